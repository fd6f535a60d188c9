//! The outbound listener: the app's plain HTTP/1.1 or h2c calls to mesh services, addressed by
//! `Host`/`:authority` or in absolute form (`HTTP_PROXY`), forwarded over pooled HTTP/2 + mTLS
//! to a peer sidecar.

mod routed;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::balance::OutlierEvent;
use crate::body::Streamed;
use crate::breaker::Breaker;
use crate::config::{
    Config, Limits, CONSUMER_HEADER, ORIG_PROTO_HEADER, PEER_IDENTITY_HEADER, RETRIED_HEADER,
};
use crate::error::ProxyError;
use crate::headers::{
    append_forwarded, is_upgrade, request_authority, request_host, strip_hop_by_hop,
};
use crate::identity::IdentityStore;
use crate::metrics::{ConnectionGuard, Metrics, OUTBOUND, UNKNOWN_SERVICE};
use crate::original_dst::{OriginalDst, Protocol};
use crate::pool::PeerPool;
use crate::retry::{idempotent, retry_after};
use crate::route::{Choice, Route, RouteTable};
use crate::server::{accept_loop, http_builder, serve_connection, Activity, ConnTimeouts};
use crate::snapshot::Endpoint;
use crate::RequestBody;
use crate::{drain, upgrade, ResponseBody};
use http_body::Body as _;
use http_body_util::BodyExt;

/// Plain HTTP/1.1 to destinations outside the mesh, pooled by endpoint address.
type ExternalClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Incoming,
>;

pub struct Outbound {
    external: ExternalClient,
    routes: Arc<ArcSwap<RouteTable>>,
    pool: Arc<PeerPool>,
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    limits: Limits,
    connect_timeout: Duration,
    request_timeout: Duration,
    stream_idle: Duration,
    unknown: Arc<String>,
    tracing: Arc<crate::trace::Tracing>,
    access: Arc<crate::access_log::AccessLog>,
    /// Learns services the snapshot does not hold (scoped stores); `None`: unknown is unknown.
    on_demand: Option<crate::discover::OnDemand>,
}

// === impl Outbound ===

