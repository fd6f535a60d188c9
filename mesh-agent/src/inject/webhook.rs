//! `mesh-agent injector`: the mutating admission webhook over HTTPS. Stateless (each answer
//! depends only on the request and the flags), so several replicas can run behind one
//! Service.
//!
//! - `POST /inject`: for namespaces labelled `trellis.dev/inject=enabled`; every pod is
//!   injected unless annotated `trellis.dev/inject: disabled`.
//! - `POST /inject-annotated`: for other namespaces; only pods annotated
//!   `trellis.dev/inject: enabled` are injected.
//! - `GET /healthz`: 200 once serving (the Deployment's probes).
//!
//! The serving certificate (cert-manager's Secret, or the documented script's) is re-read when
//! its files change, with the ingress' loader: a rotation needs no restart.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use trellis_proxy::config::ServerCertificate;
use trellis_proxy::listeners::ingress::certs::{self, CertError, Resolver, SniCerts};

use super::options::{Gate, Options};
use super::review::{self, Decision};

/// The route of namespaces labelled for injection ([`Gate::UnlessDisabled`]).
pub const INJECT_PATH: &str = "/inject";
/// The route of other namespaces ([`Gate::OnlyEnabled`]).
pub const INJECT_ANNOTATED_PATH: &str = "/inject-annotated";
pub const HEALTH_PATH: &str = "/healthz";

/// An AdmissionReview carries one pod; the API server caps requests at 3 MiB.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct InjectorConfig {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// How often the certificate files are checked for changes.
    pub reload_interval: Duration,
    pub options: Options,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("injector certificate: {0}")]
    Cert(#[from] CertError),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started injector: its address (port 0 resolved) and the task serving it.
pub struct Running {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Load the certificate, bind, and serve until the task is dropped with the runtime.
pub async fn start(cfg: InjectorConfig) -> Result<Running, WebhookError> {
    let cert = ServerCertificate {
        hosts: Vec::new(),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
    };
    let resolver = Resolver::new(SniCerts::load(std::slice::from_ref(&cert))?);
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = trellis_proxy::telemetry::metrics::Metrics::register(&mut registry);
    certs::spawn_reloader(resolver.clone(), vec![cert], cfg.reload_interval, metrics);
    let mut tls =
        rustls::ServerConfig::builder_with_provider(trellis_proxy::identity::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let bind_error = |source| WebhookError::Bind {
        addr: cfg.listen,
        source,
    };
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let options = Arc::new(cfg.options);
    let task = tokio::spawn(serve(listener, acceptor, options));
    Ok(Running { addr, task })
}

async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    options: Arc<Options>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, options) = (acceptor.clone(), options.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |req| handle(req, options.clone()));
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    options: Arc<Options>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let gate = match (req.method(), req.uri().path()) {
        (&Method::GET, HEALTH_PATH) => return Ok(reply(StatusCode::OK, "text/plain", "ok\n")),
        (&Method::POST, INJECT_PATH) => Gate::UnlessDisabled,
        (&Method::POST, INJECT_ANNOTATED_PATH) => Gate::OnlyEnabled,
        _ => return Ok(reply(StatusCode::NOT_FOUND, "text/plain", "not found\n")),
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("{e}\n"),
            ))
        }
    };
    Ok(match review::answer(&body, &options, gate) {
        Ok((answer, decision)) => {
            log(&decision);
            reply(StatusCode::OK, "application/json", answer.to_string())
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
    })
}

fn log(decision: &Decision) {
    match decision {
        Decision::Injected { pod, operations } => {
            tracing::info!(%pod, operations, "injected the sidecar")
        }
        Decision::Refused { reason } => tracing::warn!(%reason, "refused a pod"),
        Decision::Skipped => {}
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}
