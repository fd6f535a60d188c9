//! The inbound listener: mTLS from peer sidecars (plaintext too in permissive mode), forwarded
//! to the local app as HTTP/1.1 or h2c, with the verified peer identity in a header.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;

use crate::app_protocol::{AppKnowledge, AttemptBody, Proto, Replay};
use crate::client_body::ClientBody;

/// Largest read buffer of an HTTP/1.1 connection to the app.
const APP_READ_BUF: usize = 64 * 1024;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::{
    AppProtocol, Config, InboundMode, Limits, ORIG_PROTO_HEADER, PEER_IDENTITY_HEADER,
};
use crate::error::ProxyError;
use crate::headers::{
    append_forwarded, edge_forwarded, is_upgrade, request_authority, strip_hop_by_hop,
    TrustedProxies,
};
use crate::identity::{
    classify_io_error, describe_io_error, spiffe_id_from_cert, IdentityStore, TlsFailure,
};
use crate::metrics::{ConnectionGuard, Metrics, INBOUND};
use crate::ratelimit::RateLimits;
use crate::server::{accept_loop, http_builder, serve_connection, Activity, ConnTimeouts};
use crate::{drain, upgrade, ResponseBody};

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
/// Idle keep-alive connections to the app are closed after this long.
const APP_POOL_IDLE: Duration = Duration::from_secs(90);
const PLAINTEXT_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\ntrellis-error: tls-plaintext\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 43\r\n\r\nthis port requires mTLS from a mesh peer.\r\n";

pub struct Inbound {
    service: Arc<String>,
    mode: InboundMode,
    app: SocketAddr,
    app_protocol: AppProtocol,
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    limits: Limits,
    request_timeout: Duration,
    h1: Client<AppConnector, AttemptBody>,
    h2: Client<AppConnector, AttemptBody>,
    /// What the app speaks, for `app_protocol: auto`.
    knowledge: Arc<AppKnowledge>,
    rate_limits: Arc<RateLimits>,
    access_control: Arc<crate::access::AccessControl>,
    tracing: Arc<crate::trace::Tracing>,
    access: Arc<crate::access_log::AccessLog>,
}

// === impl Inbound ===

