//! The inbound listener: mTLS from peer sidecars (plaintext too in permissive mode), forwarded
//! to the local app as HTTP/1.1 or h2c, with the verified peer identity in a header.

mod app;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::app_protocol::AppKnowledge;
use crate::config::{Config, InboundMode, Limits, PEER_IDENTITY_HEADER};
use crate::error::ProxyError;
use crate::headers::{
    append_forwarded, edge_forwarded, is_upgrade, strip_hop_by_hop, TrustedProxies,
};
use crate::http::rewrite;
use crate::identity::{
    classify_io_error, describe_io_error, spiffe_id_from_cert, IdentityStore, TlsFailure,
};
use crate::metrics::{ConnectionGuard, Metrics, INBOUND};
use crate::ratelimit::RateLimits;
use crate::server::{accept_loop, http_builder, serve_connection, Activity, ConnTimeouts};
use crate::{drain, upgrade, ResponseBody};
use app::{AppClient, Call};

pub use app::AppConnector;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
const PLAINTEXT_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\ntrellis-error: tls-plaintext\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 43\r\n\r\nthis port requires mTLS from a mesh peer.\r\n";

pub struct Inbound {
    service: Arc<String>,
    mode: InboundMode,
    /// The app's address, the authority of requests that name none.
    app_authority: String,
    app: AppClient,
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    limits: Limits,
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
        Self {
            service: Arc::new(config.service.clone()),
            mode: config.inbound.mode,
            app_authority: config.inbound.app.to_string(),
            app: AppClient::new(config),
            tls,
            metrics,
            limits: config.limits.clone(),
            tracing,
            access,
            rate_limits: limits,
            access_control,
        }
    }

    /// What the app was found to speak (for `/config_dump`).
    pub fn app_knowledge(&self) -> Arc<AppKnowledge> {
        self.app.knowledge()
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

    /// Rewrite for the app (identity and forwarding headers by what the connection proved)
    /// and send; an upgrade's two sides are joined once the app agrees.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        peer: Option<HeaderValue>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let upgrade = is_upgrade(&req);
        let orig = rewrite::to_app(&mut req, &self.app_authority, upgrade)?;
        let headers = req.headers_mut();
        headers.remove(PEER_IDENTITY_HEADER);
        if let Some(peer) = peer {
            headers.insert(PEER_IDENTITY_HEADER, peer);
            append_forwarded(headers, client.ip(), "https");
        } else {
            // A plaintext caller (permissive mode) is outside the mesh: it vouches for nothing.
            edge_forwarded(headers, client.ip(), &TrustedProxies::default(), "http");
        }
        let call = Call {
            caller_h2: match &orig {
                Some(v) => !v.as_bytes().starts_with(b"HTTP/1"),
                None => req.version() == Version::HTTP_2,
            },
            upgrade,
            grpc: crate::grpc::is_grpc(req.headers()),
        };
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let resp = self.app.send(req, call).await?;
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
