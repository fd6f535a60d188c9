//! mTLS rejections: foreign CA, expired, not yet valid, wrong trust domain, plaintext on the
//! strict port, and a server whose SPIFFE ID is not the destination's. Each is refused before
//! any request reaches the app, and counted under its own reason.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::identity::{crypto_provider, CertificateAuthority, IssuedCert, SpiffeId};
use trellis_proxy::testing;
use trellis_tests::client::{self, metric};
use trellis_tests::{Mesh, Pki, Sidecar};

/// Accepts any server: these tests exercise the *server's* checks on the client.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        crypto_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connect with `cert` and try one HTTP/1.1 request; returns whatever came back.
async fn attempt(addr: std::net::SocketAddr, cert: &IssuedCert) -> Result<String, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("echo").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3 clients finish before the server has judged their certificate: the refusal
    // shows up on the first read.
    tls.write_all(b"GET /echo HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    match tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut out)).await {
        Ok(Ok(_)) if out.is_empty() => Err("closed".into()),
        Ok(Ok(_)) => Ok(out),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

async fn inbound_failures(mesh: &Mesh, reason: &str) -> f64 {
    let text = client::admin(mesh.server.admin(), "/metrics").await.body;
    metric(
        &text,
        &format!(
            "trellis_tls_handshake_failures_total{{direction=\"inbound\",reason=\"{reason}\"}}"
        ),
    )
}

/// Returns what the client saw (the alert it received, when it got one).
async fn assert_rejected(mesh: &Mesh, cert: &IssuedCert, reason: &str) -> String {
    let before = mesh.backend.requests.load(Ordering::Relaxed);
    let result = attempt(mesh.server.inbound(), cert).await;
    let Err(seen) = result else {
        panic!("{reason}: connection was served: {result:?}");
    };
    assert_eq!(
        inbound_failures(mesh, reason).await,
        1.0,
        "metric for {reason}"
    );
    assert_eq!(
        mesh.backend.requests.load(Ordering::Relaxed),
        before,
        "{reason}: request reached the app"
    );
    seen
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

#[tokio::test]
async fn valid_client_cert_is_accepted_by_the_raw_client() {
    // Control for the rejection tests: the same raw client with a good certificate is served.
    let mesh = Mesh::start().await;
    let good = mesh
        .pki
        .ca
        .issue_service("client", Duration::from_secs(600))
        .unwrap();
    let resp = attempt(mesh.server.inbound(), &good).await.expect("served");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(&Pki::spiffe("client")), "{resp}");
}

#[tokio::test]
async fn foreign_ca_expired_not_yet_valid_and_wrong_trust_domain_are_rejected() {
    let mesh = Mesh::start().await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let client_id = id(&Pki::spiffe("client"));

    // Same trust domain, so the same CA name as ours: only the signature differs.
    let foreign = CertificateAuthority::generate(testing::TRUST_DOMAIN, hour).unwrap();
    let seen = assert_rejected(
        &mesh,
        &foreign.issue_service("client", hour).unwrap(),
        "unknown_ca",
    )
    .await;
    assert!(
        seen.contains("UnknownCA"),
        "the client is told why (unknown_ca alert): {seen}"
    );
    let _ = assert_rejected(
        &mesh,
        &mesh
            .pki
            .ca
            .issue(&client_id, now - 2 * hour, now - hour)
            .unwrap(),
        "expired",
    )
    .await;
    let _ = assert_rejected(
        &mesh,
        &mesh
            .pki
            .ca
            .issue(&client_id, now + hour, now + 2 * hour)
            .unwrap(),
        "not_yet_valid",
    )
    .await;
    let other_td = id("spiffe://elsewhere.test/service/client");
    let _ = assert_rejected(
        &mesh,
        &mesh
            .pki
            .ca
            .issue(&other_td, now - hour, now + hour)
            .unwrap(),
        "wrong_trust_domain",
    )
    .await;
}

#[tokio::test]
async fn plaintext_on_the_strict_inbound_port_is_refused() {
    let mesh = Mesh::start().await;
    let resp = client::raw(
        mesh.server.inbound(),
        b"GET /echo HTTP/1.1\r\nHost: echo\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("trellis-error: tls-plaintext"), "{resp}");
    assert_eq!(inbound_failures(&mesh, "plaintext").await, 1.0);
    assert_eq!(mesh.backend.requests.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn server_with_the_wrong_spiffe_id_is_refused_by_the_client() {
    let mesh = Mesh::start().await;
    testing::write_identity(&mesh.pki.ca, mesh.pki.path(), "impostor").unwrap();
    let impostor = Sidecar::start(&mesh.pki, "impostor", mesh.backend.addr, |_| {}).await;
    impostor.route(&[]).await;
    // The mesh state says `echo` lives at the impostor's address.
    mesh.client.route(&[("echo", &[impostor.inbound()])]).await;
    let reply = client::get(&client::h1(mesh.client.outbound()), "http://echo/echo").await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    assert_eq!(reply.cause(), "tls-wrong-identity");
    assert!(
        reply
            .body
            .contains("spiffe://trellis.test/service/impostor"),
        "{}",
        reply.body
    );
    assert_eq!(mesh.backend.requests.load(Ordering::Relaxed), 0);
    let text = client::admin(mesh.client.admin(), "/metrics").await.body;
    assert_eq!(metric(&text, "trellis_tls_handshake_failures_total{direction=\"outbound\",reason=\"wrong_identity\"}"), 1.0);
    // Once the state is right again, traffic flows.
    mesh.client
        .route(&[("echo", &[mesh.server.inbound()])])
        .await;
    let ok = client::get(&client::h1(mesh.client.outbound()), "http://echo/echo").await;
    assert_eq!(ok.status, 200);
}
