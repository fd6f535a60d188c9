//! Certificate rotation under traffic: new files are picked up without a single failed request;
//! an invalid file is rejected and the current certificate keeps serving.

use std::time::{Duration, Instant};

use trellis_tests::client::{self, metric};
use trellis_tests::{Load, Mesh};

async fn generation(admin: std::net::SocketAddr) -> u64 {
    client::admin(admin, "/config_dump").await.json()["identity"]["generation"]
        .as_u64()
        .unwrap()
}

async fn wait_generation(admin: std::net::SocketAddr, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while generation(admin).await < at_least {
        assert!(Instant::now() < deadline, "certificate not reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic_drops_nothing() {
    let mesh = Mesh::start().await;
    // Half HTTP/1.1, half h2c; each worker's connection to the sidecar is long-lived.
    let out = mesh.client.outbound();
    let clients = vec![
        client::h1(out),
        client::h2c(out),
        client::h1(out),
        client::h2c(out),
    ];
    let load = Load::start(clients, "http://echo/echo");

    let (client_admin, server_admin) = (mesh.client.admin(), mesh.server.admin());
    for round in 0..3u64 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for svc in ["client", "echo"] {
            mesh.pki
                .ca
                .issue_service(svc, Duration::from_secs(7200 + round))
                .unwrap()
                .write(mesh.pki.path(), svc)
                .unwrap();
        }
        wait_generation(client_admin, round + 2).await;
        wait_generation(server_admin, round + 2).await;
    }

    // An invalid certificate file is rejected; the current one keeps serving.
    let before_gen = generation(server_admin).await;
    std::fs::write(mesh.pki.path().join("echo.pem"), "not a certificate").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = client::admin(server_admin, "/metrics").await.body;
        if metric(&text, "trellis_cert_reloads_total{result=\"error\"}") >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "invalid certificate was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        generation(server_admin).await,
        before_gen,
        "invalid file must not replace the identity"
    );

    let (ok, failed) = load.stop().await;
    eprintln!("{ok} requests succeeded during rotation, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 50, "too little traffic to prove anything: {ok}");
    // New connections use the new certificate: a fresh client still gets through.
    let reply = client::get(&client::h1(mesh.client.outbound()), "http://echo/echo").await;
    assert_eq!(reply.status, 200);
}
