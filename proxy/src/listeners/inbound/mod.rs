//! The inbound listener: mTLS from peer sidecars (plaintext too in permissive mode), forwarded
//! to the local app as HTTP/1.1 or h2c, with the verified peer identity in a header.

mod app;
pub mod app_protocol;
pub mod telemetry;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, InboundMode, Limits};
use crate::error::ProxyError;
use crate::http::headers::PEER_IDENTITY_HEADER;
use crate::http::headers::{any_internal, is_upgrade, strip_hop_by_hop, ClientHop, TrustedProxies};
use crate::http::rewrite;
use crate::http::upgrade;
use crate::identity::{
    classify_io_error, describe_io_error, spiffe_id_from_cert, IdentityStore, TlsFailure,
};
use crate::listeners::inbound::app_protocol::AppKnowledge;
use crate::listeners::lifecycle::{admission, Admission, Labels, Lifecycle};
use crate::listeners::protocol::{http_builders, HttpBuilders};
use crate::listeners::server::{
    accept_loop, serve_connection, Activity, ActivityGuard, ConnTimeouts,
};
use crate::policy::ratelimit::RateLimits;
use crate::telemetry::metrics::{ConnectionGuard, Metrics, INBOUND};
use crate::telemetry::trace::logs;
use crate::{drain, ResponseBody};
use app::{AppClient, Call};

pub use app::AppConnector;

/// First byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;
const PLAINTEXT_REFUSAL: &[u8] = b"HTTP/1.1 400 Bad Request\r\ntrellis-error: tls-plaintext\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: 43\r\n\r\nthis port requires mTLS from a mesh peer.\r\n";

pub struct Inbound {
    mode: InboundMode,
    app: AppClient,
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    limits: Limits,
    admission: Admission,
    lifecycle: Lifecycle,
    tracing: Arc<crate::telemetry::trace::Tracing>,
    /// Answers `/.well-known/trellis/` for the allowed readers (set by the wiring).
    telemetry: Option<telemetry::Telemetry>,
    /// Responses of the app, under the service's cache policies (none: one atomic load).
    cache: Arc<crate::cache::ResponseCache>,
}

// === impl Inbound ===

impl Inbound {
    pub fn new(
        config: &Config,
        tls: IdentityStore,
        metrics: Arc<Metrics>,
        limits: Arc<RateLimits>,
        access_control: Arc<crate::policy::access::AccessControl>,
        tracing: Arc<crate::telemetry::trace::Tracing>,
        access: Arc<crate::telemetry::access_log::AccessLog>,
    ) -> Self {
        Self {
            mode: config.inbound.mode,
            app: AppClient::new(config),
            tls,
            limits: config.limits.clone(),
            admission: Admission::new(access_control, limits, metrics.clone()),
            lifecycle: Lifecycle::new(INBOUND, metrics.clone(), access),
            metrics,
            tracing,
            telemetry: None,
            cache: crate::cache::ResponseCache::inert(),
        }
    }

    /// Cache the app's responses under the service's cache policies.
    pub fn with_cache(mut self, cache: Arc<crate::cache::ResponseCache>) -> Self {
        self.cache = cache;
        self
    }

    /// Serve this sidecar's telemetry under `/.well-known/trellis/` (to `telemetry.readers`).
    pub fn with_telemetry(mut self, t: telemetry::Telemetry) -> Self {
        self.telemetry = Some(t);
        self
    }

    /// What the app was found to speak (for `/config_dump`).
    pub fn app_knowledge(&self) -> Arc<AppKnowledge> {
        self.app.knowledge()
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher) {
        let builder = Arc::new(http_builders(&self.limits));
        let max = self.limits.max_connections;
        let errors = self.metrics.accept_errors(INBOUND);
        accept_loop(
            listener,
            max,
            drain,
            INBOUND,
            errors,
            move |tcp, client, drain| {
                let this = self.clone();
                let builder = builder.clone();
                async move {
                    let _conn = ConnectionGuard::new(&this.metrics, INBOUND);
                    this.connection(tcp, client, &builder, drain).await;
                }
            },
        )
        .await;
    }

    async fn connection(
        self: Arc<Self>,
        mut tcp: TcpStream,
        client: SocketAddr,
        builder: &HttpBuilders,
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
        // Boxed: a TLS connection's state (handshake, rustls session, the stream type) is
        // several KB that a plaintext connection's task would otherwise carry too.
        Box::pin(self.tls_connection(tcp, client, builder, drain, activity, timeouts)).await;
    }

