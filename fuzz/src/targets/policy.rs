//! Policy documents as an operator or a compromised writer supplies them
//! (`policies/src/document.rs` `parse_documents`, `PolicyDocument::validate`, `policies/src/lib.rs`
//! `parse_mesh_yaml`, `policies/src/validate.rs`), YAML or JSON, one or many documents; then,
//! for a mesh document that validates, the data plane's build of it (`Snapshot::from_document`,
//! `TargetTable::build`: balancers, HTTPRoute compilation, regexes).

use std::sync::Arc;

use trellis_proxy::state::snapshot::Snapshot;
use trellis_proxy::state::target::{StatsRegistry, TargetTable};

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"apiVersion: trellis.dev/v1\n",
    b"kind: ",
    b"ServicePolicy",
    b"HTTPRoute",
    b"RateLimit",
    b"ConcurrencyLimit",
    b"Authentication",
    b"Authorization",
    b"Consumer",
    b"ExternalService",
    b"ApiSpec",
    b"CachePolicy",
    b"CachePurge",
    b"document: ",
    b"metadata:\n  name: ",
    b"spec:\n",
    b"---\n",
    b"services:\n",
    b"endpoints:\n",
    b"address: ",
    b"127.0.0.1:8080",
    b"[::1]:80",
    b"identity: spiffe://trellis.local/service/a",
    b"weight: ",
    b"policy:\n",
    b"request_timeout: ",
    b"1s",
    b"999999999h",
    b"0ms",
    b"retries:\n",
    b"load_balancer:\n",
    b"algorithm: ",
    b"ring_hash",
    b"maglev",
    b"least_request",
    b"hash_on:\n",
    b"header: ",
    b"http_routes:\n",
    b"hosts: [",
    b"rules:\n",
    b"matches:\n",
    b"path:\n",
    b"prefix: /",
    b"exact: /",
    b"regex: ",
    b"(a+)+$",
    b".{1000000}",
    b"backends:\n",
    b"- service: ",
    b"rate_limits:\n",
    b"limit: ",
    b"per: second",
    b"key:\n",
    b"&a ",
    b"*a",
    b"!!binary ",
    b"!!str",
    b"? ",
    b"- ",
    b": ",
    b"\n  ",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"'",
    b"~",
    b"null",
    b"1e999",
    b"0x1F",
    b".inf",
    b"-.nan",
    b"<<: *a",
];

pub fn run(data: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let mut label = String::new();
    let docs = trellis_policies::parse_documents(text, "fuzz");
    for (i, doc) in docs.into_iter().enumerate() {
        let result = doc
            .map_err(|e| e.message)
            .and_then(|doc| doc.validate().map(|_| ()).map_err(|e| e.message));
        // The first two documents' results make the label: more would make every
        // combination of results a new outcome.
        if i < 2 {
            match result {
                Ok(()) => label.push_str("valid "),
                Err(message) => label.push_str(&message),
            }
            label.push('|');
        }
    }
    match trellis_policies::parse_mesh_yaml(text) {
        Ok(doc) => {
            label.push_str("mesh ok ");
            label.push_str(&build(&doc));
        }
        Err(e) => label.push_str(&e.to_string()),
    }
    outcome(&label)
}

/// What a sidecar does with a mesh document that validated: an `Err` here is a clean
/// rejection (e.g. a DNS name where the data plane needs an address), never a panic.
pub fn build(doc: &trellis_policies::MeshDocument) -> String {
    match Snapshot::from_document(doc, "trellis.local", 1, "fuzz".into()) {
        Ok(snapshot) => {
            let table = TargetTable::build(
                Arc::new(snapshot),
                &StatsRegistry::default(),
                Some("a"),
                Some("gateway"),
            );
            let _ = table.dump();
            let _ = table.routing.dump();
            format!("snapshot {}", crate::count(table.routes().count()))
        }
        Err(e) => e,
    }
}
