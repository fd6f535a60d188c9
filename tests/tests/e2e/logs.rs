//! Logs that join traces, through two real sidecars: a line a sidecar logs while handling a
//! request (the inbound `inbound request failed` warning, the outbound `request refused`)
//! carries the trace id of that request's access log line and the span id of the span it
//! exports; a line outside any request carries neither.

use std::path::Path;
use std::time::Duration;

use http::Request;
use mesh_agent::logging::{Captured, LogFormat};
use serde_json::Value;
use trellis_proxy::config::Config;
use trellis_tests::client;
use trellis_tests::otlp::{Collector, SERVER};
use trellis_tests::{wait_for, Mesh};

const TRACE: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
const PARENT: &str = "10f067aa0ba902b8";

/// Tracing to `endpoint` (sampling 0: only callers that sample are exported) and an access
/// log in `access`.
fn observed(c: &mut Config, endpoint: String, access: &Path) {
    c.tracing.endpoint = Some(endpoint);
    c.tracing.sampling = 0.0;
    c.tracing.flush_interval = Duration::from_millis(100);
    c.access_log.enabled = true;
    c.access_log.path = Some(access.to_path_buf());
}

/// The JSON lines of `lines` whose message is `message`.
fn with_message(lines: &[String], message: &str) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == message)
        .collect()
}

fn access_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// A current-thread runtime: every sidecar task runs on this thread, where the capturing
// subscriber is the default (the e2e binary may have a global one already).
#[tokio::test]
async fn lines_logged_for_a_request_carry_its_trace_and_span_ids() {
    let logs = Captured::default();
    let filter = "warn,trellis_proxy::listeners::lifecycle=debug";
    let _default = tracing::dispatcher::set_default(&logs.subscriber(LogFormat::Json, filter));
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (client_log, server_log) = (dir.path().join("client.log"), dir.path().join("echo.log"));
    let (e1, e2, cl, sl) = (
        collector.endpoint(),
        collector.endpoint(),
        client_log.clone(),
        server_log.clone(),
    );
    // The app that is down.
    let app = trellis_tests::ClosedPort::new();
    let app_addr = app.addr;
    let mesh = Mesh::start_with(
        move |c| observed(c, e1, &cl),
        move |c| {
            observed(c, e2, &sl);
            c.inbound.app = app_addr;
        },
    )
    .await;
    let c = client::h1(mesh.client.outbound());

    // The app behind the echo sidecar is down: its inbound listener warns, once per attempt.
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let req = Request::get("http://echo/").header("traceparent", traceparent);
    let r = client::send(&c, req.body(client::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    // Unsampled and refused by the outbound listener itself (debug).
    assert_eq!(client::get(&c, "http://nowhere/").await.status, 503);
    tracing::warn!("a line outside any request");

    // Every attempt's warning is written before the answer; its span and access log line
    // follow.
    let warned = with_message(&logs.lines(), "inbound request failed").len();
    assert!(warned > 0, "{:#?}", logs.lines());
    wait_for(Duration::from_secs(10), "spans and access logs", || async {
        let trace = collector.trace(TRACE);
        trace.iter().filter(|s| s.kind == SERVER).count() == warned
            && access_lines(&server_log).len() == warned
            && access_lines(&client_log).len() == 2
    })
    .await;
    let lines = logs.lines();

    // Inbound: each warning names the trace and the server span exported for its attempt.
    let failed = with_message(&lines, "inbound request failed");
    let mut exported: Vec<_> = collector
        .trace(TRACE)
        .into_iter()
        .filter(|s| s.kind == SERVER)
        .map(|s| s.span_id)
        .collect();
    let mut logged: Vec<_> = failed.iter().map(|l| l["span_id"].clone()).collect();
    exported.sort();
    logged.sort_by_key(|v| v.to_string());
    assert_eq!(logged, exported, "{failed:#?}");
    for line in &failed {
        assert_eq!(line["trace_id"], TRACE, "{line}");
        assert_eq!(line["level"], "WARN");
    }
    for access in access_lines(&server_log) {
        assert_eq!(access["trace_id"], TRACE, "{access}");
    }

    // Outbound, unsampled: the debug line has the trace id its access log line has.
    let refused = with_message(&lines, "request refused");
    let refused: Vec<_> = refused
        .iter()
        .filter(|l| l["cause"] == "unknown-service")
        .collect();
    assert_eq!(refused.len(), 1, "{lines:#?}");
    let access = access_lines(&client_log);
    let unknown = access
        .iter()
        .find(|a| a["status"] == 503)
        .expect("503 line");
    let trace_id = refused[0]["trace_id"].as_str().expect("a trace id");
    assert_eq!(unknown["trace_id"], trace_id);
    assert_ne!(trace_id, TRACE, "a trace of its own");
    assert_eq!(refused[0]["span_id"].as_str().map(str::len), Some(16));

    let outside = with_message(&lines, "a line outside any request");
    assert_eq!(outside.len(), 1, "{lines:#?}");
    assert!(outside[0].get("trace_id").is_none(), "{}", outside[0]);
    assert!(outside[0].get("span_id").is_none(), "{}", outside[0]);
}
