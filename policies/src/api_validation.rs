//! `validation` on an `HTTPRoute` rule: the ingress checks requests (and, in audit mode,
//! responses) against a stored OpenAPI document before they reach a backend.
//!
//! Opt-in per rule, and only at an ingress gateway: a rule bound to no gateway but `mesh`
//! with `validation` is refused, since sidecars do not validate (the edge is where strangers'
//! requests arrive). Whether the named document exists is checked where etcd is at hand
//! (`policy apply`); here only the shape of the section is.

use serde::{Deserialize, Serialize};

use crate::api_spec::validate_version;
use crate::validate::validate_service_name;

/// Default bound on a request body buffered for validation.
pub const DEFAULT_VALIDATION_BODY: u64 = 1 << 20;
/// Largest `max_body_bytes` a rule may set: the whole body is held in memory while checked.
pub const MAX_VALIDATION_BODY: u64 = 16 << 20;

/// `rules[].validation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteValidation {
    /// The stored document (`mesh-agent api put`) the requests are checked against.
    pub spec: ApiRef,
    /// `enforce` (default): an invalid request is answered 400 and never forwarded.
    #[serde(default)]
    pub request: RequestMode,
    /// `audit`: responses are checked as they pass, mismatches logged and counted, never
    /// blocked; `off` (default).
    #[serde(default)]
    pub response: ResponseMode,
    /// The largest request body buffered to be checked (413 above it); 1 MiB by default.
    #[serde(default = "d_body")]
    pub max_body_bytes: u64,
}

/// One stored API document: a service and one of its versions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiRef {
    pub service: String,
    pub version: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestMode {
    #[default]
    Enforce,
    Off,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseMode {
    Audit,
    #[default]
    Off,
}

fn d_body() -> u64 {
    DEFAULT_VALIDATION_BODY
}

// === impl RouteValidation ===

impl RouteValidation {
    /// Check the section; the message starts with the field (`validation.spec.version: ...`).
    pub fn validate(&self) -> Result<(), String> {
        validate_service_name(&self.spec.service)
            .map_err(|m| format!("validation.spec.service: {m}"))?;
        validate_version(&self.spec.version)
            .map_err(|m| format!("validation.spec.version: {m}"))?;
        if !(1..=MAX_VALIDATION_BODY).contains(&self.max_body_bytes) {
            return Err(format!(
                "validation.max_body_bytes: must be between 1 and {MAX_VALIDATION_BODY} (16 MiB), got {}",
                self.max_body_bytes
            ));
        }
        if self.request == RequestMode::Off && self.response == ResponseMode::Off {
            return Err(
                "validation: `request: off` and `response: off` check nothing; remove the section"
                    .into(),
            );
        }
        Ok(())
    }
}

impl std::fmt::Display for ApiRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.service, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HttpRouteSpec;

    fn route(yaml: &str) -> Result<HttpRouteSpec, String> {
        let spec: HttpRouteSpec = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        spec.validate("r").map(|_| spec)
    }

    const BASE: &str = "hosts: [api.example.com]\ngateways: [edge]\nrules:\n- backends: [{service: orders}]\n  validation:\n";

    #[test]
    fn a_rule_opts_in_and_bad_values_are_named() {
        let ok = route(&format!(
            "{BASE}    spec: {{service: orders, version: v2}}\n    response: audit\n"
        ))
        .unwrap();
        let v = ok.rules[0].validation.as_ref().unwrap();
        assert_eq!(v.request, RequestMode::Enforce);
        assert_eq!(v.response, ResponseMode::Audit);
        assert_eq!(v.max_body_bytes, DEFAULT_VALIDATION_BODY);
        for (section, want) in [
            (
                "    spec: {service: orders, version: v/2}\n",
                "rules[0].validation.spec.version: `v/2` is not a version",
            ),
            (
                "    spec: {service: Orders, version: v2}\n",
                "rules[0].validation.spec.service:",
            ),
            (
                "    spec: {service: orders, version: v2}\n    max_body_bytes: 0\n",
                "rules[0].validation.max_body_bytes: must be between 1 and 16777216",
            ),
            (
                "    spec: {service: orders, version: v2}\n    request: off\n",
                "check nothing",
            ),
            (
                "    spec: {service: orders, version: v2}\n    request: block\n",
                "unknown variant `block`",
            ),
            (
                "    spec: {service: orders, version: v2}\n    mode: enforce\n",
                "unknown field `mode`",
            ),
            ("    spec: {service: orders}\n", "missing field `version`"),
        ] {
            let e = route(&format!("{BASE}{section}")).unwrap_err();
            assert!(e.contains(want), "{section}\n  got: {e}\n want: {want}");
        }
    }

    #[test]
    fn validation_needs_a_gateway_and_backends() {
        let mesh_only = "hosts: [orders]\nrules:\n- backends: [{service: orders}]\n  validation: {spec: {service: orders, version: v2}}\n";
        let e = route(mesh_only).unwrap_err();
        assert!(
            e.contains("rules[0].validation: applies at an ingress gateway"),
            "{e}"
        );
        let direct = "hosts: [api.example.com]\ngateways: [edge]\nrules:\n- direct_response: {status: 200}\n  validation: {spec: {service: orders, version: v2}}\n";
        let e = route(direct).unwrap_err();
        assert!(
            e.contains("validation: only applies to a rule with `backends`"),
            "{e}"
        );
    }
}
