//! gRPC-JSON transcoding at the ingress (docs/composition.md) over real sockets: plain
//! HTTP/1.1 JSON requests to the gateway become gRPC calls over mTLS to the `books` sidecar
//! and the test gRPC service behind it (`tests/proto/transcode.proto`, its descriptor set in
//! the policy, stored in a real etcd), and its answers JSON again. Bad input is refused before
//! anything reaches the service; a policy that does not compile is refused and the last good
//! one keeps serving.

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use http::Request;
use serde_json::{json, Value};
use trellis_policies::parse_documents;
use trellis_tests::backend::{grpc_frame, Backend};
use trellis_tests::client::{self, HttpClient, Reply};

const HOST: &str = "api.example.com";
/// Its server streams as newline-delimited JSON.
const ND_HOST: &str = "nd.example.com";
const PREFIX: &str = "/trellis/v1";
const DESCRIPTOR_SET: &[u8] = include_bytes!("../../proto/transcode.pb");

/// The `books` route: `service` of the descriptor set exposed on both hosts.
fn route(service: &str) -> String {
    let set = base64::engine::general_purpose::STANDARD.encode(DESCRIPTOR_SET);
    format!(
        r#"apiVersion: trellis.dev/v1
kind: HTTPRoute
metadata: {{name: books}}
spec:
  hosts: [{HOST}, {ND_HOST}]
  gateways: [edge]
  rules:
    - name: books-nd
      matches: [{{headers: [{{name: host, exact: {ND_HOST}}}]}}]
      backends: [{{service: books}}]
      grpc_transcode: {{descriptor_set: "{set}", service: {service}, stream: ndjson}}
    - name: books
      backends: [{{service: books}}]
      grpc_transcode:
        descriptor_set: "{set}"
        service: {service}
        max_body_bytes: 4096
"#
    )
}

async fn apply(
    etcd: &mesh_agent::config::EtcdConfig,
    yaml: &str,
) -> Result<Vec<String>, mesh_agent::policy::PolicyError> {
    let docs: Vec<_> = parse_documents(yaml, "t")
        .into_iter()
        .map(|d| d.expect("a policy document"))
        .collect();
    mesh_agent::policy::apply_as(etcd, &docs, false, "alice").await
}

async fn call(c: &HttpClient, method: &str, host: &str, path: &str, body: &[u8]) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{host}{path}"))
        .header("content-type", "application/json")
        .body(client::full(body.to_vec()))
        .expect("request");
    client::send(c, req).await.expect("reply")
}

