//! The ingress gateway: requests from outside the mesh, over TLS (a certificate per SNI host)
//! or plain HTTP (optionally only redirected to HTTPS), admitted by this sidecar's
//! authentication, authorization and rate limits, then routed like the outbound listener's
//! (HTTPRoutes, balancing, retries) to mesh services over mTLS.
//!
//! Several ingress instances need nothing from each other: they read the same policies from
//! etcd and share global limits (consumer quotas) through it, so any L4 balancer or DNS can
//! spread clients over them.

pub mod certs;
pub mod portal;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::Limits;
use crate::drain;
use crate::error::{known_cause, ProxyError};
use crate::http::headers::{ClientHop, TrustedProxies, ERROR_HEADER};
use crate::listeners::lifecycle::{admission, end_with_body, Admission, Lifecycle};
use crate::listeners::outbound::Outbound;
use crate::listeners::protocol::http_builders;
use crate::listeners::server::{
    accept_loop, serve_connection, Activity, ActivityGuard, ConnTimeouts,
};
use crate::policy::access::AccessControl;
use crate::policy::ratelimit::{Permits, RateLimits};
use crate::telemetry::access_log::cache_status;
use crate::telemetry::metrics::{ConnectionGuard, Metrics};
use crate::telemetry::trace::{logs, RequestSpan, Tracing};
use crate::ResponseBody;

/// The `direction` label of the ingress listeners' connections, bytes and refusals.
pub const INGRESS: &str = "ingress";

pub struct Ingress {
    outbound: Arc<Outbound>,
    /// Admits requests to this gateway's service: the one its policies and consumer metrics
    /// name.
    admission: Admission,
    /// The ingress's requests are observed under its own direction.
    lifecycle: Lifecycle,
    tracing: Arc<Tracing>,
    metrics: Arc<Metrics>,
    limits: Limits,
    edge: Edge,
    tls: TlsAcceptor,
    /// Responses of the mesh, under the gateway's own cache policies.
    cache: Arc<crate::cache::ResponseCache>,
}

/// What only the edge has: its certificates (to tell which hosts a TLS connection may ask
/// for), the proxies in front of it, and its public HTTPS port.
pub struct Edge {
    pub certs: Arc<certs::Resolver>,
    pub tls: Arc<rustls::ServerConfig>,
    pub trusted_proxies: TrustedProxies,
    /// The port in `Location` of HTTP -> HTTPS redirects (omitted when 443).
    pub https_port: u16,
    /// The developer portal's host and documents, when configured.
    pub portal: Option<portal::Portal>,
}

/// rustls' server config for the ingress: certificates by SNI, HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(
    resolver: Arc<certs::Resolver>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

// === impl Ingress ===

impl Ingress {
    pub fn new(
        outbound: Arc<Outbound>,
        access: Arc<AccessControl>,
        rate_limits: Arc<RateLimits>,
        metrics: Arc<Metrics>,
        limits: Limits,
        edge: Edge,
    ) -> Self {
        Self {
            admission: Admission::new(access, rate_limits, metrics.clone()),
            lifecycle: outbound.lifecycle(INGRESS),
            tracing: outbound.tracing(),
            outbound,
            metrics,
            limits,
            tls: TlsAcceptor::from(edge.tls.clone()),
            edge,
            cache: crate::cache::ResponseCache::inert(),
        }
    }

    /// Cache the mesh's responses under the gateway service's cache policies.
    pub fn with_cache(mut self, cache: Arc<crate::cache::ResponseCache>) -> Self {
        self.cache = cache;
        self
    }

    /// Serve TLS clients until drain.
    pub async fn serve_tls(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher) {
        self.serve(listener, drain, Mode::Tls).await
    }

    /// Serve plain HTTP until drain: redirected to HTTPS, or proxied like TLS requests.
    pub async fn serve_http(
        self: Arc<Self>,
        listener: TcpListener,
        drain: drain::Watcher,
        redirect: bool,
    ) {
        let mode = if redirect {
            Mode::Redirect
        } else {
            Mode::Plain
        };
        self.serve(listener, drain, mode).await
    }

