//! API composition at the ingress over real sockets (docs/composition.md): an aggregate's
//! calls are mesh calls over mTLS to each service's sidecar, traced as children of the
//! ingress's server span; JSON body transforms refuse bad or oversized bodies before anything
//! reaches the backend.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Request;
use http_body_util::Empty;
use trellis_proxy::config::Config;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::otlp::{Collector, CLIENT, SERVER};
use trellis_tests::web::{loopback_ingress, Dial, HttpsReply, WebPki};
use trellis_tests::{init_logs, wait_for, Pki, Sidecar};

const SERVICES: [&str; 4] = ["users", "orders", "recs", "teams"];
const HOST: &str = "api.example.com";

/// Four mesh services (each its own sidecar in front of one echo backend) and an ingress
/// gateway serving `routes` (the `http_routes` entries) over TLS and plain HTTP.
struct Edge {
    backend: Backend,
    _services: Vec<Sidecar>,
    gateway: Sidecar,
    web: WebPki,
    _pki: Pki,
}

async fn edge(collector: Option<&Collector>, routes: &str) -> Edge {
    init_logs();
    let mut names = vec!["gateway"];
    names.extend(SERVICES);
    let pki = Pki::new(&names);
    let web = WebPki::new();
    web.leaf(pki.path(), "api", &[HOST]);
    let backend = Backend::start().await;
    let traced = |cfg: &mut Config| {
        if let Some(c) = collector {
            cfg.tracing.endpoint = Some(c.endpoint());
            cfg.tracing.sampling = 0.0;
            cfg.tracing.flush_interval = Duration::from_millis(100);
        }
    };
    let mut services = Vec::new();
    for s in SERVICES {
        services.push(Sidecar::start(&pki, s, backend.addr, traced).await);
    }
    let dir = pki.path().to_path_buf();
    let gateway = Sidecar::start(&pki, "gateway", backend.addr, |cfg| {
        traced(cfg);
        cfg.ingress = Some(loopback_ingress(&dir, &[(HOST, "api")], false));
    })
    .await;
    let endpoints: String = SERVICES
        .iter()
        .zip(&services)
        .map(|(s, sc)| {
            format!(
                "  {s}:\n    endpoints: [{{address: \"{}\"}}]\n",
                sc.inbound()
            )
        })
        .collect();
    let yaml = format!("services:\n{endpoints}http_routes:\n{routes}");
    let doc = trellis_policies::parse_mesh_yaml(&yaml).expect("mesh document");
    let snap = trellis_tests::snapshot_of(&doc);
    for s in &services {
        s.apply(snap.clone()).await;
    }
    gateway.apply(snap).await;
    Edge {
        backend,
        _services: services,
        gateway,
        web,
        _pki: pki,
    }
}

impl Edge {
    fn tls(&self) -> SocketAddr {
        self.gateway.running.bound.ingress.expect("ingress bound")
    }

    fn plain(&self) -> SocketAddr {
        self.gateway
            .running
            .bound
            .ingress_http
            .expect("plain ingress bound")
    }

    /// A GET over a new TLS connection.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpsReply {
        let mut req = Request::get(path).header("host", HOST);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let dial = Dial {
            addr: self.tls(),
            from: None,
            name: HOST,
            sni: true,
            h2: false,
        };
        self.web
            .send(dial, req.body(Empty::new()).expect("request"))
            .await
    }
}

const PROFILE: &str = r#"
  profile:
    hosts: [api.example.com]
    gateways: [gateway]
    rules:
      - name: profile
        matches: [{path: {prefix: /profile}}]
        response_headers: {set: {x-composed: "yes"}}
        aggregate:
          params: /profile/{id}
          calls:
            - {name: user, service: users, path: "/echo/users/{id}"}
            - {name: orders, service: orders, path: "/slowjson/300?user={id}"}
            - {name: recs, service: recs, path: "/slowjson/3000", timeout: 100ms, required: false}
      - name: team
        matches: [{path: {prefix: /team}}]
        aggregate:
          params: /team/{id}
          merge: top_level
          calls:
            - {name: user, service: users, path: "/echo/{id}"}
            - {name: team, service: teams, path: "/echo/team-{user.method}?q={query.q}"}
      - name: broken
        matches: [{path: {prefix: /broken}}]
        aggregate:
          calls:
            - {name: user, service: users, path: /status/404}
            - {name: recs, service: recs, path: /echo/r, required: false}
      - name: late
        matches: [{path: {prefix: /late}}]
        aggregate:
          calls:
            - {name: orders, service: orders, path: /slowjson/3000, timeout: 200ms}
