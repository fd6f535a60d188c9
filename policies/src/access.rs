//! Who may call a service: authentication (JWT, API keys), consumers (the parties behind the
//! credentials, with their quotas) and authorization rules. Enforced by the destination's
//! sidecar on inbound requests, and by an ingress gateway on the traffic it receives.
//!
//! API keys are stored as SHA-256 digests only: a key is a high-entropy random secret, so an
//! unsalted digest is safe to keep in etcd (as GitHub and Stripe do for their tokens), and the
//! plaintext never reaches the mesh state, the cache file or `/config_dump`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::auth::JwtProviderSpec;
use crate::limits::{Limit, RouteMatch, MAX_REQUESTS};

/// Most JWT providers, API keys or rules in one policy: policies are read per request.
pub const MAX_ITEMS: usize = 64;

/// `AuthenticationPolicy`: which credentials a service's requests must carry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthenticationSpec {
    /// The service whose sidecars (or ingress) authenticate its inbound requests.
    pub service: String,
    /// Only requests matching this route are authenticated; all when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    /// JWT issuers accepted, by provider name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub jwt: BTreeMap<String, JwtProviderSpec>,
    /// Accept API keys of declared consumers, read from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<ApiKeySource>,
    /// Refuse (401) requests that carry no credential; with `false` they pass as anonymous and
    /// authorization decides. A credential that is present but invalid is always refused.
    #[serde(default = "d_true")]
    pub required: bool,
}

/// Where a request carries its API key: `{header: x-api-key}` or `{query: api_key}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// `Consumer`: a party calling the mesh's APIs, its credentials and its quota.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// API keys, as lower-case hex SHA-256 digests (`mesh-agent apikey generate` makes one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKeySpec>,
    /// JWT subjects that are this consumer: `{issuer, subject}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_subjects: Vec<JwtSubject>,
    /// Mesh workloads (SPIFFE IDs, verified by mTLS) that are this consumer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// A global budget per service this consumer calls, shared by that service's sidecars
    /// through the rate-limit mechanism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    /// A disabled consumer's credentials are refused (401), as if revoked.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    /// A label for logs and audit (never the key itself), e.g. `ci-2026-11`.
    pub id: String,
    /// Lower-case hex SHA-256 of the key.
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSubject {
    pub issuer: String,
    pub subject: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub limit: Limit,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

/// `AuthorizationPolicy`: allow or deny rules on a service's inbound requests.
///
/// Evaluation (as Istio's): an enforced `deny` rule that matches refuses the request (403);
/// otherwise, when the service has enforced `allow` policies, a request must match one of their
/// rules; with none, the sidecar's `authorization.default` decides. `audit` policies are
/// evaluated the same way but only log (and count) what they would deny.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationSpec {
    pub service: String,
    pub action: AuthzAction,
    #[serde(default)]
    pub mode: AuthzMode,
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzMode {
    #[default]
    Enforce,
    /// Log and count what would be denied; deny nothing.
    Audit,
}

/// A rule matches when every condition it sets matches; a list condition matches when any of
/// its values does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    #[serde(default)]
    pub from: AuthzFrom,
    #[serde(default)]
    pub to: AuthzTo,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzFrom {
    /// Caller SPIFFE IDs; a trailing `*` matches a prefix (`spiffe://td/service/*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// Consumer names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consumers: Vec<String>,
    /// Required JWT claims: a string claim must equal the value, an array claim contain it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
    /// Required scopes (all of them), from the token's `scope` or `scp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// `true`: any authenticated caller (JWT, API key or mTLS identity); `false`: only
    /// callers without any credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzTo {
    /// Routes (path and methods); any request when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteMatch>,
}

fn d_true() -> bool {
    true
}

fn check_len(field: &str, n: usize) -> Result<(), String> {
    if n > MAX_ITEMS {
        return Err(format!("{field}: at most {MAX_ITEMS} entries"));
    }
    Ok(())
}

fn lower_header_name(field: &str, h: &str) -> Result<(), String> {
    if h.is_empty()
        || !h
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        return Err(format!("{field}: `{h}` is not a lower-case header name"));
    }
    Ok(())
}

// === impl AuthenticationSpec ===

impl AuthenticationSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        if let Some(r) = &self.route {
            r.validate().map_err(|m| format!("match.{m}"))?;
        }
        if self.jwt.is_empty() && self.api_keys.is_none() {
            return Err("set `jwt` providers, `api_keys`, or both".into());
        }
        check_len("jwt", self.jwt.len())?;
        let mut issuers = BTreeMap::new();
        for (name, p) in &self.jwt {
            p.validate().map_err(|m| format!("jwt.{name}.{m}"))?;
            if let Some(other) = issuers.insert(p.issuer.as_str(), name) {
                return Err(format!(
                    "jwt.{name}.issuer: `{}` is also the issuer of `{other}`",
                    p.issuer
                ));
            }
        }
        if let Some(k) = &self.api_keys {
            match (&k.header, &k.query) {
                (Some(h), None) => lower_header_name("api_keys.header", h)?,
                (None, Some(q)) if !q.is_empty() => {}
                _ => return Err("api_keys: set exactly one of `header` and `query`".into()),
            }
        }
        Ok(())
    }
}

// === impl ConsumerSpec ===