impl Outbound {
    pub fn new(
        config: &Config,
        routes: Arc<ArcSwap<RouteTable>>,
        pool: Arc<PeerPool>,
        tls: IdentityStore,
        metrics: Arc<Metrics>,
        tracing: Arc<crate::trace::Tracing>,
        access: Arc<crate::access_log::AccessLog>,
    ) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeouts.connect));
        connector.set_nodelay(true);
        let external =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .set_host(false)
                .build(connector);
        Self {
            external,
            routes,
            pool,
            tls,
            metrics,
            limits: config.limits.clone(),
            connect_timeout: config.timeouts.connect,
            request_timeout: config.timeouts.request,
            stream_idle: config.timeouts.stream_idle,
            unknown: Arc::new(UNKNOWN_SERVICE.to_string()),
            tracing,
            access,
            on_demand: None,
        }
    }

    /// Learn services the snapshot does not hold through `on_demand` (scoped discovery).
    pub fn with_on_demand(mut self, on_demand: Option<crate::discover::OnDemand>) -> Self {
        self.on_demand = on_demand;
        self
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher) {
        let builder = Arc::new(http_builder(&self.limits));
        let max = self.limits.max_connections;
        accept_loop(listener, max, drain, OUTBOUND, move |tcp, client, drain| {
            let this = self.clone();
            let builder = builder.clone();
            async move {
                let _conn = ConnectionGuard::new(&this.metrics, OUTBOUND);
                // Transparent interception: opaque TCP goes on to where the app sent it.
                let redirected = crate::original_dst::redirected(&tcp);
                if let Some(dst) = redirected {
                    if crate::original_dst::detect(&tcp).await == Protocol::Opaque {
                        crate::original_dst::tcp_passthrough(tcp, dst, this.connect_timeout).await;
                        return;
                    }
                }
                let activity = Activity::counted(this.metrics.byte_counters(OUTBOUND));
                let timeouts = ConnTimeouts::from(&this.limits);
                let act = activity.clone();
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    let this = this.clone();
                    let guard = act.begin();
                    if let Some(dst) = redirected {
                        req.extensions_mut().insert(OriginalDst(dst));
                    }
                    // Peers trust this header from sidecars: an app may not set it.
                    if req.headers().contains_key(CONSUMER_HEADER) {
                        req.headers_mut().remove(CONSUMER_HEADER);
                    }
                    async move {
                        let resp = this.handle(req, client, OUTBOUND).await;
                        drop(guard);
                        Ok::<_, Infallible>(resp)
                    }
                });
                serve_connection(&builder, tcp, svc, activity, timeouts, &drain).await;
            }
        })
        .await;
    }

    /// Route and forward one request; `direction` labels its metrics and access log line
    /// (`outbound` for the app's calls, `ingress` for the gateway's).
    pub(crate) async fn handle(
        &self,
        mut req: Request<Incoming>,
        client: SocketAddr,
        direction: &'static str,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        let grpc = crate::grpc::is_grpc(req.headers());
        let mut span = self.tracing.client(
            req.method(),
            req.uri().path(),
            req.headers(),
            request_host(&req).unwrap_or(UNKNOWN_SERVICE),
        );
        span.inject(req.headers_mut());
        let mut info = self
            .access
            .enabled()
            .then(|| crate::access_log::RequestInfo::of(&req));
        let edge = direction == crate::ingress::INGRESS;
        let (service, route, result) = self.route(req, client, edge, &mut span).await;
        if let Some(i) = info.as_mut() {
            i.route = Some(route.clone());
        }
        let mut cause = None;
        let resp = result.unwrap_or_else(|e| {
            self.metrics.proxy_error(direction, e.cause());
            tracing::debug!(error = %e, cause = e.cause(), "outbound request failed");
            cause = Some(e.cause());
            e.into_response_for(grpc)
        });
        // A refusal by the far sidecar names its cause too.
        let cause = cause.or_else(|| {
            resp.headers()
                .get(crate::config::ERROR_HEADER)
                .and_then(|v| crate::error::known_cause(v.as_bytes()))
        });
        span.respond(resp.status().as_u16(), cause);
        self.access.finish(
            info,
            crate::access_log::Outcome {
                direction,
                service: &service,
                response: &resp,
                cause,
                elapsed: start.elapsed(),
                client,
                peer_identity: None,
                span: &span,
            },
        );
        let resp = crate::trace::end_with_body(resp, span);
        self.metrics.record_routed_request(
            direction,
            &service,
            &route,
            resp.status().as_u16(),
            start.elapsed().as_secs_f64(),
        );
        resp
    }

    async fn forward(
        &self,
        route: &Route,
        mut req: Request<Incoming>,
        client: SocketAddr,
        span: &mut crate::trace::RequestSpan,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let svc = &route.service;
        let ip = client.ip();
        let overflow = |breaker: Breaker| {
            self.metrics.outlier_event(&svc.name, breaker.label());
            ProxyError::BreakerOpen {
                service: svc.name.to_string(),
                breaker,
            }
        };
        // Held until the response headers arrive (or the request fails).
        let _request = route
            .counters
            .request(route.max_requests)
            .ok_or_else(|| overflow(Breaker::MaxRequests))?;
        let mut i = self.choose(route, &req, ip, None)?;
        let ep = &svc.endpoints[i];
        let connect_timeout = svc.connect_timeout.unwrap_or(self.connect_timeout);
        // A gRPC deadline shortens the timeout, and travels on with the time that remains.
        let grpc_timeout = crate::grpc::parse_timeout(req.headers());
        let request_timeout = req
            .extensions()
            .get::<crate::routing::RouteTimeout>()
            .map(|t| t.0)
            .or(svc.request_timeout)
            .unwrap_or(self.request_timeout);
        let request_timeout = grpc_timeout.map_or(request_timeout, |g| g.min(request_timeout));
        let authority = request_authority(&req).ok_or(ProxyError::MissingAuthority)?;

        let headers = req.headers_mut();
        // The app must not be able to claim an identity; only the far side sets this header.
        headers.remove(PEER_IDENTITY_HEADER);
        headers.remove(ORIG_PROTO_HEADER);
        // The ingress wrote them already, by its trusted-proxy rule.
        if req
            .extensions()
            .get::<crate::headers::EdgeForwarded>()
            .is_none()
        {
            append_forwarded(req.headers_mut(), client.ip(), "http");
        }

        if let Some(host) = &svc.external_host {
            let result = self.forward_external(ep, host, req, request_timeout).await;
            self.outcome(route, i, result.as_ref().map(|r| r.status().as_u16()));
            return result;
        }

        if is_upgrade(&req) {
            let tls = self.tls.load_full();
            return upgrade::outbound(
                &tls,
                ep,
                req,
                &authority,
                connect_timeout,
                request_timeout,
                &self.metrics,
            )
            .await;
        }

        let orig = req.version();
        let headers = req.headers_mut();
        strip_hop_by_hop(headers, false);
        headers.remove(header::HOST);
        if orig != Version::HTTP_2 {
            let v = if orig == Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            headers.insert(ORIG_PROTO_HEADER, HeaderValue::from_static(v));
        }
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        *req.uri_mut() = Uri::builder()
            .scheme("https")
            .authority(authority.as_str())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::MissingAuthority)?;
        *req.version_mut() = Version::HTTP_2;

        // Retries replay the body, so only small bodies of known length are buffered (and only
        // for idempotent methods unless allowed); anything else streams once.
        let retry = &route.retry;
        let may_retry = retry.attempts > 0
            && !req.headers().contains_key(RETRIED_HEADER)
            && (retry.allow_non_idempotent || idempotent(req.method()))
            && (req.body().is_end_stream()
                || req
                    .body()
                    .size_hint()
                    .exact()
                    .is_some_and(|n| n <= retry.max_body_bytes));
        let (parts, body) = req.into_parts();
        let mut template = None;
        let mut streaming = None;
        // Asked before blaming the endpoint for a failure: was it the client's body?
        let mut watch = None;
        if may_retry {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ProxyError::Client {
                    fault: crate::client_body::ClientFault::BodyError,
                    message: e.to_string(),
                })?
                .to_bytes();
            template = Some((parts, bytes));
        } else {
            let (body, w) = crate::client_body::ClientBody::new(body);
            watch = Some(w);
            streaming = Some(Request::from_parts(parts, Either::Left(body)));
        }
        route.counters.budget.deposit();
        let deadline = tokio::time::Instant::now() + request_timeout;
        let mut attempt = 0u32;
        let mut exclude = None;
        // Held while a retry is in flight (the max_retries breaker).
        let mut _retrying = None;
        // A closing pooled connection handed the request back unsent once already.
        let mut handed_back = false;
        loop {
            let mut req: Request<RequestBody> = match (&template, streaming.take()) {
                (Some((parts, bytes)), _) => replay(parts, bytes, attempt > 0),
                (None, Some(r)) => r,
                (None, None) => {
                    return Err(ProxyError::Upstream {
                        addr: ep.addr,
                        message: "request body already sent".into(),
                    })
                }
            };
            if attempt > 0 {
                i = self.choose(route, &req, ip, exclude)?;
            }
            let ep = &svc.endpoints[i];
            span.upstream(ep.addr, &ep.identity, attempt);
            let pending = route
                .counters
                .pending(route.max_pending)
                .ok_or_else(|| overflow(Breaker::MaxPending))?;
            let connected = self.pool.get(ep, connect_timeout).await;
            drop(pending);
            let sender = match connected {
                Ok(sender) => sender,
                Err(e) => {
                    // Nothing was sent: any request, streaming or not, can go to another endpoint
                    // (retrying the same one would repeat the same failure).
                    self.outcome(route, i, Err(&e));
                    if svc.endpoints.len() > 1
                        && attempt < retry.attempts.max(1)
                        && self.withdraw(route)
                    {
                        let Some(permit) = route.counters.retry(route.max_retries) else {
                            self.metrics.outlier_event(&svc.name, "max_retries");
                            return Err(e);
                        };
                        _retrying = Some(permit);
                        if template.is_none() {
                            streaming = Some(req);
                        }
                        exclude = Some(i);
                        attempt += 1;
                        continue;
                    }
                    return Err(e);
                }
            };
            let stats = &route.stats[i];
            // Counted in flight (least request, peak-EWMA) until the response headers arrive.
            let in_flight = stats.start();
            let started = std::time::Instant::now();
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            let per_try = retry
                .per_try_timeout
                .map_or(remaining, |t| t.min(remaining));
            if grpc_timeout.is_some() {
                req.headers_mut().insert(
                    crate::grpc::TIMEOUT_HEADER,
                    crate::grpc::encode_timeout(remaining),
                );
            }
            let result = match self.send(ep, sender, req, per_try).await {
                Sent::Done(result) => result,
                Sent::HandedBack(req) if !handed_back => {
                    // The pooled connection was closing (the peer draining) and gave the
                    // request back before writing it: dial again. Nothing was sent, so this is
                    // not a retry; if the peer is gone, the connect failure above moves the
                    // request to another endpoint like any other.
                    handed_back = true;
                    self.pool.invalidate(ep);
                    if template.is_none() {
                        streaming = Some(req);
                    }
                    continue;
                }
                Sent::HandedBack(_) => Err(ProxyError::Upstream {
                    addr: ep.addr,
                    message: "a fresh connection refused the request before sending it".into(),
                }),
            };
            if let Some(fault) = client_fault(&result, watch.as_deref()) {
                // The client broke its own request: not the endpoint's failure, no retry.
                return Err(fault);
            }
            stats.observe_rtt(started.elapsed());
            self.outcome(route, i, result.as_ref().map(|r| r.status().as_u16()));
            let retryable = template.is_some()
                && attempt < retry.attempts
                && match &result {
                    Ok(resp) => retryable_response(retry, resp),
                    Err(ProxyError::Upstream { .. }) => true,
                    Err(ProxyError::ResponseTimeout { .. }) => retry.per_try_timeout.is_some(),
                    Err(_) => false,
                };
            if retryable {
                let wait = match &result {
                    Ok(resp) => retry_after(resp.headers()),
                    Err(_) => None,
                }
                .unwrap_or_else(|| {
                    route
                        .counters
                        .budget
                        .backoff(attempt, retry.backoff_base, retry.backoff_max)
                });
                let permit =
                    if tokio::time::Instant::now() + wait < deadline && self.withdraw(route) {
                        let p = route.counters.retry(route.max_retries);
                        if p.is_none() {
                            self.metrics.outlier_event(&svc.name, "max_retries");
                        }
                        p
                    } else {
                        None
                    };
                if let Some(permit) = permit {
                    _retrying = Some(permit);
                    tokio::time::sleep(wait).await;
                    exclude = Some(i);
                    attempt += 1;
                    continue;
                }
            }
            let mut resp = result?;
            strip_hop_by_hop(resp.headers_mut(), false);
            let idle = svc.stream_idle_timeout.unwrap_or(self.stream_idle);
            return Ok(resp
                .map(|b| Either::Left(Streamed::new(b).idle_timeout(idle).in_flight(in_flight))));
        }
    }

    /// Take a retry from the service's budget, counting the outcome.
    fn withdraw(&self, route: &Route) -> bool {
        let ok = route
            .counters
            .budget
            .try_withdraw(route.retry.budget_ratio, route.retry.budget_min_per_second);
        self.metrics.outlier_event(
            &route.service.name,
            if ok {
                "retry"
            } else {
                "retry_budget_exhausted"
            },
        );
        ok
    }

    /// A destination outside the mesh: HTTP/1.1 to one of its DNS records, `Host` set to the
    /// external host. No mTLS and no identity: the far end is not a mesh member.
    async fn forward_external(
        &self,
        ep: &Endpoint,
        host: &str,
        mut req: Request<Incoming>,
        request_timeout: Duration,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        strip_hop_by_hop(req.headers_mut(), false);
        if let Ok(h) = HeaderValue::from_str(host) {
            req.headers_mut().insert(header::HOST, h);
        }
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(ep.addr.to_string())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::MissingAuthority)?;
        *req.version_mut() = Version::HTTP_11;
        let mut resp = tokio::time::timeout(request_timeout, self.external.request(req))
            .await
            .map_err(|_| ProxyError::ResponseTimeout {
                addr: ep.addr,
                timeout: request_timeout,
            })?
            .map_err(|e| ProxyError::from_client(ep.addr, &e))?;
        strip_hop_by_hop(resp.headers_mut(), false);
        Ok(resp.map(|b| Either::Left(Streamed::new(b).idle_timeout(self.stream_idle))))
    }

    /// Send on the pooled connection. If the connection turns out to be closing before the
    /// request was written (a GOAWAY race), the request is unsent and is retried once on a
    /// fresh connection: this is safe for any method because the peer never saw it.
    async fn send(
        &self,
        ep: &Endpoint,
        mut send: hyper::client::conn::http2::SendRequest<RequestBody>,
        req: Request<RequestBody>,
        request_timeout: Duration,
    ) -> Sent {
        let attempt = async {
            match send.try_send_request(req).await {
                Ok(resp) => Sent::Done(Ok(resp)),
                Err(mut e) => match e.take_message() {
                    Some(req) => Sent::HandedBack(req),
                    None => Sent::Done(Err(upstream(ep, e.error()))),
                },
            }
        };
        tokio::time::timeout(request_timeout, attempt)
            .await
            .unwrap_or(Sent::Done(Err(ProxyError::ResponseTimeout {
                addr: ep.addr,
                timeout: request_timeout,
            })))
    }
}