"#;

/// Three calls, one slow and optional: the answer comes once the slowest required call is
/// in (the optional one gave up at its own timeout), marked partial; the trace holds the
/// ingress's server span with one client span per call, each the parent of the far
/// sidecar's server span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_answers_after_its_slowest_required_call_with_one_span_per_call() {
    let c = Collector::start().await;
    let e = edge(Some(&c), PROFILE).await;
    // Warm the TLS and mesh connections (untraced: the client samples nothing).
    let r = e.get("/profile/42", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);

    let mut overheads = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let r = e.get("/profile/42", &[]).await;
        let took = start.elapsed();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(took >= Duration::from_millis(300), "{took:?}");
        overheads.push(took - Duration::from_millis(300));
    }
    overheads.sort();
    eprintln!("aggregate latency over the slowest required call (300 ms), TLS connect included: {overheads:?}");
    assert!(
        overheads[1] < Duration::from_millis(60),
        "median overhead {:?}",
        overheads[1]
    );

    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tp = format!("00-{trace}-{parent}-01");
    let r = e.get("/profile/42", &[("traceparent", &tp)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.headers["trellis-partial"], "recs");
    assert_eq!(
        r.headers["x-composed"], "yes",
        "the rule's response headers"
    );
    assert_eq!(r.headers["content-type"], "application/json");
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(v["user"]["path"], "/echo/users/42");
    assert_eq!(v["orders"]["path"], "/slowjson/300?user=42");
    assert_eq!(
        v["_partial"],
        serde_json::json!({"recs": "response-timeout"})
    );
    assert!(v.get("recs").is_none(), "{v}");
    // Each call reached its service over mTLS as the gateway.
    let peer = &v["user"]["headers"]["trellis-peer-identity"];
    assert_eq!(peer, &Pki::spiffe("gateway").as_str(), "{v}");

    wait_for(Duration::from_secs(10), "the gateway's spans", || async {
        c.trace(trace)
            .iter()
            .filter(|s| s.service == "gateway")
            .count()
            >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = c.trace(trace);
    let ours: Vec<_> = spans.iter().filter(|s| s.service == "gateway").collect();
    let servers: Vec<_> = ours.iter().filter(|s| s.kind == SERVER).collect();
    assert_eq!(servers.len(), 1, "{spans:#?}");
    let edge_span = servers[0];
    assert_eq!(edge_span.parent_span_id, parent);
    assert_eq!(edge_span.attributes["http.response.status_code"], "200");
    let calls: Vec<_> = ours.iter().filter(|s| s.kind == CLIENT).collect();
    assert_eq!(calls.len(), 3, "{spans:#?}");
    let mut called: Vec<&str> = Vec::new();
    for call in &calls {
        assert_eq!(call.parent_span_id, edge_span.span_id, "{call:#?}");
        assert_eq!(call.attributes["http.route"], "profile");
        called.push(call.attributes["peer.service"].as_str());
    }
    called.sort();
    assert_eq!(called, ["orders", "recs", "users"]);
    let recs = calls
        .iter()
        .find(|s| s.attributes["peer.service"] == "recs")
        .expect("recs call");
    assert_eq!(recs.attributes["error.type"], "response-timeout");
    for service in ["users", "orders"] {
        let call = calls
            .iter()
            .find(|s| s.attributes["peer.service"] == service)
            .expect("call");
        let far = spans
            .iter()
            .find(|s| s.service == service && s.kind == SERVER)
            .unwrap_or_else(|| panic!("{service}'s server span: {spans:#?}"));
        assert_eq!(far.parent_span_id, call.span_id);
    }
}

/// A call after the answer it names, top-level merging, a failed required call (the
/// upstream's status, named in a problem document) and a timed-out one, and paths that do not
/// fit the parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_dependencies_failures_and_bad_paths() {
    let e = edge(None, PROFILE).await;
    let r = e.get("/team/7?q=x+y%2F", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    // Top level: the later call's fields win; its path was built from the first answer and
    // the decoded, re-encoded query value.
    assert_eq!(v["path"], "/echo/team-GET?q=x%20y%2F", "{v}");
    assert!(r.headers.get("trellis-partial").is_none());

    let r = e.get("/broken", &[]).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.headers["trellis-error"], "upstream-status");
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let p: serde_json::Value = serde_json::from_str(&r.body).expect("problem JSON");
    assert_eq!(p["call"], "user");
    assert_eq!(p["service"], "users");
    assert_eq!(p["status"], 404);

    let start = Instant::now();
    let r = e.get("/late", &[]).await;
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.headers["trellis-error"], "response-timeout");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );

    for path in ["/profile", "/profile/1/extra", "/team/"] {
        let r = e.get(path, &[]).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert_eq!(r.headers["content-type"], "application/problem+json");
    }
    // A value cannot climb out of its segment.
    let r = e.get("/team/..", &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);
}

