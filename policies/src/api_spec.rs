//! `ApiSpec`: an OpenAPI 3.0 / 3.1 document for one service and version, stored in etcd by
//! content hash and listed by `mesh-agent api list|get|diff` (issue 19, "specs in the mesh").
//!
//! The checks here are structural, not a full OpenAPI schema validation: the document must be
//! one the mesh can store, list and diff safely (an object with `openapi`, `info.title`,
//! `info.version`, path items made of HTTP methods, self-contained `$ref`s that resolve and do
//! not loop). No OpenAPI crate is used on purpose: the well-known ones (`openapiv3`, `oas3`)
//! each model one version only (3.0 or 3.1) and refuse documents of the other, would fail on
//! the first unknown field with a serde message and no JSON path, and resolve nothing; what the
//! mesh needs is a few hundred lines over `serde_json::Value` with bounded recursion.
//!
//! Hostile input is bounded everywhere: the text is refused above [`MAX_SPEC_BYTES`] before it
//! is parsed (a 50 MB document costs a length comparison), nesting deeper than [`MAX_DEPTH`] is
//! refused, and `$ref` chains are followed at most [`MAX_REF_HOPS`] hops with a visited set, so a
//! cycle of any length ends with an error instead of a stack overflow.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::validate::validate_service_name;

/// The largest document accepted, as text (JSON or YAML) or as canonical JSON: 8 MiB. Large
/// public APIs (GitHub's, ~10k operations) are about this size as JSON; it also bounds the
/// memory a hostile document can make a validator, the CLI or a gateway spend.
pub const MAX_SPEC_BYTES: usize = 8 * 1024 * 1024;

/// The deepest nesting of objects and arrays accepted (the JSON parser itself stops at 128).
pub const MAX_DEPTH: usize = 64;

/// The longest chain of `$ref` to `$ref` followed before giving up.
pub const MAX_REF_HOPS: usize = 32;

/// The HTTP methods an OpenAPI path item may hold.
pub const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// Fields whose values are literal data, where a `$ref` key is data and not a reference.
const LITERAL_FIELDS: &[&str] = &["example", "const", "enum"];

/// Path item fields that are not operations.
const PATH_ITEM_FIELDS: &[&str] = &["$ref", "summary", "description", "servers", "parameters"];

/// The spec of an `ApiSpec` policy document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSpecSpec {
    /// The service the API belongs to.
    pub service: String,
    /// The API's version as the mesh lists it (e.g. `v1`, `2.3.0`); independent of
    /// `info.version`, which is shown as the document's own.
    pub version: String,
    /// The OpenAPI document: inline (a mapping in the policy YAML) or as text (a string holding
    /// JSON or YAML, e.g. a `|` block with the app's `openapi.json`).
    pub document: Value,
}

/// Why a document was refused. `path` is a JSONPath into the OpenAPI document (`$.info.title`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("the document is {size} bytes, over the limit of {limit} bytes (8 MiB)")]
    TooLarge { size: usize, limit: usize },
    #[error("the document is neither JSON nor YAML: {0}")]
    Parse(String),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// What the mesh lists about a valid document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecSummary {
    /// `openapi`, e.g. `3.1.0`.
    pub openapi: String,
    /// `info.title`.
    pub title: String,
    /// `info.version`: the document's own version string.
    pub info_version: String,
}

// === impl ApiSpecSpec ===

impl ApiSpecSpec {
    /// Check the service and version, then the document; returns the document as a JSON value.
    pub fn validate(&self) -> Result<(Value, SpecSummary), String> {
        validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        validate_version(&self.version).map_err(|m| format!("version: {m}"))?;
        let doc = match &self.document {
            Value::String(text) => parse_document(text),
            other => check_size(other).map(|_| other.clone()),
        }
        .map_err(|e| format!("document: {e}"))?;
        let summary = validate_document(&doc).map_err(|e| format!("document: {e}"))?;
        Ok((doc, summary))
    }
}

/// An API version as it appears in etcd keys and on the command line: 1 to 64 characters of
/// `[A-Za-z0-9._+-]`, not starting with `.`.
pub fn validate_version(v: &str) -> Result<(), String> {
    let ok_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+');
    if v.is_empty() || v.len() > 64 || v.starts_with('.') || !v.bytes().all(ok_char) {
        return Err(format!(
            "`{v}` is not a version: 1 to 64 characters of [A-Za-z0-9._+-], not starting with `.`"
        ));
    }
    Ok(())
}

