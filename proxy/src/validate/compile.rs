//! One OpenAPI document compiled for the request path: its paths as a [`PathTable`], each
//! operation's parameters, request body and responses with their JSON Schema validators built
//! (`jsonschema`, draft 2020-12, formats checked, linear-time regexes). Built by the agent when
//! a document changes, once per content hash, and shared read-only by every request.
//!
//! Schemas are compiled where they are: each validator is `{"$ref": "<doc>#<pointer>"}` against
//! the whole (dialect-normalized) document registered once, so `$ref`s between components
//! resolve in memory and nothing is copied per schema. No retriever: a reference outside the
//! document (refused when it was stored anyway) fails the compilation.

use std::sync::Arc;

use http::Method;
use jsonschema::json::Json;
use jsonschema::{Draft, PatternOptions, Registry, Retrieve, ValidationOptions, Validator};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Map, Value};

use super::dialect;
use super::fast::{self, DocFacts, FastBody};
use super::paths::PathTable;
use super::tape::Tape;
use super::views::{self, Side};

/// The URI the document is registered under.
const ROOT: &str = "urn:trellis:openapi";
/// Most `$ref` hops followed to reach a parameter, body or response.
const MAX_HOPS: usize = 32;
/// Characters escaped in a pointer written as a URI fragment (`{id}` in a path).
const FRAGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Why a document could not be compiled; the message names the place.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error("the document's schemas cannot be registered: {0}")]
    Registry(String),
    #[error("{at}: {message}")]
    Schema { at: String, message: String },
    #[error("{at}: `$ref` chain does not resolve within {MAX_HOPS} hops")]
    Ref { at: String },
}

/// A compiled document.
pub struct CompiledSpec {
    paths: PathTable<PathItem>,
    /// Operations compiled, for logs.
    pub operations: usize,
}

/// The operations of one path.
#[derive(Default)]
pub struct PathItem {
    ops: Vec<(Method, Arc<Operation>)>,
}

/// What one operation accepts and answers.
pub struct Operation {
    pub(super) params: Vec<Param>,
    pub(super) body: Option<BodySpec>,
    pub(super) responses: Vec<(StatusKey, Content)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum In {
    Path,
    Query,
    Header,
    Cookie,
}

pub(super) struct Param {
    pub name: String,
    pub location: In,
    pub required: bool,
    /// How an array or object is written (OpenAPI's `style`; the location's default).
    pub style: Style,
    /// Query and cookie arrays and objects: one key per item or property (`?t=a&t=b`,
    /// `?color=red&size=10`: the default) or one comma-separated value (`explode: false`).
    pub explode: bool,
    pub check: Option<Check>,
}

/// OpenAPI's parameter `style`s the checks read; `label` and `matrix` (path parameters with
/// a leading `.` or `;`) are read as `simple`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Style {
    /// Query and cookie default: `t=a,b` or `t=a&t=b`.
    Form,
    /// Path and header default: `a,b`; an object `k,v,k,v` (`k=v,k=v` exploded).
    Simple,
    /// `?filter[color]=red&filter[size]=10`: an object, one key per property.
    DeepObject,
    /// `?t=a|b`.
    PipeDelimited,
    /// `?t=a%20b`.
    SpaceDelimited,
}

/// A compiled schema, and the JSON type a parameter's text is read as.
pub(super) struct Check {
    pub validator: Validator,
    pub shape: Shape,
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Shape {
    Text,
    Integer,
    Number,
    Boolean,
    Array(Box<Shape>),
    /// Its properties' shapes (others are read as text).
    Object(Vec<(String, Shape)>),
}

pub(super) struct BodySpec {
    pub required: bool,
    pub content: Content,
}

/// Media ranges (lower-case) and the schema of each JSON one; empty: anything goes.
#[derive(Default)]
pub(super) struct Content(pub Vec<(String, Option<BodyValidator>)>);

/// A JSON body's checks: its validator, and the scan that accepts the usual valid body
/// without building its document, when the schema allows one ([`super::fast`]).
pub(super) struct BodyValidator {
    pub full: Validator<Tape>,
    pub fast: Option<FastBody>,
}

#[derive(Debug, PartialEq)]
pub(super) enum StatusKey {
    Exact(u16),
    /// `2XX`: the first digit.
    Range(u16),
    Default,
}

/// Builds validators against the registered document.
struct Compiler<'d> {
    doc: &'d Value,
    /// The documents as each side sees it (the view, or `doc` when there is none).
    request_doc: &'d Value,
    response_doc: &'d Value,
    facts: DocFacts,
    registry: Registry<'static>,
    /// The document as request bodies see it (`readOnly`), when it differs.
    request: Option<Registry<'static>>,
    /// The document as response bodies see it (`writeOnly`), when it differs.
    response: Option<Registry<'static>>,
}