const SHOP: &str = r#"
  shop:
    hosts: [api.example.com]
    gateways: [gateway]
    rules:
      - name: orders
        matches: [{path: {prefix: /reflect}}]
        backends: [{service: orders}]
        transform:
          max_body_bytes: 4096
          request:
            remove: [/internal]
            rename: {/customer/name: /name}
            jq: '. + {total: (.items | map(.price) | add)}'
          response:
            jq: '{order: ., served_by: "edge"}'
      - name: echo
        matches: [{path: {prefix: /echo}}]
        backends: [{service: users}]
        transform:
          max_body_bytes: 1024
          response: {jq: '{method}'}
"#;

async fn post(addr: SocketAddr, path: &str, body: client::Body) -> client::Reply {
    post_with(&client::h1(addr), path, body).await
}

/// A body the gateway refuses before reading it all is sent over h2c: HTTP/1.1 would see the
/// connection close under a request still being written (a broken pipe, not the answer).
async fn post_with(c: &client::HttpClient, path: &str, body: client::Body) -> client::Reply {
    let req = Request::post(format!("http://{HOST}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    client::send(c, req).await.expect("reply")
}

const CHECKOUT: &str = r#"
  checkout:
    hosts: [api.example.com]
    gateways: [gateway]
    rules:
      - name: checkout
        matches: [{path: {prefix: /checkout}, method: POST}]
        aggregate:
          max_body_bytes: 1024
          calls:
            - {name: order, service: orders, method: POST, path: /reflect/orders, body: {pointer: /order}}
            - name: bill
              service: users
              method: PUT
              path: /reflect/bills
              body: {transform: {jq: '{total: (.order.items | map(.price) | add), who: .customer}'}}
      - name: retries
        matches: [{path: {prefix: /retries}}]
        aggregate:
          params: /retries/{k}
          calls:
            - {name: post, service: orders, method: POST, path: "/flakyjson/p{k}/1", body: {whole: true}, required: false}
            - {name: put, service: users, method: PUT, path: "/flakyjson/u{k}/1", body: {whole: true}, required: false}
"#;

/// A `POST` aggregate: each call sends its own part of the public JSON body (a pointer into
/// it, a jq reshape) with its own method; a public body that is not JSON, lacks a part, or is
/// too large is refused before any call; a `POST` call is not retried, a `PUT` call is (the
/// mesh's idempotency rules, the services' default retry policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_aggregate_sends_each_call_its_part_of_the_body() {
    let e = edge(None, CHECKOUT).await;
    let addr = e.plain();
    let body = r#"{"order": {"items": [{"price": 2}, {"price": 3}]}, "customer": "ana"}"#;
    let r = post(addr, "/checkout", client::full(body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // `/reflect` answers the body each service received.
    assert_eq!(
        r.json(),
        serde_json::json!({"order": {"items": [{"price": 2}, {"price": 3}]},
            "bill": {"total": 5, "who": "ana"}})
    );

    let seen = e.backend.requests.load(Ordering::Relaxed);
    let big = format!(r#"{{"order": "{}"}}"#, "x".repeat(2000));
    let cases: Vec<(Vec<u8>, u16, &str, &str)> = vec![
        (
            br#"{"order": {"items": ["#.to_vec(),
            400,
            "bad-json-body",
            "not JSON",
        ),
        (Vec::new(), 400, "bad-json-body", "not JSON"),
        (
            b"{\"order\": \"\xff\"}".to_vec(),
            400,
            "bad-json-body",
            "not UTF-8",
        ),
        (
            br#"{"customer": "ana"}"#.to_vec(),
            400,
            "bad-json-body",
            "nothing at `/order`",
        ),
        (
            br#"{"order": {"items": 3}}"#.to_vec(),
            400,
            "bad-json-body",
            "cannot be transformed",
        ),
        (
            big.into_bytes(),
            413,
            "body-too-large",
            "larger than 1024 bytes",
        ),
    ];
    for (body, status, cause, detail) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let r = post(addr, "/checkout", client::full(body)).await;
        assert_eq!(
            (r.status.as_u16(), r.cause()),
            (status, cause),
            "{shown}: {}",
            r.body
        );
        assert_eq!(r.headers["content-type"], "application/problem+json");
        assert!(r.body.contains(detail), "{shown}: {}", r.body);
    }
    assert_eq!(
        e.backend.requests.load(Ordering::Relaxed),
        seen,
        "no call was made for a refused body"
    );

    // Both services fail the first call with 503: the PUT is retried (and marked), the POST
    // is not.
    let r = post(addr, "/retries/1", client::full("{}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(
        v["put"],
        serde_json::json!({"call": 2, "retried": true}),
        "{v}"
    );
    assert_eq!(
        v["_partial"],
        serde_json::json!({"post": "upstream-status"}),
        "{v}"
    );
    assert_eq!(r.headers["trellis-partial"], "post");
}

/// Request and response bodies reshaped by field operations and jq; malformed, too deep, not
/// UTF-8 or too large bodies refused with a problem document before anything reaches the
/// backend; an oversized upstream answer is a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_transforms_reshape_json_and_refuse_bad_bodies_before_the_backend() {
    let e = edge(None, SHOP).await;
    let addr = e.plain();
    let body = r#"{"customer": {"name": "ana"}, "internal": true, "items": [{"price": 10}, {"price": 20}]}"#;
    let r = post(addr, "/reflect", client::full(body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        serde_json::json!({"order": {"customer": {}, "items": [{"price": 10}, {"price": 20}],
            "name": "ana", "total": 30}, "served_by": "edge"})
    );
    assert_eq!(r.headers["content-length"], r.body.len().to_string());

    let seen = e.backend.requests.load(Ordering::Relaxed);
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let huge = format!("[{}0]", "0,".repeat(10_000));
    let cases: Vec<(&str, Vec<u8>, u16, &str, &str)> = vec![
        (
            "malformed",
            b"{\"items\": [".to_vec(),
            400,
            "bad-json-body",
            "not JSON",
        ),
        (
            "deep",
            deep.into_bytes(),
            400,
            "bad-json-body",
            "deeper than",
        ),
        (
            "not utf-8",
            b"{\"a\": \"\xff\"}".to_vec(),
            400,
            "bad-json-body",
            "not UTF-8",
        ),
        (
            "no items",
            b"{\"items\": 3}".to_vec(),
            400,
            "bad-json-body",
            "transform failed",
        ),
        (
            "huge array",
            huge.into_bytes(),
            413,
            "body-too-large",
            "larger than 4096",
        ),
    ];
    let h2 = client::h2c(addr);
    for (what, body, status, cause, detail) in cases {
        let r = post_with(&h2, "/reflect", client::full(body)).await;
        assert_eq!(r.status.as_u16(), status, "{what}: {}", r.body);
        assert_eq!(r.cause(), cause, "{what}");
        assert_eq!(r.headers["content-type"], "application/problem+json");
        let p = r.json();
        assert_eq!(p["status"], status, "{what}");
        assert!(
            p["detail"].as_str().unwrap_or("").contains(detail),
            "{what}: {p}"
        );
    }
    // Too large without a length: refused once the limit is read, the rest never sent on.
    let chunks = futures_util::stream::iter((0..16).map(|_| {
        Ok::<_, client::BoxError>(http_body::Frame::data(bytes::Bytes::from(vec![b' '; 1024])))
    }));
    let streamed = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(chunks));
    let r = post_with(&h2, "/reflect", streamed).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(
        e.backend.requests.load(Ordering::Relaxed),
        seen,
        "no refused body reached the backend"
    );
    let metrics = client::admin(e.gateway.admin(), "/metrics").await.body;
    let refused = metrics
        .lines()
        .find(|l| {
            l.starts_with("trellis_proxy_errors_total") && l.contains("cause=\"bad-json-body\"")
        })
        .unwrap_or_else(|| panic!("bad-json-body counted: {metrics}"));
    assert!(refused.ends_with(" 4"), "{refused}");

    // The response side: small answers reshaped, an answer over the limit a 502.
    let r = client::get(&client::h1(addr), &format!("http://{HOST}/echo")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), serde_json::json!({"method": "GET"}));
    let pad = "p".repeat(2048);
    let req = Request::get(format!("http://{HOST}/echo"))
        .header("x-pad", pad)
        .body(client::empty())
        .expect("request");
    let r = client::send(&client::h1(addr), req).await.expect("reply");
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.cause(), "upstream-body-too-large");
}

const RPC: &str = r#"
  rpc:
    hosts: [api.example.com]
    gateways: [gateway]
    rules:
      - name: rpc
        matches: [{path: {prefix: /test.Echo}}]
        backends: [{service: orders}]
"#;

/// A message `0x0a 0x03 "abc"` (protobuf field 1 = "abc") in gRPC's framing.
const MESSAGE: &[u8] = b"\x00\x00\x00\x00\x05\x0a\x03abc";

/// POST `body` as `content_type` with `c` (HTTP/1.1 as a browser would, or h2c for a body
/// refused before it is read): status, headers, the body's exact bytes.
async fn grpc_web(
    c: &client::HttpClient,
    method: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, http::HeaderMap, Vec<u8>) {
    use http_body_util::BodyExt;
    let req = Request::post(format!("http://{HOST}/test.Echo/{method}"))
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        .body(client::full(body))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (parts.status.as_u16(), parts.headers, bytes.to_vec())
}

/// gRPC-Web's trailer frame: flag 0x80, big-endian length, `name:value\r\n` lines.
fn trailer_frame(block: &str) -> Vec<u8> {
    let mut f = vec![0x80];
    f.extend_from_slice(&(block.len() as u32).to_be_bytes());
    f.extend_from_slice(block.as_bytes());
    f
}

/// Binary and text gRPC-Web from a browser-like HTTP/1.1 client, byte for byte: the gRPC
/// service behind the ingress sees plain gRPC, the client gets its messages then the
/// trailers as the last frame (base64 for text); a text body that does not decode is refused
/// before anything reaches the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_binary_and_text_are_translated_byte_for_byte() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let e = edge(None, RPC).await;
    let h1 = client::h1(e.plain());
    let h2 = client::h2c(e.plain());
    let two = [MESSAGE, MESSAGE].concat();
    let expected = [
        two.as_slice(),
        &trailer_frame("grpc-status:0\r\nx-message-count:2\r\n"),
    ]
    .concat();

    let (status, headers, body) =
        grpc_web(&h1, "Say", "application/grpc-web+proto", two.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/grpc-web+proto");
    assert_eq!(body, expected, "{:?}", String::from_utf8_lossy(&body));

    // Text: base64 in, base64 out, the same bytes once decoded; the request as one padded
    // piece per message, as clients that encode message by message send it.
    let text = format!("{}{}", b64.encode(MESSAGE), b64.encode(MESSAGE));
    let (status, headers, body) =
        grpc_web(&h1, "Say", "application/grpc-web-text", text.into_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/grpc-web-text+proto");
    assert_eq!(
        String::from_utf8(body).expect("base64 text"),
        b64.encode(&expected)
    );

    // A failing call: no messages, the status in the trailer frame.
    let (status, _, body) = grpc_web(&h1, "Fail", "application/grpc-web", MESSAGE.to_vec()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        trailer_frame("grpc-status:5\r\ngrpc-message:no such thing\r\nx-message-count:1\r\n")
    );

    let seen = e.backend.requests.load(Ordering::Relaxed);
    for bad in [&b"AAAAAAUKA2FiYw="[..], b"!!!!", b"AAAA AAA"] {
        let (status, headers, body) =
            grpc_web(&h1, "Say", "application/grpc-web-text", bad.to_vec()).await;
        let body = String::from_utf8_lossy(&body);
        // A trailers-only gRPC error, which gRPC-Web clients read from the headers.
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["trellis-error"], "bad-grpc-web", "{body}");
        assert_eq!(headers["grpc-status"], "13");
        assert_eq!(headers["content-type"], "application/grpc-web-text+proto");
    }
    // A text body over gRPC's default message size limit (4 MiB).
    let huge = b64.encode(vec![0u8; 4 * 1024 * 1024]).into_bytes();
    let (_, headers, _) = grpc_web(&h2, "Say", "application/grpc-web-text", huge).await;
    assert_eq!(headers["trellis-error"], "body-too-large");
    assert_eq!(headers["grpc-status"], "8", "RESOURCE_EXHAUSTED");
    assert_eq!(e.backend.requests.load(Ordering::Relaxed), seen);
}

/// Where `.ci/run` installs the npm `grpc-web` client library and `xhr2`, if they are there
/// and `node` runs.
fn grpc_web_modules() -> Result<std::path::PathBuf, String> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .ok_or("no cache directory (HOME unset)")?;
    let modules = cache.join("trellis-grpc-web/node_modules");
    if !modules.join("grpc-web").is_dir() || !modules.join("xhr2").is_dir() {
        return Err(format!("no grpc-web and xhr2 in {}", modules.display()));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    match node {
        Ok(o) if o.status.success() => Ok(modules),
        _ => Err("node does not run".into()),
    }
}

/// gRPC-Web from the npm `grpc-web` library itself (the browsers' client), under node, in
/// both formats: a unary call's message, a failing call's status and message, a server
/// stream's three messages. Skipped, saying why, when node or the package is absent outside
/// CI (`.ci/run` installs them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_from_the_npm_client_library() {
    let modules = match grpc_web_modules() {
        Ok(m) => m,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: {why} (bash .ci/run installs them)");
            return;
        }
        Err(why) => panic!("{why}"),
    };
    // [`RPC`] for `localhost`: the npm client's XMLHttpRequest cannot set `Host`.
    let e = edge(None, &RPC.replace("[api.example.com]", "[localhost]")).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc-web/call.js");
    let base = format!("http://localhost:{}", e.plain().port());
    for format in ["text", "binary"] {
        let run = tokio::process::Command::new("node")
            .arg(&script)
            .arg(&base)
            .arg(format)
            .env("NODE_PATH", &modules)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), run)
            .await
            .expect("node in time")
            .expect("node runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<serde_json::Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(lines.len(), 3, "{format}: {stdout}\n{stderr}");
        assert_eq!(
            lines[0],
            serde_json::json!({"call": "Say", "code": 0, "message": "0a03616263"}),
            "{format}"
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"call": "Fail", "code": 5, "message": "no such thing"}),
            "{format}"
        );
        assert_eq!(
            lines[2],
            serde_json::json!({"call": "Repeat", "code": 0,
                "messages": ["0a03616263", "0a03616263", "0a03616263"]}),
            "{format}"
        );
    }
}

