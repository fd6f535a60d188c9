//! Try-it-out: the portal sends a consumer's request to the API *through this ingress's own
//! TLS listener*, with the consumer's key, so it is admitted, limited, routed and counted
//! exactly as the consumer's client would be; the page shows the answer.
//!
//! Sent from the agent rather than the browser: the API is on another host, and a browser
//! call there would need CORS on every API, and would put the API's answers on the portal's
//! origin. The connection goes only to the ingress's own listener (never to a host the page
//! names), and the ingress's certificate is checked by pinning: the leaf it presents must be
//! the one configured for that host name, read from the same files.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use trellis_proxy::config::ServerCertificate;

/// How long a try-it-out request may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(15);
/// The most of an answer shown.
const MAX_SHOWN: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("{0}")]
    Bad(String),
    #[error("cannot reach the ingress: {0}")]
    Connect(String),
    #[error("the API took over {0:?}")]
    Timeout(Duration),
}

/// What the page asks to send.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TryRequest {
    pub service: String,
    pub method: String,
    /// Path and query, as the API's consumers call it (`/shop/42?x=1`).
    pub path: String,
    /// The consumer's API key, as the page holds it (never stored).
    pub key: String,
    #[serde(default)]
    pub body: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TryResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub truncated: bool,
    pub millis: u64,
    /// What was sent: method and URL.
    pub sent: String,
}

/// Where the API is and how its key travels, read from its public document.
pub struct Target {
    pub host: String,
    pub base: String,
    pub key_in: KeyIn,
}

pub enum KeyIn {
    Header(String),
    Query(String),
}

pub struct Relay {
    /// The ingress TLS listener (a wildcard address dialed on loopback).
    pub listener: SocketAddr,
    pub certificates: Vec<ServerCertificate>,
}

// === impl Relay ===

impl Relay {
    pub async fn send(&self, target: &Target, req: &TryRequest) -> Result<TryResponse, RelayError> {
        let start = Instant::now();
        let (request, sent) = build(target, req)?;
        let resp = tokio::time::timeout(TIMEOUT, self.exchange(&target.host, request))
            .await
            .map_err(|_| RelayError::Timeout(TIMEOUT))??;
        let (parts, body) = resp.into_parts();
        let (body, truncated) = match Limited::new(body, MAX_SHOWN).collect().await {
            Ok(b) => (b.to_bytes(), false),
            Err(_) => (Bytes::from_static(b""), true),
        };
        Ok(TryResponse {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect(),
            body: String::from_utf8_lossy(&body).into_owned(),
            truncated,
            millis: start.elapsed().as_millis() as u64,
            sent,
        })
    }

