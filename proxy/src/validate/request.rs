//! A request against its operation: path, query and header parameters (required, type, enum,
//! format: whatever the parameter's schema says, its text read as the schema's type first),
//! then the body's content type and, for JSON, its schema. Pure functions of the request's
//! parts; reading the body is [`super::body`]'s.
//!
//! Query parameters the document does not name are allowed (clients add tracking and cache
//! busting parameters; OpenAPI does not forbid them). Cookie parameters are not checked.

use std::borrow::Cow;

use http::{header, HeaderMap, StatusCode};
use jsonschema::error::ValidationErrorKind;
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::compile::{is_json, BodySpec, Check, In, Operation, Param, Shape};
use super::paths::Captures;
use super::problem::{FieldError, Location, Problem, MAX_ERRORS};

/// What the body needs, once the parameters passed.
pub enum BodyPlan<'o> {
    /// Nothing to read: no body described, or one accepted without a schema.
    Pass,
    /// Read (bounded) and check against this schema.
    Json(&'o Validator),
}

/// The parameters' errors, in the document's order.
pub fn check_params(
    op: &Operation,
    captures: &Captures<'_>,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Vec<FieldError> {
    let pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = match query {
        Some(q) if op.params.iter().any(|p| p.location == In::Query) => {
            form_urlencoded::parse(q.as_bytes()).collect()
        }
        _ => Vec::new(),
    };
    let mut errors = Vec::new();
    for p in &op.params {
        let raws: Vec<Cow<'_, str>> = match p.location {
            In::Path => captures
                .iter()
                .filter(|(n, _)| *n == p.name)
                .map(|(_, v)| v.clone())
                .collect(),
            In::Query => pairs
                .iter()
                .filter(|(n, _)| *n == p.name)
                .map(|(_, v)| v.clone())
                .collect(),
            In::Header => headers
                .get_all(p.name.as_str())
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()))
                .collect(),
        };
        if let Some(e) = check_param(p, &raws) {
            errors.push(e);
            if errors.len() == MAX_ERRORS {
                break;
            }
        }
    }
    errors
}

fn check_param(p: &Param, raws: &[Cow<'_, str>]) -> Option<FieldError> {
    let location = Location::Param(p.location);
    if raws.is_empty() {
        return p
            .required
            .then(|| FieldError::new(location, &p.name, "required but missing"));
    }
    let Check { validator, shape } = p.check.as_ref()?;
    let split = p.location != In::Query || !p.explode;
    let value = read(shape, raws, split);
    // The fast path: no error locations tracked, no messages built.
    if validator.is_valid(&value) {
        return None;
    }
    let e = validator.validate(&value).err()?;
    Some(FieldError::new(location, &p.name, e.to_string()))
}

/// A parameter's text as the JSON value its schema describes; text that does not parse as
/// the type stays a string, for the schema to name the mismatch.
fn read(shape: &Shape, raws: &[Cow<'_, str>], split: bool) -> Value {
    match shape {
        Shape::Array(item) => {
            let parts: Vec<&str> = match (split, raws) {
                (true, [one]) => one.split(',').collect(),
                _ => raws.iter().map(|r| r.as_ref()).collect(),
            };
            Value::Array(parts.into_iter().map(|s| scalar(item, s)).collect())
        }
        _ => scalar(shape, raws.first().map_or("", |r| r.as_ref())),
    }
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
        Shape::Text | Shape::Array(_) => None,
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
pub fn check_json(validator: &Validator, body: &[u8]) -> Result<(), Problem> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "body_malformed",
            "The request body is not valid JSON",
        )
        .detail(format!("the body is not valid JSON: {e}"))
    })?;
    // The fast path: no error locations tracked, no messages built.
    if validator.is_valid(&value) {
        return Ok(());
    }
    let errors: Vec<FieldError> = validator
        .iter_errors(&value)
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
