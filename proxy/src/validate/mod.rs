//! OpenAPI validation at the ingress, per HTTPRoute rule and opt-in (`rules[].validation`,
//! docs/api-validation.md).
//!
//! The agent compiles the stored documents the gateway's routes name ([`CompiledSpec`], once
//! per content hash) and publishes them whole ([`ValidatorSet`] in an `ArcSwap`); a request
//! only looks its document up. A matched rule with validation checks the request after the
//! rule's rewrite (the path the backend, and so the document, knows) and before it is mirrored
//! or forwarded:
//!
//! - the operation is found by path template and method (404 / 405 otherwise);
//! - its parameters, then its body: content type (415), presence, and a JSON body read up to the
//!   rule's bound (413) and checked against its schema (400 naming line and column when it
//!   does not parse, each failing field by JSON pointer when it does not match);
//! - a valid body goes on as read ([`crate::http::read_ahead::ReadAhead`]).
//!
//! A refusal is `application/problem+json` and counted by route and reason. Responses are
//! checked in audit mode only ([`audit`]). The request path compiles nothing.

pub mod audit;
mod body;
pub mod compile;
mod dialect;
mod fast;
mod formats;
pub mod metrics;
mod paths;
pub mod problem;
mod request;
pub mod tape;
#[cfg(test)]
mod tests;
mod views;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{header, Request, StatusCode};
use hyper::body::{Body as _, Incoming};
use trellis_policies::{ApiRef, RequestMode, ResponseMode, RouteValidation};

pub use compile::{CompileError, CompiledSpec};
pub use metrics::ValidationMetrics;

use audit::Audit;
use problem::Problem;
use request::BodyPlan;

/// The compiled documents the gateway's routes name, by service and version.
#[derive(Default)]
pub struct ValidatorSet {
    specs: HashMap<ApiRef, Arc<CompiledSpec>>,
}

/// Replaced whole by the agent, read by every validated request.
pub type ApiValidators = Arc<ArcSwap<ValidatorSet>>;

/// What the ingress validates with: the published documents and the metrics.
pub struct EdgeValidation {
    pub validators: ApiValidators,
    pub metrics: Arc<ValidationMetrics>,
}

/// A rule's `validation`, as the data plane applies it.
#[derive(Debug)]
pub struct RuleValidation {
    pub api: ApiRef,
    pub enforce: bool,
    pub audit: bool,
    pub max_body: u64,
}

// === impl ValidatorSet ===

impl ValidatorSet {
    pub fn new(specs: HashMap<ApiRef, Arc<CompiledSpec>>) -> Self {
        Self { specs }
    }

    pub fn get(&self, api: &ApiRef) -> Option<&Arc<CompiledSpec>> {
        self.specs.get(api)
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }
}

// === impl RuleValidation ===

impl RuleValidation {
    pub fn new(v: &RouteValidation) -> Self {
        Self {
            api: v.spec.clone(),
            enforce: v.request == RequestMode::Enforce,
            audit: v.response == ResponseMode::Audit,
            max_body: v.max_body_bytes,
        }
    }
}

// === impl EdgeValidation ===

impl EdgeValidation {
    pub fn new(registry: &mut prometheus_client::registry::Registry) -> Self {
        Self {
            validators: Arc::default(),
            metrics: Arc::new(ValidationMetrics::register(registry)),
        }
    }

