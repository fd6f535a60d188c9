//! OpenAPI documents as an app or an operator supplies them, and as read back from etcd
//! (`policies/src/api_spec.rs` `parse_document`, `validate_document`, `follow_ref`;
//! `api_diff.rs` `diff`): `old\0new`, each JSON or YAML. Hostile shapes (deep nesting, `$ref`
//! cycles and chains, references shared many times over) must end in an error or a bounded
//! walk, never a stack overflow or a panic.

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"openapi: 3.1.0\n",
    b"\"openapi\": \"3.0.3\"",
    b"info: {title: t, version: '1'}\n",
    b"paths:\n",
    b"  /orders:\n",
    b"    get:\n",
    b"    post:\n",
    b"    fetch:\n",
    b"parameters: [{name: a, in: query, required: true}]",
    b"requestBody:",
    b"responses:",
    b"'200':",
    b"content:",
    b"application/json:",
    b"schema:",
    b"properties:",
    b"required: [",
    b"items:",
    b"allOf: [",
    b"$ref: '#/components/schemas/A'",
    b"\"$ref\": \"#/components/schemas/B\"",
    b"components:\n  schemas:\n    A:",
    b"#/",
    b"~1",
    b"~0",
    b"{",
    b"}",
    b"[",
    b"]",
    b"&a ",
    b"*a",
    b"\0",
];

pub fn run(data: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let parts = crate::split(text.as_bytes(), 2);
    let mut label = String::new();
    let mut docs = Vec::new();
    for part in &parts {
        let Ok(part) = std::str::from_utf8(part) else {
            return 0;
        };
        match trellis_policies::parse_openapi(part)
            .and_then(|d| trellis_policies::validate_openapi(&d).map(|_| d))
        {
            Ok(d) => {
                check_canonical(&d);
                label.push_str("valid|");
                docs.push(d);
            }
            Err(e) => {
                label.push_str(&e.to_string());
                label.push('|');
            }
        }
    }
    if let [old, new] = docs.as_slice() {
        assert!(
            trellis_policies::diff_api(old, old).is_empty(),
            "a document differs from itself"
        );
        let changes = trellis_policies::diff_api(old, new);
        label.push_str(crate::count(changes.iter().filter(|c| c.breaking).count()));
    }
    outcome(&label)
}

/// The canonical bytes (what is hashed and stored) parse back to the same document.
fn check_canonical(doc: &serde_json::Value) {
    let bytes = trellis_policies::canonical_bytes(doc);
    let back: serde_json::Value = serde_json::from_slice(&bytes).expect("canonical JSON parses");
    assert_eq!(&back, doc, "canonical bytes round trip");
}