/// The document registered for validators to `$ref` into.
fn register(doc: Value) -> Result<Registry<'static>, CompileError> {
    Registry::new()
        .draft(Draft::Draft202012)
        .add(ROOT, doc)
        .and_then(|b| b.prepare())
        .map_err(|e| CompileError::Registry(e.to_string()))
}

// === impl CompiledSpec ===

impl CompiledSpec {
    /// Compile `doc` (a stored, validated OpenAPI 3.0 or 3.1 document).
    pub fn compile(doc: &Value) -> Result<Self, CompileError> {
        let v30 = doc
            .get("openapi")
            .and_then(Value::as_str)
            .is_some_and(|v| v.starts_with("3.0"));
        let mut doc = doc.clone();
        dialect::normalize(&mut doc, v30);
        let (request_view, response_view) = (
            views::view(&doc, Side::Request),
            views::view(&doc, Side::Response),
        );
        let compiler = Compiler {
            doc: &doc,
            request_doc: request_view.as_ref().unwrap_or(&doc),
            response_doc: response_view.as_ref().unwrap_or(&doc),
            facts: DocFacts::of(&doc),
            registry: register(doc.clone())?,
            request: request_view.clone().map(register).transpose()?,
            response: response_view.clone().map(register).transpose()?,
        };
        let mut paths = PathTable::new();
        let mut operations = 0;
        let empty = Map::new();
        let items = doc
            .get("paths")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for (path, item) in items {
            let at = format!("/paths/{}", escape(path));
            let (item, at) = compiler.follow(item, at)?;
            let mut ops = Vec::new();
            for (key, op) in item.as_object().unwrap_or(&empty) {
                let Ok(method) = Method::from_bytes(key.to_ascii_uppercase().as_bytes()) else {
                    continue;
                };
                if !METHODS.contains(&key.as_str()) {
                    continue;
                }
                let op = compiler.operation((&item, &at), op, &format!("{at}/{key}"))?;
                ops.push((method, Arc::new(op)));
            }
            operations += ops.len();
            paths.insert(path, PathItem { ops });
        }
        Ok(Self { paths, operations })
    }

    /// The operation for `method` on `path`, and the path's parameters; `Err(true)` when the
    /// path is known but not the method, `Err(false)` when the path is not.
    pub(super) fn operation<'s, 'p>(
        &'s self,
        method: &Method,
        path: &'p str,
    ) -> Result<(&'s Arc<Operation>, super::paths::Captures<'p>), bool>
    where
        's: 'p,
    {
        let (item, captures) = self.paths.find(path).ok_or(false)?;
        let find = |want: &Method| item.ops.iter().find(|(m, _)| m == want);
        // HEAD is GET without the body (RFC 9110): a document rarely lists it.
        let op = match find(method) {
            None if method == Method::HEAD => find(&Method::GET),
            found => found,
        };
        Ok((&op.ok_or(true)?.1, captures))
    }

    /// The methods of `path`, for `Allow`.
    pub(super) fn methods(&self, path: &str) -> Vec<&Method> {
        self.paths
            .find(path)
            .map(|(item, _)| item.ops.iter().map(|(m, _)| m).collect())
            .unwrap_or_default()
    }
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

// === impl Compiler ===

impl Compiler<'_> {
    /// Follow `$ref`s from `v` (at pointer `at`) to what they name, and its pointer.
    fn follow(&self, v: &Value, at: String) -> Result<(Value, String), CompileError> {
        let (mut v, mut at) = (v.clone(), at);
        for _ in 0..MAX_HOPS {
            let Some(r) = v.get("$ref").and_then(Value::as_str) else {
                return Ok((v, at));
            };
            let pointer = r
                .strip_prefix('#')
                .ok_or(CompileError::Ref { at: at.clone() })?;
            let target = self
                .doc
                .pointer(pointer)
                .ok_or(CompileError::Ref { at: at.clone() })?;
            at = pointer.to_string();
            v = target.clone();
        }
        Err(CompileError::Ref { at })
    }