    /// Check `req` for `rule` (the route `route`): `Err` is the answer to send instead of
    /// forwarding; `Ok` carries the response's audit when the rule asks for one. A body read
    /// to be checked is left in the request's extensions.
    pub async fn check(
        &self,
        rule: &RuleValidation,
        route: &Arc<String>,
        req: &mut Request<Incoming>,
        body_timeout: Duration,
    ) -> Result<Option<Audit>, Box<http::Response<crate::ResponseBody>>> {
        let set = self.validators.load();
        let Some(spec) = set.get(&rule.api) else {
            if !rule.enforce {
                return Ok(None);
            }
            let p = Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "spec_unavailable",
                "The API's description is not loaded",
            )
            .detail(format!(
                "the OpenAPI document of {} has not been compiled by this gateway (yet)",
                rule.api
            ));
            return Err(self.refuse(route, p));
        };
        let spec = spec.clone();
        drop(set);
        if is_preflight(req) {
            return Ok(None);
        }
        let (method, uri) = (req.method(), req.uri());
        let op = match spec.operation(method, uri.path()) {
            Ok((op, captures)) => {
                if rule.enforce {
                    check_params(op, &captures, uri.query(), req.headers())
                        .map_err(|p| self.refuse(route, p))?;
                }
                op.clone()
            }
            Err(_) if !rule.enforce => return Ok(None),
            Err(path_known) => {
                let p = unknown(&spec, method, uri.path(), path_known);
                return Err(self.refuse(route, p));
            }
        };
        if rule.enforce {
            self.check_body(&op, rule, req, body_timeout)
                .await
                .map_err(|p| self.refuse(route, p))?;
        }
        Ok(rule.audit.then(|| Audit {
            op,
            route: route.clone(),
            metrics: self.metrics.clone(),
            limit: usize::try_from(rule.max_body).unwrap_or(usize::MAX),
        }))
    }

    async fn check_body(
        &self,
        op: &compile::Operation,
        rule: &RuleValidation,
        req: &mut Request<Incoming>,
        timeout: Duration,
    ) -> Result<(), Problem> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let empty = req.body().is_end_stream() || declared == Some(0);
        let BodyPlan::Json(validator) = request::plan_body(op.body.as_ref(), req.headers(), empty)?
        else {
            return Ok(());
        };
        let bytes = body::read(req.body_mut(), declared, rule.max_body, timeout).await?;
        request::check_json(validator, &bytes)?;
        req.extensions_mut()
            .insert(crate::http::read_ahead::ReadAhead(bytes));
        Ok(())
    }

    fn refuse(&self, route: &Arc<String>, p: Problem) -> Box<http::Response<crate::ResponseBody>> {
        self.metrics.refused(route, p.reason);
        tracing::debug!(%route, reason = p.reason, detail = %p.detail, "request refused by validation");
        Box::new(p.response())
    }
}

/// A CORS preflight (`OPTIONS` with `Access-Control-Request-Method`) is the browser asking
/// whether it may send the request, not a call of the API: it is not checked.
fn is_preflight<B>(req: &Request<B>) -> bool {
    req.method() == http::Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The checks of a request whose body is already in memory, in the order
/// [`EdgeValidation::check`] runs them (which reads the body, bounded, between the parameters
/// and the schema): for the tests and the benchmark (`proxy/benches/validation.rs`).
pub fn check_request(
    spec: &CompiledSpec,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
    body: &[u8],
) -> Result<(), Problem> {
    let (op, captures) = spec
        .operation(method, uri.path())
        .map_err(|known| unknown(spec, method, uri.path(), known))?;
    check_params(op, &captures, uri.query(), headers)?;
    match request::plan_body(op.body.as_ref(), headers, body.is_empty())? {
        BodyPlan::Pass => Ok(()),
        BodyPlan::Json(validator) => request::check_json(validator, body),
    }
}

fn check_params(
    op: &compile::Operation,
    captures: &paths::Captures<'_>,
    query: Option<&str>,
    headers: &http::HeaderMap,
) -> Result<(), Problem> {
    let errors = request::check_params(op, captures, query, headers);
    match errors.is_empty() {
        true => Ok(()),
        false => Err(Problem::invalid(errors)),
    }
}

/// 404 for a path the document does not describe, 405 (with `Allow`) for a method.
fn unknown(spec: &CompiledSpec, method: &http::Method, path: &str, path_known: bool) -> Problem {
    if !path_known {
        return Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_operation",
            "The API does not describe this path",
        )
        .detail("no path of the API matches the request's path");
    }
    let allow: Vec<&str> = spec.methods(path).iter().map(|m| m.as_str()).collect();
    Problem {
        allow: Some(allow.join(", ")),
        ..Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "unknown_operation",
            "The API does not describe this method for this path",
        )
        .detail(format!(
            "{method} is not an operation of the API on this path"
        ))
    }
}
