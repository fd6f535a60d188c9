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

/// A mesh whose client sidecar logs to `log`, and a client of it, once one request's line is
/// there.
async fn logging_client(log: &Path) -> (Mesh, client::HttpClient) {
    let l = log.to_path_buf();
    let mesh = Mesh::start_with(
        move |c| {
            c.access_log.enabled = true;
            c.access_log.path = Some(l);
        },
        |_| {},
    )
    .await;
    let c = client::h1(mesh.client.outbound());
    assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    wait_for(Duration::from_secs(5), "first line", || async {
        lines(log).len() == 1
    })
    .await;
    (mesh, c)
}

/// logrotate's `create` (rename, then a new file) and a removed file: the sidecar notices within
/// a second and writes to the file the path names; the renamed file keeps what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_follows_its_path_when_rotated_or_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("client.log");
    let (_mesh, c) = logging_client(&log).await;
    let rotated = dir.path().join("client.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // Requests until one lands in the new file (the path is checked once a second).
    wait_for(Duration::from_secs(5), "a line in the new file", || async {
        client::get(&c, "http://echo/echo").await;
        !lines(&log).is_empty()
    })
    .await;
    let in_rotated = lines(&rotated).len();
    assert!(in_rotated >= 1, "the renamed file keeps its lines");
    std::fs::remove_file(&log).unwrap();
    wait_for(
        Duration::from_secs(5),
        "a line in a re-created file",
        || async {
            client::get(&c, "http://echo/echo").await;
            !lines(&log).is_empty()
        },
    )
    .await;
    assert_eq!(
        lines(&rotated).len(),
        in_rotated,
        "nothing more goes to the renamed file once the new one is open"
    );
    for l in lines(&log) {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["direction"], "outbound");
    }
}

/// The disk under the access log fills up: requests are served as before, the lines that
/// cannot be written are counted, and once there is room again the log goes on, with at most
/// the one line cut off by the full disk unreadable (closed by a newline, not glued to the
/// next). A real full file system: a 64 KiB tmpfs (needs root; without it the test says why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_loses_counted_lines_and_no_more_than_one_line_is_cut() {
    let Some(disk) = trellis_tests::disk::SmallDisk::mount(64 * 1024) else {
        return;
    };
    let log = disk.path().join("client.log");
    let (mesh, c) = logging_client(&log).await;
    // The rest of the file system taken: the log's last block has some room left, so the next
    // batches first fill that (one of them part way), then fail.
    disk.fill("filler");
    let lost = || async {
        let text = client::admin(mesh.client.admin(), "/metrics").await.body;
        client::metric(&text, "trellis_access_log_lost_lines_total")
    };
    let mut sent = 0;
    while lost().await < 5.0 {
        assert!(sent < 400, "lines not reported lost after {sent} requests");
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
        sent += 1;
    }
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    let before = lines(&log).len();
    wait_for(Duration::from_secs(5), "lines written again", || async {
        client::get(&c, "http://echo/echo").await;
        lines(&log).len() > before + 1
    })
    .await;
    let all = lines(&log);
    let broken: Vec<&String> = all
        .iter()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_err())
        .collect();
    assert!(broken.len() <= 1, "at most one cut line: {broken:?}");
    assert!(
        broken.iter().all(|l| l.matches("{\"time\"").count() == 1),
        "the cut line is not glued to the next one: {broken:?}"
    );
    let last: serde_json::Value = serde_json::from_str(all.last().unwrap()).unwrap();
    assert_eq!(last["status"], 200);
    assert!(lost().await >= 5.0);
}