    async fn exchange(
        &self,
        host: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, RelayError> {
        let pinned = pinned_leaf(&self.certificates, host)?;
        let provider = rustls::crypto::ring::default_provider();
        let verifier = Arc::new(Pinned {
            leaf: pinned,
            algs: provider.signature_verification_algorithms,
        });
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| RelayError::Connect(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| RelayError::Bad(format!("host `{host}`: {e}")))?;
        let tcp = tokio::net::TcpStream::connect(dial(self.listener))
            .await
            .map_err(|e| RelayError::Connect(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| RelayError::Connect(e.to_string()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| RelayError::Connect(e.to_string()))?;
        tokio::spawn(conn);
        sender
            .send_request(req)
            .await
            .map_err(|e| RelayError::Connect(e.to_string()))
    }
}

/// A wildcard listen address is reached on loopback.
fn dial(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

/// The request the ingress gets: only a method and a path of the page's choosing; the host
/// is the API's.
fn build(target: &Target, req: &TryRequest) -> Result<(Request<Full<Bytes>>, String), RelayError> {
    let method = match req.method.to_ascii_uppercase().as_str() {
        "GET" => Method::GET,
        "HEAD" => Method::HEAD,
        "POST" => Method::POST,
        "PUT" => Method::PUT,
        "PATCH" => Method::PATCH,
        "DELETE" => Method::DELETE,
        "OPTIONS" => Method::OPTIONS,
        _ => {
            return Err(RelayError::Bad(format!(
                "`{}` is not a method an OpenAPI operation can have here",
                req.method
            )))
        }
    };
    if !req.path.starts_with('/') || req.path.starts_with("//") {
        return Err(RelayError::Bad(
            "the path must start with a single `/`".into(),
        ));
    }
    let mut path = format!("{}{}", target.base.trim_end_matches('/'), req.path);
    if let KeyIn::Query(name) = &target.key_in {
        let sep = if path.contains('?') { '&' } else { '?' };
        path = format!("{path}{sep}{name}={}", url_escape(&req.key));
    }
    let uri: Uri = path
        .parse()
        .map_err(|e| RelayError::Bad(format!("path: {e}")))?;
    let body = req.body.clone().unwrap_or_default();
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header(http::header::HOST, &target.host)
        .header(http::header::USER_AGENT, "trellis-portal-try-it-out");
    if !body.is_empty() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    if let KeyIn::Header(name) = &target.key_in {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| RelayError::Bad(format!("key header: {e}")))?;
        let value = HeaderValue::from_str(&req.key)
            .map_err(|_| RelayError::Bad("the key is not a valid header value".into()))?;
        builder = builder.header(name, value);
    }
    let sent = format!("{method} https://{}{path}", target.host);
    let sent = match &target.key_in {
        KeyIn::Query(_) => sent.replace(&url_escape(&req.key), "<key>"),
        KeyIn::Header(_) => sent,
    };
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| RelayError::Bad(e.to_string()))?;
    Ok((request, sent))
}

fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The leaf certificate the ingress serves for `host`: the first configured certificate
/// naming it (exactly or by a one-label wildcard), else the default (the first).
fn pinned_leaf(
    certs: &[ServerCertificate],
    host: &str,
) -> Result<CertificateDer<'static>, RelayError> {
    let matches = |pattern: &str| {
        pattern.eq_ignore_ascii_case(host)
            || pattern.strip_prefix("*.").is_some_and(|suffix| {
                host.split_once('.')
                    .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(suffix))
            })
    };
    let chosen = certs
        .iter()
        .find(|c| c.hosts.iter().any(|h| matches(h)))
        .or_else(|| certs.first())
        .ok_or_else(|| RelayError::Connect("the ingress has no certificate".into()))?;
    CertificateDer::pem_file_iter(&chosen.cert)
        .map_err(|e| RelayError::Connect(format!("{}: {e}", chosen.cert.display())))?
        .next()
        .ok_or_else(|| RelayError::Connect(format!("{}: no certificate", chosen.cert.display())))?
        .map_err(|e| RelayError::Connect(format!("{}: {e}", chosen.cert.display())))
}

/// Accepts exactly one leaf certificate (signatures still checked).
#[derive(Debug)]
struct Pinned {
    leaf: CertificateDer<'static>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match end_entity.as_ref() == self.leaf.as_ref() {
            true => Ok(ServerCertVerified::assertion()),
            false => Err(rustls::Error::General(
                "not the certificate this ingress is configured with".into(),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_goes_to_the_api_host_with_the_key() {
        let target = Target {
            host: "api.example.com".into(),
            base: "/v2".into(),
            key_in: KeyIn::Query("api_key".into()),
        };
        let req = TryRequest {
            service: "orders".into(),
            method: "get".into(),
            path: "/shop?x=1".into(),
            key: "trk_a+b".into(),
            body: None,
        };
        let (r, sent) = build(&target, &req).expect("built");
        assert_eq!(r.uri(), "/v2/shop?x=1&api_key=trk_a%2Bb");
        assert_eq!(r.headers()["host"], "api.example.com");
        assert_eq!(
            sent,
            "GET https://api.example.com/v2/shop?x=1&api_key=<key>"
        );
        let connect = TryRequest {
            method: "CONNECT".into(),
            ..req_with(&req)
        };
        assert!(build(&target, &connect).is_err());
        for bad in ["shop", "//evil.example/x", "http://evil/"] {
            let req = TryRequest {
                path: bad.into(),
                ..req_with(&req)
            };
            assert!(build(&target, &req).is_err(), "{bad}");
        }
    }

    fn req_with(r: &TryRequest) -> TryRequest {
        TryRequest {
            service: r.service.clone(),
            method: r.method.clone(),
            path: r.path.clone(),
            key: r.key.clone(),
            body: r.body.clone(),
        }
    }
}