    /// One operation at `at`, under its path item (and the item's pointer).
    fn operation(
        &self,
        (item, item_at): (&Value, &str),
        op: &Value,
        at: &str,
    ) -> Result<Operation, CompileError> {
        let mut params: Vec<Param> = Vec::new();
        // Operation parameters override the path's by name and location.
        let lists = [
            (op.get("parameters"), format!("{at}/parameters")),
            (item.get("parameters"), format!("{item_at}/parameters")),
        ];
        for (list, list_at) in lists {
            let Some(list) = list.and_then(Value::as_array) else {
                continue;
            };
            for (i, p) in list.iter().enumerate() {
                let Some(param) = self.param(p, format!("{list_at}/{i}"))? else {
                    continue;
                };
                let known = params
                    .iter()
                    .any(|q| q.location == param.location && q.name == param.name);
                if !known {
                    params.push(param);
                }
            }
        }
        let body = match op.get("requestBody") {
            None => None,
            Some(b) => {
                let (b, b_at) = self.follow(b, format!("{at}/requestBody"))?;
                Some(BodySpec {
                    required: b.get("required").and_then(Value::as_bool) == Some(true),
                    content: self.content(&b, &b_at, Side::Request)?,
                })
            }
        };
        let mut responses = Vec::new();
        if let Some(rs) = op.get("responses").and_then(Value::as_object) {
            for (code, r) in rs {
                let Some(key) = StatusKey::parse(code) else {
                    continue;
                };
                let (r, r_at) = self.follow(r, format!("{at}/responses/{}", escape(code)))?;
                responses.push((key, self.content(&r, &r_at, Side::Response)?));
            }
        }
        Ok(Operation {
            params,
            body,
            responses,
        })
    }

    /// A parameter; `None` for the headers OpenAPI says to ignore.
    fn param(&self, p: &Value, at: String) -> Result<Option<Param>, CompileError> {
        let (p, at) = self.follow(p, at)?;
        let name = p.get("name").and_then(Value::as_str).unwrap_or_default();
        let location = match p.get("in").and_then(Value::as_str) {
            Some("path") => In::Path,
            Some("query") => In::Query,
            Some("header") => In::Header,
            Some("cookie") => In::Cookie,
            _ => return Ok(None),
        };
        let style = match p.get("style").and_then(Value::as_str) {
            Some("deepObject") => Style::DeepObject,
            Some("pipeDelimited") => Style::PipeDelimited,
            Some("spaceDelimited") => Style::SpaceDelimited,
            Some("form") => Style::Form,
            Some(_) => Style::Simple,
            None if matches!(location, In::Query | In::Cookie) => Style::Form,
            None => Style::Simple,
        };
        let ignored = ["accept", "content-type", "authorization"];
        if location == In::Header && ignored.contains(&name.to_ascii_lowercase().as_str()) {
            return Ok(None);
        }
        let check = match p.get("schema") {
            Some(s) => Some(Check {
                shape: self.shape(s, 0),
                validator: self.validator(&format!("{at}/schema"), None)?,
            }),
            None => None,
        };
        Ok(Some(Param {
            name: match location {
                In::Header => name.to_ascii_lowercase(),
                _ => name.to_string(),
            },
            location,
            required: location == In::Path
                || p.get("required").and_then(Value::as_bool) == Some(true),
            // OpenAPI: `explode` defaults to true for `form`, false for the other styles.
            explode: p
                .get("explode")
                .and_then(Value::as_bool)
                .unwrap_or(style == Style::Form),
            style,
            check,
        }))
    }

