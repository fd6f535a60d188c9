//! The file store (standalone mode): hot reload, and an invalid edit that is rejected while the
//! last good version keeps serving.

use std::time::{Duration, Instant};

use trellis_tests::client::{self, metric};
use trellis_tests::{Pki, Sidecar};

async fn wait_status(c: &client::HttpClient, uri: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client::get(c, uri).await;
        if r.status == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{uri} never returned {status}; last {} {}",
            r.status,
            r.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_hot_reloads_and_keeps_last_good_version() {
    trellis_tests::init_logs();
    let pki = Pki::new(&["client", "echo"]);
    let backend = trellis_tests::backend::Backend::start().await;
    let server = Sidecar::start(&pki, "echo", backend.addr, |_| {}).await;
    server.route(&[]).await;

    let mesh_file = pki.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "services:\n  echo:\n    endpoints:\n      - address: {}\n",
            server.inbound()
        ),
    )
    .unwrap();
    let mut cfg = mesh_agent::testing::config("client", pki.path(), backend.addr);
    cfg.store.file = Some(mesh_file.clone());
    let running = mesh_agent::run::start(cfg).await.expect("start");
    let c = client::h1(running.bound.outbound);
    wait_status(&c, "http://echo/echo", 200).await;

    // A broken edit: rejected with its position, counted, shown, and traffic continues.
    std::fs::write(&mesh_file, "services:\n  echo:\n    endpionts: []\n").unwrap();
    let admin = running.bound.admin;
    let deadline = Instant::now() + Duration::from_secs(5);
    let dump = loop {
        let d = client::admin(admin, "/config_dump").await.json();
        if !d["store"]["rejected"].is_null() {
            break d;
        }
        assert!(Instant::now() < deadline, "rejection not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let err = dump["store"]["rejected"]["error"].as_str().unwrap();
    assert!(err.contains("endpionts") && err.contains("line 3"), "{err}");
    assert_eq!(dump["store"]["version"], 1);
    let m = client::admin(admin, "/metrics").await.body;
    assert_eq!(
        metric(
            &m,
            "trellis_store_updates_total{source=\"file\",result=\"rejected\"}"
        ),
        1.0
    );
    assert_eq!(
        client::get(&c, "http://echo/echo").await.status,
        200,
        "last good version keeps serving"
    );

    // A valid edit applies: no endpoints now.
    std::fs::write(&mesh_file, "services:\n  echo:\n    endpoints: []\n").unwrap();
    wait_status(&c, "http://echo/echo", 503).await;
    let d = client::admin(admin, "/config_dump").await.json();
    assert_eq!(d["store"]["version"], 2);
    assert!(d["store"]["rejected"].is_null());
    assert_eq!(Pki::spiffe("client"), d["identity"]["spiffe_id"]);
}