    async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher, mode: Mode) {
        let builder = Arc::new(http_builders(&self.limits));
        let max = self.limits.max_connections;
        let errors = self.metrics.accept_errors(INGRESS);
        accept_loop(listener, max, drain, INGRESS, errors, move |tcp, client, drain| {
            let this = self.clone();
            let builder = builder.clone();
            async move {
                let _conn = ConnectionGuard::new(&this.metrics, INGRESS);
                let activity = Activity::counted(this.metrics.byte_counters(INGRESS));
                let timeouts = ConnTimeouts::from(&this.limits);
                if mode != Mode::Tls {
                    let conn = Conn::new(client, false, None);
                    let svc = this.service(mode, conn, &activity);
                    serve_connection(&builder, tcp, svc, activity, timeouts, &drain).await;
                    return;
                }
                let handshake =
                    tokio::time::timeout(this.limits.header_read_timeout, this.tls.accept(tcp));
                match handshake.await {
                    Ok(Ok(tls)) => {
                        let sni = tls.get_ref().1.server_name().map(Arc::<str>::from);
                        let conn = Conn::new(client, true, sni);
                        let svc = this.service(mode, conn, &activity);
                        serve_connection(&builder, tls, svc, activity, timeouts, &drain).await
                    }
                    Ok(Err(e)) => {
                        this.metrics.tls_failure(INGRESS, "handshake");
                        tracing::debug!(peer = %client, error = %e, "ingress TLS handshake failed");
                    }
                    Err(_) => this.metrics.tls_failure(INGRESS, "timeout"),
                }
            }
        })
        .await;
    }

    /// The per-connection request handler.
    fn service(
        self: &Arc<Self>,
        mode: Mode,
        conn: Conn,
        activity: &Arc<Activity>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<ResponseBody>,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response<ResponseBody>, Infallible>> + Send,
    > + Clone {
        let this = self.clone();
        let act = activity.clone();
        service_fn(move |req: Request<Incoming>| {
            let busy = act.begin();
            this.clone().serve_request(req, conn.clone(), mode, busy)
        })
    }

    /// One request on a connection of `mode`; the connection counts as busy until it ends
    /// (`_busy`). The service's future itself: a wrapping async block would move the whole
    /// (several KB) future once more per request.
    ///
    /// Admit, then route into the mesh under the ingress's own observation; the
    /// concurrency slots are held until the response body ends. The server span of the
    /// request the edge received covers both: a refusal is in the trace with its cause, and a
    /// routed request's client span is its child.
    async fn serve_request(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: Conn,
        mode: Mode,
        _busy: ActivityGuard,
    ) -> Result<Response<ResponseBody>, Infallible> {
        if mode == Mode::Redirect {
            return Ok(self.redirect(&req));
        }
        let conn = &conn;
        let peer = conn.peer;
        let start = std::time::Instant::now();
        // The client as far as it can be believed: the TCP peer unless a trusted proxy
        // vouches for another; limits and access logs key on it.
        let client = match self.edge.trusted_proxies.client(peer.ip(), req.headers()) {
            ip if ip == peer.ip() => peer,
            ip => SocketAddr::new(ip, 0),
        };
        let mut span = self.server_span(&mut req, client, conn);
        // What is logged from here on names the request's trace and the edge's server span
        // (once routed, the client span: the outbound scope nests inside this one).
        let (resp, consumer, route) =
            logs::in_scope!(span.ids(), self.answer(req, conn, client, start));
        // Whoever answered with an error (this gateway, or a sidecar behind it) named it.
        let cause = resp
            .headers()
            .get(ERROR_HEADER)
            .and_then(|v| known_cause(v.as_bytes()));
        span.respond(resp.status().as_u16(), cause, || {
            cache_status(resp.headers())
        });
        let seconds = start.elapsed().as_secs_f64();
        self.admission.count(
            consumer.as_ref(),
            route.as_ref(),
            resp.status().as_u16(),
            seconds,
        );
        Ok(end_with_body(resp, span))
    }

    /// Admit and route a request, or refuse it; also the consumer it was admitted as and the
    /// HTTPRoute rule that routed it (`None` when refused before routing).
    async fn answer(
        &self,
        mut req: Request<Incoming>,
        conn: &Conn,
        client: SocketAddr,
        start: std::time::Instant,
    ) -> (
        Response<ResponseBody>,
        Option<Arc<str>>,
        Option<Arc<String>>,
    ) {
        let grpc = crate::http::grpc::is_grpc(req.headers());
        // The portal's and the cache's futures are boxed: an `async fn`'s state is as large as
        // its largest branch, and it is moved whole into each enclosing future, so every
        // routed request would otherwise copy their kilobytes several times
        // (docs/performance.md, "The ingress's request future").
        if let Some(portal) = self.portal(&req, conn) {
            let answer = Box::pin(portal.answer(req, conn.peer, conn.tls)).await;
            return (answer, None, None);
        }
        // Browsers' gRPC-Web becomes gRPC here, and its answer gRPC-Web again.
        let web = crate::compose::grpc_web::accept(&mut req);
        let mut consumer = None;
        let mut route = None;
        let resp = match self.admit(&mut req, conn, client, &mut consumer).await {
            Ok(permits) => {
                // HTTPRoute redirects keep the scheme the client used.
                req.extensions_mut()
                    .insert(crate::policy::routing::RequestScheme(conn.scheme()));
                let routed = &mut route;
                let upstream = |req| async move {
                    let (resp, r) = self
                        .outbound
                        .handle_routed(req, client, &self.lifecycle)
                        .await;
                    *routed = Some(r);
                    Ok(resp)
                };
                // A policy may cache one HTTPRoute's requests only: which one routes this.
                let rule = match self.cache.names_routes() {
                    true => self.outbound.edge_rule(&req),
                    false => None,
                };
                let names = rule.as_ref().map(|r| (&*r.policy, r.name.as_str()));
                let resp = match self.cache.edge_plan(&req, consumer.as_deref(), names) {
                    None => upstream(req).await,
                    Some(plan) => plan.serve(req, upstream).await,
                };
                admission::hold(resp.unwrap_or_else(|e| e.into_response_for(grpc)), permits)
            }
            Err(e) => {
                let resp = self.lifecycle.refuse(e, grpc);
                // Refused before routing: counted under the gateway's own service.
                self.metrics.record_request(
                    INGRESS,
                    self.admission.service(),
                    resp.status().as_u16(),
                    start.elapsed().as_secs_f64(),
                );
                resp
            }
        };
        let resp = match web {
            Some(mode) => crate::compose::grpc_web::respond(resp, mode),
            None => resp,
        };
        (resp, consumer, route)
    }

    /// The portal, when the request is for its host (on a connection allowed to name it): it
    /// answers before authentication and limits (public documents, and its own accounts),
    /// and is never routed.
    fn portal(&self, req: &Request<Incoming>, conn: &Conn) -> Option<&portal::Portal> {
        let portal = self.edge.portal.as_ref()?;
        let host = crate::http::headers::request_host(req)?;
        if !portal.serves(host) || self.admit_host(req, conn).is_err() {
            return None;
        }
        Some(portal)
    }

    /// The server span of a request from outside, made the parent of what the request leads
    /// to. The trace context a client sends is followed (it names no one: identity never
    /// comes from it).
    fn server_span(
        &self,
        req: &mut Request<Incoming>,
        client: SocketAddr,
        conn: &Conn,
    ) -> RequestSpan {
        let (method, path) = (req.method(), req.uri().path());
        let span = self
            .tracing
            .server(method, path, req.headers(), None, client, conn.scheme());
        span.inject(req.headers_mut());
        span
    }

    /// What the edge checks before anything else reads the request: its framing, its host
    /// against the TLS connection, then its forwarding headers (rewritten by the
    /// trusted-proxy rule) and internal headers (removed); then the common admission.
    async fn admit(
        &self,
        req: &mut Request<Incoming>,
        conn: &Conn,
        client: SocketAddr,
        consumer: &mut Option<Arc<str>>,
    ) -> Result<Permits, ProxyError> {
        crate::http::headers::check_framing(req)?;
        self.admit_host(req, conn)?;
        let trusted = &self.edge.trusted_proxies;
        conn.hop.rewrite_at_edge(req.headers_mut(), trusted);
        crate::http::headers::strip_internal(req.headers_mut());
        self.admission.check(req, None, client.ip(), consumer).await
    }

    /// A request on a TLS connection must name a host the certificate chosen by its SNI name
    /// was configured for (421 otherwise): the check that keeps `Host: orders` on a
    /// connection opened for `api.example.com` from reaching anything `api.example.com`
    /// does not serve.
    fn admit_host<B>(&self, req: &Request<B>, conn: &Conn) -> Result<(), ProxyError> {
        let Some(host) = crate::http::headers::request_host(req) else {
            return Err(ProxyError::MissingAuthority);
        };
        if conn.tls && !self.edge.certs.covers(conn.sni.as_deref(), host) {
            return Err(ProxyError::Misdirected(host.to_string()));
        }
        Ok(())
    }

    /// `308 Permanent Redirect` to the same host and path over HTTPS (308 keeps the method
    /// and body, unlike 301).
    fn redirect(&self, req: &Request<Incoming>) -> Response<ResponseBody> {
        let host = crate::http::headers::request_host(req).unwrap_or("localhost");
        let port = match self.edge.https_port {
            443 => String::new(),
            p => format!(":{p}"),
        };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let mut resp = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
            bytes::Bytes::new(),
        )));
        *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
        if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }
}

/// What the connection a request arrived on says about it.
#[derive(Clone, Debug)]
struct Conn {
    peer: SocketAddr,
    tls: bool,
    /// The TLS server name the client asked for (`None` without TLS or without SNI).
    sni: Option<Arc<str>>,
    /// The forwarding values naming the client, made once for the connection.
    hop: Arc<ClientHop>,
}

// === impl Conn ===

impl Conn {
    fn new(peer: SocketAddr, tls: bool, sni: Option<Arc<str>>) -> Self {
        let scheme = if tls { "https" } else { "http" };
        Self {
            peer,
            tls,
            sni,
            hop: Arc::new(ClientHop::at_edge(peer.ip(), scheme)),
        }
    }

    /// The scheme the client used.
    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Tls,
    Plain,
    Redirect,
}
