//! Rate limits and concurrency limits on the inbound sidecar: local limits exact, per-key
//! buckets, the 429 headers, gRPC RESOURCE_EXHAUSTED, concurrency slots held until the response
//! body ends; and global limits shared through a real etcd (see `ratelimit_global.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use trellis_policies::{ConcurrencyLimitSpec, MeshDocument, RateLimitSpec};
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::backend::{grpc_frame, Backend};
use trellis_tests::client::{self, metric};
use trellis_tests::{init_logs, Pki, Sidecar};

/// A snapshot with `orders` at `inbound` (retries off, so every answer is the inbound's own)
/// and the given limits.
fn snapshot(
    inbound: SocketAddr,
    rate: &[(&str, serde_json::Value)],
    concurrency: &[(&str, serde_json::Value)],
) -> Arc<Snapshot> {
    let mut doc = MeshDocument::default();
    doc.services
        .insert("orders".into(), trellis_tests::unretried_service(inbound));
    for (name, spec) in rate {
        let spec: RateLimitSpec = serde_json::from_value(spec.clone()).expect("rate limit spec");
        doc.rate_limits.insert(name.to_string(), spec);
    }
    for (name, spec) in concurrency {
        let spec: ConcurrencyLimitSpec =
            serde_json::from_value(spec.clone()).expect("concurrency limit spec");
        doc.concurrency_limits.insert(name.to_string(), spec);
    }
    trellis_tests::snapshot_of(&doc)
}

struct Orders {
    _pki: Pki,
    backend: Backend,
    server: Sidecar,
    client: Sidecar,
}

async fn orders(
    rate: &[(&str, serde_json::Value)],
    concurrency: &[(&str, serde_json::Value)],
) -> Orders {
    init_logs();
    let pki = Pki::new(&["client", "orders"]);
    let backend = Backend::start().await;
    let server = Sidecar::start(&pki, "orders", backend.addr, |_| {}).await;
    let client = Sidecar::start(&pki, "client", backend.addr, |_| {}).await;
    let snap = snapshot(server.inbound(), rate, concurrency);
    server.apply(snap.clone()).await;
    client.apply(snap).await;
    Orders {
        _pki: pki,
        backend,
        server,
        client,
    }
}

async fn get_with(c: &client::HttpClient, uri: &str, tenant: &str) -> client::Reply {
    let req = Request::get(uri)
        .header("x-tenant", tenant)
        .body(client::empty())
        .unwrap();
    client::send(c, req).await.unwrap()
}

fn header<'a>(r: &'a client::Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_limit_is_exact_per_key_with_rate_limit_headers() {
    let m = orders(
        &[(
            "orders-per-tenant",
            serde_json::json!({
                "service": "orders", "scope": "local",
                "match": {"path": {"prefix": "/echo"}},
                "key": {"headers": ["x-tenant"]},
                "limit": {"requests": 5, "per": "minute"},
            }),
        )],
        &[],
    )
    .await;
    let c = client::h1(m.client.outbound());
    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..8 {
        let r = get_with(&c, "http://orders/echo", "acme").await;
        statuses.push(r.status.as_u16());
        if r.status == 429 {
            limited = Some(r);
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429]);
    let r = limited.unwrap();
    assert_eq!(r.cause(), "rate-limited");
    // 5 per minute: the next request is admitted 12 s after the burst.
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((11..=12).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        header(&r, "ratelimit-policy"),
        "\"orders-per-tenant\";q=5;w=60"
    );
    assert_eq!(
        header(&r, "ratelimit"),
        format!("\"orders-per-tenant\";r=0;t={retry}")
    );

    // Another tenant has its own bucket; a route outside the match is not limited.
    assert_eq!(
        get_with(&c, "http://orders/echo", "globex").await.status,
        200
    );
    for _ in 0..10 {
        assert_eq!(
            get_with(&c, "http://orders/status/200", "acme")
                .await
                .status,
            200
        );
    }
    assert_eq!(
        m.backend
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        16,
        "5 + 1 limited-route requests and 10 unmatched reached the app"
    );

    let text = client::admin(m.server.admin(), "/metrics").await.body;
    let series = |d: &str| {
        format!(
            "trellis_ratelimit_decisions_total{{policy=\"orders-per-tenant\",decision=\"{d}\"}}"
        )
    };
    assert_eq!(metric(&text, &series("allowed")), 6.0, "{text}");
    assert_eq!(metric(&text, &series("limited")), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_gets_resource_exhausted() {
    let m = orders(
        &[(
            "orders-grpc",
            serde_json::json!({
                "service": "orders", "scope": "local",
                "match": {"path": {"prefix": "/test.Echo"}},
                "limit": {"requests": 1, "per": "minute"},
            }),
        )],
        &[],
    )
    .await;
    let c = client::h2c(m.client.outbound());
    let call = || {
        Request::post("http://orders/test.Echo/Unary")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(client::full(grpc_frame(b"hello")))
            .unwrap()
    };
    let first = client::send(&c, call()).await.unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(header(&first, "grpc-status"), "", "status in trailers");
    let second = client::send(&c, call()).await.unwrap();
    assert_eq!(second.status, 200, "gRPC errors travel as HTTP 200");
    assert_eq!(header(&second, "grpc-status"), "8", "RESOURCE_EXHAUSTED");
    assert_eq!(second.cause(), "rate-limited");
    assert!(header(&second, "ratelimit-policy").contains("orders-grpc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_is_exact_and_held_until_the_body_ends() {
    let m = orders(
        &[],
        &[
            (
                "orders-slow",
                serde_json::json!({"service": "orders", "match": {"path": {"prefix": "/slow"}}, "max_in_flight": 3}),
            ),
            (
                "orders-stall",
                serde_json::json!({"service": "orders", "match": {"path": {"prefix": "/stall"}}, "max_in_flight": 1}),
            ),
        ],
    )
    .await;
    let c = client::h1(m.client.outbound());
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { client::get(&c, "http://orders/slow/1000").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        let r = call.await.unwrap();
        if r.status == 503 {
            assert_eq!(r.cause(), "concurrency-limited");
            assert_eq!(header(&r, "retry-after"), "1");
        }
        statuses.push(r.status.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 503, 503]);
    // The slots are free again.
    let again: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { client::get(&c, "http://orders/slow/200").await.status })
        })
        .collect();
    for call in again {
        assert_eq!(call.await.unwrap(), 200);
    }

    // A streamed response holds its slot until its last byte: while the first /stall body is
    // still pending, a second call is refused; once it has ended, a third is admitted.
    let first = c
        .request(
            Request::get("http://orders/stall/1000")
                .body(client::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(first.status(), 200, "headers arrive before the body ends");
    let second = client::get(&c, "http://orders/stall/10").await;
    assert_eq!(second.status, 503);
    assert_eq!(second.cause(), "concurrency-limited");
    use http_body_util::BodyExt;
    let body = first.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"first last");
    trellis_tests::wait_for(
        std::time::Duration::from_secs(2),
        "stall slot released",
        || async { client::get(&c, "http://orders/stall/10").await.status == 200 },
    )
    .await;

    let text = client::admin(m.server.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &text,
            "trellis_concurrency_limit_in_flight{policy=\"orders-slow\"}"
        ),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "trellis_concurrency_limit_decisions_total{policy=\"orders-slow\",decision=\"limited\"}"
        ),
        2.0,
        "{text}"
    );
}
