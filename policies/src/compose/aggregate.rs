//! `aggregate`: a rule that answers with the merged JSON answers of several mesh calls.

use std::collections::HashSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::jq_bound::{default_steps, Limits};
use super::template::Template;
use super::transform::{BodyProgram, TransformSpec};
use crate::validate::{validate_service_name, MAX_TIMEOUT};

/// Most calls of one aggregate.
pub const MAX_CALLS: usize = 16;
/// Default and largest size of one call's answer, and of the public request's body.
const DEFAULT_MAX_ANSWER: u64 = 1024 * 1024;
const MAX_ANSWER: u64 = 16 * 1024 * 1024;

/// Calls several services (in parallel, or after the calls whose answers their path names) and
/// merges their JSON answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    /// The public path's parameters: `/profile/{id}` names the segment after `/profile/`
    /// `id`. Every `{name}` matches one whole segment; a request whose path does not fit
    /// answers 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<String>,
    /// `named` (each answer under its call's name, the default) or `top_level` (the fields of
    /// the object answers merged into one object, later calls winning).
    #[serde(default)]
    pub merge: MergeMode,
    pub calls: Vec<AggregateCall>,
    /// The largest answer of one call, in bytes (default 1 MiB): a larger one fails the call.
    #[serde(default = "default_max_answer")]
    pub max_answer_bytes: u64,
    /// The largest public request body, in bytes (default 1 MiB), read when a call's `body`
    /// is built from it: a larger one answers 413 before any call is made.
    #[serde(default = "default_max_answer", skip_serializing_if = "is_default_max")]
    pub max_body_bytes: u64,
}

/// An aggregate call's HTTP method. Only `GET`, `DELETE` and the methods that carry a body:
/// `HEAD` has no answer to merge, and the others are not calls an API composes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CallMethod {
    #[default]
    Get,
    Post,
    Put,
    Patch,
    Delete,
}

/// Where a call's JSON body comes from: exactly one of the three, all read from the public
/// request's JSON body.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallBody {
    /// The public body as it is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub whole: bool,
    /// A JSON pointer (RFC 6901) into the public body: the value there (a body without it
    /// answers 400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    /// Field operations and jq over the public body, as a `transform.request` (compiled once
    /// per policy, bounded the same way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<TransformSpec>,
}

/// A compiled [`CallBody`].
#[derive(Debug)]
pub enum BodySource {
    Whole,
    /// The pointer as written (serde_json reads it).
    Pointer(String),
    Program(BodyProgram),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMode {
    #[default]
    Named,
    TopLevel,
}

/// One mesh call of an aggregate: a `GET` of `path` on `service`, with the public request's
/// headers (authorization, trace context).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateCall {
    /// The field its answer is merged under, and its name in the partial marker.
    pub name: String,
    pub service: String,
    /// A path template (see the `template` module): `/users/{id}`, `{query.q}`, `{user.team}`.
    pub path: String,
    /// Time allowed for the whole answer; the service's request timeout when unset.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// A failed required call fails the request; a failed optional one leaves its field out
    /// and marks the answer partial. Required by default.
    #[serde(default = "yes")]
    pub required: bool,
    /// `GET` (the default), `POST`, `PUT`, `PATCH` or `DELETE`. Retried as any mesh call of
    /// that method: `POST` and `PATCH` only when the service's retry policy allows
    /// non-idempotent methods.
    #[serde(default, skip_serializing_if = "is_get")]
    pub method: CallMethod,
    /// The call's JSON body, built from the public request's (not with `GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<CallBody>,
}

fn is_get(m: &CallMethod) -> bool {
    *m == CallMethod::Get
}

fn is_default_max(n: &u64) -> bool {
    *n == DEFAULT_MAX_ANSWER
}

// === impl CallMethod ===

impl CallMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
        }
    }
}

// === impl CallBody ===

impl CallBody {
    /// The source compiled (a transform's program within `limits`); the error names the
    /// field.
    pub fn compile(&self, limits: Limits) -> Result<BodySource, String> {
        let set = [self.whole, self.pointer.is_some(), self.transform.is_some()];
        match set.iter().filter(|s| **s).count() {
            0 => {
                return Err(
                    "names nothing: set one of `whole: true`, `pointer` and `transform`".into(),
                )
            }
            1 => {}
            _ => return Err("set only one of `whole`, `pointer` and `transform`".into()),
        }
        if let Some(p) = &self.pointer {
            if !p.starts_with('/') {
                return Err(format!(
                    "pointer: `{p}` is not a JSON pointer (starts with '/'; `whole: true` is the whole body)"
                ));
            }
            return Ok(BodySource::Pointer(p.clone()));
        }
        match &self.transform {
            Some(t) => Ok(BodySource::Program(
                t.compile(limits).map_err(|m| format!("transform.{m}"))?,
            )),
            None => Ok(BodySource::Whole),
        }
    }
}

/// A call's name is a JSON field and a header list item: short and plain.
fn check_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("`{n}` is not a call name: 1-63 of [A-Za-z0-9_-]"))
    }
}

