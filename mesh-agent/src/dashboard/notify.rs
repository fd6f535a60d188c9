//! Delivery of alert notifications (Alertmanager's v2 API, a JSON webhook) over `http://` or
//! `https://`.
//!
//! Why one connection per post rather than a pooled client: alerts are few (one post per
//! destination per evaluation round at most), so a pool saves nothing measurable, and owning
//! the connection is what lets a failure be told precisely: the connect, the TLS handshake
//! (with rustls' own reason: unknown issuer, expired, name mismatch...), or the HTTP answer. A
//! pooled client reports all of these as one opaque "connect error".
//!
//! Trust: an `https` destination's certificate is verified against the Mozilla roots compiled
//! in (`webpki-roots`, as the JWKS fetch does, so a minimal container without a system trust
//! store works), or, when `--alert-ca-file` is given, against that bundle only: Alertmanager
//! and webhooks usually sit behind a private CA, and trusting only it keeps a public CA from
//! vouching for an internal name. `--alert-client-cert` / `--alert-client-key` present a
//! client certificate (mTLS to Alertmanager). Every file is read and checked once at startup,
//! so a wrong path or a broken PEM stops the dashboard with the file's name instead of failing
//! every round.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::alerts::Notify;

/// Deadline of one delivery: connect, handshake, request and answer. A destination that hangs
/// costs the round at most this long (deliveries of a round run at once).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// A notification setting that cannot work; found at startup, naming the flag or file.
#[derive(Debug, thiserror::Error)]
pub enum NotifyConfigError {
    #[error("alert destination {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("{what} {}: cannot read it: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {}: not valid PEM: {reason}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {}: no certificate in it (expected PEM `CERTIFICATE` blocks)", path.display())]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("alert CA file {}: certificate {index} is not a usable trust anchor: {reason}", path.display())]
    BadCa {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("alert client key {}: no private key in it (expected PEM `PRIVATE KEY`)", path.display())]
    NoKey { path: PathBuf },
    #[error("--alert-client-cert and --alert-client-key go together; only {given} is set")]
    Unpaired { given: &'static str },
    #[error("alert client certificate {} with key {}: {reason}", cert.display(), key.display())]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Why one delivery failed; logged with the destination, and the alert is sent again as any
/// failed delivery is (Alertmanager's firing alerts every round).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The handshake failed, or the server ended the connection with a TLS alert (refusing
    /// this client's certificate, say): the reason is rustls' with a hint.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(hyper::Error),
    #[error("refused with status {0}")]
    Status(StatusCode),
    #[error("no answer within {DELIVERY_TIMEOUT:?}")]
    Timeout,
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

impl DeliveryError {
    /// A short label for logs: `connect`, `tls`, `http`, `status`, `timeout`, `request`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Tls(_) => "tls",
            Self::Http(_) => "http",
            Self::Status(_) => "status",
            Self::Timeout => "timeout",
            Self::Request(_) => "request",
        }
    }
}

/// One parsed destination URL.
#[derive(Clone, Debug)]
pub struct Destination {
    uri: Uri,
    host: String,
    port: u16,
    https: bool,
}

impl Destination {
    /// Parse an `http://` or `https://` URL with a host.
    pub fn parse(url: &str) -> Result<Self, NotifyConfigError> {
        let bad = |reason: String| NotifyConfigError::Url {
            url: url.to_string(),
            reason,
        };
        let uri: Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("not http:// or https://".into())),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if https {
            ServerName::try_from(host.clone())
                .map_err(|e| bad(format!("{host:?} is not a TLS server name: {e}")))?;
        }
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Self {
            uri,
            host,
            port,
            https,
        })
    }

    pub fn url(&self) -> String {
        self.uri.to_string()
    }

    pub fn is_https(&self) -> bool {
        self.https
    }
}

/// Where alerts go and how: built once at startup from [`Notify`].
pub struct Notifier {
    pub alertmanagers: Vec<Destination>,
    pub webhook: Option<Destination>,
    /// Set when a destination is `https` or a TLS file is given (checked even if unused, so
    /// that a typo does not wait for the first https URL to show).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Notifier {
    /// Check every URL and TLS file; the error names the one at fault.
    pub fn new(n: &Notify) -> Result<Self, NotifyConfigError> {
        let alertmanagers = n
            .alertmanagers
            .iter()
            .map(|base| {
                Destination::parse(&format!("{}/api/v2/alerts", base.trim_end_matches('/')))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let webhook = n.webhook.as_deref().map(Destination::parse).transpose()?;
        let any_https = alertmanagers.iter().chain(&webhook).any(|d| d.https);
        let any_file = n.ca_file.is_some() || n.client_cert.is_some() || n.client_key.is_some();
        let tls = if any_https || any_file {
            Some(Arc::new(client_config(n)?))
        } else {
            None
        };
        Ok(Self {
            alertmanagers,
            webhook,
            tls,
        })
    }

    /// POST `body` to `dest` as JSON within [`DELIVERY_TIMEOUT`].
    pub async fn post(
        &self,
        dest: &Destination,
        body: &serde_json::Value,
    ) -> Result<(), DeliveryError> {
        tokio::time::timeout(DELIVERY_TIMEOUT, self.post_inner(dest, body))
            .await
            .map_err(|_| DeliveryError::Timeout)?
    }

    /// [`Self::post`], a failure logged with its kind and precise reason. The caller goes on
    /// either way: one destination failing never holds back the others or the evaluation.
    pub async fn deliver(&self, dest: &Destination, body: &serde_json::Value) -> bool {
        match self.post(dest, body).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(url = %dest.url(), kind = e.kind(), error = %e, "alert not delivered");
                false
            }
        }
    }

