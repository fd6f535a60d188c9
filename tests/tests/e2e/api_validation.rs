//! OpenAPI validation at the edge (issue 19): an HTTPRoute rule bound to the ingress validates
//! its requests against the `orders` document stored in a real etcd. Over real sockets (HTTPS
//! to the ingress, mTLS to the `orders` sidecar, its app recording what it receives): valid
//! requests reach the app unchanged; invalid ones are answered 400 `application/problem+json`
//! naming the field and never reach it; a response that does not match is counted in
//! `/metrics` and passed on unchanged (audit); hostile bodies (10 MB, deep nesting, invalid
//! UTF-8) are refused without harming the next client; a route naming a document that is not
//! stored is refused at apply; a new document that does not compile is counted and the last
//! good compilation keeps validating.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use trellis_policies::parse_documents;
use trellis_tests::web::{Dial, WebPki};

/// What the app received: method, path and body of each request.
type Seen = Arc<Mutex<Vec<(String, String, Bytes)>>>;

/// The `orders` API: its app's paths (the ingress publishes them under `/shop`).
fn orders_api() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Orders", "version": "1"},
        "paths": {
            "/orders": {"post": {
                "parameters": [{"name": "dry_run", "in": "query", "schema": {"type": "boolean"}}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewOrder"}}}},
                "responses": {"201": {"description": "created", "content": {"application/json": {"schema": {"type": "object"}}}}}
            }},
            "/orders/{id}": {"get": {
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "one", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}}}
            }}
        },
        "components": {"schemas": {
            "NewOrder": {"type": "object", "required": ["customer", "lines"], "properties": {
                "customer": {"type": "string", "format": "email"},
                "lines": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["sku", "qty"], "properties": {
                    "sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}}}}}},
            "Order": {"type": "object", "required": ["id", "status"], "properties": {
                "id": {"type": "integer"}, "status": {"type": "string", "enum": ["open", "closed"]}}}
        }}
    })
}

fn route(version: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {{name: shop}}\nspec:\n  hosts: [api.example.com]\n  gateways: [edge]\n  rules:\n  - name: shop\n    matches: [{{path: {{prefix: /shop}}}}]\n    rewrite: {{path_prefix: /orders}}\n    backends: [{{service: orders}}]\n    validation: {{spec: {{service: orders, version: {version}}}, response: audit, max_body_bytes: 65536}}\n"
    )
}

/// The app: records every request; `GET /orders/7` answers a body the document does not
/// allow (no `status`), other gets a valid order, posts 201.
async fn orders_app(seen: Seen) -> SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let path = parts.uri.path().to_string();
                        seen.lock()
                            .unwrap()
                            .push((parts.method.to_string(), path.clone(), body));
                        let (status, out) = match (parts.method.as_str(), path.as_str()) {
                            ("GET", "/orders/7") => (200, json!({"id": 7})),
                            ("GET", _) => (200, json!({"id": 1, "status": "open"})),
                            _ => (201, json!({"created": true})),
                        };
                        let resp = http::Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(out.to_string())))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(io, svc)
                .await;
            });
        }
    });
    addr
}

async fn put(etcd: &mesh_agent::config::EtcdConfig, doc: &Value) {
    let spec = mesh_agent::api::Spec {
        service: "orders".into(),
        version: "v1".into(),
        summary: trellis_policies::validate_openapi(doc).unwrap(),
        document: doc.clone(),
    };
    mesh_agent::api::put(etcd, &[spec], false).await.unwrap();
}

async fn apply(
    etcd: &mesh_agent::config::EtcdConfig,
    yaml: &str,
) -> Result<Vec<String>, mesh_agent::policy::PolicyError> {
    let docs: Vec<_> = parse_documents(yaml, "t")
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    mesh_agent::policy::apply_as(etcd, &docs, false, "alice").await
}

struct Edge {
    web: WebPki,
    addr: SocketAddr,
}

impl Edge {
    async fn send(
        &self,
        method: &str,
        path: &str,
        ct: Option<&str>,
        body: impl Into<Bytes>,
    ) -> trellis_tests::web::HttpsReply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "api.example.com");
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let req = req.body(Full::new(body.into())).unwrap();
        let dial = Dial {
            addr: self.addr,
            from: None,
            name: "api.example.com",
            sni: true,
            h2: false,
        };
        self.web.send(dial, req).await
    }
}

