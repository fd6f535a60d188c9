//! Power of two choices: sample two distinct endpoints at random and take the cheaper. Least
//! request compares (in-flight + 1) / weight; peak-EWMA compares latency x (in-flight + 1), so a
//! slow or congested endpoint gets less traffic while still being probed now and then.

use std::sync::Arc;

use super::rand::Rng;
use super::{next_available, Balancer, EndpointStats, PickContext};

fn p2c(rng: &Rng, endpoints: &[Arc<EndpointStats>], cost: impl Fn(usize) -> f64) -> Option<usize> {
    let n = endpoints.len();
    match n {
        0 => None,
        1 => next_available(endpoints, 0),
        _ => {
            let a = rng.below(n);
            let b = (a + 1 + rng.below(n - 1)) % n;
            let (ok_a, ok_b) = (endpoints[a].available(), endpoints[b].available());
            match (ok_a, ok_b) {
                (true, true) => Some(if cost(b) < cost(a) { b } else { a }),
                (true, false) => Some(a),
                (false, true) => Some(b),
                (false, false) => next_available(endpoints, b),
            }
        }
    }
}

pub struct LeastRequest {
    rng: Rng,
    inv_weights: Vec<f64>,
}

impl LeastRequest {
    pub fn new(weights: &[u32]) -> Self {
        Self {
            rng: Rng::new(),
            inv_weights: weights.iter().map(|&w| 1.0 / f64::from(w.max(1))).collect(),
        }
    }
}

impl Balancer for LeastRequest {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], _: &PickContext) -> Option<usize> {
        p2c(&self.rng, endpoints, |i| {
            (endpoints[i].in_flight() as f64 + 1.0)
                * self.inv_weights.get(i).copied().unwrap_or(1.0)
        })
    }

    fn name(&self) -> &'static str {
        "least_request"
    }
}

pub struct PeakEwma {
    rng: Rng,
}

impl PeakEwma {
    pub fn new() -> Self {
        Self { rng: Rng::new() }
    }
}

impl Default for PeakEwma {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer for PeakEwma {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], _: &PickContext) -> Option<usize> {
        p2c(&self.rng, endpoints, |i| endpoints[i].cost())
    }

    fn name(&self) -> &'static str {
        "peak_ewma"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_util::*;
    use super::*;

    #[test]
    fn least_request_avoids_the_busy_endpoint() {
        let eps = endpoints(3);
        let _busy: Vec<_> = (0..20).map(|_| eps[0].start()).collect();
        let h = histogram(&LeastRequest::new(&[1, 1, 1]), &eps, 3000, |_| None);
        // Endpoint 0 only wins when both samples are endpoint 0, which P2C never draws.
        assert_eq!(h[0], 0, "{h:?}");
        assert!(h[1] > 1000 && h[2] > 1000, "{h:?}");
    }

    #[test]
    fn peak_ewma_prefers_the_faster_endpoint() {
        let eps = endpoints(2);
        eps[0].observe_rtt(Duration::from_millis(50));
        eps[1].observe_rtt(Duration::from_millis(5));
        let h = histogram(&PeakEwma::new(), &eps, 1000, |_| None);
        assert_eq!(
            h,
            vec![0, 1000],
            "with two endpoints P2C always compares both"
        );
        let eps = endpoints(4);
        eps[0].observe_rtt(Duration::from_millis(200));
        let h = histogram(&PeakEwma::new(), &eps, 4000, |_| None);
        assert_eq!(h[0], 0, "the slow one loses every comparison: {h:?}");
    }

    #[test]
    fn ejected_endpoints_are_skipped() {
        let eps = endpoints(2);
        eps[1].eject_for(Duration::from_secs(60));
        let h = histogram(&LeastRequest::new(&[1, 1]), &eps, 100, |_| None);
        assert_eq!(h, vec![100, 0]);
    }
}
