//! Where an outbound request goes: an HTTPRoute naming the host decides first (faults,
//! redirect, direct response, or forwarding with header changes, rewrites and mirroring);
//! hosts without one are mesh services, as before HTTPRoutes existed.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use super::Outbound;
use crate::error::ProxyError;
use crate::http::headers::request_host;
use crate::http::origin::Origin;
use crate::http::rewrite::Host;
use crate::listeners::original_dst::OriginalDst;
use crate::policy::routing::{self, Action, Decision, Rule};
use crate::ResponseBody;

impl Outbound {
    /// Pick the destination and forward; returns the service and route labels with the
    /// outcome. An HTTPRoute naming the host decides first; other hosts are services, except
    /// at the `edge` (the ingress), which routes only hosts of HTTPRoutes bound to it: a
    /// stranger must not reach a mesh service by naming it in `Host`.
    pub(super) async fn route(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
        edge: bool,
        span: &mut crate::telemetry::trace::RequestSpan,
    ) -> (
        Arc<String>,
        Arc<String>,
        Result<Response<ResponseBody>, ProxyError>,
    ) {
        let default_route = self.metrics.default_route.clone();
        if let Err(e) = crate::http::headers::check_framing(&req) {
            return (self.unknown.clone(), default_route, Err(e));
        }
        let Some(host) = request_host(&req) else {
            return (
                self.unknown.clone(),
                default_route,
                Err(ProxyError::MissingAuthority),
            );
        };
        let table = self.routes.load();
        let routing = if edge {
            &table.gateway_routing
        } else {
            &table.routing
        };
        let matched = match routing.decide(host, req.method(), req.uri(), req.headers()) {
            Decision::Unrouted if edge => {
                let err = ProxyError::NoRoute(host.to_string());
                return (self.unknown.clone(), default_route, Err(err));
            }
            Decision::Unrouted => None,
            Decision::NoMatch(h) if h.is_service && !edge => None,
            Decision::NoMatch(h) => {
                let err = ProxyError::NoRoute(host.to_string());
                return (h.host.clone(), default_route, Err(err));
            }
            Decision::Matched { host, rule, prefix } => {
                Some((host.host.clone(), rule.clone(), prefix))
            }
        };
        if let Some((host, rule, prefix)) = matched {
            drop(table);
            span.route(&rule.name);
            // Boxed: an HTTPRoute rule's state (validation, mirroring, transcoding, with the
            // forward inside) is 1.9 KB more than a plain mesh call's, and inline it would be
            // carried, and copied at each layer, by every outbound request.
            let routed = self.route_rule(&host, &rule, prefix, req, client, span);
            let (service, result) = Box::pin(routed).await;
            return (service, rule.name.clone(), result);
        }
        let found = table.route(host).cloned();
        // The table guard must not live across the forward (arc-swap guards are for short
        // reads; a held one slows every snapshot swap).
        drop(table);
        let route = match found {
            Some(route) => route,
            None => {
                let host = host.to_string();
                // Cold paths, boxed: their futures would otherwise size every request's.
                match Box::pin(self.learn(&host)).await {
                    Ok(Some(route)) => route,
                    learned => {
                        return Box::pin(self.unknown_host(host, learned.err(), req)).await;
                    }
                }
            }
        };
        let result = self.forward(&route, req, client, span).await;
        (route.service.name.clone(), default_route, result)
    }

    /// Ask the store about a service this sidecar does not hold (scoped discovery).
    pub(super) async fn learn(
        &self,
        service: &str,
    ) -> Result<Option<Arc<crate::state::target::Target>>, String> {
        match &self.on_demand {
            Some(d) => d.learn(service, &self.routes).await,
            None => Ok(None),
        }
    }

    /// A host that is no service: where the app sent it when intercepted transparently (even
    /// when the store cannot be asked), else 503 naming why.
    async fn unknown_host(
        &self,
        host: String,
        store_error: Option<String>,
        req: Request<Incoming>,
    ) -> (
        Arc<String>,
        Arc<String>,
        Result<Response<ResponseBody>, ProxyError>,
    ) {
        let default_route = self.metrics.default_route.clone();
        if let Some(&OriginalDst(dst)) = req.extensions().get::<OriginalDst>() {
            let origin = Origin {
                addr: dst,
                host: Host::AsSent,
                request_timeout: self.defaults.request,
                stream_idle: self.defaults.stream_idle,
            };
            let result = self.external.forward(origin, req).await;
            return (
                crate::listeners::original_dst::passthrough_label(),
                default_route,
                result,
            );
        }
        (
            self.unknown.clone(),
            default_route,
            Err(not_found(host, store_error)),
        )
    }

