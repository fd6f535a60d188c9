//! The outbound listener: the app's plain HTTP/1.1 or h2c calls to mesh services, addressed by
//! `Host`/`:authority` or in absolute form (`HTTP_PROXY`), forwarded over pooled HTTP/2 + mTLS
//! to a peer sidecar.

mod attempt;
mod compose;
pub(crate) mod connector;
mod endpoints;
mod external;
mod payload;
mod resolve;
mod routed;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::config::{Config, Limits};
use crate::error::ProxyError;
use crate::http::body::Streamed;
use crate::http::headers::{
    any_internal, has_name, CONSUMER_HEADER, ORIG_PROTO_HEADER, PEER_IDENTITY_HEADER,
};
use crate::http::headers::{is_upgrade, request_host};
use crate::http::origin::ExternalClient;
use crate::http::rewrite;
use crate::http::upgrade;
use crate::identity::IdentityStore;
use crate::listeners::lifecycle::{Labels, Lifecycle};
use crate::listeners::original_dst::{OriginalDst, Protocol};
use crate::listeners::protocol::http_builders;
use crate::listeners::server::{
    accept_loop, serve_connection, Activity, ActivityGuard, ConnTimeouts,
};
use crate::policy::breaker::{Breaker, Permit};
use crate::state::pool::PeerPool;
use crate::state::target::{Target, TargetTable};
use crate::telemetry::metrics::{ConnectionGuard, Metrics, OUTBOUND, UNKNOWN_SERVICE};
use crate::telemetry::trace::logs;
use crate::{drain, ResponseBody};
use attempt::Attempts;
use endpoints::Endpoints;
use payload::Payload;
use resolve::{Defaults, Resolved};

pub struct Outbound {
    external: ExternalClient,
    routes: Arc<ArcSwap<TargetTable>>,
    pool: Arc<PeerPool>,
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    limits: Limits,
    defaults: Defaults,
    unknown: Arc<String>,
    tracing: Arc<crate::telemetry::trace::Tracing>,
    access: Arc<crate::telemetry::access_log::AccessLog>,
    /// How the app's calls are observed.
    lifecycle: Lifecycle,
    /// Learns services the snapshot does not hold (scoped stores); `None`: unknown is unknown.
    on_demand: Option<crate::state::discover::OnDemand>,
    /// OpenAPI validation of HTTPRoute rules that ask for it (set for an ingress only).
    validation: Option<Arc<crate::validate::EdgeValidation>>,
}

// === impl Outbound ===

impl Outbound {
    pub fn new(
        config: &Config,
        routes: Arc<ArcSwap<TargetTable>>,
        pool: Arc<PeerPool>,
        tls: IdentityStore,
        metrics: Arc<Metrics>,
        tracing: Arc<crate::telemetry::trace::Tracing>,
        access: Arc<crate::telemetry::access_log::AccessLog>,
    ) -> Self {
        let lifecycle = Lifecycle::new(OUTBOUND, metrics.clone(), access.clone());
        Self {
            external: ExternalClient::new(config.timeouts.connect),
            routes,
            pool,
            tls,
            metrics,
            limits: config.limits.clone(),
            defaults: Defaults {
                connect: config.timeouts.connect,
                request: config.timeouts.request,
                stream_idle: config.timeouts.stream_idle,
            },
            unknown: Arc::new(UNKNOWN_SERVICE.to_string()),
            tracing,
            lifecycle,
            access,
            on_demand: None,
            validation: None,
        }
    }

    /// Validate requests of rules with `validation` (an ingress gateway).
    pub fn with_validation(mut self, v: Option<Arc<crate::validate::EdgeValidation>>) -> Self {
        self.validation = v;
        self
    }

