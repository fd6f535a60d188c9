//! A body schema compiled for the scan: the objects and arrays it walks itself, and a
//! `jsonschema` validator for each scalar's schema (built by the caller exactly as the body's
//! own validator is). Bounded: at most [`MAX_NODES`] schemas compiled per body (past it, no
//! fast path: the full check serves), a recursive schema cut at [`MAX_SCHEMA_DEPTH`].

use jsonschema::Validator;
use serde_json::{Map, Value};

use super::scalar::Scalar;
use super::{Additional, ArrayNode, FastBody, Node, ObjectNode};
use crate::validate::compile::escape;
use crate::validate::tape::Tape;

/// Most schemas compiled for one body; past it there is no fast path.
const MAX_NODES: usize = 256;
/// Deepest schema nesting compiled: a recursive schema becomes [`Node::Unsure`] there.
const MAX_SCHEMA_DEPTH: usize = 16;
/// Most `$ref` hops followed from one schema.
const MAX_HOPS: usize = 32;
/// Most properties of one object walked here (the required ones are bits of a `u64`).
const MAX_PROPS: usize = 64;
/// Keywords that do not validate: JSON Schema's meta-data, OpenAPI's own, and the places
/// that only hold schemas for `$ref`s to point at.
const ANNOTATIONS: &[&str] = &[
    "$defs",
    "definitions",
    "title",
    "description",
    "example",
    "examples",
    "default",
    "deprecated",
    "$comment",
    "externalDocs",
    "xml",
];

/// What is known of a whole document before its bodies are compiled.
#[derive(Clone, Copy)]
pub struct DocFacts {
    /// `$dynamicRef` / `$recursiveRef` resolve by the path taken to them: a scalar's
    /// validator built on its own could resolve them otherwise. None: no fast path.
    dynamic: bool,
}

impl DocFacts {
    pub fn of(doc: &Value) -> Self {
        Self {
            dynamic: mentions_dynamic(doc),
        }
    }
}

/// The schema at pointer `at` of `doc` compiled for the scan; `leaf` builds the validator of
/// the schema at a pointer. `None`: no fast path for this body (the full check serves).
pub fn compile(
    doc: &Value,
    facts: DocFacts,
    at: &str,
    leaf: &mut dyn FnMut(&str, &Value) -> Option<Validator<Tape>>,
) -> Option<FastBody> {
    if facts.dynamic {
        return None;
    }
    let schema = doc.pointer(at)?;
    let mut c = Compiler {
        doc,
        leaf,
        nodes: 0,
    };
    match c.node(schema, at.to_string(), 0)? {
        Node::Unsure => None,
        root => Some(FastBody { root }),
    }
}

struct Compiler<'d, 'l> {
    doc: &'d Value,
    leaf: &'l mut dyn FnMut(&str, &Value) -> Option<Validator<Tape>>,
    nodes: usize,
}

/// A schema object, and its keywords.
type Schema<'d> = (&'d Value, &'d Map<String, Value>);

/// How a schema is walked.
enum Kind {
    Any,
    Object,
    Array,
    Scalar(Box<Scalar>),
    Leaf,
}

// === impl Compiler ===

