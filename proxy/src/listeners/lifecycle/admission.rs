//! Admission: authentication and authorization, then the rate and concurrency limits, whose
//! slots are held until the response body ends.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use http_body_util::Either;

use crate::error::ProxyError;
use crate::policy::access::AccessControl;
use crate::policy::ratelimit::{Permits, RateLimits};
use crate::telemetry::metrics::Metrics;
use crate::ResponseBody;

/// What admits a request to this sidecar's service (its inbound listener and its ingress).
pub struct Admission {
    /// The service the policies and consumer metrics name.
    service: Arc<String>,
    access: Arc<AccessControl>,
    rate_limits: Arc<RateLimits>,
    metrics: Arc<Metrics>,
}

// === impl Admission ===

impl Admission {
    pub fn new(
        access: Arc<AccessControl>,
        rate_limits: Arc<RateLimits>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            service: Arc::new(access.service().to_string()),
            access,
            rate_limits,
            metrics,
        }
    }

    /// The service admitted requests are for.
    pub fn service(&self) -> &Arc<String> {
        &self.service
    }

    /// Authenticate and authorize `req` (from the mTLS-verified `peer`, if any), then apply
    /// the limits; the returned permits are the concurrency slots taken. `consumer` is set as
    /// soon as it is known, so that a consumer refused by a limit is still counted.
    pub async fn check<B>(
        &self,
        req: &mut Request<B>,
        peer: Option<&HeaderValue>,
        client: IpAddr,
        consumer: &mut Option<Arc<str>>,
    ) -> Result<Permits, ProxyError> {
        let who = self.access.check(req, peer).await?;
        consumer.clone_from(&who.consumer);
        self.rate_limits.check(
            req.method(),
            req.uri().path(),
            req.headers(),
            peer,
            client,
            who.consumer.as_deref(),
        )
    }

    /// Count the request of an authenticated consumer once its status is known, under the
    /// HTTPRoute rule that routed it (`None`: none did, counted as `default`).
    pub fn count(
        &self,
        consumer: Option<&Arc<str>>,
        route: Option<&Arc<String>>,
        status: u16,
        seconds: f64,
    ) {
        if let Some(c) = consumer {
            let route = route.unwrap_or(&self.metrics.default_route);
            self.metrics
                .record_consumer_request(&self.service, c, route, status, seconds);
        }
    }
}

/// Hold `permits` until the response body ends (a streamed body), or release them now.
pub fn hold(resp: Response<ResponseBody>, permits: Permits) -> Response<ResponseBody> {
    if permits.is_empty() {
        return resp;
    }
    resp.map(|b| match b {
        Either::Left(s) => Either::Left(s.hold(permits)),
        other => other,
    })
}
