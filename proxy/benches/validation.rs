//! OpenAPI validation's own cost per request: the 1 kB JSON order of `bench/validation.sh`
//! (same document, same body) checked by `trellis_proxy::validate::check_request` (operation,
//! parameters, content type, body parsed and checked against its schema), and a refused one.
//!
//! `cargo bench -p trellis-proxy --bench validation`
//!
//! For instruction counts (repeatable on a busy machine), run the built binary with
//! `VALIDATION_ITERS=N` under callgrind: it then checks the valid order N times without
//! criterion, each in `one_request`, so that
//! `valgrind --tool=callgrind --toggle-collect='*one_request*' <bench binary> --bench`
//! counts the validation alone (divide the total by N).

use std::hint::black_box;

use criterion::{criterion_group, Criterion};
use http::{HeaderMap, HeaderValue, Method, Uri};
use serde_json::{json, Value};
use trellis_proxy::validate::{check_request, CompiledSpec};

/// `bench/validation.sh`'s document (OpenAPI 3.1).
fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Orders", "version": "1"},
        "paths": {"/orders": {"post": {
            "parameters": [
                {"name": "dry_run", "in": "query", "schema": {"type": "boolean"}},
                {"name": "x-request-id", "in": "header", "schema": {"type": "string", "format": "uuid"}}
            ],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewOrder"}}}},
            "responses": {"200": {"description": "created", "content": {"application/json": {"schema": {
                "type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "integer", "format": "int64"},
                    "status": {"type": "string", "enum": ["open", "closed"]},
                    "total": {"type": "number", "minimum": 0}}}}}}}
        }}},
        "components": {"schemas": {"NewOrder": {
            "type": "object", "required": ["customer", "currency", "lines"],
            "properties": {
                "customer": {"type": "string", "format": "email"},
                "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                "placed": {"type": "string", "format": "date-time"},
                "note": {"type": ["string", "null"], "maxLength": 200},
                "shipping": {"type": "object", "required": ["street", "city", "country"], "properties": {
                    "street": {"type": "string"}, "city": {"type": "string"},
                    "postcode": {"type": "string", "pattern": "^[0-9A-Z -]{3,10}$"},
                    "country": {"type": "string", "minLength": 2, "maxLength": 2}}},
                "lines": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                    "type": "object", "required": ["sku", "qty", "price"], "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "price": {"type": "number", "exclusiveMinimum": 0},
                        "gift": {"type": "boolean"}}}}
            }
        }}}
    })
}

/// `bench/validation.sh`'s order: 12 lines, about 1 kB.
fn order(first_qty: u32) -> Vec<u8> {
    let lines: Vec<Value> = (0..12u32)
        .map(|i| {
            let qty = if i == 0 { first_qty } else { i + 1 };
            json!({"sku": format!("ABC-{i:04}"), "qty": qty, "price": 9.99 + f64::from(i), "gift": i % 2 == 0})
        })
        .collect();
    json!({
        "customer": "ada.lovelace@example.com", "currency": "EUR", "placed": "2026-12-03T20:00:00Z",
        "note": "leave at the door, ring twice",
        "shipping": {"street": "12 Analytical Engine Road", "city": "London", "postcode": "NW1 6XE", "country": "GB"},
        "lines": lines
    })
    .to_string()
    .into_bytes()
}

struct Case {
    spec: CompiledSpec,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

fn case() -> Case {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Case {
        spec: CompiledSpec::compile(&document()).expect("the document compiles"),
        method: Method::POST,
        uri: Uri::from_static("/orders"),
        headers,
    }
}

/// One request's checks; not inlined, so that callgrind can count it alone.
#[inline(never)]
fn one_request(c: &Case, body: &[u8]) -> bool {
    check_request(&c.spec, &c.method, &c.uri, &c.headers, body).is_ok()
}

fn bench(crit: &mut Criterion) {
    let c = case();
    let (good, bad) = (order(1), order(0));
    assert!(one_request(&c, &good), "the order is valid");
    assert!(!one_request(&c, &bad), "qty 0 is refused");
    crit.bench_function("valid_1kB_order", |b| {
        b.iter(|| one_request(&c, black_box(&good)))
    });
    crit.bench_function("refused_1kB_order", |b| {
        b.iter(|| one_request(&c, black_box(&bad)))
    });
}

criterion_group!(benches, bench);

fn main() {
    if let Some(n) = std::env::var("VALIDATION_ITERS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        let c = case();
        let good = order(1);
        let valid = (0..n).filter(|_| one_request(&c, black_box(&good))).count();
        println!("{valid} of {n} valid");
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
