//! The attempt loop against a scripted connector, under paused tokio time: each test would
//! fail if the loop retried, redialed, reselected or timed out other than its policy says.

use std::collections::VecDeque;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use super::super::connector::{Connector, Sent};
use super::super::endpoints::Endpoints;
use super::super::payload::Payload;
use super::super::resolve::Resolved;
use super::Attempts;
use crate::error::ProxyError;
use crate::http::headers::RETRIED_HEADER;
use crate::state::snapshot::{Endpoint, Snapshot};
use crate::state::target::{StatsRegistry, TargetTable};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::Tracing;
use crate::RequestBody;

/// What one send does.
#[derive(Clone, Copy, Debug)]
enum Step {
    Status(u16),
    /// The peer reset the stream (REFUSED_STREAM): an upstream failure.
    Refused,
    /// No answer, ever.
    Hang,
    /// The pooled connection was closing and gave the request back unsent.
    HandBack,
}

/// A connector that plays a script and records what the loop asked of it.
#[derive(Default)]
struct Script {
    /// Connects that fail, from the first on.
    failing_connects: Mutex<usize>,
    steps: Mutex<VecDeque<Step>>,
    connects: Mutex<Vec<SocketAddr>>,
    /// Each send: the endpoint and the request's headers.
    sends: Mutex<Vec<(SocketAddr, HeaderMap)>>,
    invalidated: Mutex<Vec<SocketAddr>>,
}

impl Script {
    fn new(failing_connects: usize, steps: &[Step]) -> Self {
        Self {
            failing_connects: Mutex::new(failing_connects),
            steps: Mutex::new(steps.iter().copied().collect()),
            ..Self::default()
        }
    }

    fn sends(&self) -> Vec<(SocketAddr, HeaderMap)> {
        self.sends.lock().unwrap().clone()
    }
}

impl Connector for Script {
    type Conn = SocketAddr;
    type Body = ();

    fn connect(
        &self,
        ep: &Endpoint,
        _: Duration,
    ) -> impl Future<Output = Result<SocketAddr, ProxyError>> + Send {
        self.connects.lock().unwrap().push(ep.addr);
        let mut failing = self.failing_connects.lock().unwrap();
        let result = if *failing > 0 {
            *failing -= 1;
            Err(ProxyError::Connect {
                addr: ep.addr,
                source: std::io::ErrorKind::ConnectionRefused.into(),
            })
        } else {
            Ok(ep.addr)
        };
        async move { result }
    }

