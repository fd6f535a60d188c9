//! The HTTPRoute decision is allocation-free: matching exact, prefix, regex, method, header and
//! query conditions, missing every rule, and drawing a weighted backend. (A regex's search
//! cache is created on its first use in a thread; that one-time allocation is warmed up first.)

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderValue, Method, Uri};
use trellis_policies::HttpRouteSpec;
use trellis_proxy::policy::routing::{Decision, RoutingTable};

#[path = "support/counting.rs"]
mod counting;
use counting::allocations;

#[test]
fn decisions_do_not_allocate() {
    counting::assert_active();
    let spec: HttpRouteSpec = serde_json::from_value(serde_json::json!({
        "hosts": ["orders"],
        "rules": [
            {"name": "exact", "matches": [{"path": {"exact": "/login"}}], "backends": [{"service": "a"}]},
            {"name": "regex", "matches": [{"path": {"regex": "/users/[0-9]+"}}], "backends": [{"service": "a"}]},
            {"name": "hdr", "matches": [{"path": {"prefix": "/api"}, "method": "GET",
                "headers": [{"name": "x-tenant", "regex": "t[0-9]+"}, {"name": "x-beta", "present": true}],
                "query": [{"name": "v", "exact": "2"}]}], "backends": [{"service": "a"}]},
            {"name": "split", "matches": [{"path": {"prefix": "/api"}}],
                "backends": [{"service": "a", "weight": 9}, {"service": "b", "weight": 1}]},
        ]
    }))
    .unwrap();
    spec.validate("p").unwrap();
    let mut specs = BTreeMap::new();
    specs.insert("p".to_string(), spec);
    let table = RoutingTable::build(&specs, trellis_policies::MESH_GATEWAY, |_| false);
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("t42"));
    headers.insert("x-beta", HeaderValue::from_static("1"));
    let cases: Vec<(Uri, &str)> = vec![
        ("/login".parse().unwrap(), "exact"),
        ("/users/7".parse().unwrap(), "regex"),
        ("/api/x?a=1&v=2".parse().unwrap(), "hdr"),
        ("/api/x?v=3".parse().unwrap(), "split"),
        ("/nothing".parse().unwrap(), "-"),
    ];
    let run = || {
        let mut names = 0usize;
        for (uri, want) in &cases {
            match table.decide("orders", &Method::GET, uri, &headers) {
                Decision::Matched { rule, .. } => {
                    assert_eq!(rule.name.as_str(), *want);
                    names += rule.backend().map_or(0, |b| b.service.len());
                }
                Decision::NoMatch(_) => assert_eq!(*want, "-"),
                Decision::Unrouted => panic!("orders has routes"),
            }
        }
        assert!(matches!(
            table.decide("payments", &Method::GET, &cases[0].0, &headers),
            Decision::Unrouted
        ));
        names
    };
    run();
    let start = allocations();
    for _ in 0..1000 {
        std::hint::black_box(run());
    }
    assert_eq!(allocations() - start, 0, "routing decisions allocated");
}
