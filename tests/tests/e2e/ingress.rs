//! The ingress gateway over real sockets: TLS with a certificate per SNI name (exact and
//! wildcard, default for unknown names), hot reload of a certificate, HTTP -> HTTPS redirect,
//! API-key authentication of outside clients at the edge, and routing by HTTPRoute into the
//! mesh over mTLS (the app sees the gateway's SPIFFE identity).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::Empty;
use rustls_pki_types::CertificateDer;
use trellis_policies::MeshDocument;
use trellis_proxy::config::{IngressConfig, IngressHttpConfig, ServerCertificate};
use trellis_proxy::policy::access::key_digest;
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::otlp::{Collector, ReceivedSpan, CLIENT, SERVER};
use trellis_tests::web::{loopback_ingress, Dial, WebPki};
use trellis_tests::{init_logs, wait_for, Pki, Sidecar};

const KEY: &str = "edge-key-6f1d2c";

/// One HTTPS request to `addr` with SNI `sni` (also the `Host`): status, body, and the
/// certificate served.
async fn https_get(
    web: &WebPki,
    addr: SocketAddr,
    sni: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, CertificateDer<'static>) {
    let mut req = Request::get(path).header("host", sni);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let dial = Dial {
        addr,
        from: None,
        name: sni,
        sni: true,
        h2: false,
    };
    let r = web
        .send(dial, req.body(Empty::new()).expect("request"))
        .await;
    (r.status, r.body, r.served)
}

