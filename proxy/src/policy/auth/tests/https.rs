//! The `https` path of JWKS fetching: rustls with ring over a real loopback TLS server.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

use crate::policy::auth::fetch::{FetchError, Fetcher};

/// A private CA and a `localhost` server certificate it signed.
fn pki() -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
        .expect("ca cert");
    let key = KeyPair::generate().expect("server key");
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .expect("server params")
        .signed_by(&key, &ca)
        .expect("server cert");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (ca.der().clone(), cert.der().clone(), key)
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[tokio::test]
async fn fetches_over_tls_and_checks_the_server_certificate() {
    let (ca, cert, key) = pki();
    let server = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let host = req.headers().get("host").cloned();
                    let body = format!("{{\"path\": \"{}\", \"host\": {:?}}}", req.uri(), host);
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });

    let uri = format!("https://localhost:{port}/keys?v=1");
    // The public roots do not know the private CA.
    let public = Fetcher::new(&uri).expect("uri");
    assert!(matches!(public.fetch().await, Err(FetchError::Tls(_))));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("ca");
    let client = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let fetcher = Fetcher::new(&uri)
        .expect("uri")
        .with_tls_config(Arc::new(client));
    let body = fetcher.fetch().await.expect("fetched over TLS");
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("\"path\": \"/keys?v=1\""), "{text}");
    assert!(text.contains(&format!("localhost:{port}")), "{text}");
}
