//! Composition's mesh calls: an aggregate's fan-out at the edge, a transformed rule's
//! forward and a transcoded JSON request's gRPC call. Each call is a normal mesh call
//! ([`Outbound::forward_built`]) observed like any routed request (metrics, access log, a
//! client span), so an aggregate's trace shows the ingress's server span with one child per
//! call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::Outbound;
use crate::compose::aggregate::{Answer, Call, Failure};
use crate::compose::body::{collect, refused_request, Collect};
use crate::compose::{grpc_web, transcode, Aggregate, ComposeError, Transform};
use crate::error::{known_cause, ProxyError};
use crate::http::headers::{request_host, ERROR_HEADER};
use crate::listeners::lifecycle::{Labels, Lifecycle};
use crate::policy::routing::{self, Action, Decision, RouteTimeout, Rule};
use crate::state::target::Target;
use crate::telemetry::trace::{logs, RequestSpan};
use crate::ResponseBody;
use trellis_policies::compose::Transcoder;

/// What every call of one aggregate shares.
struct Fanout<'a> {
    rule: &'a Arc<String>,
    headers: HeaderMap,
    client: SocketAddr,
    lifecycle: &'a Lifecycle,
    max_answer: u64,
    /// Each call's body (by call index), built before any call left.
    bodies: Vec<Option<Bytes>>,
}

impl Outbound {
    /// The aggregate rule an edge request matches, if any (a second routing decision, made
    /// only when the gateway's table has aggregates).
    /// The ingress's HTTPRoute rule for a request (a cache policy may name it), decided as
    /// routing will decide it.
    pub(crate) fn edge_rule<B>(&self, req: &Request<B>) -> Option<Arc<Rule>> {
        let table = self.routes.load();
        let host = request_host(req)?;
        let decision = table
            .gateway_routing
            .decide(host, req.method(), req.uri(), req.headers());
        match decision {
            Decision::Matched { rule, .. } => Some(rule.clone()),
            _ => None,
        }
    }

    pub(super) fn edge_aggregate<B>(
        &self,
        req: &Request<B>,
    ) -> Option<(Arc<Rule>, Arc<Aggregate>)> {
        let table = self.routes.load();
        if !table.gateway_routing.has_aggregates() {
            return None;
        }
        let host = request_host(req)?;
        let decision = table
            .gateway_routing
            .decide(host, req.method(), req.uri(), req.headers());
        match decision {
            Decision::Matched { rule, .. } => match &rule.action {
                Action::Aggregate(a) => Some((rule.clone(), a.clone())),
                _ => None,
            },
            _ => None,
        }
    }