    async fn post_inner(
        &self,
        dest: &Destination,
        body: &serde_json::Value,
    ) -> Result<(), DeliveryError> {
        let tcp = TcpStream::connect((dest.host.as_str(), dest.port))
            .await
            .map_err(DeliveryError::Connect)?;
        let _ = tcp.set_nodelay(true);
        match (&self.tls, dest.https) {
            (Some(config), true) => {
                // Checked in `Destination::parse`; a failure here would be a bug, not input.
                let name = ServerName::try_from(dest.host.clone())
                    .map_err(|e| DeliveryError::Tls(format!("server name: {e}")))?;
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|e| DeliveryError::Tls(tls_reason(&e)))?;
                exchange(dest, tls, body).await
            }
            (None, true) => Err(DeliveryError::Tls("no TLS configuration".into())),
            (_, false) => exchange(dest, tcp, body).await,
        }
    }
}

/// One HTTP/1.1 POST on `io`.
async fn exchange<S>(
    dest: &Destination,
    io: S,
    body: &serde_json::Value,
) -> Result<(), DeliveryError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(http_error)?;
    // The connection task ends with the exchange, or when the deadline drops `send`.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = dest.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = dest.uri.authority().map_or("", |a| a.as_str());
    let req = Request::post(path)
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "trellis-dashboard")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = send.send_request(req).await.map_err(http_error)?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Status(resp.status()))
    }
}

/// A TLS alert can arrive after the client's side of the handshake is done (TLS 1.3: the
/// server checks the client certificate then), so it surfaces as an HTTP error: tell it apart.
fn http_error(e: hyper::Error) -> DeliveryError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        // `io::Error::source` skips the error it wraps: look inside it too.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<rustls::Error>());
        if let Some(t) = s.downcast_ref::<rustls::Error>().or(inner) {
            return DeliveryError::Tls(describe(t));
        }
        source = s.source();
    }
    DeliveryError::Http(e)
}

/// The rustls reason inside a handshake's I/O error, or the I/O error itself (a reset).
fn tls_reason(e: &std::io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => describe(t),
        None => e.to_string(),
    }
}

/// rustls' reason, with what to check for the common ones.
fn describe(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let hint = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                " (the server's certificate does not chain to a trusted root: check --alert-ca-file)"
            }
            C::BadSignature => {
                " (the server's certificate is not signed by the trusted CA's key: check --alert-ca-file)"
            }
            C::Expired | C::ExpiredContext { .. } => " (the server's certificate has expired)",
            C::NotValidYet | C::NotValidYetContext { .. } => {
                " (the server's certificate is not valid yet: check the clocks)"
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                " (the server's certificate is not for the URL's host)"
            }
            _ => "",
        },
        rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA,
        ) => " (the server refused this client: check --alert-client-cert)",
        _ => "",
    };
    format!("{e}{hint}")
}

/// The TLS client configuration of every https destination.
fn client_config(n: &Notify) -> Result<rustls::ClientConfig, NotifyConfigError> {
    let roots = match &n.ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for (index, cert) in certificates(path, "alert CA file")?.into_iter().enumerate() {
                roots.add(cert).map_err(|e| NotifyConfigError::BadCa {
                    path: path.clone(),
                    index,
                    reason: e.to_string(),
                })?;
            }
            roots
        }
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // The ring provider supports the default versions; this cannot fail.
        .unwrap_or_else(|_| unreachable!("ring supports TLS 1.2 and 1.3"))
        .with_root_certificates(roots);
    let mut config = match (&n.client_cert, &n.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(NotifyConfigError::Unpaired {
                given: "--alert-client-cert",
            })
        }
        (None, Some(_)) => {
            return Err(NotifyConfigError::Unpaired {
                given: "--alert-client-key",
            })
        }
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "alert client certificate")?;
            let der = read(key, "alert client key")?;
            let private = PrivateKeyDer::from_pem_slice(&der).map_err(|e| match e {
                rustls_pki_types::pem::Error::NoItemsFound => {
                    NotifyConfigError::NoKey { path: key.clone() }
                }
                e => NotifyConfigError::Pem {
                    what: "alert client key",
                    path: key.clone(),
                    reason: e.to_string(),
                },
            })?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                NotifyConfigError::ClientAuth {
                    cert: cert.clone(),
                    key: key.clone(),
                    reason: e.to_string(),
                }
            })?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, NotifyConfigError> {
    std::fs::read(path).map_err(|source| NotifyConfigError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate of a PEM file; at least one.
fn certificates(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, NotifyConfigError> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NotifyConfigError::Pem {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(NotifyConfigError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests;
