//! The transform benchmarks' body and programs, shared by `benches/transform.rs` and
//! `examples/transform_count.rs` (`#[path]` module).

/// A reshape of the kind a public contract asks for.
pub const RESHAPE: &str = "{id, customer: .customer.name, \
    lines: [.items[] | {sku, total: (.price * .qty)}], total: ([.items[] | .price * .qty] | add)}";

/// A gateway transform of the forms that used to leave the native subset (docs/composition.md
/// #cost): string interpolation, `//`, `select` with a comparison, `if`, `length`, `join`,
/// `has`, `del`, `keys`, `to_entries`.
pub const GATEWAY: &str = "{order: .id, who: \"\\(.customer.name) <\\(.customer.email)>\", \
    city: (.customer.address.country // \"PT\"), \
    lines: [.items[] | select(.qty > 1) | {sku, total: (.price * .qty)}], \
    count: (.items | length), tags: (.items[0].tags | join(\",\")), \
    priority: (if (.items | length) > 20 then \"high\" else \"normal\" end), \
    internal: has(\"internal\"), fields: (del(.internal) | keys), \
    address: (.customer.address | to_entries | map(\"\\(.key)=\\(.value)\") | join(\"&\"))}";

/// The rule's own program in "field operations + jq".
pub const FIELDS_JQ: &str = ". + {total: (.items | map(.price) | add)}";

/// The field operations of "field operations alone" and "field operations + jq".
pub const FIELDS: &str = "{remove: [/internal], rename: {/customer/name: /name}, add: {/v: 2}}";

/// An order of about 2 kB.
pub fn body() -> Vec<u8> {
    let items: Vec<serde_json::Value> = (0..22)
        .map(|i| {
            serde_json::json!({"sku": format!("SKU-{i:05}"), "name": format!("Item number {i}"),
                "price": 10 + i, "qty": 1 + i % 3, "tags": ["a", "b"]})
        })
        .collect();
    let v = serde_json::json!({
        "id": "ord-123456", "internal": {"shard": 7, "trace": "abc"},
        "customer": {"name": "Ana Lima", "email": "ana@example.com",
            "address": {"street": "1 Main St", "city": "Lisbon", "zip": "1000-001"}},
        "items": items,
    });
    let b = serde_json::to_vec(&v).expect("JSON");
    assert!((1900..2300).contains(&b.len()), "{} bytes", b.len());
    b
}
