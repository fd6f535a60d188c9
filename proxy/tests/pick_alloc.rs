//! Every balancer's pick is allocation-free: a counting global allocator watches picks for each
//! algorithm at 10 and 1,000 endpoints, including consistent hashing on a header through
//! `Target::pick`.

use std::sync::Arc;

use trellis_proxy::state::balance::{self, hash_key, EndpointStats, PickContext};

#[path = "support/counting.rs"]
mod counting;
use counting::allocations;

#[test]
fn picks_do_not_allocate() {
    // The counter sees allocations on this thread (so a zero below means something).
    counting::assert_active();

    for n in [10usize, 1000] {
        let stats: Vec<Arc<EndpointStats>> =
            (0..n).map(|_| Arc::new(EndpointStats::new())).collect();
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i % 5) as u32).collect();
        let keys: Vec<u64> = (0..n)
            .map(|i| hash_key(format!("10.0.{}.{}:15006", i / 250, i % 250).as_bytes()))
            .collect();
        let zones: Vec<Option<&str>> = (0..n)
            .map(|i| Some(if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        for algorithm in [
            "round_robin",
            "weighted_round_robin",
            "random",
            "least_request",
            "peak_ewma",
            "consistent_hash",
        ] {
            for zone_aware in [false, true] {
                let hash_on = if algorithm == "consistent_hash" {
                    ", hash_on: {header: x-user}"
                } else {
                    ""
                };
                let yaml = format!("{{algorithm: {algorithm}, zone_aware: {zone_aware}{hash_on}}}");
                let spec: trellis_policies::LoadBalancerSpec =
                    serde_norway::from_str(&yaml).unwrap();
                let b = balance::build(Some(&spec), &stats, &weights, &keys, &zones, Some("a"));
                let ctx = PickContext {
                    hash: Some(hash_key(b"user-1")),
                };
                let before = allocations();
                for _ in 0..1000 {
                    assert!(b.pick(&stats, &ctx).is_some());
                }
                let allocated = allocations() - before;
                assert_eq!(allocated, 0, "{algorithm} (zone_aware {zone_aware}) allocated {allocated} times in 1000 picks of {n}");
            }
        }
    }
}
