//! The scan never accepts what the full check refuses (generated and mutated bodies against
//! the benchmark's order schema, the rich schema of the tape tests and a few more), reads
//! numbers as `serde_json` does, and does accept the usual valid body (so it is really taken).

use http::Method;
use serde_json::{json, Number, Value};

use super::scan::number_for_tests;
use crate::validate::compile::{BodyValidator, CompiledSpec};
use crate::validate::tape::equivalence::{order_schema, rich_schema, validators, Gen};
use crate::validate::tape::Doc;

/// `schema` as the request body of `POST /x` in an OpenAPI 3.1 document (its `$defs` also
/// at the document's root, where `#/$defs/...` points).
fn spec(schema: &Value) -> CompiledSpec {
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {"title": "t", "version": "1"},
        "paths": {"/x": {"post": {
            "requestBody": {"content": {"application/json": {"schema": schema}}},
            "responses": {"200": {"description": "ok"}}
        }}}
    });
    if let Some(defs) = schema.get("$defs") {
        doc["$defs"] = defs.clone();
    }
    CompiledSpec::compile(&doc).expect("the test document compiles")
}

fn body(spec: &CompiledSpec) -> &BodyValidator {
    let Ok((op, _)) = spec.operation(&Method::POST, "/x") else {
        panic!("POST /x");
    };
    let content = &op.body.as_ref().expect("a body").content;
    content
        .find("application/json")
        .and_then(Option::as_ref)
        .expect("a JSON schema")
}

/// The full check's answer: parsed by `serde_json`, valid for `jsonschema`.
fn full(v: &BodyValidator, text: &[u8]) -> bool {
    Doc::parse_unordered(text).is_ok_and(|doc| v.full.is_valid(doc.root()))
}

/// What the bench POSTs (bench/validation.sh).
fn order() -> String {
    let lines: Vec<Value> = (0..12)
        .map(|i| json!({"sku": format!("ABC-{i:04}"), "qty": i + 1, "price": 9.99 + f64::from(i), "gift": i % 2 == 0}))
        .collect();
    json!({"customer": "ada.lovelace@example.com", "currency": "EUR",
           "placed": "2026-12-03T20:00:00Z", "note": "leave at the door, ring twice",
           "shipping": {"street": "12 Analytical Engine Road", "city": "London",
                        "postcode": "NW1 6XE", "country": "GB"},
           "lines": lines})
    .to_string()
}

/// Checks `text` both ways; whether the scan accepted it.
fn check(v: &BodyValidator, text: &[u8]) -> bool {
    let fast = v.fast.as_ref().is_some_and(|f| f.accepts(text));
    if fast {
        assert!(
            full(v, text),
            "accepted by the scan, refused by the full check: {}",
            String::from_utf8_lossy(text)
        );
    }
    fast
}

#[test]
fn the_benchmarks_order_is_accepted_in_one_pass() {
    let spec = spec(&order_schema());
    let v = body(&spec);
    assert!(v.fast.is_some(), "the order schema compiles for the scan");
    let text = order();
    assert!(full(v, text.as_bytes()));
    assert!(check(v, text.as_bytes()), "{text}");
    // with whitespace, as a pretty-printer writes it
    let pretty = serde_json::to_string_pretty(&serde_json::from_str::<Value>(&text).unwrap());
    assert!(check(v, pretty.unwrap().as_bytes()));
}

