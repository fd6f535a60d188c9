//! What changed between two versions of an API, with the changes that break existing clients
//! flagged: a removed path or method, a removed response field (a name under a response
//! schema's `properties`), a new required parameter, a new required request-body field.
//!
//! Schemas are compared by the field paths they declare (`items[].id`), following `$ref`,
//! `items` and `allOf`. Both documents have passed [`crate::validate_document`], but the walk is
//! still bounded on its own: a `$ref` already being expanded is not expanded again (recursive
//! schemas), nesting stops at [`MAX_DEPTH`], and at most [`MAX_SCHEMA_NODES`] schema nodes are
//! visited per diff, since references shared many times over (a DAG) could otherwise expand
//! exponentially. When that budget runs out the diff says so rather than guessing.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use crate::api_spec::{follow_ref, MAX_DEPTH, METHODS};

/// Schema nodes visited per diff, over both documents.
pub const MAX_SCHEMA_NODES: usize = 200_000;

/// One difference between two versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApiChange {
    pub kind: ChangeKind,
    /// Whether existing clients may break.
    pub breaking: bool,
    /// `GET /orders`, or the path alone for path-level changes.
    pub location: String,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    PathRemoved,
    MethodRemoved,
    ResponseFieldRemoved,
    RequiredParameterAdded,
    RequiredBodyFieldAdded,
    PathAdded,
    MethodAdded,
    ResponseFieldAdded,
    /// The schemas were too large to compare fully within [`MAX_SCHEMA_NODES`].
    Incomplete,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PathRemoved => "path removed",
            Self::MethodRemoved => "method removed",
            Self::ResponseFieldRemoved => "response field removed",
            Self::RequiredParameterAdded => "required parameter added",
            Self::RequiredBodyFieldAdded => "required body field added",
            Self::PathAdded => "path added",
            Self::MethodAdded => "method added",
            Self::ResponseFieldAdded => "response field added",
            Self::Incomplete => "incomplete",
        }
    }

    fn breaking(self) -> bool {
        matches!(
            self,
            Self::PathRemoved
                | Self::MethodRemoved
                | Self::ResponseFieldRemoved
                | Self::RequiredParameterAdded
                | Self::RequiredBodyFieldAdded
        )
    }
}

/// Every change from `old` to `new`, breaking ones first.
pub fn diff(old: &Value, new: &Value) -> Vec<ApiChange> {
    let mut d = Differ {
        old,
        new,
        budget: MAX_SCHEMA_NODES,
        out: Vec::new(),
    };
    d.paths();
    if d.budget == 0 {
        d.push(
            ChangeKind::Incomplete,
            "",
            format!("schemas too large to compare fully (over {MAX_SCHEMA_NODES} nodes); field changes may be missing"),
        );
    }
    d.out.sort_by(|a, b| {
        (!a.breaking, a.kind, &a.location, &a.detail).cmp(&(
            !b.breaking,
            b.kind,
            &b.location,
            &b.detail,
        ))
    });
    d.out
}

struct Differ<'a> {
    old: &'a Value,
    new: &'a Value,
    budget: usize,
    out: Vec<ApiChange>,
}

type Params = BTreeMap<(String, String), bool>;

impl<'a> Differ<'a> {
    fn push(&mut self, kind: ChangeKind, location: &str, detail: String) {
        self.out.push(ApiChange {
            kind,
            breaking: kind.breaking(),
            location: location.to_string(),
            detail,
        });
    }

    fn paths(&mut self) {
        let (old, new) = (path_items(self.old), path_items(self.new));
        for (route, old_item) in &old {
            match new.get(route) {
                None => self.push(ChangeKind::PathRemoved, route, "the path is gone".into()),
                Some(new_item) => self.methods(route, old_item, new_item),
            }
        }
        for route in new.keys().filter(|r| !old.contains_key(*r)) {
            self.push(ChangeKind::PathAdded, route, "new path".into());
        }
    }

