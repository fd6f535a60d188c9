//! gRPC-JSON transcoding at the ingress (docs/composition.md) over real sockets: plain
//! HTTP/1.1 JSON requests to the gateway become gRPC calls over mTLS to the `books` sidecar
//! and the test gRPC service behind it (`tests/proto/transcode.proto`, its descriptor set in
//! the policy, stored in a real etcd), and its answers JSON again. Bad input is refused before
//! anything reaches the service; a policy that does not compile is refused and the last good
//! one keeps serving.

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use trellis_policies::parse_documents;
use trellis_tests::backend::{grpc_frame, Backend, GrpcCall};
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

/// A real etcd holding the `books` route, the test gRPC service behind its sidecar, and the
/// gateway's plain HTTP ingress.
struct Env {
    etcd: mesh_agent::testing::EtcdCluster,
    backend: Backend,
    _books: trellis_proxy::app::Running,
    gateway: trellis_proxy::app::Running,
    plain: std::net::SocketAddr,
    _web: trellis_tests::web::WebPki,
    _pki: trellis_tests::Pki,
}

async fn env() -> Env {
    trellis_tests::init_logs();
    let etcd = mesh_agent::testing::EtcdCluster::start(1).await;
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    apply(&cfg, &route("test.Echo")).await.expect("applied");
    let backend = Backend::start().await;
    let pki = trellis_tests::Pki::new(&["books", "edge"]);
    let books =
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
    trellis_tests::wait_for(
        Duration::from_secs(30),
        "the first transcoded call",
        || async { call(&h1, "GET", HOST, "/v1/items/1", b"").await.status == 200 },
    )
    .await;
    Env {
        etcd,
        backend,
        _books: books,
        gateway,
        plain,
        _web: web,
        _pki: pki,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_requests_reach_a_grpc_service_and_its_answers_come_back_as_json() {
    let Env {
        etcd,
        backend,
        gateway,
        plain,
        ..
    } = env().await;
    let h1 = client::h1(plain);

    // Unary GET: path variables (one of two segments), the rest from the query string.
    let path = "/v1/shelves/3/items/42?title=hi%21&tags=a&tags=b&draft=true";
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
    refused_by_apply_and_the_gateway(
        &etcd,
        gateway.bound.admin,
        "books",
        &route("test.Nope"),
        "grpc_transcode.service: `test.Nope` is not in the descriptor set (it has: test.Echo)",
        "`test.Nope` is not in the descriptor set",
    )
    .await;
    let r = call(&h1, "GET", HOST, "/v1/items/7", b"").await;
    assert_eq!((r.status.as_u16(), r.json()), (200, json!({"id": "7"})));
}

/// The HTTPRoute `name` in `yaml` is refused by `policy apply` (and `validate`) with
/// `refused` in the message; written to the store past validation (as an older agent or a
/// writer with store access could), the gateway refuses it too, with `reason` in its config
/// dump. Whether the last good version still serves is the caller's to check.
async fn refused_by_apply_and_the_gateway(
    etcd: &mesh_agent::testing::EtcdCluster,
    admin: std::net::SocketAddr,
    name: &str,
    yaml: &str,
    refused: &str,
    reason: &str,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).expect("written");
    let e = mesh_agent::policy::load_documents(&file)
        .map(|_| ())
        .expect_err("refused by `policy apply`")
        .to_string();
    assert!(e.contains(refused), "{e}");
    let doc = parse_documents(yaml, "t")
        .remove(0)
        .expect("a policy document");
    let key = format!("{PREFIX}/mesh/policies/HTTPRoute/{name}");
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("etcd client");
    raw.put(key.as_str(), serde_json::to_vec(&doc).expect("json"), None)
        .await
        .expect("put");
    trellis_tests::wait_for(
        Duration::from_secs(10),
        "the gateway refuses it",
        || async {
            let d = client::admin(admin, "/config_dump").await.json();
            d["etcd"]["discovery"]["rejected"][&key]["reason"]
                .as_str()
                .is_some_and(|r| r.contains(reason))
        },
    )
    .await;
}

/// A request body sent in pieces, each when the test sends it: the sender and the body.
fn streamed() -> (tokio::sync::mpsc::Sender<Bytes>, client::Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        let piece = rx.recv().await?;
        Some((Ok::<_, client::BoxError>(http_body::Frame::data(piece)), rx))
    });
    (tx, http_body_util::StreamBody::new(stream).boxed())
}

