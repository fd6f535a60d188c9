//! Load balancing: small strategies behind one trait (Pingora-style), each pick O(1) and
//! allocation-free. Endpoint state that balancers read (in-flight requests, peak-EWMA latency,
//! ejection) lives in [`EndpointStats`], which outlives snapshots: an endpoint that stays across
//! a mesh update keeps its history.

mod hash;
mod p2c;
pub(crate) mod rand;
mod round_robin;
mod stats;
mod weighted;
mod zone;

pub use hash::{hash_key, Maglev, StableHasher};
pub use p2c::{LeastRequest, PeakEwma};
pub use rand::Random;
pub use round_robin::RoundRobin;
pub use stats::{EndpointStats, InFlight, OutlierEvent, OutlierParams, DEFAULT_RTT};
pub use weighted::WeightedRoundRobin;
pub use zone::ZoneAware;

use std::sync::Arc;

use trellis_policies::{LbAlgorithm, LoadBalancerSpec};

/// What a pick may depend on besides endpoint state.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickContext {
    /// Consistent-hash input (header, cookie or source address), already hashed.
    pub hash: Option<u64>,
}

/// A load-balancing strategy over a fixed endpoint list (rebuilt when the list changes).
///
/// `pick` returns an index into the list the balancer was built for. Implementations must be
/// O(1) or O(log n), must not allocate, and must skip endpoints that are not available
/// (ejected) when any available one exists.
pub trait Balancer: Send + Sync {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], ctx: &PickContext) -> Option<usize>;
    fn name(&self) -> &'static str;
}

/// Build the balancer a policy asks for (round robin when none). `endpoints`, `weights`,
/// `keys` (stable hashes of the endpoints' addresses) and `zones` are in list order;
/// `local_zone` enables zone preference when the policy asks for it.
pub fn build(
    spec: Option<&LoadBalancerSpec>,
    endpoints: &[Arc<EndpointStats>],
    weights: &[u32],
    keys: &[u64],
    zones: &[Option<&str>],
    local_zone: Option<&str>,
) -> Box<dyn Balancer> {
    let algorithm = spec.map(|s| s.algorithm).unwrap_or_default();
    let make = |w: &[u32], k: &[u64]| -> Box<dyn Balancer> {
        match algorithm {
            LbAlgorithm::RoundRobin => Box::new(RoundRobin::new()),
            LbAlgorithm::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(w)),
            LbAlgorithm::Random => Box::new(Random::new()),
            LbAlgorithm::LeastRequest => Box::new(LeastRequest::new(w)),
            LbAlgorithm::PeakEwma => Box::new(PeakEwma::new()),
            LbAlgorithm::ConsistentHash => Box::new(Maglev::with_keys(k)),
        }
    };
    if let (true, Some(zone)) = (spec.is_some_and(|s| s.zone_aware), local_zone) {
        let local: Vec<usize> = zones
            .iter()
            .enumerate()
            .filter(|(_, z)| **z == Some(zone))
            .map(|(i, _)| i)
            .collect();
        if !local.is_empty() && local.len() < endpoints.len() {
            let lw: Vec<u32> = local.iter().map(|&i| weights[i]).collect();
            let lk: Vec<u64> = local.iter().map(|&i| keys[i]).collect();
            let local_balancer = make(&lw, &lk);
            return Box::new(ZoneAware::new(
                local,
                endpoints,
                local_balancer,
                make(weights, keys),
            ));
        }
    }
    make(weights, keys)
}

/// Index of the first available endpoint at or after `start` (wrapping), for strategies that
/// land on an ejected endpoint. O(n) only in the degenerate case where most are ejected.
pub(crate) fn next_available(endpoints: &[Arc<EndpointStats>], start: usize) -> Option<usize> {
    let n = endpoints.len();
    (0..n)
        .map(|k| (start + k) % n)
        .find(|&i| endpoints[i].available())
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    pub fn endpoints(n: usize) -> Vec<Arc<EndpointStats>> {
        (0..n).map(|_| Arc::new(EndpointStats::new())).collect()
    }

    /// How often each index was picked in `rounds` picks.
    pub fn histogram(
        b: &dyn Balancer,
        eps: &[Arc<EndpointStats>],
        rounds: usize,
        hash: impl Fn(usize) -> Option<u64>,
    ) -> Vec<usize> {
        let mut counts = vec![0; eps.len()];
        for r in 0..rounds {
            let i = b
                .pick(eps, &PickContext { hash: hash(r) })
                .expect("an endpoint");
            counts[i] += 1;
        }
        counts
    }
}
