//! Smooth weighted round robin (nginx's algorithm) as a precomputed schedule: built once per
//! endpoint list, interleaving as nginx does (weights 5,1,1 give a a b a c a a, not
//! a a a a a b c); each pick is then one atomic increment and an index.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{next_available, Balancer, EndpointStats, PickContext};

/// Longest schedule; larger weight sums are scaled down (keeping every weight >= 1). Building
/// costs O(schedule x endpoints), once per snapshot, off the request path.
const MAX_SCHEDULE: u64 = 16_384;

pub struct WeightedRoundRobin {
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl WeightedRoundRobin {
    pub fn new(weights: &[u32]) -> Self {
        let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x.max(1))).collect();
        let g = w.iter().copied().fold(0, gcd).max(1);
        w.iter_mut().for_each(|x| *x /= g);
        let total: u64 = w.iter().sum();
        if total > MAX_SCHEDULE {
            let scale = total.div_ceil(MAX_SCHEDULE);
            w.iter_mut().for_each(|x| *x = (*x / scale).max(1));
        }
        let total: i64 = w.iter().sum::<u64>() as i64;
        let mut current = vec![0i64; w.len()];
        let mut schedule = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for (i, c) in current.iter_mut().enumerate() {
                *c += w[i] as i64;
            }
            for i in 1..current.len() {
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            schedule.push(best as u32);
        }
        Self {
            schedule,
            next: AtomicUsize::new(0),
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Balancer for WeightedRoundRobin {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], _: &PickContext) -> Option<usize> {
        if endpoints.is_empty() || self.schedule.is_empty() {
            return None;
        }
        let slot = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        let i = self.schedule[slot] as usize;
        if i < endpoints.len() && endpoints[i].available() {
            return Some(i);
        }
        next_available(endpoints, i % endpoints.len())
    }

    fn name(&self) -> &'static str {
        "weighted_round_robin"
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn exact_proportions_and_smooth_interleaving() {
        let eps = endpoints(3);
        let b = WeightedRoundRobin::new(&[5, 1, 1]);
        assert_eq!(histogram(&b, &eps, 700, |_| None), vec![500, 100, 100]);
        let seq: Vec<usize> = (0..7)
            .map(|_| b.pick(&eps, &PickContext::default()).unwrap())
            .collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0], "nginx's smooth order");
    }

    #[test]
    fn large_weights_are_scaled_without_losing_small_ones() {
        let eps = endpoints(2);
        let b = WeightedRoundRobin::new(&[10_000, 1]);
        let h = histogram(&b, &eps, 100_000, |_| None);
        assert!(h[1] >= 1, "{h:?}");
        assert!(h[0] > 99 * h[1], "{h:?}");
    }
}