    /// Learn services the snapshot does not hold through `on_demand` (scoped discovery).
    pub fn with_on_demand(mut self, on_demand: Option<crate::state::discover::OnDemand>) -> Self {
        self.on_demand = on_demand;
        self
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher) {
        let builder = Arc::new(http_builders(&self.limits));
        let max = self.limits.max_connections;
        let errors = self.metrics.accept_errors(OUTBOUND);
        accept_loop(
            listener,
            max,
            drain,
            OUTBOUND,
            errors,
            move |tcp, client, drain| {
                let this = self.clone();
                let builder = builder.clone();
                async move {
                    let _conn = ConnectionGuard::new(&this.metrics, OUTBOUND);
                    // Transparent interception: opaque TCP goes on to where the app sent it.
                    let redirected = crate::listeners::original_dst::redirected(&tcp);
                    if let Some(dst) = redirected {
                        if crate::listeners::original_dst::detect(&tcp).await == Protocol::Opaque {
                            // Boxed: a pass-through's state would otherwise size every HTTP
                            // connection's task.
                            let connect = this.defaults.connect;
                            Box::pin(crate::listeners::original_dst::tcp_passthrough(
                                tcp, dst, connect,
                            ))
                            .await;
                            return;
                        }
                    }
                    let activity = Activity::counted(this.metrics.byte_counters(OUTBOUND));
                    let timeouts = ConnTimeouts::from(&this.limits);
                    let act = activity.clone();
                    let svc = service_fn(move |mut req: Request<Incoming>| {
                        let busy = act.begin();
                        if let Some(dst) = redirected {
                            req.extensions_mut().insert(OriginalDst(dst));
                        }
                        // Peers trust this header from sidecars: an app may not set it.
                        if has_name(req.headers(), &CONSUMER_HEADER) {
                            req.headers_mut().remove(CONSUMER_HEADER);
                        }
                        this.clone().handle(req, client, busy)
                    });
                    serve_connection(&builder, tcp, svc, activity, timeouts, &drain).await;
                }
            },
        )
        .await;
    }

    /// How this listener observes its requests; the ingress observes its own, routed here,
    /// under its direction.
    /// The tracer its spans are made with (the ingress makes its server spans with it too).
    pub(crate) fn tracing(&self) -> Arc<crate::telemetry::trace::Tracing> {
        self.tracing.clone()
    }

    pub(crate) fn lifecycle(&self, direction: &'static str) -> Lifecycle {
        Lifecycle::new(direction, self.metrics.clone(), self.access.clone())
    }

