//! `HTTPRoute`: Gateway-API-like request routing, applied by the caller's sidecar (and later by
//! an ingress listener) to requests for the policy's `hosts`.
//!
//! A rule matches requests (path, method, headers, query) and says what to do with them: route
//! to weighted backend services, rewrite, modify headers, redirect, answer directly, inject
//! faults, mirror. Matches of every HTTPRoute of a host are ranked by one precedence order
//! (see [`HttpRouteMatch::precedence`]), so the result does not depend on how routes are split
//! into policies.
//!
//! Everything an operator may write is bounded here (rules, matches, regex size, body size), so
//! a sidecar never compiles or stores an unbounded table; the proxy compiles regexes with
//! [`compile_regex`], the same function validation uses, so a policy that validates compiles.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::{validate_host, validate_service_name, MAX_TIMEOUT, MAX_WEIGHT};

/// Most hosts one policy may name.
pub const MAX_HOSTS: usize = 64;
/// Most rules in one policy.
pub const MAX_RULES: usize = 128;
/// Most matches in one rule, and header or query conditions in one match.
pub const MAX_MATCHES: usize = 16;
pub const MAX_CONDITIONS: usize = 16;
/// Most backends of one rule.
pub const MAX_BACKENDS: usize = 16;
/// Longest regex pattern, and the most memory its compiled program may take.
pub const MAX_REGEX_LEN: usize = 1024;
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Largest direct response body.
pub const MAX_BODY: usize = 64 * 1024;

/// The spec of an `HTTPRoute` policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// `Host` values (without port) the rules apply to: mesh service names, or host names an
    /// ingress serves.
    pub hosts: Vec<String>,
    /// Where the route applies, as Istio's `VirtualService.gateways`: [`MESH`] for the
    /// outbound side of every sidecar, and the service names of ingress gateways
    /// (`mesh-agent run --mode ingress`) that expose it. `[mesh]` when omitted, so a route
    /// reaches the edge only when it names the gateway: an ingress never exposes what no
    /// route bound to it names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    pub rules: Vec<HttpRouteRule>,
}

/// The reserved `gateways` entry for the sidecars' outbound side.
pub const MESH: &str = "mesh";

/// One rule: where matching requests go and what happens to them on the way.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRouteRule {
    /// The `route` label of metrics and access logs; `<policy>-<index>` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one of them matching is enough; no matches matches every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    /// Services to send the request to, chosen by weight per request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
    /// Answer with the merged JSON answers of several mesh calls (ingress only; see
    /// [`crate::compose`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate: Option<crate::compose::AggregateSpec>,
    /// JSON body transforms of a forwarding rule (see [`crate::compose`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<crate::compose::BodyTransform>,
    /// The rule's backend is a gRPC service, also offered as REST/JSON from its descriptor set
    /// and `google.api.http` annotations (ingress only; see [`crate::compose`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_transcode: Option<crate::compose::GrpcTranscode>,
    /// Time allowed for the response headers; overrides the backend service's request timeout.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    /// Requests checked against a stored OpenAPI document at the ingress (docs/api-validation.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<crate::api_validation::RouteValidation>,
}

/// All the conditions of one match must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// Every path when unset (as `prefix: /`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    /// An upper-case method name; any method when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameters, compared as sent (not percent-decoded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// Exactly one of the three. A prefix matches whole segments (`/api` matches `/api` and
/// `/api/x`, not `/apix`); a regex must match the whole path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// A header (name case-insensitive, written lower-case) or query parameter (name
/// case-sensitive) condition: exactly one of `exact`, `regex` (whole value) and `present: true`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub present: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    /// A mesh service; a service the mesh does not know answers 503 `unknown-service`.
    pub service: String,
    /// Relative weight (0..=10000; 0 sends nothing, e.g. a canary switched off).
    #[serde(default = "one")]
    pub weight: u32,
}

/// Header changes: `set` replaces, `add` appends, `remove` deletes (names lower-case).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// What the backend sees instead of what the app sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    /// Replace the whole path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Replace the prefix the rule matched (every match of the rule must be a prefix match).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The `Host` the backend sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Answer with a redirect; unset parts keep the request's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Replaces the whole path (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// 301, 302 (default), 307 or 308.
    #[serde(default = "d_redirect_status")]
    pub status: u16,
}

