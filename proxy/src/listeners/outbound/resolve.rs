//! What a request to a mesh service is allowed: resolved once, before its first attempt, from
//! the HTTPRoute rule, the service's policy, the sidecar's defaults and the caller's gRPC
//! deadline.

use std::time::Duration;

use http::Request;

use crate::error::ProxyError;
use crate::http::headers::request_authority;
use crate::policy::routing::RouteTimeout;
use crate::state::target::Target;

/// The sidecar's own timeouts, where a service's policy sets none.
#[derive(Clone, Copy, Debug)]
pub(super) struct Defaults {
    pub connect: Duration,
    pub request: Duration,
    pub stream_idle: Duration,
}

/// One request's timeouts.
#[derive(Clone, Copy, Debug)]
pub(super) struct Resolved {
    pub connect_timeout: Duration,
    /// Bounds every attempt together, from the first one.
    pub request_timeout: Duration,
    /// The caller sent a gRPC deadline: it travels on with the time that remains.
    pub grpc_deadline: bool,
    /// How long a response body may stay silent.
    pub stream_idle: Duration,
}

// === impl Resolved ===

impl Resolved {
    /// The rule's timeout first, then the service's, then the sidecar's; a gRPC deadline
    /// shortens it. A request that names no authority cannot be forwarded.
    pub fn resolve<B>(
        defaults: &Defaults,
        route: &Target,
        req: &Request<B>,
    ) -> Result<Self, ProxyError> {
        let svc = &route.service;
        let grpc_timeout = crate::http::grpc::parse_timeout(req.headers());
        let request_timeout = req
            .extensions()
            .get::<RouteTimeout>()
            .map(|t| t.0)
            .or(svc.request_timeout)
            .unwrap_or(defaults.request);
        let request_timeout = grpc_timeout.map_or(request_timeout, |g| g.min(request_timeout));
        request_authority(req).ok_or(ProxyError::MissingAuthority)?;
        Ok(Self {
            connect_timeout: svc.connect_timeout.unwrap_or(defaults.connect),
            request_timeout,
            grpc_deadline: grpc_timeout.is_some(),
            stream_idle: svc.stream_idle_timeout.unwrap_or(defaults.stream_idle),
        })
    }
}