impl ConsumerSpec {
    pub fn validate(&self) -> Result<(), String> {
        check_len("api_keys", self.api_keys.len())?;
        check_len("jwt_subjects", self.jwt_subjects.len())?;
        check_len("identities", self.identities.len())?;
        for (i, k) in self.api_keys.iter().enumerate() {
            if k.id.is_empty() || k.id.len() > 64 {
                return Err(format!("api_keys[{i}].id: 1 to 64 characters"));
            }
            if k.sha256.len() != 64
                || !k
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(format!(
                    "api_keys[{i}].sha256: 64 lower-case hex digits (the SHA-256 of the key, never the key)"
                ));
            }
        }
        for (i, s) in self.jwt_subjects.iter().enumerate() {
            if s.issuer.is_empty() || s.subject.is_empty() {
                return Err(format!(
                    "jwt_subjects[{i}]: issuer and subject are required"
                ));
            }
        }
        for (i, id) in self.identities.iter().enumerate() {
            crate::SpiffeId::parse(id).map_err(|e| format!("identities[{i}]: {e}"))?;
        }
        if let Some(q) = &self.quota {
            if q.limit.requests == 0 || q.limit.requests > MAX_REQUESTS {
                return Err(format!(
                    "quota.limit.requests: must be between 1 and {MAX_REQUESTS}"
                ));
            }
            if q.burst.is_some_and(|b| b == 0 || b > MAX_REQUESTS) {
                return Err(format!("quota.burst: must be between 1 and {MAX_REQUESTS}"));
            }
        }
        Ok(())
    }
}

// === impl AuthorizationSpec ===

impl AuthorizationSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        if self.rules.is_empty() {
            return Err(
                "rules: at least one rule (a rule with no conditions matches every request)".into(),
            );
        }
        check_len("rules", self.rules.len())?;
        for (i, r) in self.rules.iter().enumerate() {
            for (j, id) in r.from.identities.iter().enumerate() {
                let fixed = id.strip_suffix('*').unwrap_or(id);
                if !fixed.starts_with("spiffe://") {
                    return Err(format!(
                        "rules[{i}].from.identities[{j}]: `{id}` is not a SPIFFE ID (spiffe://...; a trailing * matches a prefix)"
                    ));
                }
            }
            check_len(
                &format!("rules[{i}].from.identities"),
                r.from.identities.len(),
            )?;
            check_len(
                &format!("rules[{i}].from.consumers"),
                r.from.consumers.len(),
            )?;
            check_len(&format!("rules[{i}].to.routes"), r.to.routes.len())?;
            for (j, route) in r.to.routes.iter().enumerate() {
                route
                    .validate()
                    .map_err(|m| format!("rules[{i}].to.routes[{j}].{m}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authn(yaml: &str) -> Result<AuthenticationSpec, String> {
        let s: AuthenticationSpec = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn authentication_needs_a_credential_kind_and_distinct_issuers() {
        let ok = authn("service: orders\napi_keys: {header: x-api-key}\n").expect("valid");
        assert!(ok.required);
        let e = authn("service: orders\n").unwrap_err();
        assert!(e.contains("`jwt` providers"), "{e}");
        let e = authn("service: orders\napi_keys: {header: X-Key}\n").unwrap_err();
        assert!(e.contains("api_keys.header"), "{e}");
        let e = authn(
            "service: orders\njwt:\n  a: {issuer: i, jwks: {inline: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\"}]}'}}\n  b: {issuer: i, jwks: {inline: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\"}]}'}}\n",
        )
        .unwrap_err();
        assert!(e.contains("jwt.b.issuer"), "{e}");
        let e = authn("service: orders\napi_keys: {header: x, nope: 1}\n").unwrap_err();
        assert!(e.contains("unknown field `nope`"), "{e}");
    }

    #[test]
    fn consumers_hold_digests_never_keys() {
        let c: ConsumerSpec = serde_norway::from_str(
            "api_keys: [{id: k1, sha256: 'not-a-digest'}]\nquota: {limit: {requests: 10, per: second}}\n",
        )
        .expect("parses");
        let e = c.validate().unwrap_err();
        assert!(e.contains("api_keys[0].sha256"), "{e}");
        let c: ConsumerSpec = serde_norway::from_str(&format!(
            "api_keys: [{{id: k1, sha256: '{}'}}]\nidentities: [spiffe://td/service/a]\n",
            "ab".repeat(32)
        ))
        .expect("parses");
        c.validate().expect("valid");
    }

    #[test]
    fn authorization_rules_are_checked() {
        let a: AuthorizationSpec = serde_norway::from_str(
            "service: orders\naction: allow\nrules: [{from: {identities: ['spiffe://td/service/*']}, to: {routes: [{path: {prefix: /api}, methods: [GET]}]}}]\n",
        )
        .expect("parses");
        a.validate().expect("valid");
        assert_eq!(a.mode, AuthzMode::Enforce);
        let a: AuthorizationSpec = serde_norway::from_str(
            "service: orders\naction: deny\nmode: audit\nrules: [{from: {identities: [frontend]}}]\n",
        )
        .expect("parses");
        let e = a.validate().unwrap_err();
        assert!(e.contains("rules[0].from.identities[0]"), "{e}");
    }
}
