//! Aggregates: one public request answered by several mesh calls, run in parallel (a call
//! whose path names an earlier call's answer runs once that answer is in), their JSON answers
//! merged under the calls' names or at the top level.
//!
//! This file holds the plan and the merge; the calls themselves are the outbound listener's
//! (`listeners/outbound/compose.rs`), so each is a normal mesh call: mTLS, balancing, retries,
//! breakers, metrics, and a client span that is a child of the ingress's server span.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use serde_json::{Map, Value};
use trellis_policies::compose::{
    read_json, AggregateSpec, BodySource, CallMethod, MergeMode, Part, Template,
};

use super::ComposeError;
use crate::ResponseBody;

/// The response header listing the optional calls that failed (comma-separated names); the
/// body's `_partial` field maps each to its cause.
pub const PARTIAL_HEADER: &str = "trellis-partial";
const PARTIAL_FIELD: &str = "_partial";

/// A compiled `aggregate`.
#[derive(Debug)]
pub struct Aggregate {
    params: Option<Template>,
    merge: MergeMode,
    pub calls: Vec<Call>,
    /// The largest answer of one call.
    pub max_answer: u64,
    /// The largest public request body, read when a call's body is built from it.
    pub max_body: u64,
}

#[derive(Debug)]
pub struct Call {
    /// Its place in [`Aggregate::calls`].
    pub index: usize,
    pub name: Arc<str>,
    pub method: http::Method,
    /// Where its JSON body comes from; `None`: it sends none.
    pub body: Option<BodySource>,
    pub service: Arc<String>,
    path: Template,
    /// Earlier calls whose answers the path needs.
    deps: Vec<usize>,
    pub timeout: Option<Duration>,
    pub required: bool,
}

/// What one call ended with: its JSON answer, or why there is none.
pub type Answer = Result<Value, Failure>;

#[derive(Debug, Clone)]
pub struct Failure {
    pub status: StatusCode,
    /// The `trellis-error` cause: the upstream's, or the sidecar's.
    pub cause: &'static str,
    pub message: String,
}

/// The public request's values templates read: path parameters and the query string.
pub struct Inputs<'a> {
    params: Vec<(String, String)>,
    query: Option<&'a str>,
}

// === impl Aggregate ===

impl Aggregate {
    pub fn compile(spec: &AggregateSpec) -> Result<Self, String> {
        let (params, templates) = spec.templates()?;
        let names: Vec<&str> = spec.calls.iter().map(|c| c.name.as_str()).collect();
        let bodies = spec.bodies()?;
        let calls = spec
            .calls
            .iter()
            .zip(templates)
            .zip(bodies)
            .enumerate()
            .map(|(index, ((c, path), body))| {
                let deps = path
                    .calls()
                    .filter_map(|d| names.iter().position(|n| *n == d))
                    .collect();
                Call {
                    index,
                    method: method(c.method),
                    body,
                    name: Arc::from(c.name.as_str()),
                    service: Arc::new(c.service.clone()),
                    path,
                    deps,
                    timeout: c.timeout,
                    required: c.required,
                }
            })
            .collect();
        Ok(Self {
            params,
            merge: spec.merge,
            calls,
            max_answer: spec.max_answer_bytes,
            max_body: spec.max_body_bytes,
        })
    }

    /// Whether a call's body is built from the public request's.
    pub fn reads_body(&self) -> bool {
        self.calls.iter().any(|c| c.body.is_some())
    }

    /// Each call's body (by call index), built from the public request's JSON `body` before
    /// any call leaves: a body that is not JSON, lacks a pointer's value, or that a call's
    /// program fails on answers 400 and no call is made.
    pub async fn call_bodies(&self, body: Bytes) -> Result<Vec<Option<Bytes>>, ComposeError> {
        let value = read_json(&body).map_err(ComposeError::BadRequestBody)?;
        let mut out = Vec::with_capacity(self.calls.len());
        for c in &self.calls {
            let built = match &c.body {
                None => None,
                Some(BodySource::Whole) => Some(body.clone()),
                Some(BodySource::Pointer(p)) => {
                    let v = value
                        .pointer(p)
                        .ok_or_else(|| ComposeError::MissingBodyField {
                            call: c.name.to_string(),
                            pointer: p.clone(),
                        })?;
                    Some(Bytes::from(v.to_string()))
                }
                Some(BodySource::Program(f)) => {
                    let v = super::transform::run(f, body.clone())
                        .await
                        .map_err(ComposeError::BadRequestBody)?;
                    Some(Bytes::from(v))
                }
            };
            out.push(built);
        }
        Ok(out)
    }

