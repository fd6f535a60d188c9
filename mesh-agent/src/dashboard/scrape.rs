//! Reading one sidecar's telemetry over mTLS: the dashboard presents its own identity, checks
//! the sidecar's (the SPIFFE ID its registration names), and asks for
//! `/.well-known/trellis/<what>` on the inbound listener. The sidecar answers only if the
//! dashboard's identity is in its `telemetry.readers`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use trellis_proxy::identity::{Alpn, SpiffeId, TlsContext};
use trellis_proxy::telemetry::summary::{Summary, SUMMARY_VERSION};

/// Largest answer read from a sidecar: a summary is a few KB, metrics tens of KB.
const MAX_BODY: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{addr}: {stage} timed out after {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        stage: &'static str,
        timeout: Duration,
    },
    #[error("{addr}: connect: {0}", addr = .1)]
    Connect(std::io::Error, SocketAddr),
    #[error("{addr}: mTLS handshake: {0}", addr = .1)]
    Tls(std::io::Error, SocketAddr),
    #[error("{addr}: {0}", addr = .1)]
    Http(String, SocketAddr),
    #[error("{addr}: answered {status} ({cause})")]
    Status {
        addr: SocketAddr,
        status: StatusCode,
        cause: String,
    },
    #[error("{addr}: the summary is not one this dashboard reads: {message}")]
    Invalid { addr: SocketAddr, message: String },
}

/// Fetches telemetry with one identity.
#[derive(Clone)]
pub struct Reader {
    tls: std::sync::Arc<TlsContext>,
    timeout: Duration,
}

// === impl Reader ===

impl Reader {
    pub fn new(tls: std::sync::Arc<TlsContext>, timeout: Duration) -> Self {
        Self { tls, timeout }
    }

    /// `GET /.well-known/trellis/<what>` from the sidecar at `addr`, which must prove
    /// `identity`.
    pub async fn get(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
        what: &str,
    ) -> Result<Bytes, ScrapeError> {
        let timeout = self.timeout;
        let expired = |stage| ScrapeError::Timeout {
            addr,
            stage,
            timeout,
        };
        let config = self
            .tls
            .client_config(identity, Alpn::Http11)
            .map_err(|e| ScrapeError::Http(e.to_string(), addr))?;
        let name = identity
            .service()
            .and_then(|s| ServerName::try_from(s.to_string()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| expired("connect"))?
            .map_err(|e| ScrapeError::Connect(e, addr))?;
        let tls = tokio::time::timeout(timeout, TlsConnector::from(config).connect(name, tcp))
            .await
            .map_err(|_| expired("mTLS handshake"))?
            .map_err(|e| ScrapeError::Tls(e, addr))?;
        let exchange = async {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| ScrapeError::Http(e.to_string(), addr))?;
            tokio::spawn(conn);
            let req = Request::get(format!("/.well-known/trellis/{what}"))
                .header(http::header::HOST, identity.service().unwrap_or("sidecar"))
                .body(Empty::<Bytes>::new())
                .map_err(|e| ScrapeError::Http(e.to_string(), addr))?;
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| ScrapeError::Http(e.to_string(), addr))?;
            let status = resp.status();
            let cause = resp
                .headers()
                .get("trellis-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ScrapeError::Http(e.to_string(), addr))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(ScrapeError::Status {
                    addr,
                    status,
                    cause,
                });
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| expired("request"))?
    }

    /// The sidecar's summary, checked to be a version this dashboard reads.
    pub async fn summary(
        &self,
        addr: SocketAddr,
        identity: &SpiffeId,
    ) -> Result<Summary, ScrapeError> {
        let body = self.get(addr, identity, "summary").await?;
        let s: Summary = serde_json::from_slice(&body).map_err(|e| ScrapeError::Invalid {
            addr,
            message: e.to_string(),
        })?;
        if s.version != SUMMARY_VERSION {
            return Err(ScrapeError::Invalid {
                addr,
                message: format!(
                    "version {} (this dashboard reads {SUMMARY_VERSION})",
                    s.version
                ),
            });
        }
        Ok(s)
    }
}
