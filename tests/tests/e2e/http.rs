//! HTTP/1.1 and h2c through the mesh, header handling, absolute-form proxy requests.

use http::Request;
use trellis_tests::client::{self, empty, raw};
use trellis_tests::{Mesh, Pki};

#[tokio::test]
async fn http1_through_two_sidecars_restores_http1_and_passes_identity() {
    let mesh = Mesh::start().await;
    let c = client::h1(mesh.client.outbound());
    let req = Request::get("http://echo/echo?x=1")
        .header("connection", "x-drop-me")
        .header("x-drop-me", "secret")
        .header("keep-alive", "timeout=5")
        .header("trellis-peer-identity", "spiffe://evil/service/admin")
        .header("x-forwarded-for", "10.9.9.9")
        .header("x-app", "kept")
        .body(empty())
        .unwrap();
    let reply = client::send(&c, req).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let j = reply.json();
    assert_eq!(
        j["version"], "HTTP/1.1",
        "HTTP/1.1 from the app must reach the app as HTTP/1.1"
    );
    assert_eq!(j["path"], "/echo?x=1");
    let h = &j["headers"];
    assert_eq!(h["host"], "echo");
    assert_eq!(h["x-app"], "kept");
    assert_eq!(
        h["trellis-peer-identity"],
        Pki::spiffe("client"),
        "spoofed identity must be replaced"
    );
    assert!(
        h.get("x-drop-me").is_none() && h.get("keep-alive").is_none(),
        "hop-by-hop leaked: {h}"
    );
    assert!(
        h.get("trellis-orig-proto").is_none(),
        "internal header leaked"
    );
    // The app's own chain is kept and the server side's sidecar appends the calling pod once:
    // the client sidecar adds no hop of its own (it would name the same pod).
    assert_eq!(h["x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=https", "{h}");
}

#[tokio::test]
async fn h2c_prior_knowledge_stays_http2_to_the_app() {
    let mesh = Mesh::start().await;
    let c = client::h2c(mesh.client.outbound());
    for _ in 0..3 {
        let reply = client::get(&c, "http://echo/echo").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let j = reply.json();
        assert_eq!(j["version"], "HTTP/2.0");
        assert_eq!(j["authority"], "echo");
        assert_eq!(j["headers"]["trellis-peer-identity"], Pki::spiffe("client"));
    }
}

#[tokio::test]
async fn absolute_form_proxy_requests_are_routed() {
    let mesh = Mesh::start().await;
    let resp = raw(
        mesh.client.outbound(),
        b"GET http://echo:8080/echo HTTP/1.1\r\nHost: echo:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"host\":\"echo:8080\""), "{resp}");
}

#[tokio::test]
async fn post_bodies_and_status_codes_pass_through() {
    let mesh = Mesh::start().await;
    let c = client::h1(mesh.client.outbound());
    let req = Request::post("http://echo/upload")
        .body(client::full("hello world"))
        .unwrap();
    let reply = client::send(&c, req).await.unwrap();
    assert_eq!(reply.body, "11");
    let reply = client::get(&c, "http://echo/status/418").await;
    assert_eq!(reply.status, 418);
    assert_eq!(
        reply.cause(),
        "",
        "an upstream status is not a sidecar error"
    );
}

#[tokio::test]
async fn permissive_inbound_accepts_plaintext_without_identity() {
    let mesh = Mesh::start_with(
        |_| {},
        |c| c.inbound.mode = trellis_proxy::config::InboundMode::Permissive,
    )
    .await;
    let c = client::h1(mesh.server.inbound());
    let req = Request::get("http://echo/echo")
        .header("trellis-peer-identity", "spiffe://evil/service/x")
        .body(empty())
        .unwrap();
    let reply = client::send(&c, req).await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(
        reply.json()["headers"]
            .get("trellis-peer-identity")
            .is_none(),
        "plaintext callers have no identity"
    );
    // mTLS still works on the same port.
    let reply = client::get(&client::h1(mesh.client.outbound()), "http://echo/echo").await;
    assert_eq!(
        reply.json()["headers"]["trellis-peer-identity"],
        Pki::spiffe("client")
    );
}