/// A 4xx refusal: its status, `trellis-error`, and the problem document's `field`.
fn refusal(r: &Reply) -> (u16, String, Value) {
    assert_eq!(
        r.headers["content-type"], "application/problem+json",
        "{}",
        r.body
    );
    let doc: Value = serde_json::from_str(&r.body).expect("problem document");
    (
        r.status.as_u16(),
        r.cause().to_string(),
        doc["field"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_requests_reach_a_grpc_service_and_its_answers_come_back_as_json() {
    trellis_tests::init_logs();
    let etcd = mesh_agent::testing::EtcdCluster::start(1).await;
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    apply(&cfg, &route("test.Echo")).await.expect("applied");
    let backend = Backend::start().await;
    let pki = trellis_tests::Pki::new(&["books", "edge"]);
    let _books =
        trellis_tests::etcd_sidecar(&pki, "books", backend.addr, etcd.endpoints(), |_| {}).await;
    let web = trellis_tests::web::WebPki::new();
    web.leaf(pki.path(), "api", &[HOST]);
    let gateway = trellis_tests::etcd_sidecar(
        &pki,
        "edge",
        "127.0.0.1:9".parse().expect("address"),
        etcd.endpoints(),
        |c| {
            let ingress = trellis_tests::web::loopback_ingress(pki.path(), &[(HOST, "api")], false);
            c.proxy.ingress = Some(ingress);
        },
    )
    .await;
    let plain = gateway.bound.ingress_http.expect("plain ingress bound");
    let h1 = client::h1(plain);

    // Unary GET: path variables (one of two segments), the rest from the query string.
    let path = "/v1/shelves/3/items/42?title=hi%21&tags=a&tags=b&draft=true";
    trellis_tests::wait_for(
        Duration::from_secs(30),
        "the first transcoded call",
        || async { call(&h1, "GET", HOST, path, b"").await.status == 200 },
    )
    .await;
    let r = call(&h1, "GET", HOST, path, b"").await;
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        r.json(),
        json!({"name": "shelves/3", "id": "42", "title": "hi!", "tags": ["a", "b"], "draft": true})
    );

    // POST with the body as the message; well-known types in their JSON forms.
    let item = json!({"title": "t", "created": "2026-12-03T10:00:00Z", "ttl": "2s",
        "kind": "BOOK", "data": "aGk=", "count": 3, "big": "18446744073709551615"});
    let r = call(
        &h1,
        "POST",
        HOST,
        "/v1/shelves/1/items",
        item.to_string().as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut want = item.clone();
    want["name"] = json!("shelves/1");
    assert_eq!(r.json(), want);
    // PATCH with the body as one field.
    let r = call(
        &h1,
        "PATCH",
        HOST,
        "/v1/items/9/meta",
        br#"{"author": "ana"}"#,
    )
    .await;
    assert_eq!(r.json(), json!({"id": "9", "meta": {"author": "ana"}}));

    // Server streaming: a JSON array, or one document per line.
    let r = call(&h1, "GET", HOST, "/v1/items/5:stream", b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, r#"[{"id":"5"},{"id":"5"},{"id":"5"}]"#);
    let r = call(&h1, "GET", ND_HOST, "/v1/items/6:stream", b"").await;
    assert_eq!(r.headers["content-type"], "application/x-ndjson");
    assert_eq!(r.body, "{\"id\":\"6\"}\n".repeat(3));

    // A gRPC error status: its HTTP mapping, with google.rpc.Status's fields.
    let r = call(&h1, "GET", HOST, "/v1/missing/1", b"").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let doc = r.json();
    assert_eq!(
        (&doc["code"], &doc["grpc_status"], &doc["message"]),
        (&json!(5), &json!("NOT_FOUND"), &json!("no such thing"))
    );

    // gRPC callers of the same route pass as they are.
    let grpc = Request::post(format!("http://{HOST}/test.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(client::full(grpc_frame(b"\x10\x07")))
        .expect("request");
    let r = client::send(&client::h2c(plain), grpc)
        .await
        .expect("reply");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/grpc");

    // Bad input is refused before anything reaches the service.
    let seen = backend.requests.load(Ordering::Relaxed);
    let plain_call = "/test.Echo/Plain";
    for (body, want) in [
        (
            &br#"{"title": "a",}"#[..],
            (400, "bad-json-body", Value::Null),
        ),
        (br#"{"title": "\xff"}"#, (400, "bad-json-body", Value::Null)),
        (
            br#"{"nope": 1}"#,
            (400, "bad-request-message", json!("nope")),
        ),
        (
            br#"{"meta": {"pages": "many"}}"#,
            (400, "bad-request-message", json!("meta.pages")),
        ),
        (
            br#"{"kind": "NOVEL"}"#,
            (400, "bad-request-message", json!("kind")),
        ),
        (b"[1, 2]", (400, "bad-request-message", Value::Null)),
    ] {
        let r = call(&h1, "POST", HOST, plain_call, body).await;
        assert_eq!(
            refusal(&r),
            (want.0, want.1.to_string(), want.2),
            "{}",
            r.body
        );
    }
    let big = format!(r#"{{"title": "{}"}}"#, "x".repeat(5000));
    let r = call(&h1, "POST", HOST, plain_call, big.as_bytes()).await;
    assert_eq!(refusal(&r).0, 413, "{}", r.body);
    let r = call(&h1, "GET", HOST, "/v1/items/1?nope=1", b"").await;
    assert_eq!(
        refusal(&r),
        (400, "bad-request-message".into(), json!("nope"))
    );
    let r = call(&h1, "GET", HOST, "/v2/items/1", b"").await;
    assert_eq!(refusal(&r).0, 404, "{}", r.body);
    assert_eq!(
        backend.requests.load(Ordering::Relaxed),
        seen,
        "nothing reached the service"
    );

    // A version naming a service the descriptor set lacks is refused by `policy apply` (and
    // `validate`), and, written past validation, by the gateway, which keeps the last good
    // table.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("books.yaml");
    std::fs::write(&file, route("test.Nope")).expect("written");
    let e = mesh_agent::policy::load_documents(&file)
        .map(|_| ())
        .expect_err("refused by `policy apply`")
        .to_string();
    assert!(
        e.contains(
            "grpc_transcode.service: `test.Nope` is not in the descriptor set (it has: test.Echo)"
        ),
        "{e}"
    );
    let bad = parse_documents(&route("test.Nope"), "t")
        .remove(0)
        .expect("a policy document");
    let key = format!("{PREFIX}/mesh/policies/HTTPRoute/books");
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("etcd client");
    raw.put(key.as_str(), serde_json::to_vec(&bad).expect("json"), None)
        .await
        .expect("put");
    trellis_tests::wait_for(
        Duration::from_secs(10),
        "the gateway refuses it",
        || async {
            let d = client::admin(gateway.bound.admin, "/config_dump")
                .await
                .json();
            d["etcd"]["discovery"]["rejected"][&key]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("`test.Nope` is not in the descriptor set"))
        },
    )
    .await;
    let r = call(&h1, "GET", HOST, "/v1/items/7", b"").await;
    assert_eq!((r.status.as_u16(), r.json()), (200, json!({"id": "7"})));
}
