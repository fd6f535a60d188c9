//! Errors map to precise statuses with a `trellis-error` cause header.

use std::sync::Arc;
use std::time::Duration;

use trellis_policies::{EndpointSpec, MeshDocument, ServicePolicy, ServiceSpec};
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::client::{self, metric};
use trellis_tests::{Mesh, Pki, Sidecar, TRUST_DOMAIN};

fn doc(services: &[(&str, &[String], Option<Duration>)]) -> Arc<Snapshot> {
    let mut d = MeshDocument::default();
    for (name, addrs, timeout) in services {
        let endpoints = addrs
            .iter()
            .map(|a| EndpointSpec {
                address: a.clone(),
                identity: None,
                weight: 1,
                zone: None,
            })
            .collect();
        let policy = ServicePolicy {
            request_timeout: *timeout,
            ..Default::default()
        };
        d.services.insert(
            name.to_string(),
            ServiceSpec {
                endpoints,
                policy,
                external: None,
            },
        );
    }
    Arc::new(
        Snapshot::from_document(
            &d,
            TRUST_DOMAIN,
            trellis_tests::next_version(),
            "test".into(),
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn unknown_service_no_endpoints_connect_failure_and_timeout() {
    let mesh = Mesh::start().await;
    let closed_port = trellis_tests::ClosedPort::new();
    let closed = closed_port.addr.to_string();
    mesh.client
        .apply(doc(&[
            (
                "echo",
                &[mesh.server.inbound().to_string()],
                Some(Duration::from_millis(300)),
            ),
            ("empty", &[], None),
            ("down", &[closed], None),
        ]))
        .await;

    let c = client::h1(mesh.client.outbound());
    let cases = [
        ("http://nowhere/", 503, "unknown-service"),
        ("http://empty/", 503, "no-endpoints"),
        ("http://down/", 502, "connect-failed"),
        ("http://echo/slow/3000", 504, "response-timeout"),
    ];
    for (uri, status, cause) in cases {
        let reply = client::get(&c, uri).await;
        assert_eq!(reply.status, status, "{uri}: {}", reply.body);
        assert_eq!(reply.cause(), cause, "{uri}");
        assert!(!reply.body.is_empty(), "{uri}: the body explains the error");
    }
    // The policy timeout applies to `echo` only; fast requests still pass.
    assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    let text = client::admin(mesh.client.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &text,
            "trellis_proxy_errors_total{direction=\"outbound\",cause=\"no-endpoints\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "trellis_requests_total{direction=\"outbound\",service=\"unknown\",route=\"default\",status_code=\"503\"}"), 1.0);
}

#[tokio::test]
async fn app_down_behind_the_inbound_sidecar_is_a_502() {
    trellis_tests::init_logs();
    let pki = Pki::new(&["client", "echo"]);
    let closed_port = trellis_tests::ClosedPort::new();
    let closed = closed_port.addr;
    let server = Sidecar::start(&pki, "echo", closed, |_| {}).await;
    server.route(&[]).await;
    let client_sc = Sidecar::start(&pki, "client", closed, |_| {}).await;
    client_sc.route(&[("echo", &[server.inbound()])]).await;
    let reply = client::get(&client::h1(client_sc.outbound()), "http://echo/echo").await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.cause(), "connect-failed");
}