/// Write raw bytes to `addr` while reading the answer (the server may answer and close before
/// the request is all written: the write's failure is not the test's).
async fn raw(addr: SocketAddr, request: Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&request).await;
        wr
    });
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out)).await;
    writer.abort();
    String::from_utf8_lossy(&out).into_owned()
}

fn metric(text: &str, series: &str) -> f64 {
    trellis_tests::client::metric(text, series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_validated_at_the_edge_and_responses_audited() {
    trellis_tests::init_logs();
    let etcd = mesh_agent::testing::EtcdCluster::start(1).await;
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());

    // A route naming a document that is not stored is refused at apply, naming it.
    let e = apply(&cfg, &route("v1")).await.unwrap_err().to_string();
    assert!(
        e.contains(
            "HTTPRoute/shop: rules[0].validation.spec: no OpenAPI document is stored for orders v1"
        ),
        "{e}"
    );
    put(&cfg, &orders_api()).await;
    apply(&cfg, &route("v1")).await.unwrap();

    let seen: Seen = Arc::default();
    let app = orders_app(seen.clone()).await;
    let pki = trellis_tests::Pki::new(&["orders", "edge"]);
    let _orders = trellis_tests::etcd_sidecar(&pki, "orders", app, etcd.endpoints(), |_| {}).await;
    let web = WebPki::new();
    web.leaf(pki.path(), "api", &["api.example.com"]);
    let gateway = trellis_tests::etcd_sidecar(
        &pki,
        "edge",
        "127.0.0.1:9".parse().unwrap(),
        etcd.endpoints(),
        |c| {
            c.proxy.ingress = Some(trellis_tests::web::loopback_ingress(
                pki.path(),
                &[("api.example.com", "api")],
                false,
            ));
        },
    )
    .await;
    let edge = Edge {
        web,
        addr: gateway.bound.ingress.expect("ingress bound"),
    };
    let admin = gateway.bound.admin;

    // Valid: reaches the app, body byte for byte, under the rewritten path.
    let order =
        json!({"customer": "ada@example.com", "lines": [{"sku": "A-1", "qty": 2}]}).to_string();
    trellis_tests::wait_for(
        Duration::from_secs(30),
        "the first validated request",
        || async { edge.send("GET", "/shop/1", None, "").await.status == 200 },
    )
    .await;
    let ok = edge
        .send(
            "POST",
            "/shop?dry_run=true&utm=x",
            Some("application/json"),
            order.clone(),
        )
        .await;
    assert_eq!(ok.status, 201, "{}", ok.body);
    let last = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (last.0.as_str(), last.1.as_str(), last.2.as_ref()),
        ("POST", "/orders", order.as_bytes())
    );
    let before = seen.lock().unwrap().len();

    // Invalid: 400 problem+json naming the field; the app never sees it.
    let bad =
        json!({"customer": "ada@example.com", "lines": [{"sku": "A-1", "qty": 0}]}).to_string();
    let r = edge
        .send("POST", "/shop", Some("application/json"), bad)
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.headers["trellis-error"], "request-invalid");
    let p: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (
            p["status"].as_u64(),
            p["in"].as_str(),
            p["pointer"].as_str()
        ),
        (Some(400), Some("body"), Some("/lines/0/qty")),
        "{p}"
    );
    assert!(
        p["detail"].as_str().unwrap().contains("/lines/0/qty"),
        "{p}"
    );
    let r = edge.send("GET", "/shop/abc", None, "").await;
    let p: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (r.status, p["in"].as_str(), p["name"].as_str()),
        (400, Some("path"), Some("id")),
        "{p}"
    );
    let r = edge
        .send(
            "POST",
            "/shop?dry_run=maybe",
            Some("application/json"),
            order.clone(),
        )
        .await;
    let p: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        (r.status, p["name"].as_str()),
        (400, Some("dry_run")),
        "{p}"
    );
    let r = edge
        .send("POST", "/shop", Some("text/plain"), order.clone())
        .await;
    assert_eq!(r.status, 415, "{}", r.body);
    let r = edge
        .send("POST", "/shop", Some("application/json"), "{\"customer\": ")
        .await;
    let p: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(r.status, 400);
    assert!(
        p["detail"].as_str().unwrap().contains("line 1 column"),
        "{p}"
    );
    assert_eq!(edge.send("DELETE", "/shop/1", None, "").await.status, 405);
    assert_eq!(edge.send("OPTIONS", "/shop", None, "").await.status, 405);
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "the app saw a refused request"
    );
    // A CORS preflight is not a call of the API: forwarded unchecked (over HTTP/2 this time).
    let preflight = Request::options("https://api.example.com/shop")
        .header("origin", "https://shop.example.com")
        .header("access-control-request-method", "POST")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let dial = Dial {
        addr: edge.addr,
        from: None,
        name: "api.example.com",
        sni: true,
        h2: true,
    };
    assert_eq!(edge.web.send(dial, preflight).await.status, 201);

    // Audit: a response the document does not allow is passed on unchanged and counted.
    let r = edge.send("GET", "/shop/7", None, "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "{\"id\":7}"));
    let series =
        "trellis_validation_response_mismatches_total{route=\"shop\",reason=\"body_schema\"}";
    trellis_tests::wait_for(Duration::from_secs(5), "the mismatch counted", || async {
        metric(
            &trellis_tests::client::admin(admin, "/metrics").await.body,
            series,
        ) == 1.0
    })
    .await;
    assert_eq!(edge.send("GET", "/shop/1", None, "").await.status, 200);
    let text = trellis_tests::client::admin(admin, "/metrics").await.body;
    assert_eq!(
        metric(&text, series),
        1.0,
        "a valid response is no mismatch"
    );
    assert_eq!(
        metric(
            &text,
            "trellis_validation_request_failures_total{route=\"shop\",reason=\"body_schema\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "trellis_validation_request_failures_total{route=\"shop\",reason=\"path_param\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "trellis_api_validation_documents"), 1.0);

    // Hostile bodies over plain HTTP, each on its own connection; the next client is served.
    let plain = gateway.bound.ingress_http.expect("http bound");
    let before = seen.lock().unwrap().len();
    let head = |len: &str| {
        format!("POST /shop HTTP/1.1\r\nhost: api.example.com\r\ncontent-type: application/json\r\n{len}\r\n")
    };
    let ten_mb = vec![b'1'; 10 << 20];
    let mut declared = head(&format!("content-length: {}\r\n", ten_mb.len())).into_bytes();
    declared.extend_from_slice(&ten_mb);
    let started = std::time::Instant::now();
    let r = raw(plain, declared).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{}", &r[..r.len().min(300)]);
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut chunked = head("transfer-encoding: chunked\r\n").into_bytes();
    for _ in 0..160 {
        chunked.extend_from_slice(format!("{:x}\r\n", 65536).as_bytes());
        chunked.extend_from_slice(&vec![b' '; 65536]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = raw(plain, chunked).await;
    assert!(r.starts_with("HTTP/1.1 413"), "{}", &r[..r.len().min(300)]);
    for body in [
        format!("{}{}", "[".repeat(30_000), "]".repeat(30_000)).into_bytes(),
        [&b"{\"customer\": \""[..], &[0xff, 0xfe], b"\"}"].concat(),
    ] {
        let mut req = head(&format!("content-length: {}\r\n", body.len())).into_bytes();
        req.extend_from_slice(&body);
        let r = raw(plain, req).await;
        assert!(r.starts_with("HTTP/1.1 400"), "{}", &r[..r.len().min(300)]);
        assert!(r.contains("not valid JSON"), "{r}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        before,
        "the app saw a hostile body"
    );
    let ok = edge
        .send("POST", "/shop", Some("application/json"), order.clone())
        .await;
    assert_eq!(ok.status, 201, "the next client is served");

    // A new document for orders v1 that does not compile (a pattern the linear-time engine
    // refuses): counted, and the last good compilation keeps validating.
    let mut broken = orders_api();
    broken["components"]["schemas"]["NewOrder"]["properties"]["customer"]["pattern"] =
        json!("(?<=a)b");
    put(&cfg, &broken).await;
    trellis_tests::wait_for(
        Duration::from_secs(20),
        "the compile failure counted",
        || async {
            let text = trellis_tests::client::admin(admin, "/metrics").await.body;
            metric(
                &text,
                "trellis_api_validation_failures_total{kind=\"compile\"}",
            ) >= 1.0
        },
    )
    .await;
    let r = edge.send("GET", "/shop/abc", None, "").await;
    assert_eq!(r.status, 400, "still validated: {}", r.body);
    assert_eq!(
        edge.send("POST", "/shop", Some("application/json"), order)
            .await
            .status,
        201
    );
}
