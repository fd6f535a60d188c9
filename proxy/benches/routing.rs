//! HTTPRoute matching cost: the decision for a request against a 100-route table (a mix of
//! exact, prefix, regex and header matches) against the baseline of a host without routes.
//!
//! `cargo bench -p trellis-proxy --bench routing`

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, Method, Uri};
use trellis_policies::HttpRouteSpec;
use trellis_proxy::policy::routing::{Decision, RoutingTable};

/// 100 rules on host `orders`: 25 exact paths, 25 prefixes, 25 regexes, 25 prefix + header.
fn table() -> RoutingTable {
    let mut rules = Vec::new();
    for i in 0..25 {
        rules.push(serde_json::json!({"matches": [{"path": {"exact": format!("/exact/{i}/item")}}], "backends": [{"service": "orders"}]}));
        rules.push(serde_json::json!({"matches": [{"path": {"prefix": format!("/prefix/{i}")}}], "backends": [{"service": "orders"}]}));
        rules.push(serde_json::json!({"matches": [{"path": {"regex": format!("/re/{i}/[0-9]+/[a-z]+")}}], "backends": [{"service": "orders"}]}));
        rules.push(serde_json::json!({"matches": [{"path": {"prefix": "/hdr"}, "headers": [{"name": "x-tenant", "exact": format!("t{i}")}]}], "backends": [{"service": "orders"}]}));
    }
    let spec: HttpRouteSpec =
        serde_json::from_value(serde_json::json!({"hosts": ["orders"], "rules": rules}))
            .expect("spec");
    spec.validate("bench").expect("valid");
    let mut specs = BTreeMap::new();
    specs.insert("bench".to_string(), spec);
    RoutingTable::build(&specs, trellis_policies::MESH_GATEWAY, |_| false)
}

fn bench(c: &mut Criterion) {
    let t = table();
    let empty = RoutingTable::default();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "t24".parse().expect("value"));
    headers.insert("accept", "*/*".parse().expect("value"));
    let cases: [(&str, &str); 5] = [
        ("exact_first", "/exact/0/item"),
        ("prefix_last", "/prefix/24/orders?x=1"),
        ("regex_last", "/re/24/123/abc"),
        ("header_last", "/hdr/list"),
        ("no_match", "/none/at/all"),
    ];
    let mut g = c.benchmark_group("routing");
    let base: Uri = "/prefix/24/orders?x=1".parse().expect("uri");
    g.bench_function("no_httproute_baseline", |b| {
        b.iter(|| {
            let d = empty.decide(black_box("orders"), &Method::GET, &base, &headers);
            black_box(matches!(d, Decision::Unrouted))
        })
    });
    for (name, uri) in cases {
        let uri: Uri = uri.parse().expect("uri");
        g.bench_function(format!("table100_{name}"), |b| {
            b.iter(|| {
                let d = t.decide(black_box("orders"), &Method::GET, &uri, &headers);
                black_box(matches!(d, Decision::Matched { .. }))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