// === outlier detection hooks ===

impl Outbound {
    /// Choose an endpoint or say why there is none.
    fn choose<B>(
        &self,
        route: &Route,
        req: &Request<B>,
        ip: std::net::IpAddr,
        exclude: Option<usize>,
    ) -> Result<usize, ProxyError> {
        let name = &route.service.name;
        match route.choose(req, ip, exclude) {
            Choice::Endpoint(i) => Ok(i),
            Choice::Panic(i) => {
                self.metrics.outlier_event(name, "panic_routing");
                tracing::debug!(service = %name, "every endpoint is ejected: routing anyway (when_all_ejected: ignore_ejections)");
                Ok(i)
            }
            Choice::NoEndpoints => Err(ProxyError::NoEndpoints(name.to_string())),
            Choice::AllEjected => Err(ProxyError::AllEjected(name.to_string())),
        }
    }

    /// Feed a result (status, or the sidecar's own error) to outlier detection; log and count
    /// state changes. Failures: connect/TLS/handshake errors, resets, timeouts and 5xx.
    fn outcome(&self, route: &Route, i: usize, result: Result<u16, &ProxyError>) {
        let success = matches!(result, Ok(status) if status < 500);
        let name = &route.service.name;
        match route.record(i, success) {
            OutlierEvent::None => {}
            OutlierEvent::Ejected(d) => {
                let endpoint = route.service.endpoints.get(i).map(|e| e.addr);
                if let Some(addr) = endpoint {
                    self.metrics.endpoint_event(name, addr, "ejected");
                }
                tracing::warn!(service = %name, endpoint = ?endpoint, ejected_for = ?d, "endpoint ejected after consecutive failures");
            }
            OutlierEvent::Readmitted => {
                let endpoint = route.service.endpoints.get(i).map(|e| e.addr);
                if let Some(addr) = endpoint {
                    self.metrics.endpoint_event(name, addr, "readmitted");
                }
                tracing::info!(service = %name, endpoint = ?endpoint, "endpoint re-admitted after a successful probe");
            }
        }
    }
}