    fn methods(&mut self, route: &str, old: &'a Value, new: &'a Value) {
        for m in METHODS {
            let at = format!("{} {route}", m.to_uppercase());
            match (old.get(*m), new.get(*m)) {
                (Some(_), None) => {
                    self.push(ChangeKind::MethodRemoved, &at, "the method is gone".into())
                }
                (None, Some(_)) => self.push(ChangeKind::MethodAdded, &at, "new method".into()),
                (Some(o), Some(n)) => {
                    let (po, pn) = (params(self.old, old, o), params(self.new, new, n));
                    self.parameters(&at, &po, &pn);
                    self.request_body(&at, o, n);
                    self.responses(&at, o, n);
                }
                (None, None) => {}
            }
        }
    }

    fn parameters(&mut self, at: &str, old: &Params, new: &Params) {
        for ((name, place), required) in new {
            if !required {
                continue;
            }
            match old.get(&(name.clone(), place.clone())) {
                Some(true) => {}
                Some(false) => self.push(
                    ChangeKind::RequiredParameterAdded,
                    at,
                    format!("{place} parameter `{name}` is now required"),
                ),
                None => self.push(
                    ChangeKind::RequiredParameterAdded,
                    at,
                    format!("new required {place} parameter `{name}`"),
                ),
            }
        }
    }

    fn request_body(&mut self, at: &str, old_op: &'a Value, new_op: &'a Value) {
        let (old, new) = (
            deref(self.old, old_op.get("requestBody")),
            deref(self.new, new_op.get("requestBody")),
        );
        let Some(new) = new else { return };
        let new_required = new.get("required").and_then(Value::as_bool) == Some(true);
        if old.is_none() && new_required {
            self.push(
                ChangeKind::RequiredBodyFieldAdded,
                at,
                "a request body is now required".into(),
            );
        }
        let old_fields = match old {
            Some(o) => self.body_fields(self.old, o, true),
            None => BTreeSet::new(),
        };
        let new_fields = self.body_fields(self.new, new, true);
        if self.budget == 0 {
            return;
        }
        for f in new_fields.difference(&old_fields) {
            self.push(
                ChangeKind::RequiredBodyFieldAdded,
                at,
                format!("new required request body field `{f}`"),
            );
        }
    }

    fn responses(&mut self, at: &str, old_op: &'a Value, new_op: &'a Value) {
        let (Some(old), Some(new)) = (
            old_op.get("responses").and_then(Value::as_object),
            new_op.get("responses").and_then(Value::as_object),
        ) else {
            return;
        };
        for (status, old_resp) in old {
            let Some(new_resp) = new.get(status) else {
                continue;
            };
            let (Some(o), Some(n)) = (
                deref(self.old, Some(old_resp)),
                deref(self.new, Some(new_resp)),
            ) else {
                continue;
            };
            let (of, nf) = (
                self.body_fields(self.old, o, false),
                self.body_fields(self.new, n, false),
            );
            if self.budget == 0 {
                // A partial walk of either side would report fields as removed that are not.
                continue;
            }
            for f in of.difference(&nf) {
                self.push(
                    ChangeKind::ResponseFieldRemoved,
                    at,
                    format!("{status} response field `{f}` removed"),
                );
            }
            for f in nf.difference(&of) {
                self.push(
                    ChangeKind::ResponseFieldAdded,
                    at,
                    format!("{status} response field `{f}` added"),
                );
            }
        }
    }

    /// The fields of every media type's schema of a request body or response: the required ones
    /// (for requests) or all declared ones (for responses).
    fn body_fields(
        &mut self,
        doc: &'a Value,
        body: &'a Value,
        required_only: bool,
    ) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let Some(content) = body.get("content").and_then(Value::as_object) else {
            return out;
        };
        for media in content.values() {
            if let Some(schema) = media.get("schema") {
                let mut walk = Walk {
                    doc,
                    required_only,
                    stack: Vec::new(),
                    out: &mut out,
                };
                walk.schema(schema, "", 0, &mut self.budget);
            }
        }
        out
    }
}

