//! Rate-limit and concurrency-limit metrics, labelled by policy name (operator-declared, so the
//! label set is bounded by the policies in etcd, never by request data).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    policy: String,
    decision: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct LimitMetrics {
    decisions: Family<DecisionLabels, Counter>,
    share: Family<PolicyLabels, FloatGauge>,
    demand: Family<PolicyLabels, FloatGauge>,
    peers: Family<PolicyLabels, Gauge>,
    concurrency_decisions: Family<DecisionLabels, Counter>,
    in_flight: Family<PolicyLabels, Gauge>,
}

// === impl LimitMetrics ===

impl LimitMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            decisions: Family::default(),
            share: Family::default(),
            demand: Family::default(),
            peers: Family::default(),
            concurrency_decisions: Family::default(),
            in_flight: Family::default(),
        };
        registry.register(
            "ratelimit_decisions",
            "Rate-limit decisions on inbound requests, by policy and decision (allowed, limited)",
            m.decisions.clone(),
        );
        registry.register(
            "ratelimit_share_per_second",
            "This sidecar's current share of each rate limit, in requests per second (sum over the policy's active keys)",
            m.share.clone(),
        );
        registry.register(
            "ratelimit_demand_per_second",
            "Measured demand (admitted + limited) per rate limit, in requests per second, as published for global limits",
            m.demand.clone(),
        );
        registry.register(
            "ratelimit_peers",
            "Sidecars sharing each global rate limit, as seen in the demand table (including this one)",
            m.peers.clone(),
        );
        registry.register(
            "concurrency_limit_decisions",
            "Concurrency-limit decisions, by policy and decision (allowed, limited)",
            m.concurrency_decisions.clone(),
        );
        registry.register(
            "concurrency_limit_in_flight",
            "Requests in flight under each concurrency limit",
            m.in_flight.clone(),
        );
        m
    }

    fn labels(policy: &str) -> PolicyLabels {
        PolicyLabels {
            policy: policy.to_string(),
        }
    }

    pub fn decision(&self, policy: &str, decision: &'static str) -> Counter {
        self.decisions
            .get_or_create(&DecisionLabels {
                policy: policy.to_string(),
                decision,
            })
            .clone()
    }

    pub fn concurrency_decision(&self, policy: &str, decision: &'static str) -> Counter {
        self.concurrency_decisions
            .get_or_create(&DecisionLabels {
                policy: policy.to_string(),
                decision,
            })
            .clone()
    }

    pub fn share(&self, policy: &str) -> FloatGauge {
        self.share.get_or_create(&Self::labels(policy)).clone()
    }

    pub fn demand(&self, policy: &str) -> FloatGauge {
        self.demand.get_or_create(&Self::labels(policy)).clone()
    }

    pub fn peers(&self, policy: &str) -> Gauge {
        self.peers.get_or_create(&Self::labels(policy)).clone()
    }

    pub fn in_flight(&self, policy: &str) -> Gauge {
        self.in_flight.get_or_create(&Self::labels(policy)).clone()
    }
}
