//! Access logs written by both sidecars: JSON lines parsed back with their identities, trace
//! id, upstream, status and the sidecar's own decisions; sampling keeps errors; text format.

use std::path::Path;
use std::time::Duration;

use http::Request;
use trellis_proxy::config::AccessLogFormat;
use trellis_tests::client;
use trellis_tests::{wait_for, Mesh, Pki};

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_from_both_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let (out_log, in_log) = (dir.path().join("client.log"), dir.path().join("echo.log"));
    let (o, i) = (out_log.clone(), in_log.clone());
    let mesh = Mesh::start_with(
        move |c| {
            c.access_log.enabled = true;
            c.access_log.path = Some(o);
        },
        move |c| {
            c.access_log.enabled = true;
            c.access_log.path = Some(i);
        },
    )
    .await;
    let c = client::h1(mesh.client.outbound());
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = client::send(
        &c,
        Request::get("http://echo/echo?x=1")
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-00"))
            .body(client::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(client::get(&c, "http://nowhere/").await.status, 503);

    wait_for(Duration::from_secs(5), "log lines written", || async {
        lines(&out_log).len() == 2 && lines(&in_log).len() == 1
    })
    .await;
    let parse = |l: &str| -> serde_json::Value { serde_json::from_str(l).unwrap() };
    let out: Vec<_> = lines(&out_log).iter().map(|l| parse(l)).collect();
    let inb = parse(&lines(&in_log)[0]);

    let ok = &out[0];
    assert_eq!(ok["direction"], "outbound");
    assert_eq!(ok["service"], "echo");
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["path"], "/echo", "query strings are not logged");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["cause"], serde_json::Value::Null);
    assert_eq!(ok["upstream"], mesh.server.inbound().to_string());
    assert_eq!(ok["retries"], 0);
    assert_eq!(ok["trace_id"], trace);
    assert!(ok["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));

    assert_eq!(inb["direction"], "inbound");
    assert_eq!(inb["service"], "echo");
    assert_eq!(inb["peer_identity"], Pki::spiffe("client"));
    assert_eq!(inb["trace_id"], trace, "one trace id on both sides");
    assert_eq!(inb["status"], 200);

    let failed = &out[1];
    assert_eq!(failed["status"], 503);
    assert_eq!(failed["cause"], "unknown-service");
    assert_eq!(failed["upstream"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_errors_and_text_format() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("client.log");
    let l = log.clone();
    let mesh = Mesh::start_with(
        move |c| {
            c.access_log.enabled = true;
            c.access_log.path = Some(l);
            c.access_log.sample = 0.0;
            c.access_log.format = AccessLogFormat::Text;
        },
        |_| {},
    )
    .await;
    let c = client::h1(mesh.client.outbound());
    for _ in 0..20 {
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    }
    assert_eq!(client::get(&c, "http://echo/status/404").await.status, 404);
    wait_for(Duration::from_secs(5), "the error logged", || async {
        !lines(&log).is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = lines(&log);
    assert_eq!(got.len(), 1, "only the error: {got:?}");
    assert!(
        got[0].contains(" outbound echo \"GET /status/404\" 404 - "),
        "{}",
        got[0]
    );
}