#[test]
fn a_table_of_bodies_is_accepted_only_when_valid() {
    let spec = spec(&order_schema());
    let v = body(&spec);
    let line = r#"{"sku":"ABC-0001","qty":1,"price":2.5}"#;
    let ok = |rest: &str| {
        format!(r#"{{"customer":"a@b.example","currency":"EUR","lines":[{line}]{rest}}}"#)
    };
    let cases: Vec<(String, bool)> = vec![
        (ok(""), true),
        (ok(r#","note":null"#), true),
        (ok(r#","extra":{"deep":[1,{"x":"y"}]}"#), true),
        // a duplicate key: the scan checks both values; the full check the last one
        (ok(r#","currency":"XXX","currency":"EUR""#), false),
        (ok(r#","currency":"USD""#), true),
        // escapes, control characters: left to the full check
        (ok(r#","note":"a\nb""#), false),
        (ok(r#","n\u006fte":"x""#), false),
        (ok(",\"note\":\"a\tb\""), false),
        // invalid values, each at its place
        (ok(r#","note":5"#), false),
        (r#"{"customer":"a@b.example","currency":"EUR","lines":[]}"#.into(), false),
        (r#"{"customer":"a@b.example","currency":"EUR"}"#.into(), false),
        (r#"{"customer":"not an address","currency":"EUR","lines":[{"sku":"ABC-0001","qty":1,"price":1}]}"#.into(), false),
        (r#"{"customer":"a@b.example","currency":"EUR","lines":[{"sku":"ABC-0001","qty":0,"price":1}]}"#.into(), false),
        (r#"{"customer":"a@b.example","currency":"EUR","lines":[{"sku":"ABC-0001","qty":1,"price":0}]}"#.into(), false),
        (r#"{"customer":"a@b.example","currency":"EUR","lines":[{"sku":"ABC-0001","qty":1,"price":-0.0}]}"#.into(), false),
        (r#"{"customer":"a@b.example","currency":"EUR","lines":{"sku":"ABC-0001"}}"#.into(), false),
        // not JSON, or not only JSON
        (ok(","), false),
        (format!("{} x", ok("")), false),
        (format!("\u{feff}{}", ok("")), false),
        (ok(r#","note":"x","#), false),
        (format!(r#"{{"customer":"a@b.example","currency":"EUR","lines":[{line},]}}"#), false),
        (ok(r#","extra":01"#), false),
        (ok(r#","extra":1."#), false),
        (ok(r#","extra":-"#), false),
        (ok(r#","extra":tru"#), false),
        (format!(" \r\n\t{}\n", ok("")), true),
    ];
    for (text, expected) in &cases {
        assert_eq!(check(v, text.as_bytes()), *expected, "{text}");
    }
}

#[test]
fn structure_keywords_follow_json_schema() {
    let cases = [
        // additionalProperties: false, and a required name no property speaks of
        (
            json!({"type": "object", "properties": {"a": {"type": "integer"}},
                   "required": ["b"], "additionalProperties": false}),
            vec![(r#"{"a":1}"#, false), (r#"{"a":1,"b":2}"#, false)],
        ),
        (
            json!({"type": "object", "required": ["b"],
                   "additionalProperties": {"type": "string"}}),
            vec![
                (r#"{"b":"x","c":"y"}"#, true),
                (r#"{"b":1}"#, false),
                (r#"{"c":"y"}"#, false),
            ],
        ),
        // arrays: bounds, items by reference
        (
            json!({"type": "array", "minItems": 1, "maxItems": 2, "items": {"$ref": "#/$defs/n"},
                   "$defs": {"n": {"type": "number", "maximum": 10}}}),
            vec![
                ("[1]", true),
                ("[1,2,3]", false),
                ("[]", false),
                ("[11]", false),
                ("[1e1]", true),
            ],
        ),
        // a recursive schema: walked to a depth, then left to the full check
        (
            json!({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object",
                   "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}}}}}),
            vec![
                (r#"{"v":1,"next":{"v":2}}"#, true),
                (r#"{"v":1,"next":{"v":"x"}}"#, false),
            ],
        ),
        // keywords the scan does not walk make a leaf: containers there go to the full check
        (
            json!({"type": "object", "properties": {"a": {"allOf": [{"type": "object"}]}}}),
            vec![(r#"{"a":{}}"#, false), (r#"{"b":{}}"#, true)],
        ),
        (
            json!(true),
            vec![(r#"{"a":[1,{"b":null}]}"#, true), ("1", true), ("", false)],
        ),
        // a type, bounds and lengths are checked in place, exactly
        (
            json!({"type": "integer", "minimum": 1, "maximum": 1000}),
            vec![
                ("1", true),
                ("0", false),
                ("1000", true),
                ("1001", false),
                ("-1", false),
                ("1.0", false),
                ("\"1\"", false),
            ],
        ),
        (
            json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 2.5}),
            vec![
                ("0", false),
                ("1e-300", true),
                ("-0.0", false),
                ("0.1", true),
                ("2.5", false),
                ("2.4999", true),
                ("2", true),
            ],
        ),
        (
            json!({"maximum": 9007199254740993_u64}),
            vec![
                ("9007199254740993", true),
                ("9007199254740994", false),
                ("9007199254740992.0", false),
                ("1.5", false),
                ("\"x\"", true),
            ],
        ),
        (
            json!({"type": ["string", "null", "integer"], "minLength": 2, "maxLength": 3}),
            vec![
                ("\"é\"", false),
                ("\"éé\"", true),
                ("\"abcd\"", false),
                ("null", true),
                ("7", true),
                ("7.5", false),
                ("true", false),
                ("[]", false),
            ],
        ),
    ];
    for (schema, bodies) in cases {
        let spec = spec(&schema);
        let v = body(&spec);
        for (text, expected) in bodies {
            assert_eq!(check(v, text.as_bytes()), expected, "{schema} {text}");
        }
    }
}

#[test]
fn read_only_properties_are_left_to_the_full_check() {
    let schema = json!({"type": "object", "properties": {
        "id": {"type": "integer", "readOnly": true}, "name": {"type": "string"}}});
    let spec = spec(&schema);
    let v = body(&spec);
    assert!(check(v, br#"{"name":"x"}"#));
    assert!(!check(v, br#"{"name":"x","id":1}"#));
    assert!(
        !full(v, br#"{"name":"x","id":1}"#),
        "a request may not carry readOnly"
    );
}

#[test]
fn hostile_bodies_are_left_to_the_full_check() {
    let spec = spec(&json!(true));
    let v = body(&spec);
    let deep = "[".repeat(100_000);
    assert!(!check(v, deep.as_bytes()), "past 64 levels: not sure");
    let at_limit = format!("{}{}", "[".repeat(64), "]".repeat(64));
    assert!(check(v, at_limit.as_bytes()));
    let past = format!("{}{}", "[".repeat(65), "]".repeat(65));
    assert!(!check(v, past.as_bytes()));
    let long = format!("\"{}\"", "x".repeat(4 << 20));
    assert!(check(v, long.as_bytes()));
    assert!(!check(v, b"\"\xff\""), "not UTF-8");
}

#[test]
fn large_or_dynamic_schemas_get_no_scan() {
    let props: serde_json::Map<String, Value> = (0..300)
        .map(|i| (format!("p{i}"), json!({"type": "string"})))
        .collect();
    let spec1 = spec(&json!({"type": "object", "properties": props}));
    assert!(body(&spec1).fast.is_none(), "over the node budget");
    let spec2 = spec(&json!({"$defs": {"d": {"$dynamicAnchor": "n"}}, "$dynamicRef": "#/$defs/d"}));
    assert!(body(&spec2).fast.is_none(), "dynamic references");
}

#[test]
fn never_accepts_what_the_full_check_refuses_on_generated_bodies() {
    let order_spec = spec(&order_schema());
    let rich_spec = spec(&rich_schema());
    let lenient = {
        let mut s = rich_schema();
        let map = s.as_object_mut().unwrap();
        map.remove("required");
        map.remove("additionalProperties");
        s
    };
    let lenient_spec = spec(&lenient);
    // and against jsonschema's own `Value` validators, with no tape at all
    let serde_checks: Vec<_> = [order_schema(), rich_schema(), lenient.clone()]
        .iter()
        .map(|s| validators(s).0)
        .collect();
    let specs = [&order_spec, &rich_spec, &lenient_spec];
    let mut g = Gen(0x2545_f491_4f6c_dd1d);
    let mut accepted = [0usize; 3];
    let base = order();
    for round in 0..6000 {
        let mut text = if round % 2 == 0 {
            let mut t = String::new();
            g.value(0, &mut t);
            t
        } else {
            base.clone()
        }
        .into_bytes();
        // up to three bytes changed, inserted or removed
        for _ in 0..g.below(4) {
            if text.is_empty() {
                break;
            }
            let at = g.below(text.len() as u64) as usize;
            let byte = *b"\"{}[],:x0-.e \\9\xff"
                .get(g.below(16) as usize)
                .unwrap_or(&b'1');
            match g.below(3) {
                0 => text[at] = byte,
                1 => text.insert(at, byte),
                _ => drop(text.remove(at)),
            }
        }
        for (i, spec) in specs.iter().enumerate() {
            if check(body(spec), &text) {
                accepted[i] += 1;
                let value: Value = serde_json::from_slice(&text).expect("accepted: parses");
                assert!(
                    serde_checks[i].is_valid(&value),
                    "{}",
                    String::from_utf8_lossy(&text)
                );
            }
        }
    }
    // not vacuous: the order and the lenient schema accepted bodies here (the rich one
    // requires members the generator seldom writes both of)
    assert!(accepted[0] > 100 && accepted[2] > 100, "{accepted:?}");
}

#[test]
fn numbers_are_read_as_serde_json_reads_them() {
    let mut texts: Vec<String> = [
        "0",
        "-0",
        "1",
        "-1",
        "0.0",
        "-0.0",
        "9.99",
        "10.99",
        "12.990000000000002",
        "0.1",
        "0.30000000000000004",
        "1e2",
        "1E-2",
        "2.5e+3",
        "123456789012345678",
        "1234567890123456789",
        "-123456789012345678",
        "18446744073709551615",
        "18446744073709551616",
        "-9223372036854775808",
        "-9223372036854775809",
        "123456789012345.6",
        "1234567890123456.7",
        "0.000000000000001",
        "1e400",
        "-1e400",
        "1e-400",
        "9007199254740993",
        "9007199254740993.0",
        "4.35",
        "0.000123",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut g = Gen(0x1234_5678_9abc_def1);
    for _ in 0..20_000 {
        let (int_len, frac_len) = (g.below(19) as u32 + 1, g.below(12) as u32 + 1);
        let int = g.bits() % 10u64.pow(int_len);
        let frac = g.below(10u64.pow(frac_len));
        let sign = if g.below(2) == 0 { "-" } else { "" };
        texts.push(format!("{sign}{int}"));
        texts.push(format!(
            "{sign}{int}.{frac:0width$}",
            width = g.below(8) as usize + 1
        ));
    }
    // long decimals and exponents, read by `core` here: the same bits as `serde_json`'s
    for _ in 0..100_000 {
        let digits = g.below(4) as u32 + 16;
        let sig = g.bits() % 10u64.pow(digits.min(19));
        let point = g.below(u64::from(digits)) as usize;
        let mut t = format!("{sig:0width$}", width = digits as usize);
        t.insert(t.len() - point.max(1), '.');
        if g.below(4) == 0 {
            t.push_str(&format!("e{}", g.below(600) as i64 - 300));
        }
        texts.push(t);
    }
    let mut compared = 0;
    for text in &texts {
        let (ours, theirs) = match (number_for_tests(text), serde_json::from_str::<Number>(text)) {
            (Some(ours), Ok(theirs)) => (ours, theirs),
            (None, Err(_)) => continue,
            (ours, theirs) => panic!("{text}: {ours:?} against {theirs:?}"),
        };
        let kind = |n: &Number| (n.is_u64(), n.is_i64(), n.is_f64());
        assert_eq!(kind(&ours), kind(&theirs), "{text}");
        assert_eq!(ours.as_u64(), theirs.as_u64(), "{text}");
        assert_eq!(ours.as_i64(), theirs.as_i64(), "{text}");
        let bits = |n: &Number| n.as_f64().map(f64::to_bits);
        assert_eq!(bits(&ours), bits(&theirs), "{text}");
        compared += 1;
    }
    assert!(compared > 120_000, "{compared}");
    for bad in [
        "01", "-", "1.", ".5", "1e", "1e+", "+1", "--1", "0x1", "NaN",
    ] {
        assert!(number_for_tests(bad).is_none(), "{bad}");
    }
}
