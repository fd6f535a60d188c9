//! Pick cost per balancer at 10 and 1,000 endpoints (ns per pick).
//! `cargo bench -p trellis-proxy --bench pick`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use trellis_proxy::state::balance::{self, hash_key, EndpointStats, PickContext};

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [10usize, 1000] {
        let stats: Vec<Arc<EndpointStats>> =
            (0..n).map(|_| Arc::new(EndpointStats::new())).collect();
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i % 5) as u32).collect();
        let keys: Vec<u64> = (0..n)
            .map(|i| hash_key(&(i as u64).to_be_bytes()))
            .collect();
        let zones: Vec<Option<&str>> = (0..n)
            .map(|i| Some(if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        for (label, yaml) in [
            ("round_robin", "{algorithm: round_robin}"),
            ("weighted_round_robin", "{algorithm: weighted_round_robin}"),
            ("random", "{algorithm: random}"),
            ("least_request", "{algorithm: least_request}"),
            ("peak_ewma", "{algorithm: peak_ewma}"),
            (
                "consistent_hash",
                "{algorithm: consistent_hash, hash_on: {header: x-user}}",
            ),
            (
                "zone_aware_least_request",
                "{algorithm: least_request, zone_aware: true}",
            ),
        ] {
            let spec: trellis_policies::LoadBalancerSpec =
                serde_norway::from_str(yaml).expect("spec");
            let b = balance::build(Some(&spec), &stats, &weights, &keys, &zones, Some("a"));
            let mut k = 0u64;
            group.bench_with_input(BenchmarkId::new(label, n), &n, |bench, _| {
                bench.iter(|| {
                    k = k.wrapping_add(1);
                    let ctx = PickContext {
                        hash: Some(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                    };
                    std::hint::black_box(b.pick(&stats, &ctx))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
