//! Rate limits and concurrency limits on a service's inbound traffic.
//!
//! A limit applies to the requests a destination service receives (optionally only those that
//! match a route) and is enforced by that service's sidecars. A `local` rate limit is per
//! sidecar; a `global` one is a single budget shared by every sidecar of the service, split
//! between them through etcd (see `docs/ratelimit.md`).
//!
//! The key parts are flags, not a list: their order is fixed by this type, so every sidecar
//! builds the same key for the same request (APISIX shipped "global" limits that were silently
//! per node because nodes built different keys).

use serde::{Deserialize, Serialize};

/// Largest accepted `limit.requests` and `burst`.
pub const MAX_REQUESTS: u32 = 1_000_000_000;
/// Most headers a key may name.
pub const MAX_KEY_HEADERS: usize = 4;

/// `RateLimitPolicy`: at most `limit.requests` per `limit.per` for each distinct key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// The destination service whose sidecars enforce the limit.
    pub service: String,
    /// Only requests matching this route count; all requests when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    pub scope: Scope,
    /// What makes two requests share a budget; one budget for all when empty.
    #[serde(default, skip_serializing_if = "LimitKey::is_empty")]
    pub key: LimitKey,
    pub limit: Limit,
    /// Requests admitted at once after a quiet period (fleet-wide for a global limit). Defaults
    /// to `limit.requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Only requests of this consumer (see `Consumer`) count. A consumer's `quota` becomes
    /// such a limit on every service with an authentication policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
}

/// `ConcurrencyLimitPolicy`: at most `max_in_flight` requests at once (per sidecar), counted
/// until the response body ends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimitSpec {
    pub service: String,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    pub max_in_flight: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each sidecar enforces the full limit on its own traffic.
    Local,
    /// One budget shared by all the service's sidecars.
    Global,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Upper-case method names; any method when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// Exactly one of `exact` and `prefix`. A prefix matches whole segments: `/api` matches `/api`
/// and `/api/x`, not `/apix`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitKey {
    /// The caller's verified SPIFFE ID (requests without one share the `none` key).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_identity: bool,
    /// The address the connection came from.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source_ip: bool,
    /// Header values (lower-case names); a missing header is its own key value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
    /// The authenticated consumer (requests without one share the `none` key).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub consumer: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub requests: u32,
    pub per: Per,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    Second,
    Minute,
}

/// A non-empty lower-case header name (letters, digits, `-`, `_`, `.`): how policies name
/// the headers they key on.
pub(crate) fn is_lower_header_name(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

// === impl LimitKey ===

impl LimitKey {
    pub fn is_empty(&self) -> bool {
        !self.client_identity && !self.source_ip && self.headers.is_empty() && !self.consumer
    }
}

// === impl Per ===

impl Per {
    pub fn seconds(self) -> u32 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
        }
    }
}

// === impl Limit ===

impl Limit {
    /// The limit as a rate.
    pub fn per_second(&self) -> f64 {
        f64::from(self.requests) / f64::from(self.per.seconds())
    }
}

// === impl RateLimitSpec ===

impl RateLimitSpec {
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.limit.requests).max(1)
    }

    pub fn validate(&self) -> Result<(), String> {
        crate::validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        if let Some(r) = &self.route {
            r.validate().map_err(|m| format!("match.{m}"))?;
        }
        if self.limit.requests == 0 || self.limit.requests > MAX_REQUESTS {
            return Err(format!(
                "limit.requests: must be between 1 and {MAX_REQUESTS}"
            ));
        }
        if self.burst.is_some_and(|b| b == 0 || b > MAX_REQUESTS) {
            return Err(format!("burst: must be between 1 and {MAX_REQUESTS}"));
        }
        if self.key.headers.len() > MAX_KEY_HEADERS {
            return Err(format!("key.headers: at most {MAX_KEY_HEADERS} headers"));
        }
        for h in &self.key.headers {
            if !is_lower_header_name(h) {
                return Err(format!(
                    "key.headers: `{h}` is not a lower-case header name"
                ));
            }
        }
        Ok(())
    }
}