impl Inbound {
    pub fn new(
        config: &Config,
        tls: IdentityStore,
        metrics: Arc<Metrics>,
        limits: Arc<RateLimits>,
        access_control: Arc<crate::access::AccessControl>,
        tracing: Arc<crate::trace::Tracing>,
        access: Arc<crate::access_log::AccessLog>,
    ) -> Self {
        let connector = AppConnector {
            addr: config.inbound.app,
            timeout: config.timeouts.connect,
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(APP_POOL_IDLE)
            .pool_timer(TokioTimer::new())
            // What one response read from the app may hold unsent when its caller is slow:
            // bounded like an HTTP/2 stream's window, not hyper's ~400 KB default.
            .http1_max_buf_size(APP_READ_BUF);
        let h1 = b.build(connector.clone());
        let h2 = b
            .http2_only(true)
            .timer(TokioTimer::new())
            .http2_initial_stream_window_size(crate::server::H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(crate::server::H2_CONN_WINDOW)
            .build(connector);
        Self {
            service: Arc::new(config.service.clone()),
            mode: config.inbound.mode,
            app: config.inbound.app,
            app_protocol: config.inbound.app_protocol,
            tls,
            metrics,
            limits: config.limits.clone(),
            request_timeout: config.timeouts.request,
            h1,
            h2,
            knowledge: Arc::new(AppKnowledge::new(
                config.inbound.app,
                config.timeouts.connect,
            )),
            tracing,
            access,
            rate_limits: limits,
            access_control,
        }
    }

    /// What the app was found to speak (for `/config_dump`).
    pub fn app_knowledge(&self) -> Arc<AppKnowledge> {
        self.knowledge.clone()
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher) {
        let builder = Arc::new(http_builder(&self.limits));
        let max = self.limits.max_connections;
        accept_loop(listener, max, drain, INBOUND, move |tcp, client, drain| {
            let this = self.clone();
            let builder = builder.clone();
            async move {
                let _conn = ConnectionGuard::new(&this.metrics, INBOUND);
                this.connection(tcp, client, &builder, drain).await;
            }
        })
        .await;
    }

    async fn connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        client: SocketAddr,
        builder: &hyper_util::server::conn::auto::Builder<TokioExecutor>,
        drain: drain::Watcher,
    ) {
        let timeout = self.limits.header_read_timeout;
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
            Ok(Ok(1)) => {}
            _ => return,
        }
        let activity = Activity::counted(self.metrics.byte_counters(INBOUND));
        let timeouts = ConnTimeouts::from(&self.limits);
        if first[0] != TLS_HANDSHAKE {
            if self.mode == InboundMode::Strict {
                self.metrics
                    .tls_failure(INBOUND, TlsFailure::Plaintext.reason());
                tracing::warn!(peer = %client, reason = "plaintext", "refused plaintext connection: inbound requires mTLS");
                let _ = tcp.write_all(PLAINTEXT_REFUSAL).await;
                let _ = tcp.shutdown().await;
                return;
            }
            let svc = self.service_for(client, None, &activity);
            serve_connection(builder, tcp, svc, activity, timeouts, &drain).await;
            return;
        }
        let acceptor = TlsAcceptor::from(self.tls.load().server_config());
        let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                self.metrics.tls_handshake(INBOUND);
                tls
            }
            Ok(Err(e)) => {
                let reason = classify_io_error(&e);
                self.metrics.tls_failure(INBOUND, reason.reason());
                tracing::warn!(peer = %client, %reason, error = %describe_io_error(&e), "rejected mTLS connection");
                return;
            }
            Err(_) => {
                self.metrics
                    .tls_failure(INBOUND, TlsFailure::Timeout.reason());
                tracing::warn!(peer = %client, reason = "timeout", "mTLS handshake timed out");
                return;
            }
        };
        // The verifier already required a valid SPIFFE ID in our trust domain.
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| spiffe_id_from_cert(c).ok())
            .and_then(|id| HeaderValue::from_str(&id.to_string()).ok());
        let svc = self.service_for(client, peer, &activity);
        serve_connection(builder, tls, svc, activity, timeouts, &drain).await;
    }

    fn service_for(
        self: &Arc<Self>,
        client: SocketAddr,
        peer: Option<HeaderValue>,
        activity: &Arc<Activity>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ResponseBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send,
    > + Send
           + 'static {
        let this = self.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let this = this.clone();
            let peer = peer.clone();
            let guard = activity.begin();
            async move {
                let start = Instant::now();
                let grpc = crate::grpc::is_grpc(req.headers());
                let mut req = req;
                let mut span = this.tracing.server(
                    req.method(),
                    req.uri().path(),
                    req.headers(),
                    peer.as_ref(),
                    client,
                );
                span.inject(req.headers_mut());
                let info = this
                    .access
                    .enabled()
                    .then(|| crate::access_log::RequestInfo::of(&req));
                let peer_id = info.as_ref().and(peer.clone());
                let mut cause = None;
                let mut consumer = None;
                let resp = this.limited(req, client, peer, &mut consumer).await.unwrap_or_else(|e| {
                    this.metrics.proxy_error(INBOUND, e.cause());
                    if e.is_policy_decision() || matches!(e, ProxyError::Client { .. }) {
                        // Expected under load and counted per policy: no log line per request.
                        tracing::debug!(error = %e, cause = e.cause(), "inbound request refused");
                    } else {
                        tracing::warn!(error = %e, cause = e.cause(), "inbound request failed");
                    }
                    cause = Some(e.cause());
                    e.into_response_for(grpc)
                });
                span.respond(resp.status().as_u16(), cause);
                this.access.finish(
                    info,
                    crate::access_log::Outcome {
                        direction: INBOUND,
                        service: &this.service,
                        response: &resp,
                        cause,
                        elapsed: start.elapsed(),
                        client,
                        peer_identity: peer_id.as_ref().and_then(|p| p.to_str().ok()),
                        span: &span,
                    },
                );
                let resp = crate::trace::end_with_body(resp, span);
                let seconds = start.elapsed().as_secs_f64();
                let status = resp.status().as_u16();
                this.metrics
                    .record_request(INBOUND, &this.service, status, seconds);
                if let Some(c) = &consumer {
                    this.metrics
                        .record_consumer_request(&this.service, c, status, seconds);
                }
                drop(guard);
                Ok(resp)
            }
        })
    }

    /// Authenticate and authorize, apply the service's rate and concurrency limits (per
    /// consumer too), then forward; the concurrency slots are held until the response body
    /// ends.
    async fn limited(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        peer: Option<HeaderValue>,
        consumer: &mut Option<std::sync::Arc<str>>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        crate::headers::check_framing(&req)?;
        let who = self.access_control.check(&mut req, peer.as_ref()).await?;
        consumer.clone_from(&who.consumer);
        let permits = self.rate_limits.check(
            req.method(),
            req.uri().path(),
            req.headers(),
            peer.as_ref(),
            client.ip(),
            who.consumer.as_deref(),
        )?;
        let resp = self.forward(req, client, peer).await?;
        if permits.is_empty() {
            return Ok(resp);
        }
        Ok(resp.map(|b| match b {
            http_body_util::Either::Left(s) => http_body_util::Either::Left(s.hold(permits)),
            other => other,
        }))
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        peer: Option<HeaderValue>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let upgrade = is_upgrade(&req);
        let authority = request_authority(&req).unwrap_or_else(|| self.app.to_string());
        let headers = req.headers_mut();
        let orig = headers.remove(ORIG_PROTO_HEADER);
        strip_hop_by_hop(headers, upgrade);
        headers.remove(PEER_IDENTITY_HEADER);
        if let Some(peer) = peer {
            headers.insert(PEER_IDENTITY_HEADER, peer);
            append_forwarded(headers, client.ip(), "https");
        } else {
            // A plaintext caller (permissive mode) is outside the mesh: it vouches for nothing.
            edge_forwarded(headers, client.ip(), &TrustedProxies::default(), "http");
        }

        let caller_h2 = match &orig {
            Some(v) => !v.as_bytes().starts_with(b"HTTP/1"),
            None => req.version() == Version::HTTP_2,
        };
        let grpc = crate::grpc::is_grpc(req.headers());
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::MissingAuthority)?;
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let (body, watch) = ClientBody::new(body);
        let body = Replay::new(body);
        let attempts = async {
            // Upgrades need HTTP/1.1 (HTTP/2 cannot carry them); gRPC needs HTTP/2.
            let first = match self.app_protocol {
                _ if upgrade => Proto::Http1,
                AppProtocol::Http1 => Proto::Http1,
                AppProtocol::H2c => Proto::H2c,
                AppProtocol::Auto if grpc => Proto::H2c,
                AppProtocol::Auto => self.knowledge.choose(caller_h2, body.replayable()).await,
            };
            let may_fall_back = self.app_protocol == AppProtocol::Auto && !upgrade && !grpc;
            let mut parts = Some(parts);
            let mut proto = first;
            let mut stale_retried = false;
            loop {
                let req = match parts.take() {
                    Some(p) if !may_fall_back => app_request(p, proto, &authority, body.attempt()),
                    Some(p) => {
                        let again = clone_parts(&p);
                        parts = Some(again);
                        app_request(p, proto, &authority, body.attempt())
                    }
                    None => return Err(None),
                };
                let result = match proto {
                    Proto::Http1 => self.h1.request(req).await,
                    Proto::H2c => self.h2.request(req).await,
                };
                match result {
                    Ok(resp) => {
                        if self.app_protocol == AppProtocol::Auto && !upgrade {
                            self.knowledge.learn(proto);
                        }
                        return Ok(resp);
                    }
                    Err(e) => {
                        let next = if may_fall_back
                            && proto == first
                            && !e.is_connect()
                            && watch.blame(false).is_none()
                            && body.replayable()
                            && protocol_mismatch(proto, &e)
                        {
                            self.knowledge.fallback(proto).await
                        } else {
                            None
                        };
                        match next {
                            Some(other) => {
                                tracing::info!(app = %self.app, from = ?proto, to = ?other, error = %crate::outbound::error_chain(&e), "the app does not speak the protocol tried: repeating the request in the one it speaks");
                                proto = other;
                            }
                            // A pooled connection that was closing (or sent something while
                            // idle) never carried this request: once, on a fresh connection.
                            None if !stale_retried
                                && may_fall_back
                                && body.replayable()
                                && stale_connection(&e) =>
                            {
                                stale_retried = true;
                                tracing::debug!(app = %self.app, error = %crate::outbound::error_chain(&e), "pooled connection to the app was stale; sending again on a new one");
                            }
                            None => return Err(Some(e)),
                        }
                    }
                }
            }
        };
        let resp = tokio::time::timeout(self.request_timeout, attempts)
            .await
            .map_err(|_| ProxyError::ResponseTimeout {
                addr: self.app,
                timeout: self.request_timeout,
            })
            .and_then(|r| {
                r.map_err(|e| match e {
                    Some(e) => ProxyError::from_client(self.app, &e),
                    None => ProxyError::Upstream {
                        addr: self.app,
                        message: "no request left to send".into(),
                    },
                })
            })
            // A body the caller broke is the caller's fault (400/408), not a failing app:
            // the caller's sidecar must not count it against this endpoint.
            .map_err(|e| {
                let timed_out = matches!(e, ProxyError::ResponseTimeout { .. });
                match watch.blame(timed_out) {
                    Some(fault) => ProxyError::Client {
                        fault,
                        message: e.to_string(),
                    },
                    None => e,
                }
            })?;
        Ok(match client_side {
            Some(client_side) => upgrade::finish(client_side, resp),
            None => {
                let mut resp = resp;
                strip_hop_by_hop(resp.headers_mut(), false);
                resp.map(|b| http_body_util::Either::Left(crate::body::Streamed::new(b)))
            }
        })
    }
}

