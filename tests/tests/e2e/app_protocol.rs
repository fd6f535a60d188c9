//! `inbound.app_protocol: auto` over real sockets: apps that speak only HTTP/1.1, only h2c, or
//! gRPC (h2c only), and an app that speaks both, each behind its own sidecar, reached through
//! the ingress (HTTPS, HTTP/1.1 and HTTP/2 by ALPN) and from another app's sidecar (HTTP/1.1
//! and h2c). Every combination must answer 200 on the first request and after the sidecar
//! learned the app's protocol, a body must arrive once and whole, and the app must see no
//! extra request (the protocol probe sends no request).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::Full;
use trellis_policies::MeshDocument;
use trellis_proxy::config::{IngressConfig, ServerCertificate};
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::backend::{grpc_frame, grpc_messages, Backend, Speaks};
use trellis_tests::client::{self, full};
use trellis_tests::web::{Dial, HttpsReply, WebPki};
use trellis_tests::{init_logs, Pki, Sidecar};

/// Each app: service name, what it speaks, whether it is called with gRPC.
const APPS: [(&str, Speaks); 4] = [
    ("plain", Speaks::Http1),
    ("h2only", Speaks::H2c),
    ("grpc", Speaks::H2c),
    ("both", Speaks::Both),
];

/// Bytes uploaded per body: larger than one HTTP/2 frame and one socket read.
const UPLOAD: usize = 100_000;

struct World {
    _pki: Pki,
    web: WebPki,
    backends: Vec<Backend>,
    sidecars: Vec<Sidecar>,
    client: Sidecar,
    gateway: Sidecar,
}

fn snapshot(apps: &[(&str, SocketAddr)]) -> Arc<Snapshot> {
    let mut yaml = String::from("services:\n");
    for (name, addr) in apps {
        yaml += &format!("  {name}:\n    endpoints: [{{address: \"{addr}\"}}]\n");
    }
    yaml += "http_routes:\n";
    for (name, _) in apps {
        yaml += &format!(
            "  {name}:\n    hosts: [{name}.example.com]\n    gateways: [gateway]\n    rules:\n      - name: all\n        backends: [{{service: {name}}}]\n"
        );
    }
    let doc: MeshDocument = trellis_policies::parse_mesh_yaml(&yaml).expect("mesh document");
    trellis_tests::snapshot_of(&doc)
}