/// What became of a request given to a pooled connection.
enum Sent {
    Done(Result<Response<Incoming>, ProxyError>),
    /// The connection was closing and handed the request back before writing any of it.
    HandedBack(Request<RequestBody>),
}

/// A fresh copy of a buffered request for one attempt; retried attempts carry the mark.
/// The client's fault, when `result` failed because of the client's own body (see
/// [`crate::client_body`]).
fn client_fault<B>(
    result: &Result<Response<B>, ProxyError>,
    watch: Option<&crate::client_body::BodyWatch>,
) -> Option<ProxyError> {
    let (Err(e), Some(watch)) = (result, watch) else {
        return None;
    };
    let timed_out = matches!(e, ProxyError::ResponseTimeout { .. });
    watch.blame(timed_out).map(|fault| ProxyError::Client {
        fault,
        message: e.to_string(),
    })
}

fn replay(
    parts: &http::request::Parts,
    body: &bytes::Bytes,
    retried: bool,
) -> Request<RequestBody> {
    let mut req = Request::new(Either::Right(http_body_util::Full::new(body.clone())));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    if retried {
        req.headers_mut()
            .insert(RETRIED_HEADER, HeaderValue::from_static("1"));
    }
    req
}

/// A response the retry policy retries: a listed status, or a listed gRPC status in a
/// trailers-only response.
fn retryable_response(retry: &trellis_policies::RetrySpec, resp: &Response<Incoming>) -> bool {
    retry.retry_on_status.contains(&resp.status().as_u16())
        || resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|code| retry.retry_on_grpc.contains(&code))
}

fn upstream(ep: &Endpoint, e: &hyper::Error) -> ProxyError {
    ProxyError::Upstream {
        addr: ep.addr,
        message: error_chain(e),
    }
}

/// An error and its sources, joined: hyper's top-level messages alone are often vague.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}
