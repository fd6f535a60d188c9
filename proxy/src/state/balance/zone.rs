//! Zone preference: pick among same-zone endpoints, and spill over to all endpoints when every
//! local one is ejected or the local pick is clearly more loaded than an alternative elsewhere.

use std::sync::Arc;

use super::{Balancer, EndpointStats, PickContext};

/// Spill over when the local pick has more than `2 x remote + SLACK` requests in flight.
const SLACK: usize = 8;

pub struct ZoneAware {
    /// Indices (into the full list) of the same-zone endpoints.
    local: Vec<usize>,
    local_stats: Vec<Arc<EndpointStats>>,
    local_balancer: Box<dyn Balancer>,
    all_balancer: Box<dyn Balancer>,
}

impl ZoneAware {
    pub fn new(
        local: Vec<usize>,
        endpoints: &[Arc<EndpointStats>],
        local_balancer: Box<dyn Balancer>,
        all_balancer: Box<dyn Balancer>,
    ) -> Self {
        let local_stats = local
            .iter()
            .filter_map(|&i| endpoints.get(i).cloned())
            .collect();
        Self {
            local,
            local_stats,
            local_balancer,
            all_balancer,
        }
    }
}

impl Balancer for ZoneAware {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], ctx: &PickContext) -> Option<usize> {
        let local = self
            .local_balancer
            .pick(&self.local_stats, ctx)
            .filter(|&i| self.local_stats[i].available())
            .map(|i| self.local[i]);
        let Some(l) = local else {
            return self.all_balancer.pick(endpoints, ctx);
        };
        let load = endpoints[l].in_flight();
        if load > SLACK {
            if let Some(g) = self.all_balancer.pick(endpoints, ctx) {
                if load > 2 * endpoints[g].in_flight() + SLACK {
                    return Some(g);
                }
            }
        }
        Some(l)
    }

    fn name(&self) -> &'static str {
        "zone_aware"
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::round_robin::RoundRobin;
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn prefers_local_then_spills_over() {
        let eps = endpoints(4);
        let z = ZoneAware::new(
            vec![2, 3],
            &eps,
            Box::new(RoundRobin::new()),
            Box::new(RoundRobin::new()),
        );
        assert_eq!(histogram(&z, &eps, 100, |_| None), vec![0, 0, 50, 50]);
        eps[2].eject_for(Duration::from_secs(60));
        eps[3].eject_for(Duration::from_secs(60));
        let h = histogram(&z, &eps, 100, |_| None);
        assert_eq!(h[2] + h[3], 0);
        assert_eq!(h[0] + h[1], 100);
        eps[2].readmit();
        eps[3].readmit();
        let _load: Vec<_> = (0..40)
            .flat_map(|_| [eps[2].start(), eps[3].start()])
            .collect();
        let h = histogram(&z, &eps, 100, |_| None);
        assert!(h[0] + h[1] > 0, "overloaded local zone spills: {h:?}");
    }
}
