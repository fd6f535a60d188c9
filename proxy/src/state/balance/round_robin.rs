//! Round robin: one atomic increment per pick.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{next_available, Balancer, EndpointStats, PickContext};

pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self {
            next: AtomicUsize::new(0),
        }
    }
}

impl Default for RoundRobin {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], _: &PickContext) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        next_available(endpoints, i)
    }

    fn name(&self) -> &'static str {
        "round_robin"
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn even_and_skips_ejected() {
        let eps = endpoints(3);
        let rr = RoundRobin::new();
        assert_eq!(histogram(&rr, &eps, 300, |_| None), vec![100, 100, 100]);
        eps[1].eject_for(std::time::Duration::from_secs(60));
        let h = histogram(&rr, &eps, 300, |_| None);
        assert_eq!(h[1], 0);
        assert_eq!(h[0] + h[2], 300);
        assert!(RoundRobin::new()
            .pick(&[], &PickContext::default())
            .is_none());
    }
}