/// Parse an OpenAPI document from JSON or YAML text, refusing it by size first.
pub fn parse_document(text: &str) -> Result<Value, SpecError> {
    if text.len() > MAX_SPEC_BYTES {
        return Err(SpecError::TooLarge {
            size: text.len(),
            limit: MAX_SPEC_BYTES,
        });
    }
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text).map_err(|e| SpecError::Parse(format!("JSON: {e}")));
    }
    crate::document::yaml_guard(|| serde_norway::from_str(text).map_err(|e| e.to_string()))
        .map_err(|e| SpecError::Parse(format!("YAML: {e}")))
}

/// The canonical bytes of a document: compact JSON with object keys sorted (serde_json's maps
/// are ordered by key in this workspace), so that the same document written as YAML or as JSON,
/// in any key order, has one content hash.
pub fn canonical_bytes(doc: &Value) -> Vec<u8> {
    // Serialising a `Value` to a Vec cannot fail: its keys are strings.
    serde_json::to_vec(doc).unwrap_or_default()
}

fn check_size(doc: &Value) -> Result<(), SpecError> {
    let size = canonical_bytes(doc).len();
    match size > MAX_SPEC_BYTES {
        true => Err(SpecError::TooLarge {
            size,
            limit: MAX_SPEC_BYTES,
        }),
        false => Ok(()),
    }
}

/// Check a parsed document's structure; see the module documentation for what is checked.
pub fn validate_document(doc: &Value) -> Result<SpecSummary, SpecError> {
    check_depth(doc, &mut Path::root(), 0)?;
    let root = doc
        .as_object()
        .ok_or_else(|| invalid(&Path::root(), "the document is not an object".into()))?;
    let openapi = check_openapi(root.get("openapi"))?;
    let (title, info_version) = check_info(root.get("info"))?;
    if let Some(paths) = root.get("paths") {
        check_paths(paths)?;
    } else if openapi.starts_with("3.0") {
        return Err(invalid(
            &Path::root().with("paths"),
            "missing (required in OpenAPI 3.0; may be `{}`)".into(),
        ));
    }
    check_refs(doc, doc, &mut Path::root())?;
    Ok(SpecSummary {
        openapi,
        title,
        info_version,
    })
}

fn invalid(path: &Path, message: String) -> SpecError {
    SpecError::Invalid {
        path: path.to_string(),
        message,
    }
}

fn check_openapi(v: Option<&Value>) -> Result<String, SpecError> {
    let path = Path::root().with("openapi");
    let version = match v {
        None => {
            return Err(invalid(
                &path,
                "missing: the document must say its OpenAPI version (3.0.x or 3.1.x); Swagger 2.0 is not supported".into(),
            ))
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(invalid(
                &path,
                format!("must be a string such as \"3.1.0\", not {}", kind(other)),
            ))
        }
    };
    if !(version.starts_with("3.0.") || version.starts_with("3.1.")) {
        return Err(invalid(
            &path,
            format!("version `{version}` is not supported: use 3.0.x or 3.1.x"),
        ));
    }
    Ok(version)
}

fn check_info(v: Option<&Value>) -> Result<(String, String), SpecError> {
    let path = Path::root().with("info");
    let info = match v {
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(invalid(
                &path,
                format!("must be an object, not {}", kind(other)),
            ))
        }
        None => {
            return Err(invalid(
                &path,
                "missing (needs `title` and `version`)".into(),
            ))
        }
    };
    let field = |name: &str| match info.get(name) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(invalid(&path.with(name), "must not be empty".into())),
        Some(Value::Number(n)) => Err(invalid(
            &path.with(name),
            format!("must be a string, not the number {n} (quote it in YAML: \"{n}\")"),
        )),
        Some(other) => Err(invalid(
            &path.with(name),
            format!("must be a string, not {}", kind(other)),
        )),
        None => Err(invalid(&path.with(name), "missing".into())),
    };
    Ok((field("title")?, field("version")?))
}