    fn send(
        &self,
        _: &Endpoint,
        conn: SocketAddr,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Sent<()>> + Send {
        let step = self.steps.lock().unwrap().pop_front().unwrap_or(Step::Hang);
        self.sends
            .lock()
            .unwrap()
            .push((conn, req.headers().clone()));
        async move {
            match step {
                Step::Status(s) => {
                    let mut resp = Response::new(());
                    *resp.status_mut() = http::StatusCode::from_u16(s).unwrap();
                    Sent::Done(Ok(resp))
                }
                Step::Refused => Sent::Done(Err(ProxyError::Upstream {
                    addr: conn,
                    message: "stream error: refused stream".into(),
                })),
                Step::Hang => std::future::pending().await,
                Step::HandBack => Sent::HandedBack(req),
            }
        }
    }

    fn invalidate(&self, ep: &Endpoint) {
        self.invalidated.lock().unwrap().push(ep.addr);
    }
}

/// A service `s` with two endpoints and `policy` (YAML flow mappings).
fn table(policy: &str) -> TargetTable {
    let yaml = format!(
        "services:\n  s:\n    endpoints:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:2\n    policy: {policy}\n"
    );
    let doc = trellis_policies::parse_mesh_yaml(&yaml).unwrap();
    let snap = Snapshot::from_document(&doc, "td", 1, "t".into()).unwrap();
    TargetTable::build(Arc::new(snap), &StatsRegistry::default(), None, None)
}

/// Run one GET through the loop; the status or the error, and how long it took.
async fn run(
    policy: &str,
    request_timeout: Duration,
    script: &Script,
) -> (Result<u16, ProxyError>, Duration, u32) {
    let table = table(policy);
    let route = table.route("s").unwrap();
    let metrics = Metrics::register(&mut Registry::default());
    let endpoints = Endpoints {
        route,
        metrics: &metrics,
    };
    let ip: IpAddr = "10.0.0.1".parse().unwrap();
    let req = Request::get("https://s/x").body(()).unwrap();
    let first = endpoints.choose(&req, ip, None).unwrap();
    let payload = Payload::Buffered {
        parts: req.into_parts().0,
        body: Bytes::new(),
    };
    let resolved = Resolved {
        connect_timeout: Duration::from_secs(1),
        request_timeout,
        grpc_deadline: false,
        stream_idle: Duration::from_secs(60),
    };
    let mut span = Tracing::disabled().client(&http::Method::GET, "/x", &HeaderMap::new(), "s");
    let start = Instant::now();
    let result = Attempts::new(script, endpoints, ip, payload, &resolved)
        .run(first, &mut span)
        .await
        .map(|(resp, _)| resp.status().as_u16());
    (result, start.elapsed(), span.retries)
}

const TEN_SECONDS: Duration = Duration::from_secs(10);

#[tokio::test(start_paused = true)]
async fn a_refused_stream_is_retried_on_another_endpoint() {
    let script = Script::new(0, &[Step::Refused, Step::Status(200)]);
    let (result, _, retries) = run("{retries: {attempts: 2}}", TEN_SECONDS, &script).await;
    assert_eq!(result.unwrap(), 200);
    assert_eq!(retries, 1);
    let sends = script.sends();
    assert_eq!(sends.len(), 2);
    assert_ne!(
        sends[0].0, sends[1].0,
        "the retry leaves the failed endpoint"
    );
    assert!(!sends[0].1.contains_key(RETRIED_HEADER));
    assert_eq!(sends[1].1[RETRIED_HEADER], "1");
}

#[tokio::test(start_paused = true)]
async fn retries_stop_at_the_policy_s_attempts() {
    let script = Script::new(0, &[Step::Refused, Step::Refused, Step::Status(200)]);
    let (result, _, _) = run("{retries: {attempts: 1}}", TEN_SECONDS, &script).await;
    assert!(matches!(result, Err(ProxyError::Upstream { .. })));
    assert_eq!(script.sends().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_per_try_timeout_ends_a_try_and_the_next_one_answers() {
    let script = Script::new(0, &[Step::Hang, Step::Status(200)]);
    let policy = "{retries: {attempts: 2, per_try_timeout: 100ms}}";
    let (result, elapsed, _) = run(policy, TEN_SECONDS, &script).await;
    assert_eq!(result.unwrap(), 200);
    assert_eq!(script.sends().len(), 2);
    // 100 ms for the first try, then at most the 25 ms backoff.
    assert!(elapsed >= Duration::from_millis(100), "{elapsed:?}");
    assert!(elapsed <= Duration::from_millis(125), "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn the_overall_deadline_bounds_a_try_without_its_own_timeout() {
    let script = Script::new(0, &[Step::Hang]);
    let (result, elapsed, _) = run("{}", Duration::from_secs(1), &script).await;
    match result {
        Err(ProxyError::ResponseTimeout { timeout, .. }) => {
            assert_eq!(timeout, Duration::from_secs(1))
        }
        other => panic!("expected a response timeout, got {other:?}"),
    }
    assert_eq!(elapsed, Duration::from_secs(1));
    assert_eq!(
        script.sends().len(),
        1,
        "no per-try timeout: nothing to retry"
    );
}

#[tokio::test(start_paused = true)]
async fn the_overall_deadline_bounds_every_retry() {
    let script = Script::new(0, &[Step::Hang; 6]);
    let policy = "{retries: {attempts: 5, per_try_timeout: 400ms}}";
    let (result, elapsed, _) = run(policy, Duration::from_secs(1), &script).await;
    assert!(matches!(result, Err(ProxyError::ResponseTimeout { .. })));
    assert!(elapsed <= Duration::from_secs(1), "{elapsed:?}");
    let sends = script.sends().len();
    assert!((2..=3).contains(&sends), "{sends} tries within 1 s");
}

#[tokio::test(start_paused = true)]
async fn a_dead_pooled_connection_is_redialed_not_retried() {
    let script = Script::new(0, &[Step::HandBack, Step::Status(200)]);
    // Retries off: a request handed back unsent goes again all the same.
    let (result, _, retries) = run("{retries: {attempts: 0}}", TEN_SECONDS, &script).await;
    assert_eq!(result.unwrap(), 200);
    assert_eq!(retries, 0);
    let sends = script.sends();
    assert_eq!(sends.len(), 2);
    assert_eq!(
        sends[0].0, sends[1].0,
        "the same endpoint, on a new connection"
    );
    assert!(!sends[1].1.contains_key(RETRIED_HEADER));
    assert_eq!(*script.invalidated.lock().unwrap(), vec![sends[0].0]);
}

#[tokio::test(start_paused = true)]
async fn a_fresh_connection_that_hands_the_request_back_fails_it() {
    let script = Script::new(0, &[Step::HandBack, Step::HandBack, Step::Status(200)]);
    let (result, _, _) = run("{retries: {attempts: 0}}", TEN_SECONDS, &script).await;
    assert!(matches!(result, Err(ProxyError::Upstream { .. })));
    assert_eq!(script.sends().len(), 2, "redialed once only");
}

#[tokio::test(start_paused = true)]
async fn a_connect_error_reselects_another_endpoint() {
    let script = Script::new(1, &[Step::Status(200)]);
    // Even with retries off: nothing was sent.
    let (result, elapsed, _) = run("{retries: {attempts: 0}}", TEN_SECONDS, &script).await;
    assert_eq!(result.unwrap(), 200);
    assert_eq!(
        elapsed,
        Duration::ZERO,
        "no backoff before another endpoint"
    );
    let connects = script.connects.lock().unwrap().clone();
    assert_eq!(connects.len(), 2);
    assert_ne!(connects[0], connects[1]);
}

#[tokio::test(start_paused = true)]
async fn a_connect_error_moves_the_request_even_with_the_retry_breaker_full() {
    // max_retries 0: no retry may be in flight, yet a refused connection sent nothing, so the
    // request still moves to the other endpoint.
    let policy = "{circuit_breaker: {max_retries: 0}}";
    let script = Script::new(1, &[Step::Status(200)]);
    let (result, _, _) = run(policy, TEN_SECONDS, &script).await;
    assert_eq!(result.unwrap(), 200);
    assert_eq!(script.connects.lock().unwrap().len(), 2);
    // A retry after a reached endpoint still needs a slot of the breaker.
    let script = Script::new(0, &[Step::Refused, Step::Status(200)]);
    let (result, _, retries) = run(policy, TEN_SECONDS, &script).await;
    assert!(
        matches!(result, Err(ProxyError::Upstream { .. })),
        "{result:?}"
    );
    assert_eq!((script.sends().len(), retries), (1, 0));
}
