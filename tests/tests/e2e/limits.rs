//! Malformed and oversize requests, slowloris, connection and idle limits. After each abuse the
//! sidecar still serves.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::client::{self, raw};
use trellis_tests::Mesh;

async fn still_serving(mesh: &Mesh) {
    let reply = client::get(&client::h1(mesh.client.outbound()), "http://echo/echo").await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn malformed_and_oversize_requests_get_400_and_431() {
    let mesh = Mesh::start().await;
    let out = mesh.client.outbound();
    let resp = raw(out, b"GARBAGE\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "garbage: {resp}");
    still_serving(&mesh).await;

    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: echo\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let resp = raw(out, big.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "oversize header: {}",
        &resp[..resp.len().min(80)]
    );
    still_serving(&mesh).await;

    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let resp = raw(
        out,
        format!("GET /echo HTTP/1.1\r\nHost: echo\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 431"), "too many headers: {resp}");
    still_serving(&mesh).await;

    let resp = raw(out, b"GET /echo HTTP/1.0\r\n\r\n").await;
    assert!(
        resp.starts_with("HTTP/1.0 400") || resp.starts_with("HTTP/1.1 400"),
        "no host: {resp}"
    );
    assert!(resp.contains("trellis-error: missing-authority"), "{resp}");
    still_serving(&mesh).await;
}

#[tokio::test]
async fn slowloris_connection_is_closed_after_header_timeout() {
    let mesh = Mesh::start_with(
        |c| c.limits.header_read_timeout = Duration::from_millis(300),
        |_| {},
    )
    .await;
    let mut tcp = TcpStream::connect(mesh.client.outbound()).await.unwrap();
    tcp.write_all(b"GET /echo HTTP/1.1\r\nHost: ec")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let res = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(res.is_ok(), "connection left open");
    assert!(start.elapsed() < Duration::from_secs(3));
    still_serving(&mesh).await;
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let mesh = Mesh::start_with(
        |c| c.limits.idle_timeout = Duration::from_millis(300),
        |_| {},
    )
    .await;
    let mut tcp = TcpStream::connect(mesh.client.outbound()).await.unwrap();
    tcp.write_all(b"GET /echo HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let start = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if tcp.read(&mut buf).await.unwrap_or(0) == 0 {
                break;
            }
        }
    })
    .await;
    assert!(res.is_ok(), "idle connection not closed");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "closed too early: {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn max_connections_holds_new_connections_until_one_closes() {
    let mesh = Mesh::start_with(|c| c.limits.max_connections = 1, |_| {}).await;
    let out = mesh.client.outbound();
    let first = TcpStream::connect(out).await.unwrap();
    // Give the accept loop time to take the only permit.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = TcpStream::connect(out).await.unwrap();
    second
        .write_all(b"GET /echo HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let held = tokio::time::timeout(Duration::from_millis(400), second.read_to_end(&mut buf)).await;
    assert!(
        held.is_err() && buf.is_empty(),
        "second connection served while at the limit"
    );
    drop(first);
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut buf))
        .await
        .expect("served after a slot frees")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn keep_alive_connection_outlives_the_header_read_timeout() {
    // The header timeout guards a request being sent; an idle keep-alive connection is governed
    // by idle_timeout only.
    let mesh = Mesh::start_with(
        |c| c.limits.header_read_timeout = Duration::from_millis(200),
        |_| {},
    )
    .await;
    let mut tcp = TcpStream::connect(mesh.client.outbound()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..2 {
        tcp.write_all(b"GET /echo HTTP/1.1\r\nHost: echo\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_response_streams_are_cut_and_streams_count_as_in_flight() {
    use http_body_util::BodyExt;
    let mesh = Mesh::start_with(
        |c| c.timeouts.stream_idle = Duration::from_millis(400),
        |_| {},
    )
    .await;
    let c = client::h1(mesh.client.outbound());

    // A pause shorter than the idle timeout is fine.
    let r = client::get(&c, "http://echo/stall/100").await;
    assert_eq!(r.body, "first last");

    // While a stream is open its endpoint counts as in flight (least request, peak-EWMA).
    let resp = c
        .request(
            http::Request::get("http://echo/stall/1500")
                .body(client::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let dump = client::admin(mesh.client.admin(), "/config_dump")
        .await
        .json();
    assert_eq!(
        dump["load_balancers"]["echo"]["endpoints"][0]["in_flight"],
        1
    );

    // A stream that stays quiet longer than the idle timeout is ended with an error.
    let start = Instant::now();
    let mut body = resp.into_body();
    let mut saw_error = false;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("bounded")
    {
        if frame.is_err() {
            saw_error = true;
            break;
        }
    }
    assert!(saw_error, "the stalled stream was not cut");
    assert!(
        start.elapsed() < Duration::from_millis(1400),
        "cut after {:?}",
        start.elapsed()
    );
    let admin = mesh.client.admin();
    trellis_tests::wait_for(
        Duration::from_secs(2),
        "in-flight released when the stream ended",
        || async {
            client::admin(admin, "/config_dump").await.json()["load_balancers"]["echo"]["endpoints"]
                [0]["in_flight"]
                == 0
        },
    )
    .await;
    still_serving(&mesh).await;
}