impl World {
    async fn start() -> Self {
        init_logs();
        let mut names: Vec<&str> = APPS.iter().map(|(n, _)| *n).collect();
        names.extend(["gateway", "client"]);
        let pki = Pki::new(&names);
        let web = WebPki::new();
        web.leaf(pki.path(), "edge", &["*.example.com"]);
        let mut backends = Vec::new();
        let mut sidecars = Vec::new();
        let mut routed = Vec::new();
        for (name, speaks) in APPS {
            let b = Backend::start_speaking("127.0.0.1:0".parse().expect("addr"), speaks).await;
            // The default `app_protocol` (auto): nothing tells the sidecar what the app speaks.
            let s = Sidecar::start(&pki, name, b.addr, |_| {}).await;
            routed.push((name, s.inbound()));
            backends.push(b);
            sidecars.push(s);
        }
        let nowhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let client = Sidecar::start(&pki, "client", nowhere, |_| {}).await;
        let dir = pki.path();
        let gateway = Sidecar::start(&pki, "gateway", nowhere, |c| {
            c.ingress = Some(IngressConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                certificates: vec![ServerCertificate {
                    hosts: vec!["*.example.com".into()],
                    cert: dir.join("edge.pem"),
                    key: dir.join("edge-key.pem"),
                }],
                http: None,
                trusted_proxies: Vec::new(),
                portal: None,
            });
        })
        .await;
        let snap = snapshot(&routed);
        for s in sidecars.iter().chain([&client, &gateway]) {
            s.apply(snap.clone()).await;
        }
        Self {
            _pki: pki,
            web,
            backends,
            sidecars,
            client,
            gateway,
        }
    }

    fn requests(&self) -> u64 {
        self.backends
            .iter()
            .map(|b| b.requests.load(Ordering::Relaxed))
            .sum()
    }

    /// Through the ingress, by HTTPS with `h2` chosen by ALPN.
    async fn edge(&self, h2: bool, req: Request<Full<Bytes>>) -> HttpsReply {
        let host = req.uri().host().expect("absolute URI").to_string();
        let dial = Dial {
            addr: self.gateway.running.bound.ingress.expect("ingress bound"),
            from: None,
            name: &host,
            sni: true,
            h2,
        };
        let (mut parts, body) = req.into_parts();
        if !h2 {
            // HTTP/1.1: origin form and a Host header, as curl sends it.
            let pq = parts
                .uri
                .path_and_query()
                .expect("path")
                .as_str()
                .to_string();
            parts.uri = pq.parse().expect("origin form");
            parts
                .headers
                .insert("host", host.parse().expect("host header"));
        }
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            self.web.send(dial, Request::from_parts(parts, body)),
        )
        .await
        .expect("ingress answers within 20 s")
    }

    /// From the `client` app's sidecar: HTTP/1.1 or h2c (prior knowledge) to its outbound.
    async fn mesh(&self, h2: bool, req: Request<Full<Bytes>>) -> (u16, String, Option<String>) {
        let c = if h2 {
            client::h2c(self.client.outbound())
        } else {
            client::h1(self.client.outbound())
        };
        let (parts, body) = req.into_parts();
        let body = full(
            http_body_util::BodyExt::collect(body)
                .await
                .expect("full body")
                .to_bytes(),
        );
        let resp = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            c.request(Request::from_parts(parts, body)),
        )
        .await
        .expect("outbound answers within 20 s")
        .expect("response");
        let status = resp.status().as_u16();
        let collected = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body");
        let grpc_status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
        (status, body, grpc_status)
    }
}

fn echo(app: &str, edge: bool) -> Request<Full<Bytes>> {
    let host = if edge {
        format!("{app}.example.com")
    } else {
        app.to_string()
    };
    Request::get(format!("https://{host}/echo"))
        .body(Full::new(Bytes::new()))
        .expect("request")
}

fn upload(app: &str, edge: bool) -> Request<Full<Bytes>> {
    let host = if edge {
        format!("{app}.example.com")
    } else {
        app.to_string()
    };
    Request::post(format!("https://{host}/upload"))
        .body(Full::new(Bytes::from(vec![b'u'; UPLOAD])))
        .expect("request")
}

