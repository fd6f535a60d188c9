//! Graceful shutdown: in-flight requests finish, the inbound port stops accepting, the app's
//! outbound calls keep working during the grace period, then the sidecar stops.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use trellis_tests::client;
use trellis_tests::{eventually, Mesh};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_and_keeps_outbound_serving() {
    let mesh = Mesh::start().await;
    // The draining sidecar's own app can still call `client` through its outbound listener.
    mesh.server
        .route(&[("client", &[mesh.client.inbound()])])
        .await;
    let c = client::h1(mesh.client.outbound());
    let slow = tokio::spawn(async move { client::get(&c, "http://echo/slow/1500").await });
    let backend = mesh.backend.requests.clone();
    eventually(Duration::from_secs(5), || {
        backend.load(Ordering::Relaxed) >= 1
    })
    .await;

    let Mesh {
        server,
        client: client_sidecar,
        ..
    } = mesh;
    server.running.shutdown_handle().shutdown();
    let started = Instant::now();

    // New inbound connections are refused once the listener closes.
    let inbound = server.inbound();
    let deadline = Instant::now() + Duration::from_secs(2);
    while tokio::net::TcpStream::connect(inbound).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "inbound still accepting while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = client::admin(server.admin(), "/ready").await;
    assert_eq!(ready.status, 503, "not ready while draining");
    assert!(ready.body.contains("draining"), "{}", ready.body);

    // Outbound keeps serving the app during the grace period.
    let out = client::get(&client::h1(server.outbound()), "http://client/echo").await;
    assert_eq!(
        out.status, 200,
        "outbound refused during drain: {}",
        out.body
    );

    let reply = slow.await.unwrap();
    assert_eq!(
        reply.status, 200,
        "in-flight request was cut: {}",
        reply.body
    );
    assert_eq!(reply.body, "done");

    tokio::time::timeout(Duration::from_secs(8), server.running.wait())
        .await
        .expect("sidecar stops after draining");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain waited for the whole grace period"
    );
    drop(client_sidecar);
}

#[tokio::test]
async fn admin_shutdown_stops_the_sidecar() {
    let mesh = Mesh::start().await;
    let get = client::admin(mesh.server.admin(), "/shutdown").await;
    assert_eq!(get.status, 405, "shutdown needs POST");
    let c = client::h1(mesh.server.admin());
    let req = http::Request::post(format!("http://{}/shutdown", mesh.server.admin()))
        .body(client::empty())
        .unwrap();
    assert_eq!(client::send(&c, req).await.unwrap().status, 200);
    tokio::time::timeout(Duration::from_secs(8), mesh.server.running.wait())
        .await
        .expect("stopped");
}