    /// An mTLS connection from a peer: handshake within the head timeout, then serve with the
    /// verified identity.
    async fn tls_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        client: SocketAddr,
        builder: &HttpBuilders,
        drain: drain::Watcher,
        activity: Arc<Activity>,
        timeouts: ConnTimeouts,
    ) {
        let timeout = self.limits.header_read_timeout;
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
        // A verified peer is a mesh caller; a plaintext one (permissive mode) is outside the
        // mesh and vouches for nothing, as a client at the edge.
        let hop = Arc::new(match peer {
            Some(_) => ClientHop::new(client.ip(), "https"),
            None => ClientHop::at_edge(client.ip(), "http"),
        });
        // The request's future is `handle`'s own, not wrapped in another async block: each
        // layer would move the whole (several KB) future once more per request.
        service_fn(move |req| {
            this.clone()
                .handle(req, client, peer.clone(), hop.clone(), activity.begin())
        })
    }

    /// One request from a peer (`peer`: its verified identity) or a plaintext caller,
    /// observed from start to finish; the connection counts as busy until it ends (`_busy`).
    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client: SocketAddr,
        peer: Option<HeaderValue>,
        hop: Arc<ClientHop>,
        _busy: ActivityGuard,
    ) -> Result<Response<ResponseBody>, Infallible> {
        if let Some(t) = self
            .telemetry
            .as_ref()
            .filter(|_| telemetry::Telemetry::wants(&req))
        {
            return Ok(t.serve(&req, peer.as_ref(), client));
        }
        let observed = self.lifecycle.start(&mut req, |req| {
            let (method, path) = (req.method(), req.uri().path());
            // A verified peer identity means the request came over mTLS.
            let scheme = if peer.is_some() { "https" } else { "http" };
            self.tracing
                .server(method, path, req.headers(), peer.as_ref(), client, scheme)
        });
        let peer_id = observed.logging().then(|| peer.clone()).flatten();
        let mut consumer = None;
        // What is logged while admitting and forwarding names the request's trace and span.
        let result = logs::in_scope!(
            observed.span.ids(),
            self.admitted(req, client, peer, &hop, &mut consumer)
        );
        let labels = Labels {
            service: self.admission.service(),
            route: None,
            client,
            peer_identity: peer_id.as_ref(),
        };
        let (resp, finished) = observed.finish(result, labels);
        self.admission
            .count(consumer.as_ref(), None, finished.status, finished.seconds);
        Ok(resp)
    }

    /// Check the framing, admit (authenticate, authorize, limit), then forward; the
    /// concurrency slots are held until the response body ends.
    async fn admitted(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        peer: Option<HeaderValue>,
        hop: &ClientHop,
        consumer: &mut Option<Arc<str>>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        crate::http::headers::check_framing(&req)?;
        let permits = self
            .admission
            .check(&mut req, peer.as_ref(), client.ip(), consumer)
            .await?;
        let resp = match self.cache.plan(&req, consumer.as_deref()) {
            None => self.forward(req, peer, hop).await?,
            // Boxed by the cache (see `Plan::serve`).
            Some(plan) => plan.serve(req, |r| self.forward(r, peer, hop)).await?,
        };
        Ok(admission::hold(resp, permits))
    }

    /// Rewrite for the app (identity and forwarding headers by what the connection proved)
    /// and send; an upgrade's two sides are joined once the app agrees.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: Option<HeaderValue>,
        hop: &ClientHop,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let upgrade = is_upgrade(&req);
        let orig = rewrite::to_app(&mut req, upgrade);
        let headers = req.headers_mut();
        if let Some(peer) = peer {
            // Replaces whatever the caller sent under this name.
            headers.insert(PEER_IDENTITY_HEADER, peer);
            hop.append(headers);
        } else {
            // A plaintext caller (permissive mode) is outside the mesh: it vouches for nothing.
            if any_internal(headers) {
                headers.remove(PEER_IDENTITY_HEADER);
            }
            hop.rewrite_at_edge(headers, &TrustedProxies::default());
        }
        let call = Call {
            caller_h2: match &orig {
                Some(v) => !v.as_bytes().starts_with(b"HTTP/1"),
                None => req.version() == Version::HTTP_2,
            },
            upgrade,
            grpc: crate::http::grpc::is_grpc(req.headers()),
        };
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (resp, checkin) = self.app.send(req, call).await?;
        Ok(match client_side {
            Some(client_side) => upgrade::finish(client_side, resp),
            None => {
                let mut resp = resp;
                strip_hop_by_hop(resp.headers_mut(), false);
                resp.map(|b| {
                    let body = crate::http::body::Streamed::new(b).pooled(checkin);
                    http_body_util::Either::Left(body)
                })
            }
        })
    }
}