/// A bounded walk of one schema, collecting field paths.
struct Walk<'a, 'o> {
    doc: &'a Value,
    required_only: bool,
    /// The `$ref`s being expanded: met again, they are a recursive schema and stop here.
    stack: Vec<&'a str>,
    out: &'o mut BTreeSet<String>,
}

impl<'a> Walk<'a, '_> {
    fn schema(&mut self, schema: &'a Value, prefix: &str, depth: usize, budget: &mut usize) {
        if depth > MAX_DEPTH || *budget == 0 {
            return;
        }
        *budget -= 1;
        if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
            if self.stack.contains(&r) {
                return;
            }
            let Ok(target) = follow_ref(self.doc, r) else {
                return;
            };
            self.stack.push(r);
            self.schema(target, prefix, depth + 1, budget);
            self.stack.pop();
            return;
        }
        if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.schema(s, prefix, depth + 1, budget);
            }
        }
        if let Some(items) = schema.get("items") {
            self.schema(items, &format!("{prefix}[]"), depth + 1, budget);
        }
        let Some(props) = schema.get("properties").and_then(Value::as_object) else {
            return;
        };
        let required: BTreeSet<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (name, sub) in props {
            let path = match prefix {
                "" => name.clone(),
                p => format!("{p}.{name}"),
            };
            let is_required = required.contains(name.as_str());
            if self.required_only && !is_required {
                continue;
            }
            self.out.insert(path.clone());
            self.schema(sub, &path, depth + 1, budget);
        }
    }
}

/// The path items of a document, `$ref`s followed.
fn path_items(doc: &Value) -> BTreeMap<&str, &Value> {
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return BTreeMap::new();
    };
    paths
        .iter()
        .filter(|(k, _)| k.starts_with('/'))
        .filter_map(|(k, v)| deref(doc, Some(v)).map(|v| (k.as_str(), v)))
        .collect()
}

/// A value, or what its `$ref` leads to; `None` when absent or unresolvable.
fn deref<'a>(doc: &'a Value, v: Option<&'a Value>) -> Option<&'a Value> {
    let v = v?;
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => follow_ref(doc, r).ok(),
        None => Some(v),
    }
}