/// Answer with a fixed status and body; the request goes nowhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
}

/// Fault injection, to test callers' resilience: each applies to `percent` of the requests,
/// drawn independently.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    pub percent: f64,
}

/// Answered by the sidecar with `status` and `trellis-error: fault-abort`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub status: u16,
    pub percent: f64,
}

/// A fire-and-forget copy of `percent` of the requests to `service`; its response is dropped.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    pub service: String,
    #[serde(default = "d_percent")]
    pub percent: f64,
}

fn one() -> u32 {
    1
}
fn d_redirect_status() -> u16 {
    302
}
fn d_percent() -> f64 {
    100.0
}

/// Compile a path, header or query regex the way the data plane uses it: anchored (the whole
/// value must match) and with a bounded program size, so a policy cannot make a sidecar build a
/// huge automaton.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(format!("longer than {MAX_REGEX_LEN} bytes"));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("`{pattern}` is not a valid regex: {e}"))
}

/// Header names a route may neither match nor change: connection-level, framing, and the
/// sidecars' own headers (an app must not forge them through a policy either).
fn is_reserved_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "connection"
            | "content-length"
            | "transfer-encoding"
            | "te"
            | "upgrade"
            | "keep-alive"
            | "proxy-connection"
    ) || name.starts_with("trellis-")
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

fn is_header_value(v: &str) -> bool {
    v.len() <= 8 * 1024 && v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

fn check_path(what: &str, p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.contains(|c: char| c.is_whitespace() || c.is_control() || c == '?')
    {
        return Err(format!(
            "{what}: `{p}` must start with '/' and contain no spaces or '?'"
        ));
    }
    Ok(())
}

fn check_percent(what: &str, p: f64) -> Result<(), String> {
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{what}: must be between 0 and 100, got {p}"));
    }
    Ok(())
}

/// Rule names become label values: short, lower-case, no surprises in PromQL.
pub(crate) fn check_rule_name(n: &str) -> Result<(), String> {
    let ok = !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok && n != "default" {
        Ok(())
    } else {
        Err(format!(
            "`{n}` is not a valid rule name: 1-63 of [a-z0-9-_.], not `default`"
        ))
    }
}

// === impl HttpRouteSpec ===

impl HttpRouteSpec {
    /// Whether the route applies at `gateway`: [`MESH`] for sidecars' outbound side, or an
    /// ingress gateway's service name. Omitted `gateways` means `[mesh]` only.
    pub fn binds(&self, gateway: &str) -> bool {
        if self.gateways.is_empty() {
            return gateway == MESH;
        }
        self.gateways.iter().any(|g| g == gateway)
    }

    /// The name rule `index` of policy `policy` reports as.
    pub fn rule_name(&self, policy: &str, index: usize) -> String {
        match self.rules.get(index).and_then(|r| r.name.as_ref()) {
            Some(n) => n.clone(),
            None => format!("{policy}-{index}"),
        }
    }

