//! The outside world of an ingress: a web PKI (not the mesh's) with leaves for DNS names, and
//! an HTTPS client that controls what a hostile client controls: the SNI name (or none), the
//! `Host`/`:authority`, the request target's form, the protocol and the source address.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};

/// A CA for outside clients and the leaves it signs.
pub struct WebPki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// How a client reaches the ingress.
#[derive(Clone, Copy, Debug)]
pub struct Dial<'a> {
    pub addr: SocketAddr,
    /// Source address to bind (any 127.0.0.0/8 address on loopback), or the default.
    pub from: Option<IpAddr>,
    /// The name the certificate is verified for.
    pub name: &'a str,
    /// Send `name` as SNI; without it the server picks its default certificate.
    pub sni: bool,
    /// HTTP/2 by ALPN instead of HTTP/1.1.
    pub h2: bool,
}

/// What came back.
#[derive(Debug)]
pub struct HttpsReply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
    /// Trailers, if the response had any (gRPC status).
    pub trailers: Option<HeaderMap>,
    /// The leaf certificate the server presented.
    pub served: CertificateDer<'static>,
}

/// An ingress on loopback (ports chosen by the OS) with a certificate per `(host, stem)`, the
/// files [`WebPki::leaf`] wrote in `dir` (the first the default), and a plain HTTP listener
/// that redirects to HTTPS or serves.
pub fn loopback_ingress(
    dir: &Path,
    certs: &[(&str, &str)],
    redirect_to_https: bool,
) -> trellis_proxy::config::IngressConfig {
    use trellis_proxy::config::{IngressConfig, IngressHttpConfig, ServerCertificate};
    let loopback: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
    IngressConfig {
        listen: loopback,
        certificates: certs
            .iter()
            .map(|(host, stem)| ServerCertificate {
                hosts: vec![host.to_string()],
                cert: dir.join(format!("{stem}.pem")),
                key: dir.join(format!("{stem}-key.pem")),
            })
            .collect(),
        http: Some(IngressHttpConfig {
            listen: loopback,
            redirect_to_https,
        }),
        trusted_proxies: Vec::new(),
        portal: None,
    }
}

// === impl WebPki ===

impl Default for WebPki {
    fn default() -> Self {
        Self::new()
    }
}

impl WebPki {
    pub fn new() -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "test web CA");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertifiedIssuer::self_signed(p, ca_key).expect("ca");
        Self { ca }
    }

    /// Write a leaf for `names` as `<stem>.pem` / `<stem>-key.pem`; returns its DER.
    pub fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca).expect("leaf");
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{stem}-key.pem")), key.serialize_pem())
            .expect("write key");
        cert.der().clone()
    }

    /// A client trusting this CA; full handshakes only (a resumed session shows the
    /// certificate of its first one).
    pub fn client_config(&self, h2: bool, sni: bool) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        c.alpn_protocols = if h2 {
            vec![b"h2".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        c.enable_sni = sni;
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    }

    /// One request over a new TLS connection. The request is sent as built: its URI form
    /// (origin or absolute) and its `Host` header are the caller's.
    pub async fn send<B>(&self, dial: Dial<'_>, req: Request<B>) -> HttpsReply
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let socket = match dial.addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .expect("socket");
        if let Some(ip) = dial.from {
            socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
        }
        let tcp = socket.connect(dial.addr).await.expect("connect");
        let name = ServerName::try_from(dial.name.to_string()).expect("server name");
        let stream = tokio_rustls::TlsConnector::from(self.client_config(dial.h2, dial.sni))
            .connect(name, tcp)
            .await
            .expect("TLS handshake (the served certificate verifies for the name)");
        let served = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("server certificate")
            .clone()
            .into_owned();
        let io = TokioIo::new(stream);
        let resp = if dial.h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("response")
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("http1");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("response")
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let collected = resp.into_body().collect().await.expect("body");
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        HttpsReply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            trailers,
            served,
        }
    }
}