/// A streamed JSON `POST` of `path`, answered on its own task.
fn post_streamed(
    h1: &HttpClient,
    path: &str,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<Reply>,
) {
    let (tx, body) = streamed();
    let req = Request::post(format!("http://{HOST}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    let h1 = h1.clone();
    let reply = tokio::spawn(async move { client::send(&h1, req).await.expect("reply") });
    (tx, reply)
}

/// The calls of `method` the service saw since `from`, once `n` of them have ended.
/// Until the service has received `n` gRPC messages in all (the elements streamed so far went
/// out before the test sends what comes next).
async fn messages_arrive(backend: &Backend, n: u64) {
    trellis_tests::wait_for(Duration::from_secs(10), "the streamed messages", || {
        let done = backend.grpc_received.load(Ordering::SeqCst) >= n;
        async move { done }
    })
    .await;
}

async fn calls_seen(backend: &Backend, method: &str, from: usize, n: usize) -> Vec<GrpcCall> {
    let mut seen = Vec::new();
    trellis_tests::wait_for(Duration::from_secs(10), "the service's log", || {
        seen = backend.grpc_calls.lock().expect("log")[from..]
            .iter()
            .filter(|c| c.method == method)
            .cloned()
            .collect();
        let done = seen.len() >= n;
        async move { done }
    })
    .await;
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streams_are_sent_element_by_element_and_cancelled_at_a_bad_one() {
    let env = env().await;
    let h1 = client::h1(env.plain);
    let log_len = || env.backend.grpc_calls.lock().expect("log").len();
    let received = || env.backend.grpc_received.load(Ordering::SeqCst);
    let collect = "/v1/shelves/1/items:collect";

    // Several elements: one call, each element one message with the path's `name` woven in;
    // the service answers their merge (repeated fields appended, the last scalar kept).
    let from = log_len();
    let body = br#"[{"tags": ["a"], "id": 1}, {"tags": ["b"], "id": 2},
        {"tags": ["c"], "title": "t"}]"#;
    let r = call(&h1, "POST", HOST, collect, body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"name": "shelves/1", "id": "2", "title": "t", "tags": ["a", "b", "c"]})
    );
    let seen = calls_seen(&env.backend, "Collect", from, 1).await;
    assert_eq!((seen[0].messages.len(), &seen[0].broken), (3, &None));

    // An empty array: a call with no message, answered with the empty message.
    let from = log_len();
    let r = call(&h1, "POST", HOST, collect, b" [ ] ").await;
    assert_eq!(
        (r.status.as_u16(), r.json()),
        (200, json!({})),
        "{}",
        r.body
    );
    let seen = calls_seen(&env.backend, "Collect", from, 1).await;
    assert_eq!((seen[0].messages.len(), &seen[0].broken), (0, &None));

    // A malformed element in the middle, after two good ones went out: 400 naming the
    // element; the service got the two whole messages, then a cancelled call (never a
    // complete one, nor a half message).
    for (bad, cause, field) in [
        (
            &br#"{"tags": [1,}, {"tags": ["d"]}]"#[..],
            "bad-json-body",
            Value::Null,
        ),
        (
            br#"{"nope": 1}, {"tags": ["d"]}]"#,
            "bad-request-message",
            json!("nope"),
        ),
    ] {
        let from = log_len();
        let before = received();
        let (tx, reply) = post_streamed(&h1, collect);
        let first = br#"[{"tags": ["a"]}, {"tags": ["b"]},"#;
        tx.send(Bytes::from_static(first)).await.expect("sent");
        messages_arrive(&env.backend, before + 2).await;
        tx.send(Bytes::from_static(bad)).await.expect("sent");
        drop(tx);
        let r = reply.await.expect("reply task");
        assert_eq!(refusal(&r), (400, cause.to_string(), field), "{}", r.body);
        assert_eq!(r.json()["element"], json!(2), "{}", r.body);
        let seen = calls_seen(&env.backend, "Collect", from, 1).await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            seen[0].messages,
            [
                &b"\x0a\x09shelves/1\x4a\x01a"[..],
                &b"\x0a\x09shelves/1\x4a\x01b"[..]
            ],
            "the whole messages before the bad element, nothing after"
        );
        let broken = seen[0]
            .broken
            .as_deref()
            .expect("the call did not complete");
        assert!(
            broken.contains("stream no longer needed") || broken.contains("cancel"),
            "{broken}"
        );
    }

    // An element past the body limit (4 KiB on this rule): 413, the call cancelled; a
    // declared length past it is refused before any call is made.
    let from = log_len();
    let before = received();
    let (tx, reply) = post_streamed(&h1, collect);
    tx.send(Bytes::from_static(br#"[{"title": "a"},"#))
        .await
        .expect("sent");
    messages_arrive(&env.backend, before + 1).await;
    let big = format!(r#"{{"title": "{}"}}]"#, "x".repeat(5000));
    tx.send(Bytes::from(big)).await.expect("sent");
    drop(tx);
    let r = reply.await.expect("reply task");
    assert_eq!(
        refusal(&r),
        (413, "body-too-large".into(), Value::Null),
        "{}",
        r.body
    );
    let seen = calls_seen(&env.backend, "Collect", from, 1).await;
    assert_eq!(seen[0].messages.len(), 1, "{seen:?}");
    assert!(seen[0].broken.is_some(), "{seen:?}");
    let seen = env.backend.requests.load(Ordering::Relaxed);
    let big = format!("[{}]", vec!["{}"; 1500].join(","));
    let r = call(&h1, "POST", HOST, collect, big.as_bytes()).await;
    assert_eq!((refusal(&r).0, r.cause()), (413, "body-too-large"));
    assert_eq!(
        env.backend.requests.load(Ordering::Relaxed),
        seen,
        "a declared length past the limit: nothing sent"
    );

    // Bidirectional: each element goes out as it completes and its echo comes back before
    // the array is closed.
    let (tx, body) = streamed();
    let req = Request::post(format!("http://{HOST}/test.Echo/Chat"))
        .header("content-type", "application/json")
        .body(body)
        .expect("request");
    tx.send(Bytes::from_static(br#"[{"id": 1}"#))
        .await
        .expect("sent");
    let resp = client::h2c(env.plain).request(req).await.expect("answer");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while !got.ends_with(br#"[{"id":"1"}"#) {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the first echo before the array is closed")
            .expect("a frame")
            .expect("data");
        got.extend_from_slice(&frame.into_data().unwrap_or_default());
    }
    tx.send(Bytes::from_static(br#", {"id": 2}]"#))
        .await
        .expect("sent");
    drop(tx);
    let rest = body.collect().await.expect("the rest").to_bytes();
    got.extend_from_slice(&rest);
    assert_eq!(got, br#"[{"id":"1"},{"id":"2"}]"#);
}

/// A route whose body transform and aggregate compile, then a version whose jq program does
/// not: `policy apply` refuses it with the reason, and a gateway that reads it from the store
/// anyway refuses it too and keeps serving the last good version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_that_does_not_compile_is_refused_and_the_last_good_kept() {
    const SHOP: &str = "shop.example.com";
    let shop = |jq: &str| {
        format!(
            r#"apiVersion: trellis.dev/v1
kind: HTTPRoute
metadata: {{name: shop}}
spec:
  hosts: [{SHOP}]
  gateways: [edge]
  rules:
    - name: checkout
      matches: [{{path: {{prefix: /checkout}}}}]
      aggregate:
        calls:
          - {{name: seen, service: books, method: POST, path: /reflect, body: {{transform: {{jq: '{jq}'}}}}}}
    - name: shop
      backends: [{{service: books}}]
      transform: {{response: {{jq: '{jq}'}}}}
"#
        )
    };
    let env = env().await;
    let cfg = mesh_agent::config::EtcdConfig::new(env.etcd.endpoints());
    apply(&cfg, &shop("{m: .method}")).await.expect("applied");
    let h1 = client::h1(env.plain);
    trellis_tests::wait_for(Duration::from_secs(30), "the shop route", || async {
        call(&h1, "GET", SHOP, "/echo", b"").await.status == 200
    })
    .await;
    let r = call(&h1, "GET", SHOP, "/echo", b"").await;
    assert_eq!(r.json(), json!({"m": "GET"}));
    let r = call(&h1, "POST", SHOP, "/checkout", br#"{"method": "x"}"#).await;
    assert_eq!(r.json(), json!({"seen": {"m": "x"}}), "{}", r.body);

    let bad = shop("{m: .method");
    refused_by_apply_and_the_gateway(
        &env.etcd,
        env.gateway.bound.admin,
        "shop",
        &bad,
        "rules[0].aggregate.calls[0].body: transform.jq: `{m: .method` does not parse",
        "does not parse",
    )
    .await;
    let r = call(&h1, "GET", SHOP, "/echo", b"").await;
    assert_eq!(
        r.json(),
        json!({"m": "GET"}),
        "the last good version serves"
    );
    let r = call(&h1, "POST", SHOP, "/checkout", br#"{"method": "y"}"#).await;
    assert_eq!(r.json(), json!({"seen": {"m": "y"}}), "{}", r.body);
}
