//! Registrations and policies as a sidecar reads them from etcd (`mesh-agent/src/etcd/`:
//! `keys.rs` `Keys::parse`, `state.rs` `MeshState::put`/`resync`/`to_document`), then what
//! `discovery.rs` does with the state: validate the assembled document and build the data
//! plane's snapshot and route table from it. Any process with write access to the prefix
//! controls these values.
//!
//! Input: `key\0value\0key\0value...`; a key that does not start with `/` is taken as relative
//! to `/trellis/v1/mesh/`. The pairs are applied as one full read (resync), then again one by
//! one as watch events at the next revision, with every third key deleted.

use mesh_agent::etcd::keys::Keys;
use mesh_agent::etcd::state::MeshState;

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"\0",
    b"/trellis/v1/mesh/",
    b"services/orders/instances/o-1",
    b"policies/ServicePolicy/orders",
    b"policies/HTTPRoute/r",
    b"policies/RateLimit/rl",
    b"policies/Authentication/a",
    b"{\"service\":\"orders\",\"instance\":\"o-1\",",
    b"\"address\":\"127.0.0.1:9000\"",
    b"\"identity\":\"spiffe://trellis.local/service/orders\"",
    b"\"weight\":",
    b"{\"apiVersion\":\"trellis.dev/v1\",\"kind\":",
    b"\"metadata\":{\"name\":\"orders\"}",
    b"\"spec\":{",
    b"\"service\":\"orders\"",
    b"\"policy\":{",
    b"\"request_timeout\":\"1s\"",
    b"\"hosts\":[\"orders\"]",
    b"\"rules\":[{",
    b"\"backends\":[{\"service\":\"orders\"}]",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"null",
    b"1e999",
    b"-1",
    b"\\u0000",
    b"/",
];

pub fn run(data: &[u8]) -> u64 {
    let keys = Keys::new("/trellis");
    let parts = crate::split(data, 129);
    let mut owned: Vec<(String, Vec<u8>)> = Vec::new();
    for pair in parts.chunks(2).take(64) {
        let key = String::from_utf8_lossy(pair[0]);
        let key = if key.starts_with('/') {
            key.into_owned()
        } else {
            format!("/trellis/v1/mesh/{key}")
        };
        owned.push((key, pair.get(1).copied().unwrap_or_default().to_vec()));
    }
    let mut state = MeshState::default();
    let mut rejected = 0;
    let changes = state.resync(
        &keys,
        owned.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        1,
        |_, _| rejected += 1,
    );
    assert_eq!(changes.rejected, rejected);
    let distinct: std::collections::BTreeSet<&str> =
        owned.iter().map(|(k, _)| k.as_str()).collect();
    assert!(state.len() <= distinct.len());
    // (A key may be both in force and rejected: an invalid value keeps the last good one.)
    assert!(state.rejected.len() <= distinct.len());
    let mut label = format!(
        "{} {} ",
        crate::count(state.len()),
        crate::count(state.rejected.len())
    );
    for r in state.rejected.values().take(4) {
        label.push_str(&r.reason);
    }
    label.push_str(&assemble(&state));
    // The same values as watch events, with deletes.
    for (i, (k, v)) in owned.iter().enumerate() {
        if i % 3 == 2 {
            state.delete(k);
        } else {
            let _ = state.put(&keys, k, v, 2);
        }
    }
    label.push_str(&assemble(&state));
    outcome(&label)
}

fn assemble(state: &MeshState) -> String {
    let full = mesh_agent::config::DiscoveryConfig {
        scope: mesh_agent::config::DiscoveryScope::Full,
        ..Default::default()
    };
    let doc = state.to_document(&mesh_agent::etcd::scope::Scope::new(&full, "web", None));
    let _ = state.instances().count();
    match trellis_policies::validate(&doc) {
        Ok(()) => super::policy::build(&doc),
        Err(e) => e.to_string(),
    }
}
