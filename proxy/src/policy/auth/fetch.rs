//! One bounded GET of a JWKS document over HTTP/1.1, plain or TLS.
//!
//! A JWKS is fetched every few minutes, so there is no pool: each fetch opens a connection,
//! sends one request and closes it. `https` uses rustls with ring and the Mozilla roots from
//! `webpki-roots` (compiled in, so a minimal container without a system trust store still
//! reaches a public identity provider). The whole exchange has a deadline and the body a size
//! cap, so a slow or hostile server can hold neither a task nor memory.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Deadline for connect, TLS, request and the whole body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS body accepted; real ones are a few KiB.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Where and how to fetch one JWKS.
#[derive(Clone)]
pub(crate) struct Fetcher {
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// Why a fetch failed; logged with the URL, never shown to clients.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid JWKS URL: {0}")]
    InvalidUri(String),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("status {0}")]
    Status(StatusCode),
    #[error("body larger than {MAX_JWKS_BYTES} bytes or unreadable")]
    Body,
    #[error("no answer within {FETCH_TIMEOUT:?}")]
    Timeout,
    #[error("not a usable JWKS: {0}")]
    Document(String),
}

// === impl Fetcher ===

impl Fetcher {
    pub(crate) fn new(uri: &str) -> Result<Self, FetchError> {
        let uri: Uri = uri
            .parse()
            .map_err(|e| FetchError::InvalidUri(format!("{uri}: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(FetchError::InvalidUri(format!("{uri}: not http or https"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| FetchError::InvalidUri(format!("{uri}: no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = https.then(|| Arc::clone(client_config()));
        Ok(Self {
            uri,
            host,
            port,
            tls,
        })
    }

    /// Trust other roots than the public ones (tests with a private CA).
    #[cfg(test)]
    pub(crate) fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        if self.tls.is_some() {
            self.tls = Some(config);
        }
        self
    }

    pub(crate) fn uri(&self) -> &Uri {
        &self.uri
    }

    /// GET the document, within [`FETCH_TIMEOUT`] and [`MAX_JWKS_BYTES`].
    pub(crate) async fn fetch(&self) -> Result<Bytes, FetchError> {
        tokio::time::timeout(FETCH_TIMEOUT, self.fetch_inner())
            .await
            .map_err(|_| FetchError::Timeout)?
    }

    async fn fetch_inner(&self) -> Result<Bytes, FetchError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(FetchError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.exchange(tcp).await,
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| FetchError::InvalidUri(format!("{}: {e}", self.uri)))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(FetchError::Tls)?;
                self.exchange(tls).await
            }
        }
    }

    async fn exchange<S>(&self, io: S) -> Result<Bytes, FetchError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        // The connection task ends with the exchange (or with this fetch's deadline, when the
        // caller drops the future and with it `send`).
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let authority = self.uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let req = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .header(header::USER_AGENT, "trellis-jwks")
            .body(Empty::<Bytes>::new())
            .map_err(|e| FetchError::InvalidUri(e.to_string()))?;
        let resp = send.send_request(req).await?;
        if resp.status() != StatusCode::OK {
            return Err(FetchError::Status(resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|_| FetchError::Body)?;
        Ok(body.to_bytes())
    }
}

/// One TLS client configuration for all JWKS fetches: parsing the roots once.
fn client_config() -> &'static Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
            // The ring provider supports the default versions; this cannot fail.
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_url() {
        let f = Fetcher::new("https://idp.example/.well-known/jwks.json").expect("https");
        assert_eq!(
            (f.host.as_str(), f.port, f.tls.is_some()),
            ("idp.example", 443, true)
        );
        let f = Fetcher::new("http://127.0.0.1:8080/jwks").expect("http");
        assert_eq!(
            (f.host.as_str(), f.port, f.tls.is_some()),
            ("127.0.0.1", 8080, false)
        );
        let f = Fetcher::new("http://[::1]:9/k").expect("ipv6");
        assert_eq!(f.host, "::1");
        assert!(Fetcher::new("ftp://idp/jwks").is_err());
        assert!(Fetcher::new("not a url").is_err());
    }

    #[tokio::test]
    async fn refused_connection_is_an_error_not_a_hang() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let f = Fetcher::new(&format!("http://127.0.0.1:{port}/jwks")).expect("url");
        assert!(matches!(f.fetch().await, Err(FetchError::Connect(_))));
    }
}