fn snapshot(orders: SocketAddr) -> Arc<Snapshot> {
    let yaml = format!(
        r#"
services:
  orders:
    endpoints: [{{address: "{orders}"}}]
http_routes:
  edge:
    hosts: [api.example.com, "*.shop.example"]
    gateways: [gateway]
    rules:
      - name: api
        backends: [{{service: orders}}]
authentication:
  edge-keys:
    service: gateway
    api_keys: {{header: x-api-key}}
consumers:
  partner:
    api_keys: [{{id: partner-1, sha256: "{digest}"}}]
"#,
        digest = key_digest(KEY.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let doc: MeshDocument = trellis_policies::parse_mesh_yaml(&yaml).expect("mesh document");
    trellis_tests::snapshot_of(&doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_terminates_tls_per_sni_authenticates_and_routes_into_the_mesh() {
    init_logs();
    let pki = Pki::new(&["gateway", "orders"]);
    let web = WebPki::new();
    let dir = pki.path();
    let api_der = web.leaf(dir, "api", &["api.example.com"]);
    let shop_der = web.leaf(dir, "shop", &["*.shop.example"]);
    let backend = Backend::start().await;
    // orders believes the consumer only from the gateway (the default believes no peer).
    let orders = Sidecar::start(&pki, "orders", backend.addr, |c| {
        c.authorization.consumer_from_peers = vec![Pki::spiffe("gateway")];
    })
    .await;
    let gateway = Sidecar::start(&pki, "gateway", backend.addr, |c| {
        c.ingress = Some(loopback_ingress(
            dir,
            &[("api.example.com", "api"), ("*.shop.example", "shop")],
            true,
        ));
    })
    .await;
    let snap = snapshot(orders.inbound());
    orders.apply(snap.clone()).await;
    gateway.apply(snap).await;
    let tls_addr = gateway.running.bound.ingress.expect("ingress bound");
    let http_addr = gateway.running.bound.ingress_http.expect("http bound");

    // SNI picks the certificate: exact name, then the wildcard.
    let (status, body, served) = https_get(
        &web,
        tls_addr,
        "api.example.com",
        "/echo",
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served, api_der);
    let seen: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(
        seen["headers"]["trellis-peer-identity"],
        Pki::spiffe("gateway")
    );
    assert_eq!(seen["headers"]["trellis-consumer"], "partner");
    assert!(seen["headers"].get("x-api-key").is_none());
    let (status, _, served) = https_get(
        &web,
        tls_addr,
        "web.shop.example",
        "/echo",
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(served, shop_der);

    // Outside clients authenticate at the edge.
    let (status, body, _) = https_get(&web, tls_addr, "api.example.com", "/echo", &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = https_get(
        &web,
        tls_addr,
        "api.example.com",
        "/echo",
        &[("x-api-key", "nope")],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "only admitted requests reach the app"
    );

    // Plain HTTP is redirected to HTTPS with the path kept.
    let c = client::h1(http_addr);
    let r = client::send(
        &c,
        Request::get(format!("http://{http_addr}/echo?x=1"))
            .header("host", "api.example.com")
            .body(client::empty())
            .expect("request"),
    )
    .await
    .expect("reply");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.headers["location"],
        format!("https://api.example.com:{}/echo?x=1", tls_addr.port())
    );

    // A new certificate for api.example.com is picked up without a restart.
    let new_der = web.leaf(dir, "api", &["api.example.com"]);
    assert_ne!(new_der, api_der);
    wait_for(Duration::from_secs(5), "new certificate served", || {
        let new_der = new_der.clone();
        let web = &web;
        async move {
            https_get(
                web,
                tls_addr,
                "api.example.com",
                "/echo",
                &[("x-api-key", KEY)],
            )
            .await
            .2 == new_der
        }
    })
    .await;
    let text = client::admin(gateway.admin(), "/metrics").await.body;
    // Both certificates' expiry, by first host name (rcgen's default validity ends in 4096).
    for host in ["api.example.com", "*.shop.example"] {
        let exp = client::metric(
            &text,
            &format!("trellis_ingress_cert_expiry_timestamp_seconds{{host=\"{host}\"}}"),
        );
        assert!(exp > 4.0e9, "{host}: {exp}");
    }
    let dump = client::admin(gateway.admin(), "/config_dump").await.json();
    assert_eq!(dump["ingress_certificates"][0]["host"], "api.example.com");
    assert!(
        client::metric(&text, "trellis_connections_total{direction=\"ingress\"}") >= 6.0,
        "{text}"
    );
    // Two routed requests to orders (and the reload probes), two refused under the gateway.
    assert!(
        client::metric(
            &text,
            "trellis_requests_total{direction=\"ingress\",service=\"orders\",route=\"api\",status_code=\"200\"}"
        ) >= 3.0,
        "{text}"
    );
    assert_eq!(
        client::metric(
            &text,
            "trellis_requests_total{direction=\"ingress\",service=\"gateway\",route=\"default\",status_code=\"401\"}"
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn an_ingress_that_cannot_bind_names_its_own_listener_and_address() {
    init_logs();
    let pki = Pki::new(&["gateway"]);
    let web = WebPki::new();
    web.leaf(pki.path(), "api", &["api.example.com"]);
    // Both ingress ports are taken by someone else.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    let taken_http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_http_addr = taken_http.local_addr().expect("addr");
    for (tls, http, what, addr) in [
        (taken_addr, None, "ingress listener", taken_addr),
        (
            "127.0.0.1:0".parse().expect("addr"),
            Some(taken_http_addr),
            "ingress http listener",
            taken_http_addr,
        ),
    ] {
        let mut cfg = trellis_proxy::testing::config(
            "gateway",
            pki.path(),
            "127.0.0.1:9".parse().expect("addr"),
        );
        cfg.ingress = Some(IngressConfig {
            listen: tls,
            certificates: vec![ServerCertificate {
                hosts: vec!["api.example.com".into()],
                cert: pki.path().join("api.pem"),
                key: pki.path().join("api-key.pem"),
            }],
            http: http.map(|listen| IngressHttpConfig {
                listen,
                redirect_to_https: true,
            }),
            trusted_proxies: Vec::new(),
            portal: None,
        });
        let admin = cfg.admin.listen;
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let err = match trellis_proxy::app::Proxy::new(cfg, rx).start().await {
            Ok(_) => panic!("{what} on a taken port must not start"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(what) && err.contains(&addr.to_string()),
            "error names the listener and its address: {err}"
        );
        if admin.port() != 0 {
            assert!(!err.contains(&admin.to_string()), "{err}");
        }
    }
}

/// The spans of `trace` once `n` have arrived (and a flush later, none more).
async fn spans_of(c: &Collector, trace: &str, n: usize) -> Vec<ReceivedSpan> {
    wait_for(Duration::from_secs(10), "spans exported", || async {
        c.trace(trace).len() >= n
    })
    .await;
    // Flushed every 100 ms: a span the request should not have made would be here by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = c.trace(trace);
    assert_eq!(spans.len(), n, "{spans:#?}");
    spans
}

fn one(spans: &[ReceivedSpan], service: &str, kind: i32) -> ReceivedSpan {
    let mut of = spans
        .iter()
        .filter(|s| s.service == service && s.kind == kind);
    let span = of
        .next()
        .unwrap_or_else(|| panic!("{service} {kind}: {spans:#?}"));
    assert!(
        of.next().is_none(),
        "one {service} span of kind {kind}: {spans:#?}"
    );
    span.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_traces_every_request_it_answers_refused_or_routed() {
    init_logs();
    let c = Collector::start().await;
    let traced = |cfg: &mut trellis_proxy::config::Config| {
        cfg.tracing.endpoint = Some(c.endpoint());
        // Only what the client sampled is traced.
        cfg.tracing.sampling = 0.0;
        cfg.tracing.flush_interval = Duration::from_millis(100);
    };
    let pki = Pki::new(&["gateway", "orders"]);
    let web = WebPki::new();
    let dir = pki.path();
    web.leaf(dir, "api", &["api.example.com"]);
    let backend = Backend::start().await;
    let orders = Sidecar::start(&pki, "orders", backend.addr, |cfg| {
        traced(cfg);
        cfg.authorization.consumer_from_peers = vec![Pki::spiffe("gateway")];
    })
    .await;
    let gateway = Sidecar::start(&pki, "gateway", backend.addr, |cfg| {
        traced(cfg);
        cfg.ingress = Some(loopback_ingress(dir, &[("api.example.com", "api")], true));
    })
    .await;
    let snap = snapshot(orders.inbound());
    orders.apply(snap.clone()).await;
    gateway.apply(snap).await;
    let tls_addr = gateway.running.bound.ingress.expect("ingress bound");
    let parent = "00f067aa0ba902b7";

    // Routed: the gateway's server span (the client's child), its client span, the far
    // sidecar's server span, in one line of descent.
    let trace = "5bf92f3577b34da6a3ce929d0e0e4731";
    let keyed = |tp: String| {
        let web = &web;
        async move {
            let headers = [("x-api-key", KEY), ("traceparent", tp.as_str())];
            https_get(web, tls_addr, "api.example.com", "/echo", &headers).await
        }
    };
    let (status, body, _) = keyed(format!("00-{trace}-{parent}-01")).await;
    assert_eq!(status, 200, "{body}");
    let spans = spans_of(&c, trace, 3).await;
    let edge = one(&spans, "gateway", SERVER);
    let call = one(&spans, "gateway", CLIENT);
    let far = one(&spans, "orders", SERVER);
    assert_eq!(edge.parent_span_id, parent);
    assert_eq!(call.parent_span_id, edge.span_id);
    assert_eq!(far.parent_span_id, call.span_id);
    assert_eq!(edge.attributes["url.scheme"], "https");
    assert_eq!(edge.attributes["url.path"], "/echo");
    assert_eq!(edge.attributes["server.address"], "api.example.com");
    assert_eq!(edge.attributes["client.address"], "127.0.0.1");
    assert_eq!(edge.attributes["http.response.status_code"], "200");
    assert_eq!(edge.status, 0, "{edge:#?}");
    let seen: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(
        seen["headers"]["traceparent"],
        format!("00-{trace}-{}-01", far.span_id)
    );

    // Refused at the edge: one server span, with the status and the cause; nothing routed.
    let trace = "5bf92f3577b34da6a3ce929d0e0e4732";
    let tp = format!("00-{trace}-{parent}-01");
    let (status, _, _) = https_get(
        &web,
        tls_addr,
        "api.example.com",
        "/echo",
        &[("traceparent", &tp)],
    )
    .await;
    assert_eq!(status, 401);
    let spans = spans_of(&c, trace, 1).await;
    let edge = one(&spans, "gateway", SERVER);
    assert_eq!(edge.parent_span_id, parent);
    assert_eq!(edge.attributes["http.response.status_code"], "401");
    assert_eq!(edge.attributes["error.type"], "unauthenticated");
    assert_eq!(
        edge.status, 0,
        "a 4xx is the client's error, not the server's"
    );

    // Routed to nothing: the gateway answers itself, a server error named by its cause.
    let trace = "5bf92f3577b34da6a3ce929d0e0e4733";
    let closed_port = trellis_tests::ClosedPort::new();
    let closed = closed_port.addr;
    gateway.apply(snapshot(closed)).await;
    let (status, _, _) = keyed(format!("00-{trace}-{parent}-01")).await;
    assert!(status >= 500, "{status}");
    let spans = spans_of(&c, trace, 2).await;
    let edge = one(&spans, "gateway", SERVER);
    let call = one(&spans, "gateway", CLIENT);
    assert_eq!(call.parent_span_id, edge.span_id);
    assert_eq!(
        edge.attributes["http.response.status_code"],
        status.to_string()
    );
    assert_eq!(edge.attributes["error.type"], call.attributes["error.type"]);
    assert_eq!(edge.status, 2, "{edge:#?}");
}