fn check_paths(paths: &Value) -> Result<(), SpecError> {
    let path = Path::root().with("paths");
    let map = paths
        .as_object()
        .ok_or_else(|| invalid(&path, format!("must be an object, not {}", kind(paths))))?;
    for (route, item) in map {
        let at = path.with(route);
        if route.starts_with("x-") {
            continue;
        }
        if !route.starts_with('/') {
            return Err(invalid(&at, "a path must start with `/`".into()));
        }
        let item = item.as_object().ok_or_else(|| {
            invalid(
                &at,
                format!("a path item must be an object, not {}", kind(item)),
            )
        })?;
        for (field, op) in item {
            let op_at = at.with(field);
            if METHODS.contains(&field.as_str()) {
                if !op.is_object() {
                    let m = format!("an operation must be an object, not {}", kind(op));
                    return Err(invalid(&op_at, m));
                }
            } else if !PATH_ITEM_FIELDS.contains(&field.as_str()) && !field.starts_with("x-") {
                return Err(invalid(
                    &op_at,
                    format!(
                        "unknown HTTP method `{field}` (expected one of {}, or summary, description, servers, parameters, $ref, x-*)",
                        METHODS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Refuse nesting deeper than [`MAX_DEPTH`]; the recursion itself stops there.
fn check_depth(v: &Value, path: &mut Path, depth: usize) -> Result<(), SpecError> {
    if depth > MAX_DEPTH {
        return Err(invalid(
            path,
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                path.push(k);
                check_depth(child, path, depth + 1)?;
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                path.push_index(i);
                check_depth(child, path, depth + 1)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Every `$ref` must be a local JSON pointer (`#/...`) that resolves, and following `$ref` to
/// `$ref` must reach something that is not one. Recursive schemas (a `Node` whose `children`
/// refer to `Node`) are fine: only a chain made of nothing but references is a cycle. The walk
/// is bounded by [`check_depth`], which ran first.
fn check_refs(doc: &Value, v: &Value, path: &mut Path) -> Result<(), SpecError> {
    match v {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref") {
                path.push("$ref");
                let r = r
                    .as_str()
                    .ok_or_else(|| invalid(path, format!("must be a string, not {}", kind(r))))?;
                follow_ref(doc, r).map_err(|m| invalid(path, m))?;
                path.pop();
            }
            for (k, child) in map
                .iter()
                .filter(|(k, _)| !LITERAL_FIELDS.contains(&k.as_str()))
            {
                path.push(k);
                check_refs(doc, child, path)?;
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                path.push_index(i);
                check_refs(doc, child, path)?;
                path.pop();
            }
        }
        _ => {}
    }
    Ok(())
}

/// Follow `reference` (and any `$ref` it lands on) to a value that is not a reference.
pub fn follow_ref<'a>(doc: &'a Value, reference: &str) -> Result<&'a Value, String> {
    let mut seen = BTreeSet::new();
    let mut chain = vec![reference.to_string()];
    let mut current = reference.to_string();
    for _ in 0..MAX_REF_HOPS {
        let target = resolve_pointer(doc, &current)?;
        seen.insert(current.clone());
        match target.get("$ref").and_then(Value::as_str) {
            None => return Ok(target),
            Some(next) if seen.contains(next) => {
                chain.push(next.to_string());
                return Err(format!("$ref cycle: {}", chain.join(" -> ")));
            }
            Some(next) => {
                chain.push(next.to_string());
                current = next.to_string();
            }
        }
    }
    Err(format!(
        "$ref chain longer than {MAX_REF_HOPS} hops: {} -> ...",
        chain[..4.min(chain.len())].join(" -> ")
    ))
}

/// Resolve one local reference (`#/components/schemas/Order`) without following further.
fn resolve_pointer<'a>(doc: &'a Value, reference: &str) -> Result<&'a Value, String> {
    let Some(pointer) = reference.strip_prefix('#') else {
        return Err(format!(
            "`{reference}` is not a local reference (`#/...`): the document must be self-contained"
        ));
    };
    if !pointer.is_empty() && !pointer.starts_with('/') {
        return Err(format!("`{reference}` is not a JSON pointer (`#/...`)"));
    }
    doc.pointer(pointer)
        .ok_or_else(|| format!("`{reference}` does not resolve within the document"))
}

/// A JSON value's kind, with its article, for error messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A JSONPath built while walking (`$.paths["/orders"].get`), rendered only for errors.
#[derive(Clone, Debug, Default)]
pub(crate) struct Path(Vec<Seg>);

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Path {
    pub(crate) fn root() -> Self {
        Self(Vec::new())
    }

    fn with(&self, key: &str) -> Self {
        let mut p = self.clone();
        p.push(key);
        p
    }

    fn push(&mut self, key: &str) {
        self.0.push(Seg::Key(key.to_string()));
    }

    fn push_index(&mut self, i: usize) {
        self.0.push(Seg::Index(i));
    }

    fn pop(&mut self) {
        self.0.pop();
    }
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("$")?;
        for seg in &self.0 {
            match seg {
                Seg::Index(i) => write!(f, "[{i}]")?,
                Seg::Key(k) if is_ident(k) => write!(f, ".{k}")?,
                Seg::Key(k) => write!(f, "[{}]", Value::String(k.clone()))?,
            }
        }
        Ok(())
    }
}

fn is_ident(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(doc: Value) -> Result<SpecSummary, String> {
        validate_document(&doc).map_err(|e| e.to_string())
    }

    #[test]
    fn a_table_of_valid_and_invalid_documents() {
        let base = || {
            json!({
                "openapi": "3.1.0",
                "info": {"title": "Orders", "version": "1.0"},
                "paths": {"/orders": {"get": {"responses": {"200": {"description": "ok"}}}}}
            })
        };
        let with = |f: &dyn Fn(&mut Value)| {
            let mut d = base();
            f(&mut d);
            d
        };
        let valid = [
            base(),
            with(&|d| d["openapi"] = json!("3.0.3")),
            with(&|d| {
                d.as_object_mut().unwrap().remove("paths");
            }),
            // A recursive schema is not a $ref cycle.
            with(&|d| {
                d["components"] = json!({"schemas": {"Node": {"type": "object",
                    "properties": {"children": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}}}}})
            }),
            with(&|d| d["paths"]["/orders"]["parameters"] = json!([])),
            with(&|d| d["paths"]["/orders"]["x-internal"] = json!(true)),
        ];
        for doc in valid {
            check(doc.clone()).unwrap_or_else(|e| panic!("{doc}: {e}"));
        }
        let invalid: Vec<(Value, &str)> = vec![
            (json!([1, 2]), "$: the document is not an object"),
            (
                with(&|d| {
                    d.as_object_mut().unwrap().remove("openapi");
                }),
                "$.openapi: missing",
            ),
            (with(&|d| d["openapi"] = json!("2.0")), "$.openapi: version `2.0` is not supported"),
            (with(&|d| d["openapi"] = json!(3.1)), "$.openapi: must be a string"),
            (
                with(&|d| {
                    d["info"].as_object_mut().unwrap().remove("title");
                }),
                "$.info.title: missing",
            ),
            (with(&|d| d["info"]["version"] = json!(1.5)), "$.info.version: must be a string, not the number 1.5"),
            (with(&|d| d["info"]["title"] = json!(" ")), "$.info.title: must not be empty"),
            (
                with(&|d| {
                    d["openapi"] = json!("3.0.0");
                    d.as_object_mut().unwrap().remove("paths");
                }),
                "$.paths: missing",
            ),
            (with(&|d| d["paths"] = json!([])), "$.paths: must be an object"),
            (with(&|d| d["paths"]["/orders"] = json!("get")), "$.paths[\"/orders\"]: a path item must be an object"),
            (with(&|d| d["paths"]["orders"] = json!({})), "$.paths.orders: a path must start with `/`"),
            (
                with(&|d| d["paths"]["/orders"]["fetch"] = json!({})),
                "$.paths[\"/orders\"].fetch: unknown HTTP method `fetch`",
            ),
            (with(&|d| d["paths"]["/orders"]["post"] = json!(1)), "an operation must be an object"),
            (
                with(&|d| d["paths"]["/orders"]["get"]["responses"]["200"] = json!({"$ref": "#/components/responses/Nope"})),
                "$.paths[\"/orders\"].get.responses[\"200\"].$ref: `#/components/responses/Nope` does not resolve",
            ),
            (
                with(&|d| d["paths"]["/orders"]["get"]["responses"]["200"] = json!({"$ref": "other.yaml#/x"})),
                "not a local reference",
            ),
            (
                with(&|d| {
                    d["components"] = json!({"schemas": {
                        "A": {"$ref": "#/components/schemas/B"},
                        "B": {"$ref": "#/components/schemas/C"},
                        "C": {"$ref": "#/components/schemas/A"}}});
                }),
                "$ref cycle: #/components/schemas/B -> #/components/schemas/C -> #/components/schemas/A -> #/components/schemas/B",
            ),
            (
                with(&|d| d["x-self"] = json!({"$ref": "#/x-self"})),
                "$.x-self.$ref: $ref cycle: #/x-self -> #/x-self",
            ),
        ];
        for (doc, want) in invalid {
            let e = check(doc.clone()).expect_err(&doc.to_string());
            assert!(e.contains(want), "{doc}\n  got: {e}\n want: {want}");
        }
    }

    #[test]
    fn long_ref_chains_and_deep_nesting_are_bounded() {
        let mut schemas = serde_json::Map::new();
        for i in 0..1000 {
            schemas.insert(
                format!("S{i}"),
                json!({"$ref": format!("#/components/schemas/S{}", i + 1)}),
            );
        }
        schemas.insert("S1000".into(), json!({"type": "string"}));
        let doc = json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "components": {"schemas": schemas}});
        let e = check(doc).unwrap_err();
        assert!(e.contains("$ref chain longer than 32 hops"), "{e}");

        let mut deep = json!({"type": "string"});
        for _ in 0..100 {
            deep = json!({"items": deep});
        }
        let doc =
            json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "x-deep": deep});
        let e = check(doc).unwrap_err();
        assert!(e.contains("nested deeper than 64 levels"), "{e}");
    }

    #[test]
    fn yaml_alias_bombs_and_literal_refs_are_handled() {
        // "Billion laughs": nine levels of nine aliases, a few hundred bytes of text.
        let mut text =
            String::from("openapi: 3.1.0\ninfo: {title: t, version: '1'}\na0: &a0 [x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        let t = std::time::Instant::now();
        let e = parse_document(&text).unwrap_err().to_string();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        assert!(
            e.starts_with("the document is neither JSON nor YAML"),
            "{e}"
        );
        // A `$ref` inside an example is data.
        let doc = json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "components": {"schemas": {"S": {"type": "object", "example": {"$ref": "nowhere"}}}}});
        check(doc).expect("example values are not references");
    }

    #[test]
    fn a_50_mb_document_is_refused_quickly_by_its_size() {
        let text = format!(
            "{{\"openapi\": \"3.1.0\", \"x\": \"{}\"}}",
            "a".repeat(50 << 20)
        );
        let t = std::time::Instant::now();
        let e = parse_document(&text).unwrap_err();
        assert!(
            t.elapsed() < std::time::Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            e.to_string(),
            format!(
                "the document is {} bytes, over the limit of 8388608 bytes (8 MiB)",
                text.len()
            )
        );
    }

    #[test]
    fn yaml_and_json_of_one_document_have_the_same_canonical_bytes() {
        let json = r#"{"paths": {}, "info": {"version": "1", "title": "t"}, "openapi": "3.1.0"}"#;
        let yaml = "openapi: 3.1.0\ninfo:\n  title: t\n  version: '1'\npaths: {}\n";
        let (a, b) = (parse_document(json).unwrap(), parse_document(yaml).unwrap());
        assert_eq!(canonical_bytes(&a), canonical_bytes(&b));
        assert!(matches!(parse_document("{nope"), Err(SpecError::Parse(_))));
    }

    #[test]
    fn the_policy_spec_checks_service_version_and_document() {
        let spec = |v: Value| serde_json::from_value::<ApiSpecSpec>(v).map_err(|e| e.to_string());
        let doc = "openapi: 3.1.0\ninfo: {title: Orders, version: '2'}\npaths: {}\n";
        let ok = spec(json!({"service": "orders", "version": "v2", "document": doc})).unwrap();
        assert_eq!(ok.validate().unwrap().1.title, "Orders");
        let e = spec(json!({"service": "orders", "version": "v2", "document": {}, "extra": 1}))
            .unwrap_err();
        assert!(e.contains("unknown field `extra`"), "{e}");
        for (v, want) in [
            (
                json!({"service": "Orders", "version": "v2", "document": doc}),
                "service:",
            ),
            (
                json!({"service": "orders", "version": "v/2", "document": doc}),
                "version: `v/2` is not a version",
            ),
            (
                json!({"service": "orders", "version": "v2", "document": {"openapi": "3.1.0"}}),
                "document: $.info: missing",
            ),
        ] {
            let e = spec(v).unwrap().validate().unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
