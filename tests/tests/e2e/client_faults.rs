//! A client that breaks its own request (a malformed chunked body, a body cut short) gets the
//! blame: 400 for it, never an endpoint failure, a retry or an ejection. Otherwise anyone on
//! the internet could eject every backend behind an ingress with a few bad requests.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_policies::MeshDocument;
use trellis_tests::backend::Backend;
use trellis_tests::web::{loopback_ingress, WebPki};
use trellis_tests::{client, init_logs, Load, Pki, Sidecar};

const MALFORMED: &[u8] = b"POST /echo HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\nbroken\r\n0\r\n\r\n";
const TRUNCATED: &[u8] =
    b"POST /echo HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 100000\r\n\r\nonly-a-little";

/// Send `request`, optionally close the write half (a body cut short), and read the answer.
async fn hostile(addr: SocketAddr, request: &[u8], close_early: bool) -> String {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return String::new();
    };
    if tcp.write_all(request).await.is_err() {
        return String::new();
    }
    if close_early {
        let _ = tcp.shutdown().await;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_never_count_against_healthy_endpoints() {
    init_logs();
    let pki = Pki::new(&["gateway", "orders"]);
    let web = WebPki::new();
    web.leaf(pki.path(), "api", &["api.example.com"]);
    let b1 = Backend::start().await;
    let b2 = Backend::start().await;
    let o1 = Sidecar::start(&pki, "orders", b1.addr, |_| {}).await;
    let o2 = Sidecar::start(&pki, "orders", b2.addr, |_| {}).await;
    let gateway = Sidecar::start(&pki, "gateway", b1.addr, |c| {
        c.ingress = Some(loopback_ingress(
            pki.path(),
            &[("api.example.com", "api")],
            false,
        ));
    })
    .await;
    let yaml = format!(
        r#"
services:
  orders:
    endpoints: [{{address: "{}"}}, {{address: "{}"}}]
    policy:
      outlier_detection: {{consecutive_failures: 3}}
http_routes:
  edge:
    hosts: [api.example.com]
    gateways: [gateway, mesh]
    rules: [{{name: api, backends: [{{service: orders}}]}}]
"#,
        o1.inbound(),
        o2.inbound()
    );
    let doc: MeshDocument = trellis_policies::parse_mesh_yaml(&yaml).expect("mesh document");
    let snap = trellis_tests::snapshot_of(&doc);
    for s in [&o1, &o2, &gateway] {
        s.apply(snap.clone()).await;
    }
    let edge = gateway.running.bound.ingress_http.expect("http bound");
    let outbound = gateway.outbound();

    let load = Load::start(
        (0..2).map(|_| client::h1(edge)).collect(),
        "http://api.example.com/echo",
    );
    // 1,000 hostile requests, 10 at a time: half through the ingress, half from an app
    // through the sidecar's outbound side; malformed chunked bodies and bodies cut short.
    let mut answered_400 = 0;
    for round in 0..100 {
        let batch: Vec<_> = (0..10)
            .map(|i| {
                let addr = if i % 2 == 0 { edge } else { outbound };
                let (request, close_early) = if (round + i) % 2 == 0 {
                    (MALFORMED, false)
                } else {
                    (TRUNCATED, true)
                };
                tokio::spawn(hostile(addr, request, close_early))
            })
            .collect();
        for b in batch {
            let answer = b.await.expect("hostile client");
            assert!(
                !answer.starts_with("HTTP/1.1 5"),
                "a client's broken body answered as an upstream failure: {answer}"
            );
            answered_400 += usize::from(answer.starts_with("HTTP/1.1 400"));
        }
    }
    let (ok, failed) = load.stop().await;
    assert_eq!(failed, 0, "legitimate requests failed ({ok} succeeded)");
    assert!(ok > 0);
    assert!(
        answered_400 >= 250,
        "malformed bodies get 400: {answered_400}"
    );

    let text = client::admin(gateway.admin(), "/metrics").await.body;
    assert_eq!(
        client::metric(
            &text,
            "trellis_outlier_events_total{service=\"orders\",event=\"ejected\"}"
        ),
        0.0,
        "{text}"
    );
    assert_eq!(
        client::metric(
            &text,
            "trellis_outlier_events_total{service=\"orders\",event=\"retry\"}"
        ),
        0.0,
        "a client's broken body is never retried"
    );
    let dump = client::admin(gateway.admin(), "/config_dump").await.json();
    let text = dump["load_balancers"].to_string();
    assert!(!text.contains("\"ejected\""), "{text}");
}