/// The request for one attempt in `proto`: HTTP/2 carries the authority in the URI, HTTP/1.1
/// in `Host`.
fn app_request(
    mut parts: http::request::Parts,
    proto: Proto,
    authority: &str,
    body: AttemptBody,
) -> Request<AttemptBody> {
    match proto {
        Proto::H2c => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
        Proto::Http1 => {
            parts.version = Version::HTTP_11;
            if let Ok(host) = HeaderValue::from_str(authority) {
                parts.headers.insert(header::HOST, host);
            }
        }
    }
    Request::from_parts(parts, body)
}

/// What a repeated attempt needs of a request's head (extensions stay with the first).
fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}

/// Whether a failed attempt in `proto` may be the app speaking another protocol, the only
/// failures worth a probe. For HTTP/1.1: an answer that is no HTTP/1.1 (an h2c server's
/// SETTINGS frame) or a connection closed before any answer, since probing an app that fails
/// otherwise would send it an `OPTIONS *` per failure. For h2c: any failure, since the h2c
/// probe sends the app no request and it alone decides (an app that speaks h2c keeps the
/// failure).
/// hyper gave the request back unsent: the pooled connection was closing or had received
/// bytes while idle.
fn stale_connection(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_canceled();
        }
        source = s.source();
    }
    false
}

fn protocol_mismatch(proto: Proto, e: &hyper_util::client::legacy::Error) -> bool {
    if proto == Proto::H2c {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return h.is_parse()
                || h.is_incomplete_message()
                || h.to_string().contains("unexpected message");
        }
        source = s.source();
    }
    false
}

/// Connects every request to the local app, whatever the URI's authority says, so that the
/// original `Host`/`:authority` reaches the app unchanged.
#[derive(Clone)]
pub struct AppConnector {
    addr: SocketAddr,
    timeout: Duration,
}

impl AppConnector {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self { addr, timeout }
    }
}

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to app {addr} timed out"),
                    )
                })??;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(tcp))
        })
    }
}
