//! A service's endpoints as the forwarding code uses them: choosing one, and feeding what
//! each attempt taught to outlier detection, the retry budget and the breakers, with the
//! metrics and logs that go with them.

use std::net::IpAddr;

use http::Request;

use crate::error::ProxyError;
use crate::policy::breaker::{Breaker, Permit};
use crate::state::balance::OutlierEvent;
use crate::state::target::{Choice, Target};
use crate::telemetry::metrics::Metrics;

/// One service's endpoints and the metrics their events are counted in.
#[derive(Clone, Copy)]
pub(super) struct Endpoints<'a> {
    pub route: &'a Target,
    pub metrics: &'a Metrics,
}

// === impl Endpoints ===

impl<'a> Endpoints<'a> {
    /// Choose an endpoint other than `exclude`, or say why there is none.
    pub fn choose<B>(
        &self,
        req: &Request<B>,
        ip: IpAddr,
        exclude: Option<usize>,
    ) -> Result<usize, ProxyError> {
        let name = &self.route.service.name;
        match self.route.choose(req, ip, exclude) {
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
    pub fn outcome(&self, i: usize, result: Result<u16, &ProxyError>) {
        let success = matches!(result, Ok(status) if status < 500);
        let route = self.route;
        let name = &route.service.name;
        let endpoint = || route.service.endpoints.get(i).map(|e| e.addr);
        match route.record(i, success) {
            OutlierEvent::None => {}
            OutlierEvent::Ejected(d) => {
                if let Some(addr) = endpoint() {
                    self.metrics.endpoint_event(name, addr, "ejected");
                }
                tracing::warn!(service = %name, endpoint = ?endpoint(), ejected_for = ?d, "endpoint ejected after consecutive failures");
            }
            OutlierEvent::Readmitted => {
                if let Some(addr) = endpoint() {
                    self.metrics.endpoint_event(name, addr, "readmitted");
                }
                tracing::info!(service = %name, endpoint = ?endpoint(), "endpoint re-admitted after a successful probe");
            }
        }
    }

    /// Take a retry from the service's budget, counting the outcome.
    pub fn withdraw(&self) -> bool {
        let route = self.route;
        let ok = route
            .counters
            .budget
            .try_withdraw(route.retry.budget_ratio, route.retry.budget_min_per_second);
        let event = if ok {
            "retry"
        } else {
            "retry_budget_exhausted"
        };
        self.metrics.outlier_event(&route.service.name, event);
        ok
    }

    /// A slot of the `max_retries` breaker, held while the retry is in flight.
    pub fn retry_permit(&self) -> Option<Permit<'a>> {
        let route = self.route;
        let permit = route.counters.retry(route.max_retries);
        if permit.is_none() {
            self.metrics
                .outlier_event(&route.service.name, "max_retries");
        }
        permit
    }

    /// The error of a full breaker, counted.
    pub fn overflow(&self, breaker: Breaker) -> ProxyError {
        let name = &self.route.service.name;
        self.metrics.outlier_event(name, breaker.label());
        ProxyError::BreakerOpen {
            service: name.to_string(),
            breaker,
        }
    }
}