impl<'d> Compiler<'d, '_> {
    /// `None`: give up the fast path (too many schemas, a validator that does not build).
    fn node(&mut self, schema: &'d Value, at: String, depth: usize) -> Option<Node> {
        if depth > MAX_SCHEMA_DEPTH {
            return Some(Node::Unsure);
        }
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return None;
        }
        let Some((schema, at)) = self.follow(schema, at) else {
            return Some(Node::Unsure);
        };
        let map = match schema {
            Value::Bool(true) => return Some(Node::Any),
            Value::Object(map) => map,
            _ => return Some(Node::Unsure),
        };
        match kind(map) {
            Kind::Any => Some(Node::Any),
            Kind::Object => self.object((schema, map), &at, depth),
            Kind::Array => self.array((schema, map), &at, depth),
            Kind::Scalar(rule) => Some(Node::Scalar(rule)),
            Kind::Leaf => self.whole(schema, &at),
        }
    }

    /// Follow a `$ref` that stands alone (annotations aside) to its target and pointer.
    /// `None`: a reference this cannot follow as `jsonschema` would (the caller is unsure).
    fn follow(&self, mut schema: &'d Value, mut at: String) -> Option<(&'d Value, String)> {
        for _ in 0..MAX_HOPS {
            let Some(map) = schema.as_object() else {
                return Some((schema, at));
            };
            let Some(r) = map.get("$ref") else {
                return Some((schema, at));
            };
            if !map
                .keys()
                .all(|k| k == "$ref" || ANNOTATIONS.contains(&k.as_str()))
            {
                // `$ref` beside other keywords: both apply; the leaf's validator does that.
                return Some((schema, at));
            }
            // Only a plain pointer into this document (no `%` escapes to decode).
            let pointer = r.as_str()?.strip_prefix('#')?;
            if pointer.contains('%') || !(pointer.is_empty() || pointer.starts_with('/')) {
                return None;
            }
            schema = self.doc.pointer(pointer)?;
            at = pointer.to_string();
        }
        None
    }

    fn object(&mut self, (schema, map): Schema<'d>, at: &str, depth: usize) -> Option<Node> {
        let mut props = Vec::new();
        if let Some(p) = map.get("properties") {
            let Value::Object(p) = p else {
                return Some(Node::Unsure);
            };
            for (name, prop) in p {
                let child = format!("{at}/properties/{}", escape(name));
                let node = self.node(prop, child, depth + 1)?;
                props.push((Box::<str>::from(name.as_str()), Some(node)));
            }
        }
        let mut required = 0u64;
        if let Some(names) = map.get("required") {
            let Value::Array(names) = names else {
                return Some(Node::Unsure);
            };
            for name in names {
                let name = name.as_str()?;
                let i = match props.iter().position(|(p, _)| &**p == name) {
                    Some(i) => i,
                    None => {
                        props.push((name.into(), None));
                        props.len() - 1
                    }
                };
                if i >= MAX_PROPS {
                    return self.whole(schema, at);
                }
                required |= 1 << i;
            }
        }
        if props.len() > MAX_PROPS {
            return self.whole(schema, at);
        }
        let additional = match map.get("additionalProperties") {
            None | Some(Value::Bool(true)) => Additional::Any,
            Some(Value::Bool(false)) => Additional::Deny,
            Some(extra) => {
                let child = format!("{at}/additionalProperties");
                Additional::Schema(self.node(extra, child, depth + 1)?)
            }
        };
        Some(Node::Object(Box::new(ObjectNode {
            props,
            required,
            additional,
        })))
    }

    fn array(&mut self, (schema, map): Schema<'d>, at: &str, depth: usize) -> Option<Node> {
        let items = match map.get("items") {
            None => Node::Any,
            Some(items @ (Value::Object(_) | Value::Bool(_))) => {
                self.node(items, format!("{at}/items"), depth + 1)?
            }
            Some(_) => return self.whole(schema, at),
        };
        let bound = |key: &str, none: u64| match map.get(key) {
            None => Some(none),
            Some(v) => v.as_u64(),
        };
        let (Some(min), Some(max)) = (bound("minItems", 0), bound("maxItems", u64::MAX)) else {
            return self.whole(schema, at);
        };
        Some(Node::Array(Box::new(ArrayNode { items, min, max })))
    }

    /// A schema this does not walk: its validator, which hands over any container.
    fn whole(&mut self, schema: &Value, at: &str) -> Option<Node> {
        (self.leaf)(at, schema).map(|v| Node::Leaf(Box::new(v)))
    }
}

/// How `map` is walked: as an object or array only when every keyword is one walked here (or
/// an annotation) and the type, if any, is that one.
fn kind(map: &Map<String, Value>) -> Kind {
    let (mut object, mut array, mut scalar, mut ty) = (false, false, false, None);
    for (key, value) in map {
        match key.as_str() {
            "properties" | "required" | "additionalProperties" => object = true,
            "items" | "minItems" | "maxItems" => array = true,
            "type" => ty = Some(value),
            k if ignored(k, value) => {}
            // a scalar's keywords, or a leaf's
            _ => scalar = true,
        }
    }
    match (ty.map(Value::as_str), object, array, scalar) {
        (None, false, false, false) => Kind::Any,
        (None | Some(Some("object")), _, false, false) => Kind::Object,
        (None | Some(Some("array")), false, _, false) => Kind::Array,
        (_, false, false, _) => {
            Scalar::of(map, ignored).map_or(Kind::Leaf, |s| Kind::Scalar(Box::new(s)))
        }
        _ => Kind::Leaf,
    }
}

/// A keyword that does not validate here: an annotation, or a flag set to `false` (`true`
/// is a keyword of the side's view).
fn ignored(key: &str, value: &Value) -> bool {
    ANNOTATIONS.contains(&key)
        || (matches!(key, "readOnly" | "writeOnly") && value == &Value::Bool(false))
}

/// Whether `schema` can be compiled on its own, as it is: no reference, identifier or anchor
/// anywhere in it (it is then the same schema wherever it is compiled from).
pub fn self_contained(schema: &Value) -> bool {
    !has_key(schema, &|k| {
        matches!(
            k,
            "$ref"
                | "$dynamicRef"
                | "$recursiveRef"
                | "$id"
                | "$anchor"
                | "$dynamicAnchor"
                | "$recursiveAnchor"
                | "$schema"
                | "$vocabulary"
        )
    })
}

/// Whether `doc` uses a reference resolved by its dynamic scope anywhere.
fn mentions_dynamic(doc: &Value) -> bool {
    has_key(doc, &|k| matches!(k, "$dynamicRef" | "$recursiveRef"))
}

/// Whether a key of `value`, at any depth, is one `pick` names.
fn has_key(value: &Value, pick: &dyn Fn(&str) -> bool) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| pick(k) || has_key(v, pick)),
        Value::Array(items) => items.iter().any(|v| has_key(v, pick)),
        _ => false,
    }
}
