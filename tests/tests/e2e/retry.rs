//! Retries by the caller's sidecar: idempotent requests retried and marked, others not,
//! Retry-After honoured, the retry budget capping attempts during a full outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_policies::{RetrySpec, ServicePolicy};
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::client::{self, metric};
use trellis_tests::Mesh;

fn with_retries(mesh: &Mesh, retries: RetrySpec) -> Arc<Snapshot> {
    let policy = ServicePolicy {
        retries: Some(retries),
        ..Default::default()
    };
    trellis_tests::service_snapshot("echo", &[(mesh.server.inbound(), 1)], policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_and_marked_others_are_not() {
    let mesh = Mesh::start().await;
    let c = client::h1(mesh.client.outbound());
    let r = client::get(&c, "http://echo/flaky/a/1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body, "call 2, retried=true",
        "the retry reached the app, marked"
    );

    let post = http::Request::post("http://echo/flaky/b/1")
        .body(client::full("x"))
        .unwrap();
    let r = client::send(&c, post).await.unwrap();
    assert_eq!(r.status, 503, "POST is not idempotent: not retried");

    let marked = http::Request::get("http://echo/flaky/c/1")
        .header("trellis-retried", "1")
        .body(client::empty())
        .unwrap();
    let r = client::send(&c, marked).await.unwrap();
    assert_eq!(
        r.status, 503,
        "a request already retried upstream is not retried again"
    );

    let m = client::admin(mesh.client.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &m,
            "trellis_outlier_events_total{service=\"echo\",event=\"retry\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let mesh = Mesh::start().await;
    let c = client::h1(mesh.client.outbound());
    let start = Instant::now();
    let r = client::get(&c, "http://echo/flaky/d/1?after=1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "retried before Retry-After: {:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_attempts_during_a_full_outage() {
    let mesh = Mesh::start().await;
    let retries = RetrySpec {
        attempts: 3,
        backoff_base: Duration::from_millis(1),
        backoff_max: Duration::from_millis(2),
        ..Default::default()
    };
    mesh.client.apply(with_retries(&mesh, retries)).await;
    let c = client::h1(mesh.client.outbound());
    let requests = 300u64;
    let before = mesh
        .backend
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    for _ in 0..requests {
        assert_eq!(client::get(&c, "http://echo/status/503").await.status, 503);
    }
    let attempts = mesh
        .backend
        .requests
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    // (1 + ratio) x requests + min/s x 10 s window; without the budget it would be 4 x requests.
    let bound = (1.2 * requests as f64 + 100.0) as u64;
    eprintln!("{attempts} attempts for {requests} requests in a full outage (budget bound {bound}, unbudgeted {})", 4 * requests);
    assert!(attempts <= bound, "{attempts} > {bound}");
    assert!(attempts > requests, "some retries were made");
    let m = client::admin(mesh.client.admin(), "/metrics").await.body;
    assert!(
        metric(
            &m,
            "trellis_outlier_events_total{service=\"echo\",event=\"retry_budget_exhausted\"}"
        ) > 0.0
    );
}
