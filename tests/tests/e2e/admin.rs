//! The admin API: liveness, readiness gated on the first snapshot, metrics after known traffic,
//! a config dump without secrets.

use std::net::SocketAddr;

use trellis_tests::client::{self, metric};
use trellis_tests::{Pki, Sidecar};

#[tokio::test]
async fn ready_waits_for_the_first_snapshot_and_metrics_count_traffic() {
    trellis_tests::init_logs();
    let pki = Pki::new(&["client", "echo"]);
    let backend = trellis_tests::backend::Backend::start().await;
    let server = Sidecar::start(&pki, "echo", backend.addr, |_| {}).await;
    let client_sc = Sidecar::start(&pki, "client", backend.addr, |_| {}).await;

    let admin = client_sc.admin();
    assert_eq!(client::admin(admin, "/live").await.status, 200);
    let not_ready = client::admin(admin, "/ready").await;
    assert_eq!(not_ready.status, 503);
    assert!(not_ready.body.contains("snapshot"), "{}", not_ready.body);

    server.route(&[]).await;
    client_sc.route(&[("echo", &[server.inbound()])]).await;
    assert_eq!(client::admin(admin, "/ready").await.status, 200);

    let c = client::h1(client_sc.outbound());
    for _ in 0..5 {
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    }
    assert_eq!(client::get(&c, "http://echo/status/404").await.status, 404);

    let m = client::admin(admin, "/metrics").await.body;
    let out = |code: u16| {
        format!("trellis_requests_total{{direction=\"outbound\",service=\"echo\",route=\"default\",status_code=\"{code}\"}}")
    };
    assert_eq!(metric(&m, &out(200)), 5.0, "{m}");
    assert_eq!(metric(&m, &out(404)), 1.0);
    assert_eq!(
        metric(
            &m,
            "trellis_request_duration_seconds_count{direction=\"outbound\",service=\"echo\",route=\"default\",status_code=\"200\"}"
        ),
        5.0
    );
    assert!(metric(&m, "trellis_cert_expiry_timestamp_seconds") > 1.7e9);
    // One multiplexed mTLS connection to the peer carried all six requests.
    assert_eq!(
        metric(&m, "trellis_tls_handshakes_total{direction=\"outbound\"}"),
        1.0,
        "{m}"
    );
    // Six HTTP/1.1 request heads of at least `GET /echo HTTP/1.1\r\nhost: echo\r\n\r\n`,
    // and six responses with a status line each.
    let read = metric(&m, "trellis_read_bytes_total{direction=\"outbound\"}");
    assert!(read >= 6.0 * 34.0, "{read}");
    assert!(metric(&m, "trellis_written_bytes_total{direction=\"outbound\"}") >= 6.0 * 17.0);
    assert_eq!(
        metric(
            &m,
            "trellis_endpoints{service=\"echo\",state=\"available\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "trellis_endpoints{service=\"echo\",state=\"ejected\"}"),
        0.0
    );
    let age = metric(&m, "trellis_snapshot_age_seconds");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert!(m.contains("trellis_open_connections{direction=\"outbound\"}"));
    assert!(m.contains("trellis_build_info{version="));
    // Process metrics: this test process's own figures, within sane bounds.
    let rss = metric(&m, "trellis_process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 4e9, "{rss}");
    assert!(metric(&m, "trellis_process_cpu_seconds_total") > 0.0, "{m}");
    assert!(metric(&m, "trellis_process_open_fds") > 3.0);
    assert!(metric(&m, "trellis_process_start_time_seconds") > 1.7e9);
    let sm = client::admin(server.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &sm,
            "trellis_requests_total{direction=\"inbound\",service=\"echo\",route=\"default\",status_code=\"200\"}"
        ),
        5.0
    );
    assert_eq!(
        metric(&sm, "trellis_tls_handshakes_total{direction=\"inbound\"}"),
        1.0
    );
    assert!(metric(&sm, "trellis_read_bytes_total{direction=\"inbound\"}") > 0.0);

    let dump = client::admin(admin, "/config_dump").await;
    assert_eq!(dump.status, 200);
    let j = dump.json();
    assert_eq!(j["identity"]["spiffe_id"], Pki::spiffe("client"));
    assert_eq!(
        j["snapshot"]["services"]["echo"]["endpoints"][0]["addr"],
        server.inbound().to_string()
    );
    assert_eq!(j["config"]["service"], "client");
    assert!(
        !dump.body.contains("PRIVATE KEY"),
        "config dump leaks key material"
    );
    assert_eq!(client::admin(admin, "/nope").await.status, 404);
}

#[tokio::test]
async fn listeners_report_bind_errors() {
    trellis_tests::init_logs();
    let pki = Pki::new(&["echo"]);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = taken.local_addr().unwrap();
    let mut cfg = trellis_proxy::testing::config("echo", pki.path(), addr);
    cfg.admin.listen = addr;
    let (_tx, rx) = tokio::sync::watch::channel(None);
    let err = trellis_proxy::app::Proxy::new(cfg, rx)
        .start()
        .await
        .err()
        .expect("bind fails");
    assert!(err.to_string().contains("admin"), "{err}");
}