    /// The template inputs of a request with this path and query, or why its path does not
    /// fit the aggregate's `params`.
    pub fn inputs<'a>(
        &self,
        path: &'a str,
        query: Option<&'a str>,
    ) -> Result<Inputs<'a>, ComposeError> {
        let Some(template) = &self.params else {
            return Ok(Inputs {
                params: Vec::new(),
                query,
            });
        };
        let mismatch = || ComposeError::PathMismatch(describe(template));
        let mut rest = path;
        let mut params = Vec::new();
        for part in &template.parts {
            match part {
                Part::Literal(l) => rest = rest.strip_prefix(l.as_str()).ok_or_else(mismatch)?,
                Part::Param(name) => {
                    let end = rest.find('/').unwrap_or(rest.len());
                    let value = decode(&rest[..end]).ok_or_else(mismatch)?;
                    if value.is_empty() {
                        return Err(mismatch());
                    }
                    params.push((name.clone(), value));
                    rest = &rest[end..];
                }
                Part::Query(_) | Part::Answer { .. } => return Err(mismatch()),
            }
        }
        if !rest.is_empty() {
            return Err(mismatch());
        }
        Ok(Inputs { params, query })
    }

    /// Run the calls (`call` does one: the call and its path and query), then merge. A
    /// failed required call fails the whole request with its cause; what is still in flight
    /// is dropped (cancelled).
    pub async fn run<'c, F, Fut>(
        &'c self,
        inputs: &Inputs<'_>,
        call: F,
    ) -> Result<Response<ResponseBody>, ComposeError>
    where
        F: Fn(&'c Call, String) -> Fut,
        Fut: Future<Output = Answer>,
    {
        let n = self.calls.len();
        let mut done: Vec<Option<Answer>> = vec![None; n];
        let mut started = vec![false; n];
        let mut running = FuturesUnordered::new();
        loop {
            for i in self.startable(&mut started, &mut done) {
                let c = &self.calls[i];
                match self.render(c, inputs, &done) {
                    Ok(path) => {
                        let fut = call(c, path);
                        running.push(async move { (i, fut.await) });
                    }
                    Err(f) => done[i] = Some(Err(f)),
                }
            }
            if let Some(e) = self.required_failure(&done) {
                return Err(e);
            }
            match running.next().await {
                Some((i, answer)) => done[i] = Some(answer),
                None => break,
            }
        }
        Ok(self.respond(done))
    }

    /// Calls whose dependencies are all done, marked started; a call whose dependency failed
    /// fails too without being sent (and may in turn fail its dependents).
    fn startable(&self, started: &mut [bool], done: &mut [Option<Answer>]) -> Vec<usize> {
        let mut ready = Vec::new();
        loop {
            let mut progress = false;
            for (i, c) in self.calls.iter().enumerate() {
                if started[i] || c.deps.iter().any(|&d| done[d].is_none()) {
                    continue;
                }
                started[i] = true;
                progress = true;
                let failed = c.deps.iter().find(|&&d| matches!(done[d], Some(Err(_))));
                match failed {
                    Some(&d) => {
                        done[i] = Some(Err(Failure {
                            status: StatusCode::FAILED_DEPENDENCY,
                            cause: "aggregate-dependency-failed",
                            message: format!("call `{}` it depends on failed", self.calls[d].name),
                        }))
                    }
                    None => ready.push(i),
                }
            }
            if !progress {
                return ready;
            }
        }
    }

    fn required_failure(&self, done: &[Option<Answer>]) -> Option<ComposeError> {
        self.calls.iter().zip(done).find_map(|(c, d)| match d {
            Some(Err(f)) if c.required => Some(ComposeError::CallFailed {
                call: c.name.to_string(),
                service: c.service.to_string(),
                status: f.status,
                cause: f.cause,
                message: f.message.clone(),
            }),
            _ => None,
        })
    }

    /// A call's path and query, its placeholders filled in (percent-encoded).
    fn render(
        &self,
        c: &Call,
        inputs: &Inputs<'_>,
        done: &[Option<Answer>],
    ) -> Result<String, Failure> {
        let bad = |status: StatusCode, message: String| Failure {
            status,
            cause: "bad-request",
            message,
        };
        let mut out = String::new();
        for part in &c.path.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Param(name) => {
                    let v = inputs
                        .params
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, v)| v);
                    let v = v.ok_or_else(|| {
                        bad(StatusCode::NOT_FOUND, format!("no path parameter `{name}`"))
                    })?;
                    push_value(&mut out, v).map_err(|m| bad(StatusCode::BAD_REQUEST, m))?;
                }
                Part::Query(name) => {
                    let v = query_value(inputs.query, name).ok_or_else(|| {
                        bad(
                            StatusCode::BAD_REQUEST,
                            format!("query parameter `{name}` is missing"),
                        )
                    })?;
                    push_value(&mut out, &v).map_err(|m| bad(StatusCode::BAD_REQUEST, m))?;
                }
                Part::Answer { call, fields } => {
                    let v = self
                        .answer_field(call, fields, done)
                        .ok_or_else(|| Failure {
                            status: StatusCode::BAD_GATEWAY,
                            cause: "aggregate-missing-field",
                            message: format!(
                                "the answer of `{call}` has no string or number at `{}`",
                                fields.join(".")
                            ),
                        })?;
                    push_value(&mut out, &v).map_err(|m| bad(StatusCode::BAD_GATEWAY, m))?;
                }
            }
        }
        Ok(out)
    }

    fn answer_field(
        &self,
        call: &str,
        fields: &[String],
        done: &[Option<Answer>],
    ) -> Option<String> {
        let i = self.calls.iter().position(|c| &*c.name == call)?;
        let mut v = done.get(i)?.as_ref()?.as_ref().ok()?;
        for f in fields {
            v = v.get(f.as_str())?;
        }
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// The merged answer; optional calls that failed are named in `_partial` and the
    /// `trellis-partial` header.
    fn respond(&self, done: Vec<Option<Answer>>) -> Response<ResponseBody> {
        let mut body = Map::new();
        let mut partial = Map::new();
        for (c, d) in self.calls.iter().zip(done) {
            match (d, self.merge) {
                (Some(Ok(Value::Object(fields))), MergeMode::TopLevel) => body.extend(fields),
                (Some(Ok(v)), _) => {
                    body.insert(c.name.to_string(), v);
                }
                (Some(Err(f)), _) => {
                    partial.insert(c.name.to_string(), Value::String(f.cause.to_string()));
                }
                (None, _) => {
                    partial.insert(c.name.to_string(), Value::String("not-run".into()));
                }
            }
        }
        let names: Vec<&str> = partial.keys().map(String::as_str).collect();
        let header = (!names.is_empty()).then(|| names.join(","));
        if !partial.is_empty() {
            body.insert(PARTIAL_FIELD.into(), Value::Object(partial));
        }
        let bytes = Bytes::from(Value::Object(body).to_string());
        let mut resp = Response::new(Either::Right(Full::new(bytes)));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(v) = header.and_then(|v| HeaderValue::from_str(&v).ok()) {
            h.insert(PARTIAL_HEADER, v);
        }
        resp
    }
}