/// Careless programs (issue 22): the number in the body decides how long they run or how
/// large a value they build.
const HOSTILE: &str = r#"
  hostile:
    hosts: [api.example.com]
    gateways: [gateway]
    rules:
      - name: loop
        matches: [{path: {prefix: /reflect/loop}}]
        backends: [{service: orders}]
        transform:
          max_jq_steps: 20000000
          request: {jq: '{n: ([limit(.n; repeat(1))] | length)}'}
      - name: repeat-response
        matches: [{path: {prefix: /reflect/repeat}}]
        backends: [{service: orders}]
        transform:
          response: {jq: '{s: (.s * .n)}'}
      - name: fine
        matches: [{path: {prefix: /reflect/fine}}]
        backends: [{service: orders}]
        transform:
          request: {jq: '{n: .n} | select(.n > 0)'}
      - name: native
        matches: [{path: {prefix: /reflect/native}}]
        backends: [{service: orders}]
        transform:
          request: {jq: '{n: .n}'}
"#;

/// A body that makes its transform run past the step budget gets a clean 400
/// (`transform-budget`) and never reaches the backend; one that makes a response transform
/// build a 30 GB string a 502; and while the first runs out its budget on a jaq thread, other
/// requests on the same ingress (one worker thread here, as a sidecar pinned to one CPU runs)
/// are answered at once, natively and by jaq.
#[tokio::test(flavor = "current_thread")]
async fn a_runaway_transform_is_stopped_while_other_requests_are_served() {
    let e = edge(None, HOSTILE).await;
    let addr = e.plain();
    let seen = e.backend.requests.load(Ordering::Relaxed);
    let start = Instant::now();
    let hostile = tokio::spawn(async move {
        let r = post(addr, "/reflect/loop", client::full(r#"{"n": 1e15}"#)).await;
        (r, start.elapsed())
    });
    // Let the hostile run start before the others are sent.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for path in ["/reflect/native", "/reflect/fine", "/reflect/loop"] {
        let sent = Instant::now();
        let r = post(addr, path, client::full(r#"{"n": 3}"#)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert_eq!(r.json()["n"], 3, "{path}");
        assert!(
            sent.elapsed() < Duration::from_secs(2),
            "{path}: {:?}",
            sent.elapsed()
        );
        assert!(!hostile.is_finished(), "{path}: the hostile run was over");
    }
    let (r, took) = hostile.await.expect("hostile request");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.cause(), "transform-budget");
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let detail = r.json()["detail"].as_str().unwrap_or("").to_string();
    assert!(detail.contains("more than 20000000 steps"), "{detail}");
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert_eq!(
        e.backend.requests.load(Ordering::Relaxed),
        seen + 3,
        "the refused body never reached the backend"
    );

    // The response side: the upstream's answer asks for a 30 GB string.
    let r = post(
        addr,
        "/reflect/repeat",
        client::full(r#"{"s": "abc", "n": 10000000000}"#),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.cause(), "transform-budget");
    assert!(r.body.contains("30000000000 bytes"), "{}", r.body);
    let r = post(
        addr,
        "/reflect/repeat",
        client::full(r#"{"s": "ab", "n": 2}"#),
    )
    .await;
    assert_eq!(r.json(), serde_json::json!({"s": "abab"}));

    let metrics = client::admin(e.gateway.admin(), "/metrics").await.body;
    let counted = metrics
        .lines()
        .find(|l| {
            l.starts_with("trellis_proxy_errors_total") && l.contains("cause=\"transform-budget\"")
        })
        .unwrap_or_else(|| panic!("transform-budget counted: {metrics}"));
    assert!(counted.ends_with(" 2"), "{counted}");
}
