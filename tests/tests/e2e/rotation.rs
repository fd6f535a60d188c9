//! Certificate rotation under traffic: new files are picked up without a single failed request;
//! an invalid file is rejected and the current certificate keeps serving.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_tests::client::{self, metric};
use trellis_tests::Mesh;

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
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for i in 0..4 {
        // Half HTTP/1.1, half h2c; each worker's connection to the sidecar is long-lived.
        let c = if i % 2 == 0 {
            client::h1(mesh.client.outbound())
        } else {
            client::h2c(mesh.client.outbound())
        };
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let req = http::Request::get("http://echo/echo")
                    .body(client::empty())
                    .unwrap();
                match client::send(&c, req).await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("failed: {} {} {}", r.status, r.cause(), r.body);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

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

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("{ok} requests succeeded during rotation, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 50, "too little traffic to prove anything: {ok}");
    // New connections use the new certificate: a fresh client still gets through.
    let reply = client::get(&client::h1(mesh.client.outbound()), "http://echo/echo").await;
    assert_eq!(reply.status, 200);
}