    /// Check the spec; the error names the field (`rules[1].matches[0].path.regex: ...`).
    pub fn validate(&self, policy: &str) -> Result<(), String> {
        if self.hosts.is_empty() || self.hosts.len() > MAX_HOSTS {
            return Err(format!("hosts: name 1 to {MAX_HOSTS} hosts"));
        }
        let mut seen = HashSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            // `*.example.com`: any host under example.com (not example.com itself).
            let bare = h.strip_prefix("*.").unwrap_or(h);
            validate_service_name(bare).map_err(|m| format!("hosts[{i}]: {m}"))?;
            if !seen.insert(h) {
                return Err(format!("hosts[{i}]: `{h}` is listed twice"));
            }
        }
        let mut gateways = HashSet::new();
        for (i, g) in self.gateways.iter().enumerate() {
            if g != MESH {
                validate_service_name(g).map_err(|m| format!("gateways[{i}]: {m}"))?;
            }
            if !gateways.insert(g) {
                return Err(format!("gateways[{i}]: `{g}` is listed twice"));
            }
        }
        if self.rules.is_empty() || self.rules.len() > MAX_RULES {
            return Err(format!("rules: write 1 to {MAX_RULES} rules"));
        }
        let mut names = HashSet::new();
        for (i, r) in self.rules.iter().enumerate() {
            for (field, set) in [
                ("aggregate", r.aggregate.is_some()),
                ("grpc_transcode", r.grpc_transcode.is_some()),
            ] {
                if set && self.binds(MESH) {
                    return Err(format!(
                        "rules[{i}].{field}: only at an ingress gateway (list it in `gateways`, without `{MESH}`)"
                    ));
                }
            }
            r.validate().map_err(|m| format!("rules[{i}].{m}"))?;
            if let Some(v) = &r.validation {
                v.validate().map_err(|m| format!("rules[{i}].{m}"))?;
                if self.gateways.iter().all(|g| g == MESH) {
                    return Err(format!("rules[{i}].validation: applies at an ingress gateway; the route binds none (add it to `gateways`)"));
                }
            }
            let name = self.rule_name(policy, i);
            if r.name.is_some() {
                check_rule_name(&name).map_err(|m| format!("rules[{i}].name: {m}"))?;
            }
            if !names.insert(name.clone()) {
                return Err(format!("rules[{i}].name: `{name}` is used twice"));
            }
        }
        Ok(())
    }
}

// === impl HttpRouteRule ===

