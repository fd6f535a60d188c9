//! Cost of the rate-limit decision on the request path (ns per `RateLimits::check`): no limit,
//! a local limit, a global limit keyed by a header over 1,000 live keys (admitted and refused),
//! and a concurrency limit (take and release a slot).
//! `cargo bench -p trellis-proxy --bench ratelimit`

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use prometheus_client::registry::Registry;
use trellis_policies::MeshDocument;
use trellis_proxy::policy::ratelimit::RateLimits;
use trellis_proxy::state::snapshot::Snapshot;

fn limits(doc: serde_json::Value) -> std::sync::Arc<RateLimits> {
    let doc: MeshDocument = serde_json::from_value(doc).expect("document");
    let snap = Snapshot::from_document(&doc, "bench.local", 1, "bench".into()).expect("snapshot");
    let limits = RateLimits::new("orders", &mut Registry::default());
    limits.update(&snap);
    limits
}

fn checks(c: &mut Criterion) {
    let mut group = c.benchmark_group("ratelimit_check");
    let source = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let peer = HeaderValue::from_static("spiffe://bench.local/service/web");
    let get = Method::GET;
    let tenants: Vec<HeaderMap> = (0..1000)
        .map(|i| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", HeaderValue::from(i as u64));
            h
        })
        .collect();
    let huge = 1e9;
    let cases = [
        ("no_limit", serde_json::json!({})),
        (
            "local_admitted",
            serde_json::json!({"rate_limits": {"l": {"service": "orders", "scope": "local", "limit": {"requests": huge as u32, "per": "second"}}}}),
        ),
        (
            "global_by_header_1000_keys_admitted",
            serde_json::json!({"rate_limits": {"g": {"service": "orders", "scope": "global", "key": {"headers": ["x-tenant"], "client_identity": true}, "limit": {"requests": huge as u32, "per": "second"}}}}),
        ),
        (
            "global_by_header_1000_keys_refused",
            serde_json::json!({"rate_limits": {"g": {"service": "orders", "scope": "global", "key": {"headers": ["x-tenant"]}, "limit": {"requests": 1, "per": "minute"}}}}),
        ),
        (
            "concurrency_slot",
            serde_json::json!({"concurrency_limits": {"c": {"service": "orders", "max_in_flight": 1000}}}),
        ),
    ];
    for (name, doc) in cases {
        let l = limits(doc);
        let mut i = 0usize;
        group.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % tenants.len();
                let r = l.check(&get, "/orders/42", &tenants[i], Some(&peer), source, None);
                std::hint::black_box(r.is_ok())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, checks);
criterion_main!(benches);