fn method(m: CallMethod) -> http::Method {
    match m {
        CallMethod::Get => http::Method::GET,
        CallMethod::Post => http::Method::POST,
        CallMethod::Put => http::Method::PUT,
        CallMethod::Patch => http::Method::PATCH,
        CallMethod::Delete => http::Method::DELETE,
    }
}

/// The template as written, for error messages.
fn describe(t: &Template) -> String {
    t.parts
        .iter()
        .map(|p| match p {
            Part::Literal(l) => l.clone(),
            Part::Param(n) => format!("{{{n}}}"),
            Part::Query(n) => format!("{{query.{n}}}"),
            Part::Answer { call, fields } => format!("{{{call}.{}}}", fields.join(".")),
        })
        .collect()
}

/// A value substituted into a call's path: percent-encoded (nothing but unreserved
/// characters stays), never a dot segment, so no client value adds a segment, a query
/// parameter, or climbs out of the path the policy wrote.
fn push_value(out: &mut String, v: &str) -> Result<(), String> {
    if v == "." || v == ".." || v.is_empty() {
        return Err(format!("`{v}` cannot be a path value"));
    }
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(())
}

/// The first value of query parameter `name`, percent-decoded (`+` is a space).
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k)? == name).then(|| decode(&v.replace('+', " ")))?
    })
}

/// Percent-decode; `None` for a bad escape or bytes that are not UTF-8.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests;
