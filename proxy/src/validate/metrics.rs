//! Validation's metrics: requests refused and responses that did not match, by route and reason.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The HTTPRoute rule (its `route` label elsewhere).
    pub route: Arc<String>,
    pub reason: &'static str,
}

#[derive(Clone, Default)]
pub struct ValidationMetrics {
    /// Requests answered 4xx/503 by validation, never forwarded.
    pub request_failures: Family<ReasonLabels, Counter>,
    /// Responses that did not match the document (audit: passed on unchanged).
    pub response_mismatches: Family<ReasonLabels, Counter>,
    /// Responses whose body could not be checked (over the bound, or broken off).
    pub response_unchecked: Family<ReasonLabels, Counter>,
}

// === impl ValidationMetrics ===

impl ValidationMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "validation_request_failures",
            "Requests refused by OpenAPI validation at the ingress (never forwarded), by route and reason",
            m.request_failures.clone(),
        );
        registry.register(
            "validation_response_mismatches",
            "Responses that do not match the route's OpenAPI document (audit mode: passed on unchanged), by route and reason",
            m.response_mismatches.clone(),
        );
        registry.register(
            "validation_response_unchecked",
            "Responses of audited routes whose body was not checked (over the bound, or broken off), by route and reason",
            m.response_unchecked.clone(),
        );
        m
    }

    pub fn refused(&self, route: &Arc<String>, reason: &'static str) {
        self.request_failures
            .get_or_create(&labels(route, reason))
            .inc();
    }

    pub fn mismatch(&self, route: &Arc<String>, reason: &'static str) {
        self.response_mismatches
            .get_or_create(&labels(route, reason))
            .inc();
    }

    pub fn unchecked(&self, route: &Arc<String>, reason: &'static str) {
        self.response_unchecked
            .get_or_create(&labels(route, reason))
            .inc();
    }
}

fn labels(route: &Arc<String>, reason: &'static str) -> ReasonLabels {
    ReasonLabels {
        route: route.clone(),
        reason,
    }
}
