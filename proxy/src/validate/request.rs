//! A request against its operation: path, query, header and cookie parameters (required, type, enum,
//! format: whatever the parameter's schema says, its text read as the schema's type first),
//! then the body's content type and, for JSON, its schema. Pure functions of the request's
//! parts; reading the body is [`super::body`]'s.
//!
//! Query parameters the document does not name are allowed (clients add tracking and cache
//! busting parameters; OpenAPI does not forbid them). Arrays and objects are read as their
//! `style` and `explode` write them (`?t=a&t=b`, `?t=a,b`, `?t=a|b`,
//! `?filter[color]=red&filter[size]=10`, `?color=red&size=10`, `k,v,k,v`).

use std::borrow::Cow;

use http::{header, HeaderMap, StatusCode};
use jsonschema::error::ValidationErrorKind;
use jsonschema::ValidationError;
use serde_json::Value;

use super::compile::{is_json, BodySpec, BodyValidator, Check, In, Operation, Param, Shape, Style};
use super::paths::Captures;
use super::problem::{FieldError, Location, Problem, MAX_ERRORS};
use super::tape::Doc;

/// What the body needs, once the parameters passed.
pub enum BodyPlan<'o> {
    /// Nothing to read: no body described, or one accepted without a schema.
    Pass,
    /// Read (bounded) and check against this schema.
    Json(&'o BodyValidator),
}

/// A request's parameter sources, each parsed once and only when a parameter reads it.
struct Sources<'r> {
    captures: &'r Captures<'r>,
    query: Vec<(Cow<'r, str>, Cow<'r, str>)>,
    cookies: Vec<(&'r str, &'r str)>,
    headers: &'r HeaderMap,
}

/// The parameters' errors, in the document's order.
pub fn check_params(
    op: &Operation,
    captures: &Captures<'_>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Vec<FieldError> {
    let reads = |l: In| op.params.iter().any(|p| p.location == l);
    let src = Sources {
        captures,
        query: match query {
            Some(q) if reads(In::Query) => form_urlencoded::parse(q.as_bytes()).collect(),
            _ => Vec::new(),
        },
        cookies: match reads(In::Cookie) {
            true => cookies(headers),
            false => Vec::new(),
        },
        headers,
    };
    let mut errors = Vec::new();
    for p in &op.params {
        if let Some(e) = check_param(p, &src) {
            errors.push(e);
            if errors.len() == MAX_ERRORS {
                break;
            }
        }
    }
    errors
}

fn check_param(p: &Param, src: &Sources<'_>) -> Option<FieldError> {
    let location = Location::Param(p.location);
    let Some(value) = src.read(p) else {
        return p
            .required
            .then(|| FieldError::new(location, &p.name, "required but missing"));
    };
    let Check { validator, .. } = p.check.as_ref()?;
    // The fast path: no error locations tracked, no messages built.
    if validator.is_valid(&value) {
        return None;
    }
    let e = validator.validate(&value).err()?;
    // A property of a deepObject is named as the client wrote it: `filter[size]`.
    let member = e
        .instance_path()
        .as_str()
        .strip_prefix('/')
        .map(str::to_string);
    let name = match member {
        Some(m) if p.style == Style::DeepObject => format!("{}[{m}]", p.name),
        _ => p.name.clone(),
    };
    Some(FieldError::new(location, name, e.to_string()))
}

// === impl Sources ===

impl Sources<'_> {
    /// The parameter's value as its schema's type (`None`: absent); without a schema, any
    /// value (only its presence is checked).
    fn read(&self, p: &Param) -> Option<Value> {
        let shape = p.check.as_ref().map_or(&Shape::Text, |c| &c.shape);
        match shape {
            Shape::Object(props) if self.by_member(p) => {
                let members = self.members(p, props);
                (!members.is_empty()).then(|| object(props, members))
            }
            _ => {
                let raws = self.raws(p);
                (!raws.is_empty()).then(|| read(shape, &raws, p))
            }
        }
    }

    /// An object written one key per property: `deepObject`, or `form` exploded.
    fn by_member(&self, p: &Param) -> bool {
        p.style == Style::DeepObject
            || (p.style == Style::Form && p.explode && p.location == In::Query)
    }

    /// `name[key]=v` pairs (deepObject), or the pairs named by the object's properties.
    fn members(&self, p: &Param, props: &[(String, Shape)]) -> Vec<(String, Cow<'_, str>)> {
        let key = |k: &str| match p.style {
            Style::DeepObject => k
                .strip_prefix(p.name.as_str())
                .and_then(|r| r.strip_prefix('['))
                .and_then(|r| r.strip_suffix(']'))
                .map(str::to_string),
            _ => props.iter().any(|(n, _)| n == k).then(|| k.to_string()),
        };
        self.query
            .iter()
            .filter_map(|(k, v)| Some((key(k)?, v.clone())))
            .collect()
    }

    /// Every value of the parameter, in request order.
    fn raws(&self, p: &Param) -> Vec<Cow<'_, str>> {
        let name = p.name.as_str();
        match p.location {
            In::Path => (self.captures.iter())
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.clone())
                .collect(),
            In::Query => (self.query.iter())
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .collect(),
            In::Cookie => (self.cookies.iter())
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| Cow::Borrowed(*v))
                .collect(),
            In::Header => (self.headers.get_all(name).iter())
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect(),
        }
    }
}

/// The `name=value` pairs of the request's `Cookie` headers (RFC 6265 section 5.4: `; `
/// separated); values as sent (cookies are not percent-decoded).
fn cookies(headers: &HeaderMap) -> Vec<(&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .map(|(n, v)| (n.trim(), v.trim().trim_matches('"')))
        .collect()
}

