//! What being read by a dashboard costs a sidecar: encoding its registry and summarising it
//! (`/.well-known/trellis/summary`), per read, for a sidecar with 10 and 50 destination
//! services x 5 status codes in two directions (each with its 19-bucket latency histogram).
//! At one read per 10 s, `t` per read is `t / 10 s` of a core.
//! `cargo bench -p trellis-proxy --bench summary`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use prometheus_client::registry::Registry;
use trellis_proxy::telemetry::exposition;
use trellis_proxy::telemetry::metrics::{encode, Metrics};
use trellis_proxy::telemetry::summary::Summary;

fn reads(c: &mut Criterion) {
    let mut group = c.benchmark_group("telemetry_read");
    for services in [10usize, 50] {
        let mut registry = Registry::with_prefix("trellis");
        let metrics = Metrics::register(&mut registry);
        let route = Arc::new("default".to_string());
        for s in 0..services {
            let service = Arc::new(format!("service-{s}"));
            for status in [200u16, 201, 404, 429, 503] {
                for direction in ["inbound", "outbound"] {
                    metrics.record_routed_request(direction, &service, &route, status, 0.003);
                }
            }
        }
        group.bench_with_input(BenchmarkId::new("metrics", services), &registry, |b, r| {
            b.iter(|| encode(r).len())
        });
        group.bench_with_input(BenchmarkId::new("summary", services), &registry, |b, r| {
            b.iter(|| {
                let text = encode(r);
                let e = exposition::parse(&text).expect("own text parses");
                let s = Summary::from_exposition("orders", 0, &e);
                serde_json::to_string(&s).map(|j| j.len()).unwrap_or(0)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
