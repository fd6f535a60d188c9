//! Observation: what every request leaves behind, however it ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response};

use crate::error::{known_cause, ProxyError};
use crate::http::body::Streamed;
use crate::http::headers::{has_name, ERROR_HEADER};
use crate::telemetry::access_log::{cache_status, AccessLog, Outcome, RequestInfo};
use crate::telemetry::metrics::{InFlight, Metrics, RequestCounters, INBOUND};
use crate::telemetry::trace::{logs, RequestSpan};
use crate::ResponseBody;
use prometheus_client::metrics::gauge::Gauge;

/// How one listener observes its requests.
pub struct Lifecycle {
    direction: &'static str,
    metrics: Arc<Metrics>,
    /// This direction's `trellis_requests_in_flight`, looked up once here so that a request
    /// costs one atomic add and one sub, not a label lookup.
    in_flight: Gauge,
    /// This listener's request counters, kept by label set.
    counters: RequestCounters,
    access: Arc<AccessLog>,
    /// Responses come from peer sidecars (every direction but inbound), whose own refusals
    /// name their cause in `trellis-error`: the cause is recorded here too.
    peer_causes: bool,
}

/// A request being observed; [`Observed::finish`] ends it.
pub struct Observed<'a> {
    lifecycle: &'a Lifecycle,
    start: Instant,
    grpc: bool,
    pub span: RequestSpan,
    info: Option<RequestInfo>,
    /// Counted in flight until `finish` ends it, or until the request's future is dropped.
    _in_flight: InFlight<'a>,
}

/// What a finished request is counted and logged under.
pub struct Labels<'a> {
    pub service: &'a Arc<String>,
    /// The HTTPRoute rule that routed it, when the listener routes (`default` when none did).
    pub route: Option<&'a Arc<String>>,
    pub client: SocketAddr,
    /// The caller's verified identity (inbound).
    pub peer_identity: Option<&'a HeaderValue>,
}

/// The status and duration a request was counted with.
#[derive(Clone, Copy, Debug)]
pub struct Finished {
    pub status: u16,
    pub seconds: f64,
}

// === impl Lifecycle ===

impl Lifecycle {
    pub fn new(direction: &'static str, metrics: Arc<Metrics>, access: Arc<AccessLog>) -> Self {
        Self {
            direction,
            in_flight: metrics.in_flight_gauge(direction),
            counters: RequestCounters::new(direction),
            metrics,
            access,
            peer_causes: direction != INBOUND,
        }
    }

    pub fn direction(&self) -> &'static str {
        self.direction
    }

    /// Start observing `req` under the span `span_of` opens for it; the span's context
    /// travels on in the request's headers.
    pub fn start<B>(
        &self,
        req: &mut Request<B>,
        span_of: impl FnOnce(&Request<B>) -> RequestSpan,
    ) -> Observed<'_> {
        let in_flight = InFlight::start(&self.in_flight);
        let start = Instant::now();
        let grpc = crate::http::grpc::is_grpc(req.headers());
        let span = span_of(req);
        span.inject(req.headers_mut());
        let info = self.access.enabled().then(|| RequestInfo::of(req));
        Observed {
            lifecycle: self,
            start,
            grpc,
            span,
            info,
            _in_flight: in_flight,
        }
    }

    /// The response for an error (as a gRPC status for a gRPC caller), counted by cause.
    pub fn refuse(&self, e: ProxyError, grpc: bool) -> Response<ResponseBody> {
        self.metrics.proxy_error(self.direction, e.cause());
        let expected = e.is_policy_decision() || matches!(e, ProxyError::Client { .. });
        if self.direction == INBOUND && !expected {
            tracing::warn!(error = %e, cause = e.cause(), "inbound request failed");
        } else {
            // Expected under load and counted per policy: no log line per request.
            tracing::debug!(direction = self.direction, error = %e, cause = e.cause(), "request refused");
        }
        e.into_response_for(grpc)
    }
}

// === impl Observed ===

impl Observed<'_> {
    /// Whether the access log will want the request's details.
    pub fn logging(&self) -> bool {
        self.info.is_some()
    }

    /// End the request: its response (an error's, naming the cause), span, access log line
    /// and metrics.
    pub fn finish(
        mut self,
        result: Result<Response<ResponseBody>, ProxyError>,
        labels: Labels<'_>,
    ) -> (Response<ResponseBody>, Finished) {
        let lifecycle = self.lifecycle;
        if let (Some(info), Some(route)) = (self.info.as_mut(), labels.route) {
            info.route = Some(route.clone());
        }
        let mut cause = None;
        let resp = result.unwrap_or_else(|e| {
            cause = Some(e.cause());
            // Its log line names the request's trace and span.
            logs::sync_scope(self.span.ids(), || lifecycle.refuse(e, self.grpc))
        });
        // A refusal by the far sidecar names its cause too (none is behind an inbound
        // listener: its header is not even looked up there). Looked up only when present: a
        // custom name's lookup hashes it byte by byte.
        let cause = cause.or_else(|| match lifecycle.peer_causes {
            true if has_name(resp.headers(), &ERROR_HEADER) => {
                known_cause(resp.headers().get(ERROR_HEADER)?.as_bytes())
            }
            _ => None,
        });
        self.span.respond(resp.status().as_u16(), cause, || {
            cache_status(resp.headers())
        });
        // One clock read for the log line and the metrics.
        let elapsed = self.start.elapsed();
        let outcome = Outcome {
            direction: lifecycle.direction,
            service: labels.service,
            response: &resp,
            cause,
            elapsed,
            client: labels.client,
            peer_identity: labels.peer_identity.and_then(|p| p.to_str().ok()),
            span: &self.span,
        };
        lifecycle.access.finish(self.info, outcome);
        let resp = end_with_body(resp, self.span);
        let finished = Finished {
            status: resp.status().as_u16(),
            seconds: elapsed.as_secs_f64(),
        };
        let route = labels.route.unwrap_or(&lifecycle.metrics.default_route);
        lifecycle.counters.record(
            &lifecycle.metrics,
            labels.service,
            route,
            finished.status,
            finished.seconds,
        );
        (resp, finished)
    }
}

/// Hold `span` until the response body ends (a streamed body), or end it now.
pub fn end_with_body<R>(
    resp: http::Response<http_body_util::Either<Streamed, R>>,
    span: RequestSpan,
) -> http::Response<http_body_util::Either<Streamed, R>> {
    if !span.is_open() {
        return resp;
    }
    resp.map(|b| match b {
        http_body_util::Either::Left(s) => http_body_util::Either::Left(s.traced(span)),
        other => other,
    })
}
