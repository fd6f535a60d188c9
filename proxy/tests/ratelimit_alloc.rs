//! The rate-limit decision is allocation-free once a key's bucket exists: admitted and refused
//! requests, local and global limits keyed by header and identity, and a concurrency slot.

use std::net::{IpAddr, Ipv4Addr};

use http::{HeaderMap, HeaderValue, Method};
use prometheus_client::registry::Registry;
use trellis_policies::MeshDocument;
use trellis_proxy::policy::ratelimit::RateLimits;
use trellis_proxy::state::snapshot::Snapshot;

#[path = "support/counting.rs"]
mod counting;
use counting::allocations;

#[test]
fn decisions_do_not_allocate() {
    counting::assert_active();

    let doc: MeshDocument = serde_json::from_value(serde_json::json!({
        "rate_limits": {
            "local": {"service": "orders", "scope": "local", "limit": {"requests": 50, "per": "second"}},
            "global": {"service": "orders", "scope": "global", "key": {"headers": ["x-tenant"], "client_identity": true, "source_ip": true}, "limit": {"requests": 20, "per": "second"}},
        },
        "concurrency_limits": {"c": {"service": "orders", "max_in_flight": 10}},
    }))
    .unwrap();
    let snap = Snapshot::from_document(&doc, "test.local", 1, "test".into()).unwrap();
    let limits = RateLimits::new("orders", &mut Registry::default());
    limits.update(&snap);
    let peer = HeaderValue::from_static("spiffe://test.local/service/web");
    let source = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let tenants: Vec<HeaderMap> = (0..8)
        .map(|i| {
            let mut h = HeaderMap::new();
            h.insert("x-tenant", HeaderValue::from(i as u64));
            h
        })
        .collect();
    // First request per key creates its bucket (that allocates, once).
    for h in &tenants {
        drop(limits.check(&Method::GET, "/a", h, Some(&peer), source, None));
    }
    let (mut ok, mut refused) = (0, 0);
    let start = allocations();
    for i in 0..2000 {
        match limits.check(
            &Method::GET,
            "/a",
            &tenants[i % 8],
            Some(&peer),
            source,
            None,
        ) {
            Ok(permits) => {
                ok += 1;
                drop(permits);
            }
            Err(e) => {
                refused += 1;
                drop(e);
            }
        }
    }
    assert_eq!(allocations() - start, 0, "allocations on the decision path");
    assert!(
        ok > 0 && refused > 0,
        "both paths exercised: {ok} ok, {refused} refused"
    );
}