    /// The JSON type a parameter's text is read as: the schema's first non-null type.
    fn shape(&self, schema: &Value, depth: usize) -> Shape {
        let Ok((schema, _)) = self.follow(schema, String::new()) else {
            return Shape::Text;
        };
        let ty = match schema.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(ts)) => ts
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap_or("string"),
            _ => "string",
        };
        match ty {
            "integer" => Shape::Integer,
            "number" => Shape::Number,
            "boolean" => Shape::Boolean,
            "array" if depth == 0 => {
                let items = schema.get("items").map(|i| self.shape(i, 1));
                Shape::Array(Box::new(items.unwrap_or(Shape::Text)))
            }
            "object" if depth == 0 => {
                let props = schema.get("properties").and_then(Value::as_object);
                let shapes = props.into_iter().flatten();
                Shape::Object(shapes.map(|(k, s)| (k.clone(), self.shape(s, 1))).collect())
            }
            _ => Shape::Text,
        }
    }

    /// `content` of a request body or response at `at`.
    fn content(&self, v: &Value, at: &str, side: Side) -> Result<Content, CompileError> {
        let mut out = Vec::new();
        if let Some(content) = v.get("content").and_then(Value::as_object) {
            for (media, m) in content {
                let range = media.to_ascii_lowercase();
                let schema = match (is_json(&range), m.get("schema")) {
                    (true, Some(_)) => {
                        let at = format!("{at}/content/{}/schema", escape(media));
                        Some(BodyValidator {
                            full: self.validator(&at, Some(side))?,
                            fast: self.fast(&at, side),
                        })
                    }
                    _ => None,
                };
                out.push((range, schema));
            }
        }
        Ok(Content(out))
    }

    /// The scan for the body schema at `at` ([`super::fast`]), its scalars' validators built
    /// as [`Compiler::validator`] builds the body's.
    fn fast(&self, at: &str, side: Side) -> Option<FastBody> {
        let doc = match side {
            Side::Request => self.request_doc,
            Side::Response => self.response_doc,
        };
        let mut leaf = |leaf_at: &str, schema: &Value| match fast::self_contained(schema) {
            // built from the schema itself: no `$ref` step at each check
            true => self.options(Some(side)).build(schema).ok(),
            false => self.validator(leaf_at, Some(side)).ok(),
        };
        fast::compile(doc, self.facts, at, &mut leaf)
    }

    /// The validator of the schema at pointer `at` of the document; for a body, its side's
    /// view and keyword (`readOnly` refused in requests, `writeOnly` in responses).
    /// Parameters' values are built as `serde_json::Value`s (`SerdeJson`), bodies are parsed
    /// into a [`Doc`](super::tape::Doc) (`Tape`).
    fn validator<F: Json>(
        &self,
        at: &str,
        side: Option<Side>,
    ) -> Result<Validator<F>, CompileError> {
        let fragment = utf8_percent_encode(at, FRAGMENT);
        let schema = json!({ "$ref": format!("{ROOT}#{fragment}") });
        self.options(side)
            .build(&schema)
            .map_err(|e| CompileError::Schema {
                at: at.to_string(),
                message: e.to_string(),
            })
    }

    /// How every validator of the document is built.
    fn options<F: Json>(&self, side: Option<Side>) -> ValidationOptions<'_, Arc<dyn Retrieve>, F> {
        let view = match side {
            Some(Side::Request) => self.request.as_ref(),
            Some(Side::Response) => self.response.as_ref(),
            None => None,
        };
        let options = jsonschema::options_for::<F>()
            .with_draft(Draft::Draft202012)
            .with_registry(view.unwrap_or(&self.registry))
            .should_validate_formats(true)
            // The built-in answer, usually without its parser (formats.rs).
            .with_format("email", super::formats::email)
            .with_pattern_options(PatternOptions::regex());
        match side {
            Some(side) => options.with_keyword(side.flag(), views::keyword(side)),
            None => options,
        }
    }
}

// === impl StatusKey ===

impl StatusKey {
    fn parse(code: &str) -> Option<Self> {
        if code == "default" {
            return Some(Self::Default);
        }
        if let Ok(n) = code.parse::<u16>() {
            return Some(Self::Exact(n));
        }
        let b = code.as_bytes();
        let range = b.len() == 3 && b[0].is_ascii_digit() && b[1..].eq_ignore_ascii_case(b"XX");
        range.then(|| Self::Range(u16::from(b[0] - b'0')))
    }
}

// === impl Content ===

impl Content {
    /// The entry for a `Content-Type` (its essence, lower-case): exact, then `type/*`, then
    /// `*/*`. `Some(None)`: accepted without a schema.
    pub fn find(&self, essence: &str) -> Option<&Option<BodyValidator>> {
        let major = essence.split('/').next().unwrap_or("");
        let by = |want: &dyn Fn(&str) -> bool| self.0.iter().find(|(r, _)| want(r));
        by(&|r| r == essence)
            .or_else(|| by(&|r| r.strip_suffix("/*") == Some(major)))
            .or_else(|| by(&|r| r == "*/*"))
            .map(|(_, v)| v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// JSON media types: `application/json` and `*/*+json`.
pub(super) fn is_json(essence: &str) -> bool {
    essence == "application/json" || essence.ends_with("+json")
}

/// One JSON pointer segment.
pub(super) fn escape(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// The status keys of an operation's responses in the order they apply: exact, range, default.
pub(super) fn response_for(responses: &[(StatusKey, Content)], status: u16) -> Option<&Content> {
    let find = |k: &StatusKey| responses.iter().find(|(key, _)| key == k).map(|(_, c)| c);
    find(&StatusKey::Exact(status))
        .or_else(|| find(&StatusKey::Range(status / 100)))
        .or_else(|| find(&StatusKey::Default))
}