impl HttpRouteRule {
    fn validate(&self) -> Result<(), String> {
        if self.matches.len() > MAX_MATCHES {
            return Err(format!("matches: at most {MAX_MATCHES}"));
        }
        for (i, m) in self.matches.iter().enumerate() {
            m.validate().map_err(|e| format!("matches[{i}].{e}"))?;
        }
        let forwards = !self.backends.is_empty();
        let actions = [
            forwards,
            self.redirect.is_some(),
            self.direct_response.is_some(),
            self.aggregate.is_some(),
        ];
        if actions.iter().filter(|a| **a).count() != 1 {
            return Err(
                "backends: set exactly one of `backends`, `redirect`, `direct_response` and `aggregate`".into(),
            );
        }
        if let Some(a) = &self.aggregate {
            a.validate().map_err(|m| format!("aggregate.{m}"))?;
        }
        if let Some(t) = &self.transform {
            if !forwards {
                return Err("transform: only applies to a rule with `backends`".into());
            }
            t.validate().map_err(|m| format!("transform.{m}"))?;
        }
        if let Some(t) = &self.grpc_transcode {
            if !forwards || self.transform.is_some() || self.rewrite.is_some() {
                return Err("grpc_transcode: only applies to a rule with `backends`, without `transform` or `rewrite` (the path is matched as the client sent it)".into());
            }
            t.validate().map_err(|m| format!("grpc_transcode.{m}"))?;
        }
        if !forwards {
            for (field, set) in [
                ("rewrite", self.rewrite.is_some()),
                ("mirror", self.mirror.is_some()),
                ("timeout", self.timeout.is_some()),
                ("request_headers", self.request_headers.is_some()),
                ("validation", self.validation.is_some()),
            ] {
                if set {
                    return Err(format!(
                        "{field}: only applies to a rule with `backends` (not with a redirect or direct response)"
                    ));
                }
            }
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(format!("backends: at most {MAX_BACKENDS}"));
        }
        for (i, b) in self.backends.iter().enumerate() {
            validate_service_name(&b.service).map_err(|m| format!("backends[{i}].service: {m}"))?;
            if b.weight > MAX_WEIGHT {
                return Err(format!(
                    "backends[{i}].weight: must be at most {MAX_WEIGHT}"
                ));
            }
        }
        if forwards && self.backends.iter().all(|b| b.weight == 0) {
            return Err("backends: at least one backend needs a weight above 0".into());
        }
        if let Some(h) = &self.request_headers {
            h.validate().map_err(|m| format!("request_headers.{m}"))?;
        }
        if let Some(h) = &self.response_headers {
            h.validate().map_err(|m| format!("response_headers.{m}"))?;
        }
        if let Some(rw) = &self.rewrite {
            if rw.path.is_some() && rw.path_prefix.is_some() {
                return Err("rewrite: set at most one of `path` and `path_prefix`".into());
            }
            if let Some(p) = &rw.path {
                check_path("rewrite.path", p)?;
            }
            if let Some(p) = &rw.path_prefix {
                check_path("rewrite.path_prefix", p)?;
                let all_prefix = !self.matches.is_empty()
                    && self
                        .matches
                        .iter()
                        .all(|m| m.path.as_ref().is_some_and(|p| p.prefix.is_some()));
                if !all_prefix {
                    return Err(
                        "rewrite.path_prefix: every match of the rule must be a `path.prefix` match"
                            .into(),
                    );
                }
            }
            if let Some(h) = &rw.host {
                check_authority(h).map_err(|m| format!("rewrite.host: {m}"))?;
            }
        }
        if let Some(r) = &self.redirect {
            if let Some(s) = &r.scheme {
                if s != "http" && s != "https" {
                    return Err(format!(
                        "redirect.scheme: `{s}` is neither `http` nor `https`"
                    ));
                }
            }
            if let Some(h) = &r.host {
                validate_host(h).map_err(|m| format!("redirect.host: {m}"))?;
            }
            if r.port == Some(0) {
                return Err("redirect.port: port 0 is not routable".into());
            }
            if let Some(p) = &r.path {
                check_path("redirect.path", p)?;
            }
            if ![301, 302, 307, 308].contains(&r.status) {
                return Err(format!(
                    "redirect.status: {} is not one of 301, 302, 307, 308",
                    r.status
                ));
            }
        }
        if let Some(d) = &self.direct_response {
            if !(200..=599).contains(&d.status) {
                return Err(format!(
                    "direct_response.status: {} is not between 200 and 599",
                    d.status
                ));
            }
            if d.body.len() > MAX_BODY {
                return Err(format!("direct_response.body: at most {MAX_BODY} bytes"));
            }
        }
        if let Some(f) = &self.fault {
            if f.delay.is_none() && f.abort.is_none() {
                return Err("fault: set `delay`, `abort` or both".into());
            }
            if let Some(d) = &f.delay {
                check_percent("fault.delay.percent", d.percent)?;
                if d.duration.is_zero() || d.duration > MAX_TIMEOUT {
                    return Err(format!(
                        "fault.delay.duration: must be between 1ms and {}s",
                        MAX_TIMEOUT.as_secs()
                    ));
                }
            }
            if let Some(a) = &f.abort {
                check_percent("fault.abort.percent", a.percent)?;
                if !(200..=599).contains(&a.status) {
                    return Err(format!(
                        "fault.abort.status: {} is not between 200 and 599",
                        a.status
                    ));
                }
            }
        }
        if let Some(m) = &self.mirror {
            validate_service_name(&m.service).map_err(|e| format!("mirror.service: {e}"))?;
            check_percent("mirror.percent", m.percent)?;
        }
        if let Some(t) = self.timeout {
            if t.is_zero() || t > MAX_TIMEOUT {
                return Err(format!(
                    "timeout: must be greater than zero and at most {}s",
                    MAX_TIMEOUT.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// `host` or `host:port`.
fn check_authority(a: &str) -> Result<(), String> {
    match a.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') => {
            port.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("`{port}` is not a port"))?;
            validate_host(h)
        }
        _ => validate_host(a),
    }
}

// === impl HttpRouteMatch ===

impl HttpRouteMatch {
    fn validate(&self) -> Result<(), String> {
        if let Some(p) = &self.path {
            match (&p.exact, &p.prefix, &p.regex) {
                (Some(v), None, None) => check_path("path.exact", v)?,
                (None, Some(v), None) => check_path("path.prefix", v)?,
                (None, None, Some(v)) => {
                    compile_regex(v).map_err(|m| format!("path.regex: {m}"))?;
                }
                _ => {
                    return Err("path: set exactly one of `exact`, `prefix` and `regex`".into());
                }
            }
        }
        if let Some(m) = &self.method {
            if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("method: `{m}` is not an upper-case method name"));
            }
        }
        for (field, list, header) in [
            ("headers", &self.headers, true),
            ("query", &self.query, false),
        ] {
            if list.len() > MAX_CONDITIONS {
                return Err(format!("{field}: at most {MAX_CONDITIONS}"));
            }
            for (i, v) in list.iter().enumerate() {
                let at = format!("{field}[{i}]");
                if header {
                    if !is_header_name(&v.name) {
                        return Err(format!(
                            "{at}.name: `{}` is not a lower-case header name",
                            v.name
                        ));
                    }
                } else if v.name.is_empty()
                    || v.name.len() > 256
                    || v.name.contains(['&', '=', '#', ' '])
                {
                    return Err(format!(
                        "{at}.name: `{}` is not a query parameter name",
                        v.name
                    ));
                }
                match (&v.exact, &v.regex, v.present) {
                    (Some(_), None, false) | (None, None, true) => {}
                    (None, Some(r), false) => {
                        compile_regex(r).map_err(|m| format!("{at}.regex: {m}"))?;
                    }
                    _ => {
                        return Err(format!(
                            "{at}: set exactly one of `exact`, `regex` and `present: true`"
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

// === impl HeaderModifier ===

impl HeaderModifier {
    fn validate(&self) -> Result<(), String> {
        let names = self
            .set
            .iter()
            .map(|(k, v)| ("set", k, Some(v)))
            .chain(self.add.iter().map(|(k, v)| ("add", k, Some(v))))
            .chain(self.remove.iter().map(|k| ("remove", k, None)));
        for (field, name, value) in names {
            if !is_header_name(name) {
                return Err(format!("{field}: `{name}` is not a lower-case header name"));
            }
            if is_reserved_header(name) {
                return Err(format!(
                    "{field}: `{name}` cannot be changed by a route (use rewrite.host for the host)"
                ));
            }
            if value.is_some_and(|v| !is_header_value(v)) {
                return Err(format!(
                    "{field}.{name}: the value must be visible ASCII, at most 8 KiB"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<HttpRouteSpec, String> {
        let s: HttpRouteSpec = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        s.validate("web")?;
        Ok(s)
    }

    #[test]
    fn full_spec_parses_and_names_rules() {
        let s = spec(
            r#"
hosts: [orders, shop.example.com]
rules:
  - name: v2
    matches:
      - path: {prefix: /api/v2}
        method: GET
        headers: [{name: x-canary, present: true}]
        query: [{name: debug, exact: "1"}]
    backends: [{service: orders-v2, weight: 90}, {service: orders}]
    rewrite: {path_prefix: /api, host: orders.internal}
    request_headers: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
    response_headers: {set: {x-served-by: v2}}
    fault: {delay: {duration: 5ms, percent: 10}, abort: {status: 503, percent: 1.5}}
    mirror: {service: shadow, percent: 50}
    timeout: 2s
  - matches: [{path: {regex: "/users/[0-9]+"}}]
    redirect: {scheme: https, host: example.com, port: 8443, path: /u, status: 301}
  - direct_response: {status: 404, body: nothing here}
"#,
        )
        .unwrap();
        assert_eq!(s.rule_name("web", 0), "v2");
        assert_eq!(s.rule_name("web", 1), "web-1");
        assert_eq!(s.rules[0].backends[1].weight, 1);
        assert_eq!(s.rules[0].timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("hosts: []\nrules: [{backends: [{service: a}]}]", "hosts:"),
            ("hosts: [Bad]\nrules: [{backends: [{service: a}]}]", "hosts[0]:"),
            ("hosts: [a, a]\nrules: [{backends: [{service: a}]}]", "listed twice"),
            ("hosts: [a]\nrules: []", "rules:"),
            ("hosts: [a]\nrules: [{}]", "rules[0].backends: set exactly one"),
            (
                "hosts: [a]\nrules: [{backends: [{service: a}], direct_response: {status: 200}}]",
                "rules[0].backends: set exactly one",
            ),
            (
                "hosts: [a]\nrules: [{redirect: {}, mirror: {service: b}}]",
                "rules[0].mirror: only applies",
            ),
            (
                "hosts: [a]\nrules: [{backends: [{service: a, weight: 0}]}]",
                "weight above 0",
            ),
            (
                "hosts: [a]\nrules: [{matches: [{path: {regex: '(a'}}], backends: [{service: a}]}]",
                "rules[0].matches[0].path.regex: `(a` is not a valid regex",
            ),
            (
                "hosts: [a]\nrules: [{matches: [{path: {exact: /a, prefix: /b}}], backends: [{service: a}]}]",
                "rules[0].matches[0].path: set exactly one",
            ),
            (
                "hosts: [a]\nrules: [{matches: [{method: get}], backends: [{service: a}]}]",
                "rules[0].matches[0].method",
            ),
            (
                "hosts: [a]\nrules: [{matches: [{headers: [{name: X-Up, exact: a}]}], backends: [{service: a}]}]",
                "rules[0].matches[0].headers[0].name",
            ),
            (
                "hosts: [a]\nrules: [{matches: [{query: [{name: q, exact: a, present: true}]}], backends: [{service: a}]}]",
                "rules[0].matches[0].query[0]: set exactly one",
            ),
            (
                "hosts: [a]\nrules: [{backends: [{service: a}], rewrite: {path_prefix: /x}}]",
                "rules[0].rewrite.path_prefix: every match",
            ),
            (
                "hosts: [a]\nrules: [{backends: [{service: a}], request_headers: {set: {host: x}}}]",
                "rules[0].request_headers.set: `host` cannot",
            ),
            (
                "hosts: [a]\nrules: [{backends: [{service: a}], request_headers: {add: {trellis-peer-identity: x}}}]",
                "cannot be changed",
            ),
            (
                "hosts: [a]\nrules: [{redirect: {status: 303}}]",
                "rules[0].redirect.status",
            ),
            (
                "hosts: [a]\nrules: [{redirect: {scheme: ftp}}]",
                "rules[0].redirect.scheme",
            ),
            (
                "hosts: [a]\nrules: [{direct_response: {status: 99}}]",
                "rules[0].direct_response.status",
            ),
            (
                "hosts: [a]\nrules: [{backends: [{service: a}], fault: {abort: {status: 503, percent: 101}}}]",
                "rules[0].fault.abort.percent",
            ),
            (
                "hosts: [a]\nrules: [{backends: [{service: a}], fault: {}}]",
                "rules[0].fault:",
            ),
            (
                "hosts: [a]\nrules: [{backends: [{service: a}], timeout: 0s}]",
                "rules[0].timeout",
            ),
            (
                "hosts: [a]\nrules: [{name: x, backends: [{service: a}]}, {name: x, direct_response: {status: 200}}]",
                "rules[1].name: `x` is used twice",
            ),
            (
                "hosts: [a]\nrules: [{name: Big, backends: [{service: a}]}]",
                "rules[0].name",
            ),
            ("hosts: [a]\nrules: [{backend: []}]", "unknown field `backend`"),
        ];
        for (yaml, want) in cases {
            let e = spec(yaml).unwrap_err();
            assert!(e.contains(want), "{yaml}\n  -> {e}\n  wanted {want}");
        }
    }

    #[test]
    fn mesh_files_and_documents_name_the_route_field() {
        let e = crate::parse_mesh_yaml(
            "http_routes:\n  web:\n    hosts: [a]\n    rules: [{redirect: {status: 303}}]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("http_routes.web.rules[0].redirect.status: 303 is not one of"),
            "{e}"
        );
        let doc = crate::parse_documents(
            "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec: {hosts: [a], rules: [{backends: [{service: B}]}]}\n",
            "t",
        )
        .remove(0)
        .unwrap();
        let e = doc.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("HTTPRoute/web: spec.rules[0].backends[0].service:"),
            "{e}"
        );
    }

    #[test]
    fn regexes_are_anchored_and_bounded() {
        let r = compile_regex("/a/[0-9]+").unwrap();
        assert!(r.is_match("/a/12"));
        assert!(!r.is_match("/a/12/x"));
        assert!(!r.is_match("/x/a/12"));
        assert!(compile_regex(&"a".repeat(MAX_REGEX_LEN + 1)).is_err());
        // A pattern whose program exceeds the size limit is refused, not compiled.
        let e = compile_regex(r"\w{500}\w{500}").unwrap_err();
        assert!(e.contains("not a valid regex"), "{e}");
    }
}