    /// Answer an aggregate: its calls, merged; a failed required call's status and cause.
    pub(super) async fn aggregate(
        &self,
        rule: &Rule,
        aggregate: &Aggregate,
        req: Request<Incoming>,
        client: SocketAddr,
        lifecycle: &Lifecycle,
    ) -> Response<ResponseBody> {
        let grpc = crate::http::grpc::is_grpc(req.headers());
        let (mut parts, body) = req.into_parts();
        let bodies = match self
            .aggregate_bodies(rule, aggregate, &mut parts, body)
            .await
        {
            Ok(b) => b,
            Err(e) => return lifecycle.refuse(e, grpc),
        };
        let mut headers = parts.headers;
        // Each call has its own host and asks for plain JSON, whole.
        headers.remove(header::HOST);
        for h in &crate::compose::NOT_CARRIED {
            headers.remove(h);
        }
        let fanout = Fanout {
            rule: &rule.name,
            headers,
            client,
            lifecycle,
            max_answer: aggregate.max_answer,
            bodies,
        };
        let result = match aggregate.inputs(parts.uri.path(), parts.uri.query()) {
            Ok(inputs) => {
                let fanout = &fanout;
                aggregate
                    .run(&inputs, |c, path| self.aggregate_call(fanout, c, path))
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(mut resp) => {
                routing::finish_response(rule, &mut resp);
                resp
            }
            Err(e) => lifecycle.refuse(ProxyError::Compose(e), grpc),
        }
    }

    /// The calls' bodies, built from the public request's JSON body (read whole, at most
    /// `max_body_bytes`, within the rule's request timeout) before any call leaves; nothing
    /// is read when no call has a body.
    async fn aggregate_bodies(
        &self,
        rule: &Rule,
        a: &Aggregate,
        parts: &mut http::request::Parts,
        body: Incoming,
    ) -> Result<Vec<Option<Bytes>>, ProxyError> {
        if !a.reads_body() {
            return Ok(vec![None; a.calls.len()]);
        }
        let limit = rule.timeout.unwrap_or(self.defaults.request);
        let read = async {
            let bytes = crate::compose::body::request_body(parts, body, a.max_body)
                .await
                .map_err(|e| refused_request(e, a.max_body))?;
            a.call_bodies(bytes).await.map_err(ProxyError::Compose)
        };
        within(limit, read).await
    }

    /// One call of an aggregate: its method and body, its answer read whole within the
    /// call's time and size limits and parsed as JSON. Retried as any mesh call of its
    /// method (`Outbound::forward_built`): `POST` and `PATCH` only when the service's retry
    /// policy allows non-idempotent methods.
    async fn aggregate_call(&self, f: &Fanout<'_>, c: &Call, path: String) -> Answer {
        let start = Instant::now();
        let failed = |status: StatusCode, cause: &'static str, message: String| Failure {
            status,
            cause,
            message,
        };
        let body = f.bodies.get(c.index).cloned().flatten();
        let mut req = Request::new(body.clone().unwrap_or_default());
        *req.method_mut() = c.method.clone();
        *req.uri_mut() = path.parse().map_err(|e| {
            failed(
                StatusCode::BAD_REQUEST,
                "bad-request",
                format!("`{path}`: {e}"),
            )
        })?;
        *req.headers_mut() = f.headers.clone();
        let h = req.headers_mut();
        if let Ok(host) = HeaderValue::from_str(&c.service) {
            h.insert(header::HOST, host);
        }
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        if let Some(b) = &body {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(b.len()));
        }
        if let Some(t) = c.timeout {
            req.extensions_mut().insert(RouteTimeout(t));
        }
        let resp = self
            .mesh_call(&c.service, f.rule, req, f.client, f.lifecycle)
            .await;
        if !resp.status().is_success() {
            let cause = resp
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| known_cause(v.as_bytes()))
                .unwrap_or("upstream-status");
            let message = format!("answered {}", resp.status());
            return Err(failed(resp.status(), cause, message));
        }
        let (parts, body) = resp.into_parts();
        let left = c.timeout.map(|t| t.saturating_sub(start.elapsed()));
        let read = collect(&parts.headers, body, f.max_answer);
        let bytes = match tokio::time::timeout(left.unwrap_or(Duration::MAX), read).await {
            Ok(Ok(b)) => b,
            Ok(Err(Collect::TooLarge)) => {
                let m = format!("the answer is larger than {} bytes", f.max_answer);
                return Err(failed(
                    StatusCode::BAD_GATEWAY,
                    "upstream-body-too-large",
                    m,
                ));
            }
            Ok(Err(Collect::Failed(m))) => {
                return Err(failed(StatusCode::BAD_GATEWAY, "upstream-failed", m))
            }
            Err(_) => {
                let m = "the answer's body did not arrive in time".to_string();
                return Err(failed(StatusCode::GATEWAY_TIMEOUT, "response-timeout", m));
            }
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| failed(StatusCode::BAD_GATEWAY, "bad-upstream-json", e.to_string()))
    }

    /// A request this sidecar built, to `service`, observed like a routed request: a client
    /// span (the child of the span named in its headers), metrics and the access log under
    /// `route`.
    async fn mesh_call(
        &self,
        service: &Arc<String>,
        route: &Arc<String>,
        mut req: Request<Bytes>,
        client: SocketAddr,
        lifecycle: &Lifecycle,
    ) -> Response<ResponseBody> {
        let mut observed = lifecycle.start(&mut req, |req| {
            self.tracing
                .client(req.method(), req.uri().path(), req.headers(), service)
        });
        observed.span.route(route);
        let ids = observed.span.ids();
        let sent = self.call_service(service, req, client, &mut observed.span);
        let result = logs::scope(ids, sent).await;
        let labels = Labels {
            service,
            route: Some(route),
            client,
            peer_identity: None,
        };
        observed.finish(result, labels).0
    }

    async fn call_service(
        &self,
        service: &Arc<String>,
        req: Request<Bytes>,
        client: SocketAddr,
        span: &mut RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let known = self.routes.load().route(service).cloned();
        let route = match known {
            Some(route) => route,
            None => match Box::pin(self.learn(service)).await {
                Ok(Some(route)) => route,
                learned => {
                    return Err(super::routed::not_found(service.to_string(), learned.err()))
                }
            },
        };
        self.forward_built(&route, req, client, span).await
    }

    /// Forward through a rule's body transforms: the request read whole (within the request
    /// timeout) and transformed before anything is sent, the answer transformed after.
    pub(super) async fn forward_transformed(
        &self,
        t: &Transform,
        route: &Target,
        req: Request<Incoming>,
        client: SocketAddr,
        span: &mut RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let limit = self.body_time(route, &req);
        let req = within(limit, t.request(req)).await?;
        let resp = self.forward_built(route, req, client, span).await?;
        t.response(resp).await
    }

    /// Forward a JSON request to a gRPC service: mapped to the method's message (within the
    /// request timeout) before anything is sent, the answer mapped back to JSON. A
    /// client-streaming method's array streams instead, element by element; when the gateway
    /// cuts it (a bad element, the body limit), the client is answered with that cause.
    pub(super) async fn forward_transcoded(
        &self,
        t: &Transcoder,
        route: &Target,
        req: Request<Incoming>,
        client: SocketAddr,
        span: &mut RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (binding, vars) = transcode::find(t, &req)?;
        let read_ahead = req
            .extensions()
            .get::<crate::http::read_ahead::ReadAhead>()
            .is_some();
        if binding.client_streaming && !read_ahead {
            let (req, watch, failed) = transcode::upload(t, binding.clone(), vars, req)?;
            let sent = self.forward_mapped(route, req, watch, client, span).await;
            let answer = match sent {
                Ok(resp) => transcode::response(t, binding, resp).await,
                Err(e) => Err(e),
            };
            return match failed.take() {
                Some(cause) => Err(cause.into()),
                None => answer,
            };
        }
        let limit = self.body_time(route, &req);
        let req = within(limit, transcode::request(t, &binding, vars, req)).await?;
        let resp = self.forward_built(route, req, client, span).await?;
        transcode::response(t, binding, resp).await
    }

    /// Forward a gRPC-Web text request: its base64 body read whole (bounded) and decoded
    /// first, so that a body that does not decode reaches no one.
    pub(super) async fn forward_web_text(
        &self,
        route: &Target,
        req: Request<Incoming>,
        client: SocketAddr,
        span: &mut RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let limit = self.body_time(route, &req);
        let decoded = async {
            let (mut parts, body) = req.into_parts();
            let max = grpc_web::MAX_TEXT_BODY;
            let text = crate::compose::body::request_body(&mut parts, body, max)
                .await
                .map_err(|e| refused_request(e, max))?;
            let body = grpc_web::decode_text(&text).map_err(ComposeError::BadGrpcWeb)?;
            Ok(Request::from_parts(parts, body))
        };
        let req = within(limit, decoded).await?;
        self.forward_built(route, req, client, span).await
    }

    /// The time a request body may take to arrive: the rule's or service's request timeout.
    fn body_time<B>(&self, route: &Target, req: &Request<B>) -> Duration {
        req.extensions()
            .get::<RouteTimeout>()
            .map(|t| t.0)
            .or(route.service.request_timeout)
            .unwrap_or(self.defaults.request)
    }
}

/// `read`, or a stalled client's error once `limit` has passed.
async fn within<T>(
    limit: Duration,
    read: impl std::future::Future<Output = Result<T, ProxyError>>,
) -> Result<T, ProxyError> {
    match tokio::time::timeout(limit, read).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Client {
            fault: crate::http::client_body::ClientFault::BodyStalled,
            message: format!("the request body did not arrive within {limit:?}"),
        }),
    }
}