/// The parameters of an operation, path-level ones included (the operation's win), keyed by
/// (name, in), with whether each is required (path parameters always are).
fn params(doc: &Value, item: &Value, op: &Value) -> Params {
    let mut out = Params::new();
    for list in [item.get("parameters"), op.get("parameters")] {
        for p in list.and_then(Value::as_array).into_iter().flatten() {
            let Some(p) = deref(doc, Some(p)) else {
                continue;
            };
            let (Some(name), Some(place)) = (
                p.get("name").and_then(Value::as_str),
                p.get("in").and_then(Value::as_str),
            ) else {
                continue;
            };
            let required =
                place == "path" || p.get("required").and_then(Value::as_bool) == Some(true);
            out.insert((name.to_string(), place.to_string()), required);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v1() -> Value {
        json!({
            "openapi": "3.1.0",
            "info": {"title": "Orders", "version": "1"},
            "paths": {
                "/orders": {
                    "get": {
                        "parameters": [{"name": "limit", "in": "query"}],
                        "responses": {"200": {"description": "ok", "content": {"application/json": {
                            "schema": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}}}}}}
                    },
                    "post": {
                        "requestBody": {"content": {"application/json": {"schema": {
                            "type": "object", "required": ["item"],
                            "properties": {"item": {"type": "string"}, "note": {"type": "string"}}}}}},
                        "responses": {"201": {"description": "created"}}
                    }
                },
                "/orders/{id}": {"delete": {"responses": {"204": {"description": "gone"}}}},
                "/health": {"get": {"responses": {"200": {"description": "ok"}}}}
            },
            "components": {"schemas": {
                "Order": {"type": "object", "properties": {
                    "id": {"type": "string"}, "total": {"type": "number"},
                    "lines": {"type": "array", "items": {"$ref": "#/components/schemas/Line"}},
                    "parent": {"$ref": "#/components/schemas/Order"}}},
                "Line": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}}}
            }}
        })
    }

    fn v2() -> Value {
        let mut d = v1();
        d["paths"].as_object_mut().unwrap().remove("/health");
        d["paths"]["/orders/{id}"]
            .as_object_mut()
            .unwrap()
            .remove("delete");
        d["paths"]["/orders/{id}"]["get"] = json!({"responses": {"200": {"description": "ok"}}});
        d["paths"]["/orders"]["get"]["parameters"] = json!([
            {"name": "limit", "in": "query", "required": true},
            {"name": "X-Tenant", "in": "header", "required": true},
            {"name": "cursor", "in": "query"}]);
        d["paths"]["/orders"]["post"]["requestBody"]["content"]["application/json"]["schema"]
            ["required"] = json!(["item", "note"]);
        d["components"]["schemas"]["Line"]["properties"]
            .as_object_mut()
            .unwrap()
            .remove("qty");
        d["components"]["schemas"]["Order"]["properties"]["currency"] = json!({"type": "string"});
        d["paths"]["/invoices"] = json!({"get": {"responses": {"200": {"description": "ok"}}}});
        d
    }

    fn brief(changes: &[ApiChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                format!(
                    "{} | {} | {} | {}",
                    c.breaking,
                    c.kind.as_str(),
                    c.location,
                    c.detail
                )
            })
            .collect()
    }

    #[test]
    fn breaking_changes_are_flagged_and_listed_first() {
        let got = brief(&diff(&v1(), &v2()));
        let want = [
            "true | path removed | /health | the path is gone",
            "true | method removed | DELETE /orders/{id} | the method is gone",
            "true | response field removed | GET /orders | 200 response field `[].lines[].qty` removed",
            "true | required parameter added | GET /orders | header parameter `X-Tenant` is now required",
            "true | required parameter added | GET /orders | query parameter `limit` is now required",
            "true | required body field added | POST /orders | new required request body field `note`",
            "false | path added | /invoices | new path",
            "false | method added | GET /orders/{id} | new method",
            "false | response field added | GET /orders | 200 response field `[].currency` added",
        ];
        // `X-Tenant` is new, not "now" required: check the wording separately.
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want[3] = "true | required parameter added | GET /orders | new required header parameter `X-Tenant`".into();
        assert_eq!(got, want);
    }

    #[test]
    fn the_same_document_has_no_changes_and_the_reverse_is_additive_where_it_was_breaking() {
        assert!(diff(&v1(), &v1()).is_empty());
        let back = diff(&v2(), &v1());
        assert!(back
            .iter()
            .any(|c| c.kind == ChangeKind::PathRemoved && c.location == "/invoices"));
        assert!(!back
            .iter()
            .any(|c| c.kind == ChangeKind::RequiredParameterAdded));
    }

    #[test]
    fn exponential_ref_graphs_stop_at_the_budget() {
        // S0 -> two refs to S1 -> two refs to S2 ... : 2^40 expansions if walked naively.
        let mut schemas = serde_json::Map::new();
        for i in 0..40 {
            let next = format!("#/components/schemas/S{}", i + 1);
            schemas.insert(
                format!("S{i}"),
                json!({"type": "object", "properties": {
                "a": {"$ref": next}, "b": {"$ref": next}}}),
            );
        }
        schemas.insert("S40".into(), json!({"type": "string"}));
        let doc = |extra: bool| {
            let mut s = schemas.clone();
            if extra {
                s.insert("unused".into(), json!({}));
            }
            json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
                "paths": {"/x": {"get": {"responses": {"200": {"description": "ok", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/S0"}}}}}}}},
                "components": {"schemas": s}})
        };
        let t = std::time::Instant::now();
        let changes = diff(&doc(false), &doc(true));
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            changes.last().map(|c| c.kind),
            Some(ChangeKind::Incomplete),
            "{changes:?}"
        );
    }
}