/// A parameter's text as the JSON value its schema describes; text that does not parse as
/// the type stays a string, for the schema to name the mismatch.
fn read(shape: &Shape, raws: &[Cow<'_, str>], p: &Param) -> Value {
    let one = || raws.first().map_or("", |r| r.as_ref());
    let delimiter = match p.style {
        Style::PipeDelimited => '|',
        Style::SpaceDelimited => ' ',
        _ => ',',
    };
    // Repeated keys (`?t=a&t=b`) are an exploded query or cookie array's items.
    let split = !(p.explode && matches!(p.location, In::Query | In::Cookie));
    match shape {
        Shape::Array(item) => {
            let parts: Vec<&str> = match (split, raws) {
                (true, [one]) => one.split(delimiter).collect(),
                _ => raws.iter().map(|r| r.as_ref()).collect(),
            };
            Value::Array(parts.into_iter().map(|s| scalar(item, s)).collect())
        }
        Shape::Object(props) => object(props, pairs(one(), p.explode, delimiter)),
        _ => scalar(shape, one()),
    }
}

/// An object written in one value: `k,v,k,v`, or exploded (`simple` headers) `k=v,k=v`.
fn pairs(text: &str, explode: bool, delimiter: char) -> Vec<(String, Cow<'_, str>)> {
    let mut parts = text.split(delimiter);
    let mut out = Vec::new();
    if explode {
        for part in parts {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            out.push((k.to_string(), Cow::Borrowed(v)));
        }
        return out;
    }
    while let Some(k) = parts.next() {
        out.push((k.to_string(), Cow::Borrowed(parts.next().unwrap_or(""))));
    }
    out
}

/// An object of the properties written, each read as its schema's type.
fn object(props: &[(String, Shape)], members: Vec<(String, Cow<'_, str>)>) -> Value {
    let mut map = serde_json::Map::new();
    for (k, v) in members {
        let shape = props
            .iter()
            .find(|(n, _)| *n == k)
            .map_or(&Shape::Text, |(_, s)| s);
        map.insert(k, scalar(shape, &v));
    }
    Value::Object(map)
}

fn scalar(shape: &Shape, s: &str) -> Value {
    let parsed = match shape {
        Shape::Integer => s.parse::<i64>().ok().map(Value::from),
        Shape::Number => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number),
        Shape::Boolean => s.parse::<bool>().ok().map(Value::Bool),
        Shape::Text | Shape::Array(_) | Shape::Object(_) => None,
    };
    parsed.unwrap_or_else(|| Value::String(s.to_string()))
}

/// What the body needs: refused when required and absent (`empty`), or of a content type the
/// operation does not accept.
pub fn plan_body<'o>(
    spec: Option<&'o BodySpec>,
    headers: &HeaderMap,
    empty: bool,
) -> Result<BodyPlan<'o>, Problem> {
    let Some(spec) = spec else {
        return Ok(BodyPlan::Pass);
    };
    if empty {
        if spec.required {
            let e = FieldError::new(Location::Body, "", "a request body is required");
            return Err(Problem {
                reason: "body_missing",
                ..Problem::invalid(vec![e])
            });
        }
        return Ok(BodyPlan::Pass);
    }
    if spec.content.is_empty() {
        return Ok(BodyPlan::Pass);
    }
    let essence = essence(headers);
    match spec.content.find(&essence) {
        Some(Some(v)) if is_json(&essence) => Ok(BodyPlan::Json(v)),
        Some(_) => Ok(BodyPlan::Pass),
        None => {
            let accepted: Vec<&str> = spec.content.0.iter().map(|(r, _)| r.as_str()).collect();
            Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type",
                "The request's content type is not one the API accepts",
            )
            .detail(format!(
                "Content-Type `{}` is not accepted; use one of: {}",
                if essence.is_empty() {
                    "(none)"
                } else {
                    &essence
                },
                accepted.join(", ")
            )))
        }
    }
}

/// A JSON body against its schema: malformed JSON names the line and column, a mismatch
/// names each failing field by JSON pointer (a missing required field by its own pointer).
pub fn check_json(validator: &BodyValidator, body: &[u8]) -> Result<(), Problem> {
    // The usual valid body, accepted in one pass without its document (validate/fast);
    // anything else is checked in full, and only that check refuses.
    if validator.fast.as_ref().is_some_and(|f| f.accepts(body)) {
        return Ok(());
    }
    let validator = &validator.full;
    // Parsed in place (strings borrowed from `body`), not into a `serde_json::Value`; the
    // members of small objects left in the client's order (no sort) until errors are wanted.
    let doc = Doc::parse_unordered(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "body_malformed",
            "The request body is not valid JSON",
        )
        .detail(format!("the body is not valid JSON: {e}"))
    })?;
    // The fast path: no error locations tracked, no messages built.
    if validator.is_valid(doc.root()) {
        return Ok(());
    }
    // A refusal: the errors in key order, as `serde_json::Map` lists members.
    let doc = doc.into_ordered();
    let errors: Vec<FieldError> = validator
        .iter_errors(doc.root())
        .take(MAX_ERRORS)
        .map(|e| FieldError::new(Location::Body, pointer(&e), e.to_string()))
        .collect();
    match errors.is_empty() {
        true => Ok(()),
        false => Err(Problem::invalid(errors)),
    }
}

/// Where an error is: the instance's pointer, or for a missing required property the
/// property's own.
pub(super) fn pointer(e: &ValidationError<'_>) -> String {
    let at = e.instance_path().as_str();
    match e.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            format!("{at}/{}", name.replace('~', "~0").replace('/', "~1"))
        }
        _ => at.to_string(),
    }
}

/// The request's `Content-Type` without parameters, lower-case.
pub(super) fn essence(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}