    /// Route and forward one of the app's requests; the connection counts as busy until it
    /// ends (`_busy`). The service's future itself: a wrapping async block (or another
    /// layer) would move the whole, several KB, future once more per request.
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        client: SocketAddr,
        _busy: ActivityGuard,
    ) -> Result<Response<ResponseBody>, Infallible> {
        Ok(self.handle_routed(req, client, &self.lifecycle).await.0)
    }

    /// As [`Outbound::handle`], with the HTTPRoute rule that routed the request (`default`
    /// when none did): the ingress counts its consumers per route.
    pub(crate) async fn handle_routed(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        lifecycle: &Lifecycle,
    ) -> (Response<ResponseBody>, Arc<String>) {
        let edge = lifecycle.direction() == crate::listeners::ingress::INGRESS;
        if let Some((rule, aggregate)) = edge.then(|| self.edge_aggregate(&req)).flatten() {
            let resp = Box::pin(self.aggregate(&rule, &aggregate, req, client, lifecycle)).await;
            return (resp, rule.name.clone());
        }
        let mut observed = lifecycle.start(&mut req, |req| {
            if !self.tracing.active() {
                return crate::telemetry::trace::RequestSpan::none();
            }
            let host = request_host(req).unwrap_or(UNKNOWN_SERVICE);
            self.tracing
                .client(req.method(), req.uri().path(), req.headers(), host)
        });
        // What is logged while routing and forwarding names the request's trace and span.
        let ids = observed.span.ids();
        let (service, route, result) =
            logs::in_scope!(ids, self.route(req, client, edge, &mut observed.span));
        let labels = Labels {
            service: &service,
            route: Some(&route),
            client,
            peer_identity: None,
        };
        let resp = observed.finish(result, labels).0;
        (resp, route)
    }

    /// Forward to a mesh service: choose the endpoint and resolve the timeouts, then leave by
    /// the exit the request needs (an origin outside the mesh, an upgrade's own connection,
    /// or the attempt loop over the pooled HTTP/2 connections).
    async fn forward(
        &self,
        route: &Target,
        mut req: Request<Incoming>,
        client: SocketAddr,
        span: &mut crate::telemetry::trace::RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (endpoints, _request, i, resolved) = self.admit(route, &mut req, client)?;
        if let Some(host) = &route.service.external_host {
            // Cold exits, boxed: their futures would otherwise size every request's.
            return Box::pin(self.forward_external(endpoints, i, host, req, &resolved)).await;
        }
        if is_upgrade(&req) {
            let tls = self.tls.load_full();
            let ep = &route.service.endpoints[i];
            let (connect, request) = (resolved.connect_timeout, resolved.request_timeout);
            return Box::pin(upgrade::outbound(
                &tls,
                ep,
                req,
                connect,
                request,
                &self.metrics,
            ))
            .await;
        }
        rewrite::to_mesh_h2(&mut req)?;
        let payload = Payload::prepare(req, &route.retry).await?;
        self.send(route, endpoints, i, payload, &resolved, client, span)
            .await
    }

    /// As [`Outbound::forward`], for a request this sidecar built (an aggregate's call, a
    /// transformed body): a normal mesh call (balancing, breakers, retries, mTLS), to mesh
    /// services only.
    pub(crate) async fn forward_built(
        &self,
        route: &Target,
        mut req: Request<bytes::Bytes>,
        client: SocketAddr,
        span: &mut crate::telemetry::trace::RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (endpoints, _request, i, resolved) = self.admit_composed(route, &mut req, client)?;
        let payload = Payload::built(req, &route.retry);
        self.send(route, endpoints, i, payload, &resolved, client, span)
            .await
    }

    /// As [`Outbound::forward_built`], for a body the sidecar maps from the client's as it
    /// streams (a transcoded client stream): sent once, never replayed, and a failure of the
    /// body is the client's (`watch`), not the endpoint's.
    pub(crate) async fn forward_mapped(
        &self,
        route: &Target,
        mut req: Request<crate::http::client_body::ClientBody>,
        watch: Arc<crate::http::client_body::BodyWatch>,
        client: SocketAddr,
        span: &mut crate::telemetry::trace::RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (endpoints, _request, i, resolved) = self.admit_composed(route, &mut req, client)?;
        let payload = Payload::mapped(req, watch);
        self.send(route, endpoints, i, payload, &resolved, client, span)
            .await
    }

    /// [`Outbound::admit`] for a request this sidecar composed: mesh services only, and the
    /// request made HTTP/2 for the peer.
    fn admit_composed<'a, B>(
        &'a self,
        route: &'a Target,
        req: &mut Request<B>,
        client: SocketAddr,
    ) -> Result<(Endpoints<'a>, Permit<'a>, usize, Resolved), ProxyError> {
        let admitted = self.admit(route, req, client)?;
        if route.service.external_host.is_some() {
            return Err(ProxyError::BadRequest(
                "composed requests go to mesh services, not external ones",
            ));
        }
        rewrite::to_mesh_h2(req)?;
        Ok(admitted)
    }

    /// The first steps of every mesh call: the service's request budget (its permit is held
    /// until the response headers arrive, or the request fails), an endpoint, the call's
    /// timeouts, and the request cleaned of what a caller may not send.
    fn admit<'a, B>(
        &'a self,
        route: &'a Target,
        req: &mut Request<B>,
        client: SocketAddr,
    ) -> Result<(Endpoints<'a>, Permit<'a>, usize, Resolved), ProxyError> {
        let endpoints = Endpoints {
            route,
            metrics: &self.metrics,
        };
        let permit = route
            .counters
            .request(route.max_requests)
            .ok_or_else(|| endpoints.overflow(Breaker::MaxRequests))?;
        let i = endpoints.choose(req, client.ip(), None)?;
        let resolved = Resolved::resolve(&self.defaults, route, req)?;
        sanitize(req);
        Ok((endpoints, permit, i, resolved))
    }

    /// The attempt loop over the pooled HTTP/2 connections; the response body streams on
    /// under the service's idle timeout, counted in flight until it ends.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        route: &Target,
        endpoints: Endpoints<'_>,
        i: usize,
        payload: Payload,
        resolved: &Resolved,
        client: SocketAddr,
        span: &mut crate::telemetry::trace::RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        route.counters.budget.deposit();
        let attempts = Attempts::new(&*self.pool, endpoints, client.ip(), payload, resolved);
        let (resp, in_flight) = attempts.run(i, span).await?;
        let idle = resolved.stream_idle;
        Ok(resp.map(|b| {
            Either::Left(
                Streamed::from_mesh(b)
                    .idle_timeout(idle)
                    .in_flight(in_flight),
            )
        }))
    }
}

/// What the app may not say: an identity (only the far side sets it) or an original protocol
/// (this side writes it).
///
/// The forwarding headers (`X-Forwarded-For`, `Forwarded`) are not touched here: the client
/// of an outbound sidecar is its own pod (loopback, or the pod's address when traffic is
/// intercepted), which is exactly the address the far side's inbound sidecar sees and appends.
/// A second, identical hop would tell the app nothing and cost two header fields on every
/// mesh request (HPACK on both sides of the hop); Envoy's and Linkerd's outbound sidecars do
/// not append either. At the edge the ingress has written them by its trusted-proxy rule.
fn sanitize<B>(req: &mut Request<B>) {
    let headers = req.headers_mut();
    if any_internal(headers) {
        headers.remove(PEER_IDENTITY_HEADER);
        headers.remove(ORIG_PROTO_HEADER);
    }
}