fn yes() -> bool {
    true
}

fn default_max_answer() -> u64 {
    DEFAULT_MAX_ANSWER
}

// === impl AggregateSpec ===

impl AggregateSpec {
    /// The parsed templates: the public path's (if any) and each call's, in call order.
    pub fn templates(&self) -> Result<(Option<Template>, Vec<Template>), String> {
        let params = self
            .params
            .as_deref()
            .map(|p| Template::parse(p, |_| false))
            .transpose()
            .map_err(|m| format!("params: {m}"))?;
        let mut seen: Vec<&str> = Vec::new();
        let mut calls = Vec::with_capacity(self.calls.len());
        for (i, c) in self.calls.iter().enumerate() {
            let t = Template::parse(&c.path, |name| seen.contains(&name))
                .map_err(|m| format!("calls[{i}].path: {m}"))?;
            calls.push(t);
            seen.push(&c.name);
        }
        Ok((params, calls))
    }

    /// The bounds of a call body's jq run: from `max_body_bytes`, as a transform's.
    pub fn limits(&self) -> Limits {
        Limits::for_body(self.max_body_bytes, default_steps(self.max_body_bytes))
    }

    /// Each call's body source, compiled (`None`: the call sends no body).
    pub fn bodies(&self) -> Result<Vec<Option<BodySource>>, String> {
        self.calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let Some(b) = &c.body else { return Ok(None) };
                if c.method == CallMethod::Get {
                    return Err(format!(
                        "calls[{i}].body: a GET call carries no body (set `method`)"
                    ));
                }
                b.compile(self.limits())
                    .map(Some)
                    .map_err(|m| format!("calls[{i}].body: {m}"))
            })
            .collect()
    }

    /// Check the spec; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.calls.is_empty() || self.calls.len() > MAX_CALLS {
            return Err(format!("calls: write 1 to {MAX_CALLS} calls"));
        }
        for (field, v) in [
            ("max_answer_bytes", self.max_answer_bytes),
            ("max_body_bytes", self.max_body_bytes),
        ] {
            if v == 0 || v > MAX_ANSWER {
                return Err(format!("{field}: between 1 and {MAX_ANSWER}"));
            }
        }
        self.bodies()?;
        let (params, templates) = self.templates()?;
        let declared: HashSet<&str> = params.iter().flat_map(|p| p.params()).collect();
        if let Some(p) = &params {
            let mut once = HashSet::new();
            if let Some(dup) = p.params().find(|n| !once.insert(*n)) {
                return Err(format!("params: `{{{dup}}}` is named twice"));
            }
            let whole_segments = p.parts.windows(2).all(|w| match w {
                [super::Part::Param(_), super::Part::Literal(l)] => l.starts_with('/'),
                [super::Part::Literal(l), super::Part::Param(_)] => l.ends_with('/'),
                _ => false,
            });
            if !whole_segments && p.parts.len() > 1 {
                return Err("params: each `{name}` must be a whole path segment".into());
            }
        }
        let mut names = HashSet::new();
        for (i, (c, t)) in self.calls.iter().zip(&templates).enumerate() {
            let at = format!("calls[{i}]");
            check_name(&c.name).map_err(|m| format!("{at}.name: {m}"))?;
            if !names.insert(c.name.as_str()) || c.name == "_partial" {
                return Err(format!("{at}.name: `{}` is used twice", c.name));
            }
            validate_service_name(&c.service).map_err(|m| format!("{at}.service: {m}"))?;
            if let Some(p) = t.params().find(|p| !declared.contains(p)) {
                return Err(format!(
                    "{at}.path: `{{{p}}}` is not a parameter of `params`"
                ));
            }
            if let Some(t) = c.timeout {
                if t.is_zero() || t > MAX_TIMEOUT {
                    return Err(format!(
                        "{at}.timeout: must be greater than zero and at most {}s",
                        MAX_TIMEOUT.as_secs()
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::HttpRouteSpec;

    fn spec(rule: &str) -> Result<HttpRouteSpec, String> {
        let yaml = format!("hosts: [api.example.com]\ngateways: [edge]\nrules:\n  - {rule}\n");
        let s: HttpRouteSpec = serde_norway::from_str(&yaml).map_err(|e| e.to_string())?;
        s.validate("web")?;
        Ok(s)
    }

    #[test]
    fn a_full_aggregate_validates() {
        let s = spec(
            r#"aggregate:
      params: /profile/{id}
      merge: top_level
      max_answer_bytes: 4096
      calls:
        - {name: user, service: users, path: "/users/{id}", timeout: 200ms}
        - {name: recs, service: recs, path: "/recs/{id}?n={query.n}", required: false}
        - {name: team, service: teams, path: "/teams/{user.team.id}"}"#,
        )
        .unwrap();
        let a = s.rules[0].aggregate.as_ref().unwrap();
        assert_eq!(a.merge, super::MergeMode::TopLevel);
        assert!(a.calls[0].required && !a.calls[1].required);
        let (_, templates) = a.templates().unwrap();
        assert_eq!(templates[2].calls().collect::<Vec<_>>(), vec!["user"]);
    }

    #[test]
    fn calls_with_methods_and_bodies_validate() {
        let s = spec(
            r#"aggregate:
      max_body_bytes: 2048
      calls:
        - {name: a, service: a, path: /a, method: POST, body: {pointer: /order}}
        - {name: b, service: b, path: /b, method: PUT, body: {whole: true}}
        - {name: c, service: c, path: /c, method: PATCH, body: {transform: {jq: '{id: .id}'}}}
        - {name: d, service: d, path: /d, method: DELETE}"#,
        )
        .unwrap();
        let a = s.rules[0].aggregate.as_ref().unwrap();
        let bodies = a.bodies().unwrap();
        assert!(matches!(&bodies[0], Some(super::BodySource::Pointer(p)) if p == "/order"));
        assert!(matches!(bodies[1], Some(super::BodySource::Whole)));
        let Some(super::BodySource::Program(p)) = &bodies[2] else {
            panic!("a program")
        };
        assert_eq!(p.apply(br#"{"id": 3, "x": 1}"#).unwrap(), br#"{"id":3}"#);
        assert!(bodies[3].is_none());
        assert_eq!(a.calls[3].method.as_str(), "DELETE");
        // Defaults are not written back (a stored policy reads the same).
        let json = serde_json::to_value(a).unwrap();
        assert!(json["calls"][3].get("body").is_none());
        assert_eq!(json["max_body_bytes"], 2048);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("aggregate: {calls: []}", "rules[0].aggregate.calls: write 1 to"),
            (
                "{backends: [{service: a}], aggregate: {calls: [{name: a, service: a, path: /}]}}",
                "set exactly one of `backends`, `redirect`, `direct_response` and `aggregate`",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: '/u/{id}'}]}",
                "rules[0].aggregate.calls[0].path: `{id}` is not a parameter of `params`",
            ),
            (
                "aggregate: {params: '/p/{id}', calls: [{name: a, service: a, path: '/t/{b.x}'}, {name: b, service: b, path: /}]}",
                "rules[0].aggregate.calls[0].path: `{b.x}`: `b` is not the name of an earlier call",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /}, {name: a, service: b, path: /}]}",
                "calls[1].name: `a` is used twice",
            ),
            (
                "aggregate: {calls: [{name: 'a b', service: a, path: /}]}",
                "calls[0].name",
            ),
            (
                "aggregate: {calls: [{name: a, service: A, path: /}]}",
                "calls[0].service",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, timeout: 0s}]}",
                "calls[0].timeout",
            ),
            (
                "aggregate: {params: '/p/{id}{x}', calls: [{name: a, service: a, path: /}]}",
                "params: each `{name}` must be a whole path segment",
            ),
            (
                "aggregate: {params: '/p/{id}/{id}', calls: [{name: a, service: a, path: /}]}",
                "params: `{id}` is named twice",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /}], max_answer_bytes: 0}",
                "max_answer_bytes",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /}], max_body_bytes: 0}",
                "max_body_bytes: between 1 and",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, body: {whole: true}}]}",
                "rules[0].aggregate.calls[0].body: a GET call carries no body",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: POST, body: {}}]}",
                "rules[0].aggregate.calls[0].body: names nothing",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: POST, body: {whole: false}}]}",
                "calls[0].body: names nothing",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: PUT, body: {whole: true, pointer: /a}}]}",
                "calls[0].body: set only one of",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: PUT, body: {pointer: a}}]}",
                "calls[0].body: pointer: `a` is not a JSON pointer",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: PATCH, body: {transform: {jq: '.a |'}}}]}",
                "calls[0].body: transform.jq: `.a |` does not parse",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: POST, body: {transform: {remove: [x]}}}]}",
                "calls[0].body: transform.remove[0]",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: HEAD}]}",
                "unknown variant `HEAD`",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, method: POST, body: {nope: 1}}]}",
                "unknown field `nope`",
            ),
            (
                "aggregate: {calls: [{name: a, service: a, path: /, retries: 3}]}",
                "unknown field `retries`",
            ),
            (
                "{direct_response: {status: 200}, transform: {response: {jq: .}}}",
                "rules[0].transform: only applies to a rule with `backends`",
            ),
            (
                "{backends: [{service: a}], transform: {response: {jq: '.a |'}}}",
                "rules[0].transform.response.jq: `.a |` does not parse",
            ),
        ];
        for (rule, want) in cases {
            let e = spec(rule).unwrap_err();
            assert!(e.contains(want), "{rule}\n  -> {e}\n  wanted {want}");
        }
        // An aggregate is the edge's: a route bound to the mesh cannot have one.
        let yaml = "hosts: [a]\nrules: [{aggregate: {calls: [{name: a, service: a, path: /}]}}]";
        let s: HttpRouteSpec = serde_norway::from_str(yaml).unwrap();
        let e = s.validate("web").unwrap_err();
        assert!(
            e.contains("rules[0].aggregate: only at an ingress gateway"),
            "{e}"
        );
    }
}
