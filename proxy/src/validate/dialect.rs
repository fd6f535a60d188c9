//! OpenAPI schema dialects, brought to one: JSON Schema draft 2020-12, which OpenAPI 3.1's
//! schemas already are. A 3.0 document's schemas are rewritten once, when the document is
//! compiled (never per request):
//!
//! - `nullable: true` with a `type` adds `"null"` to the type (and `null` to an `enum`); without
//!   a `type` it has no effect (as OpenAPI 3.0.3 clarifies) and is dropped;
//! - `exclusiveMinimum: true` / `exclusiveMaximum: true` (draft 4 booleans) become the numeric
//!   bound of 2020-12 (`exclusiveMinimum: <minimum>`); `false` is dropped;
//! - a `$ref` replaces its object in 3.0 (siblings are ignored), so the siblings are removed.
//!
//! For both dialects, `format: int32` / `int64` on an integer adds the type's range as
//! `minimum` / `maximum` (JSON Schema applies `format` to strings only).
//!
//! The walk skips literal values (`example`, `examples`, `enum`, `const`, `default`), and is
//! bounded by the document's depth (at most 64, checked when it was stored).

use serde_json::{Map, Value};

/// Keys whose values are data, not schemas.
const LITERALS: &[&str] = &["example", "examples", "enum", "const", "default"];

/// Rewrite every schema of `doc` for 2020-12; `v30` for an OpenAPI 3.0 document.
pub fn normalize(doc: &mut Value, v30: bool) {
    match doc {
        Value::Object(map) => {
            if v30 {
                from_v30(map);
            }
            int_ranges(map);
            for (k, child) in map.iter_mut() {
                if !LITERALS.contains(&k.as_str()) {
                    normalize(child, v30);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| normalize(i, v30)),
        _ => {}
    }
}

fn from_v30(map: &mut Map<String, Value>) {
    if map.get("$ref").is_some_and(Value::is_string) {
        map.retain(|k, _| k == "$ref");
        return;
    }
    if let Some(Value::Bool(nullable)) = map.get("nullable") {
        let nullable = *nullable;
        map.remove("nullable");
        if nullable {
            add_null(map);
        }
    }
    for (flag, bound) in [
        ("exclusiveMinimum", "minimum"),
        ("exclusiveMaximum", "maximum"),
    ] {
        if let Some(Value::Bool(exclusive)) = map.get(flag) {
            match (*exclusive, map.get(bound).cloned()) {
                (true, Some(b)) => {
                    map.remove(bound);
                    map.insert(flag.into(), b);
                }
                _ => {
                    map.remove(flag);
                }
            }
        }
    }
}

/// `nullable: true`: null is one more accepted type (and enum value).
fn add_null(map: &mut Map<String, Value>) {
    let null = Value::String("null".into());
    match map.get_mut("type") {
        Some(Value::String(t)) => {
            let t = Value::String(std::mem::take(t));
            map.insert("type".into(), Value::Array(vec![t, null]));
        }
        Some(Value::Array(types)) if !types.contains(&null) => types.push(null),
        _ => return,
    }
    if let Some(Value::Array(values)) = map.get_mut("enum") {
        if !values.contains(&Value::Null) {
            values.push(Value::Null);
        }
    }
}

/// An integer's `format` as bounds JSON Schema checks.
fn int_ranges(map: &mut Map<String, Value>) {
    let (min, max) = match map.get("format").and_then(Value::as_str) {
        Some("int32") => (Value::from(i32::MIN), Value::from(i32::MAX)),
        Some("int64") => (Value::from(i64::MIN), Value::from(i64::MAX)),
        _ => return,
    };
    let integer = match map.get("type") {
        Some(Value::String(t)) => t == "integer",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
        _ => false,
    };
    if integer {
        map.entry("minimum").or_insert(min);
        map.entry("maximum").or_insert(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openapi_30_keywords_become_2020_12() {
        let mut doc = json!({
            "a": {"type": "string", "nullable": true, "enum": ["x", "y"]},
            "b": {"nullable": true, "allOf": [{"type": "string"}]},
            "c": {"type": "number", "minimum": 0, "exclusiveMinimum": true, "maximum": 9, "exclusiveMaximum": false},
            "d": {"$ref": "#/x", "description": "ignored in 3.0"},
            "e": {"type": "integer", "format": "int32"},
            "example": {"nullable": true, "type": "string"},
        });
        normalize(&mut doc, true);
        assert_eq!(
            doc["a"],
            json!({"type": ["string", "null"], "enum": ["x", "y", null]})
        );
        assert_eq!(doc["b"], json!({"allOf": [{"type": "string"}]}));
        assert_eq!(
            doc["c"],
            json!({"type": "number", "exclusiveMinimum": 0, "maximum": 9})
        );
        assert_eq!(doc["d"], json!({"$ref": "#/x"}));
        assert_eq!(
            doc["e"],
            json!({"type": "integer", "format": "int32", "minimum": i32::MIN, "maximum": i32::MAX})
        );
        assert_eq!(doc["example"], json!({"nullable": true, "type": "string"}));
    }

    #[test]
    fn openapi_31_schemas_are_left_as_they_are() {
        let mut doc = json!({"a": {"type": ["string", "null"], "exclusiveMinimum": 3, "$ref": "#/x", "description": "kept"}});
        let before = doc.clone();
        normalize(&mut doc, false);
        assert_eq!(doc, before);
    }
}