    /// Apply a matched HTTPRoute rule: faults first, then its redirect, direct response or
    /// forwarding (with header changes, rewrites, mirror); response headers last. Returns the
    /// service label: the backend, or the host for answers without one.
    async fn route_rule(
        &self,
        host: &Arc<String>,
        rule: &Rule,
        prefix: usize,
        req: Request<Incoming>,
        client: SocketAddr,
        span: &mut crate::telemetry::trace::RequestSpan,
    ) -> (Arc<String>, Result<Response<ResponseBody>, ProxyError>) {
        if let Some(fault) = &rule.fault {
            if let Some(delay) = fault.delay(&rule.rng) {
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = fault.abort(&rule.rng) {
                let route = rule.name.to_string();
                return (host.clone(), Err(ProxyError::FaultAbort { route, status }));
            }
        }
        let (service, result) = match &rule.action {
            Action::Redirect(r) => {
                let authority =
                    crate::http::headers::request_authority(&req).unwrap_or(host.as_str());
                let scheme = req
                    .extensions()
                    .get::<routing::RequestScheme>()
                    .map_or("http", |s| s.0);
                (host.clone(), Ok(r.response(scheme, authority, req.uri())))
            }
            Action::Direct(d) => (host.clone(), Ok(d.response())),
            // Answered by the ingress before routing (validation binds aggregates to
            // gateways only).
            Action::Aggregate(_) => (host.clone(), Err(ProxyError::NoRoute(host.to_string()))),
            Action::Forward { .. } => {
                self.forward_rule(host, rule, prefix, req, client, span)
                    .await
            }
        };
        let result = result.map(|mut resp| {
            routing::finish_response(rule, &mut resp);
            resp
        });
        (service, result)
    }
}

impl Outbound {
    /// A forwarding rule: its backend (learned on first use), the rule's rewrites and
    /// OpenAPI validation, its mirror, then the request forwarded as the rule says (plain,
    /// transcoded to gRPC, gRPC-Web text, or through a body transform). Returns the service
    /// label with the outcome.
    async fn forward_rule(
        &self,
        host: &Arc<String>,
        rule: &Rule,
        prefix: usize,
        mut req: Request<Incoming>,
        client: SocketAddr,
        span: &mut crate::telemetry::trace::RequestSpan,
    ) -> (Arc<String>, Result<Response<ResponseBody>, ProxyError>) {
        let Some(backend) = rule.backend() else {
            return (host.clone(), Err(ProxyError::NoRoute(host.to_string())));
        };
        let known = self.routes.load().route(&backend.service).cloned();
        let route = match known {
            Some(route) => route,
            None => match Box::pin(self.learn(&backend.service)).await {
                Ok(Some(route)) => route,
                learned => {
                    let err = not_found(backend.service.to_string(), learned.err());
                    return (self.unknown.clone(), Err(err));
                }
            },
        };
        routing::prepare_request(rule, prefix, &mut req);
        let audit = match self.validate(rule, &mut req).await {
            Ok(audit) => audit,
            Err(refused) => return (host.clone(), Ok(*refused)),
        };
        if let Some(m) = &rule.mirror {
            let table = self.routes.load();
            m.maybe_spawn(
                &req,
                table.route(&m.service),
                &rule.rng,
                &self.pool,
                client.ip(),
                self.defaults.connect,
                self.defaults.request,
            );
        }
        let web_text = req
            .extensions()
            .get::<crate::compose::grpc_web::WebText>()
            .is_some();
        let transcoded = rule
            .transcode
            .as_deref()
            .filter(|_| !crate::http::grpc::is_grpc(req.headers()));
        let result = match (transcoded, &rule.transform) {
            // JSON to a gRPC service; its gRPC (and gRPC-Web) callers pass as they are.
            (Some(t), _) => Box::pin(self.forward_transcoded(t, &route, req, client, span)).await,
            (None, None) if web_text => {
                Box::pin(self.forward_web_text(&route, req, client, span)).await
            }
            (None, None) => self.forward(&route, req, client, span).await,
            (None, Some(t)) => {
                let transformed = self.forward_transformed(t, &route, req, client, span);
                Box::pin(transformed).await
            }
        };
        let result = result.map(|resp| crate::validate::audit::attach(audit, resp));
        (route.service.name.clone(), result)
    }

    /// The rule's OpenAPI validation, at the ingress (the only listener given one).
    async fn validate(
        &self,
        rule: &Rule,
        req: &mut Request<Incoming>,
    ) -> Result<Option<crate::validate::audit::Audit>, Box<Response<ResponseBody>>> {
        let (Some(v), Some(edge)) = (&rule.validation, &self.validation) else {
            return Ok(None);
        };
        edge.check(v, &rule.name, req, self.defaults.request).await
    }
}

/// A service the snapshot does not hold and the store did not provide: unknown, or the store
/// could not be asked (`store_error`).
pub(super) fn not_found(service: String, store_error: Option<String>) -> ProxyError {
    match store_error {
        Some(cause) => ProxyError::DiscoveryUnavailable { service, cause },
        None => ProxyError::UnknownService(service),
    }
}