// === impl ConcurrencyLimitSpec ===

impl ConcurrencyLimitSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        if let Some(r) = &self.route {
            r.validate().map_err(|m| format!("match.{m}"))?;
        }
        if self.max_in_flight == 0 || self.max_in_flight > MAX_REQUESTS {
            return Err(format!(
                "max_in_flight: must be between 1 and {MAX_REQUESTS}"
            ));
        }
        Ok(())
    }
}

// === impl RouteMatch ===

impl RouteMatch {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(p) = &self.path {
            let path = match (&p.exact, &p.prefix) {
                (Some(v), None) | (None, Some(v)) => v,
                _ => return Err("path: set exactly one of `exact` and `prefix`".into()),
            };
            if !path.starts_with('/') || path.contains(|c: char| c.is_whitespace() || c == '?') {
                return Err(format!(
                    "path: `{path}` must start with '/' and contain no spaces or '?'"
                ));
            }
        }
        for m in &self.methods {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("methods: `{m}` is not an upper-case method name"));
            }
        }
        Ok(())
    }

    /// Does a request with this method and path match?
    pub fn matches(&self, method: &str, path: &str) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == method) {
            return false;
        }
        match &self.path {
            None => true,
            Some(PathMatch { exact: Some(e), .. }) => path == e,
            Some(PathMatch {
                prefix: Some(p), ..
            }) => {
                let p = p.trim_end_matches('/');
                path.strip_prefix(p)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Some(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<RateLimitSpec, String> {
        let s: RateLimitSpec = serde_json::from_value(json).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn parses_and_defaults_burst_to_the_quota() {
        let s = spec(serde_json::json!({
            "service": "orders", "scope": "global",
            "key": {"client_identity": true, "headers": ["x-tenant"]},
            "limit": {"requests": 100, "per": "minute"},
        }))
        .unwrap();
        assert_eq!(s.burst(), 100);
        assert!((s.limit.per_second() - 100.0 / 60.0).abs() < 1e-9);
        assert!(!s.key.is_empty());
    }

    #[test]
    fn rejects_bad_values_naming_the_field() {
        let base = serde_json::json!({"service": "orders", "scope": "local", "limit": {"requests": 1, "per": "second"}});
        let with = |k: &str, v: serde_json::Value| {
            let mut j = base.clone();
            j[k] = v;
            spec(j).unwrap_err()
        };
        assert!(
            with("limit", serde_json::json!({"requests": 0, "per": "second"}))
                .contains("limit.requests")
        );
        assert!(with("burst", serde_json::json!(0)).contains("burst"));
        assert!(with("key", serde_json::json!({"headers": ["X-Up"]})).contains("key.headers"));
        assert!(with(
            "match",
            serde_json::json!({"path": {"exact": "/a", "prefix": "/b"}})
        )
        .contains("exactly one"));
        assert!(with("match", serde_json::json!({"methods": ["get"]})).contains("methods"));
        assert!(with("scope", serde_json::json!("cluster")).contains("unknown variant"));
        assert!(with("service", serde_json::json!("Bad_Name")).contains("service"));
    }

    #[test]
    fn route_matching_uses_whole_segments() {
        let r = RouteMatch {
            path: Some(PathMatch {
                prefix: Some("/api/".into()),
                exact: None,
            }),
            methods: vec!["GET".into()],
        };
        assert!(r.matches("GET", "/api"));
        assert!(r.matches("GET", "/api/v1"));
        assert!(!r.matches("GET", "/apix"));
        assert!(!r.matches("POST", "/api"));
        let exact = RouteMatch {
            path: Some(PathMatch {
                exact: Some("/login".into()),
                prefix: None,
            }),
            methods: vec![],
        };
        assert!(exact.matches("POST", "/login"));
        assert!(!exact.matches("POST", "/login/x"));
    }
}