fn grpc_unary(app: &str, edge: bool, msg: &[u8]) -> Request<Full<Bytes>> {
    let host = if edge {
        format!("{app}.example.com")
    } else {
        app.to_string()
    };
    Request::post(format!("https://{host}/test.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_frame(msg)))
        .expect("request")
}

/// The version the app saw, from `/echo`'s JSON.
fn version(body: &str) -> String {
    let j: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    j["version"].as_str().unwrap_or("").to_string()
}

/// What the app must see for a caller of `caller_h2`: its own protocol if it speaks only one,
/// the caller's if it speaks both.
fn expected_version(speaks: Speaks, caller_h2: bool) -> &'static str {
    match speaks {
        Speaks::Http1 => "HTTP/1.1",
        Speaks::H2c => "HTTP/2.0",
        Speaks::Both if caller_h2 => "HTTP/2.0",
        Speaks::Both => "HTTP/1.1",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_reaches_h1_h2c_and_grpc_apps_from_h1_and_h2_clients_at_the_edge_and_in_the_mesh() {
    let world = World::start().await;
    let mut sent = 0u64;
    let mut failures = Vec::new();
    // Twice through the matrix: the first round meets each app unknown, the second after the
    // sidecar learned (or probed) what it speaks.
    for round in 0..2 {
        for edge in [true, false] {
            for caller_h2 in [false, true] {
                for (app, speaks) in APPS {
                    let via = format!(
                        "round {round}, {} {} -> {app}",
                        if edge { "ingress" } else { "mesh" },
                        if caller_h2 { "h2" } else { "h1" }
                    );
                    if app == "grpc" {
                        if !caller_h2 {
                            continue; // gRPC needs HTTP/2 end to end.
                        }
                        let msg = format!("ping {round}");
                        let req = grpc_unary(app, edge, msg.as_bytes());
                        let (status, body, grpc_status) = if edge {
                            let r = world.edge(true, req).await;
                            let gs = r
                                .trailers
                                .as_ref()
                                .and_then(|t| t.get("grpc-status"))
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_string);
                            (r.status, r.body, gs)
                        } else {
                            world.mesh(true, req).await
                        };
                        sent += 1;
                        let mut buf = BytesMut::from(body.as_bytes());
                        let msgs = grpc_messages(&mut buf);
                        if status != 200
                            || grpc_status.as_deref() != Some("0")
                            || msgs.len() != 1
                            || msgs[0].as_ref() != msg.as_bytes()
                        {
                            failures.push(format!(
                                "{via} gRPC: {status} grpc-status {grpc_status:?} {body:?}"
                            ));
                        }
                        continue;
                    }
                    for req in [echo(app, edge), upload(app, edge)] {
                        let is_echo = req.uri().path() == "/echo";
                        let (status, body) = if edge {
                            let r = world.edge(caller_h2, req).await;
                            (r.status, r.body)
                        } else {
                            let (s, b, _) = world.mesh(caller_h2, req).await;
                            (s, b)
                        };
                        sent += 1;
                        let want = if is_echo {
                            None
                        } else {
                            Some(UPLOAD.to_string())
                        };
                        let ok = status == 200
                            && match &want {
                                None => version(&body) == expected_version(speaks, caller_h2),
                                Some(n) => &body == n,
                            };
                        if !ok {
                            let seen = if is_echo && status == 200 {
                                version(&body)
                            } else {
                                body.chars().take(200).collect()
                            };
                            failures.push(format!(
                                "{via} {}: {status} {seen}",
                                if is_echo { "GET /echo" } else { "POST /upload" }
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // One request reached an app per request sent: no retry or fallback sent anything twice,
    // and no failed attempt was hidden by a retry.
    assert_eq!(world.requests(), sent, "requests seen by the apps");
    // At most one retry each: rarely (about one full-suite run in four) a pooled HTTP/1.1
    // connection to an app is canceled by hyper before a request with an already-taken body
    // is written ("received unexpected message from connection"); the app never saw it, the
    // caller's sidecar sends it again, and the count above proves nothing arrived twice.
    for (who, sidecar) in [("gateway", &world.gateway), ("client", &world.client)] {
        let n = retries(sidecar.admin()).await;
        assert!(n <= 1.0, "the {who} sidecar retried {n} times");
    }
    // Each sidecar shows what it found its app to speak.
    for ((app, speaks), sidecar) in APPS.iter().zip(&world.sidecars) {
        let dump = client::admin(sidecar.admin(), "/config_dump").await.json();
        let found = &dump["app_speaks"];
        let (h1, h2c) = match speaks {
            Speaks::Http1 => ("yes", "no"),
            Speaks::H2c if *app == "grpc" => ("unknown", "yes"),
            Speaks::H2c => ("no", "yes"),
            Speaks::Both => ("yes", "yes"),
        };
        assert_eq!(found["http1"], h1, "{app}: {found}");
        assert_eq!(found["h2c"], h2c, "{app}: {found}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_h2_callers_reach_an_h1_app_without_upstream_failures() {
    // The case: `curl --http2` through the ingress to an HTTP/1.1-only app. Besides
    // the answers, no attempt may fail on the way (no retry hides a protocol guess).
    let world = World::start().await;
    for _ in 0..5 {
        let r = world.edge(true, echo("plain", true)).await;
        assert_eq!(r.status, 200, "{:?} {}", r.headers, r.body);
        assert_eq!(version(&r.body), "HTTP/1.1");
    }
    assert_eq!(
        retries(world.gateway.admin()).await,
        0.0,
        "the gateway retried"
    );
    assert_eq!(world.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_follows_an_app_that_changes_protocol_across_restarts() {
    // What the sidecar learned goes stale when the app is replaced on the same port by one
    // speaking another protocol: the first request after each restart must still succeed
    // (fresh probes prove the app never saw the failed attempt), and the app sees each
    // request once.
    init_logs();
    let pki = Pki::new(&["client", "app"]);
    let first = Backend::start_speaking("127.0.0.1:0".parse().expect("addr"), Speaks::H2c).await;
    let addr = first.addr;
    let app = Sidecar::start(&pki, "app", addr, |_| {}).await;
    let nowhere: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let client = Sidecar::start(&pki, "client", nowhere, |_| {}).await;
    app.route(&[]).await;
    client.route(&[("app", &[app.inbound()])]).await;
    let h1 = client::h1(client.outbound());
    let h2 = client::h2c(client.outbound());
    let check = |who: &str, r: client::Reply, want: &str| {
        assert_eq!(r.status, 200, "{who}: {}", r.body);
        assert_eq!(version(&r.body), want, "{who}");
    };

    check(
        "h2 -> h2c app",
        client::get(&h2, "http://app/echo").await,
        "HTTP/2.0",
    );
    check(
        "h1 -> h2c app",
        client::get(&h1, "http://app/echo").await,
        "HTTP/2.0",
    );
    assert_eq!(first.requests.load(Ordering::Relaxed), 2);

    first.stop().await;
    // An app restart takes a moment: the sidecar's pooled connection to the old process sees
    // its end (a request racing that close is retried by the caller's sidecar, which this
    // test would count as a hidden failure).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let second = Backend::start_speaking(addr, Speaks::Http1).await;
    check(
        "h2 -> restarted as h1",
        client::get(&h2, "http://app/echo").await,
        "HTTP/1.1",
    );
    check(
        "h1 -> restarted as h1",
        client::get(&h1, "http://app/echo").await,
        "HTTP/1.1",
    );
    let up = client::send(
        &h2,
        Request::post("http://app/upload")
            .body(full(vec![b'u'; UPLOAD]))
            .expect("request"),
    )
    .await
    .expect("upload answered");
    assert_eq!((up.status.as_u16(), up.body), (200, UPLOAD.to_string()));
    assert_eq!(second.requests.load(Ordering::Relaxed), 3);

    second.stop().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let third = Backend::start_speaking(addr, Speaks::H2c).await;
    check(
        "h1 -> restarted as h2c",
        client::get(&h1, "http://app/echo").await,
        "HTTP/2.0",
    );
    check(
        "h2 -> restarted as h2c",
        client::get(&h2, "http://app/echo").await,
        "HTTP/2.0",
    );
    assert_eq!(third.requests.load(Ordering::Relaxed), 2);
    // At most one retry by the client sidecar: the same rare cancel of a pooled HTTP/1.1 app
    // connection by hyper as in the matrix test above (seen once in about a dozen full runs
    // here); the app never saw the canceled request, and the per-app counts above prove each
    // request arrived exactly once.
    let n = retries(client.admin()).await;
    assert!(n <= 1.0, "the client sidecar retried {n} times");
}

/// Retries a sidecar made, from its metrics.
async fn retries(admin: SocketAddr) -> f64 {
    let metrics = client::admin(admin, "/metrics").await.body;
    metrics
        .lines()
        .filter(|l| l.starts_with("trellis_outlier_events_total") && l.contains("event=\"retry\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
