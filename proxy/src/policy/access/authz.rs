//! Authorization: allow/deny rules over who is calling (SPIFFE identity, consumer, JWT claims
//! and scopes) and what they call (method, path).
//!
//! Order, as Istio's: an enforced `deny` rule that matches refuses; then, if the service has
//! enforced `allow` policies, the request must match one of their rules; with none, the
//! sidecar's default decides. `audit` policies are evaluated the same way on the side: what
//! they would refuse is reported, never refused.

use std::sync::Arc;

use http::Method;
use serde_json::Value;
use trellis_policies::{AuthorizationSpec, AuthzAction, AuthzMode, AuthzRule};

use super::Principal;
use crate::config::AuthzDefault;

/// The policy name reported when the sidecar's `deny` default refused a request.
pub const DEFAULT_DENY: &str = "default-deny";

pub struct Authz {
    deny: Vec<Policy>,
    allow: Vec<Policy>,
    audit_deny: Vec<Policy>,
    audit_allow: Vec<Policy>,
    default: AuthzDefault,
    default_name: Arc<str>,
}

struct Policy {
    name: Arc<str>,
    rules: Vec<AuthzRule>,
}

/// The verdict, and what audit-mode policies would have done.
#[derive(Debug, PartialEq)]
pub struct Verdict {
    /// `Some(policy)` when the request is refused.
    pub denied_by: Option<Arc<str>>,
    /// `Some(policy)` when an audit-mode policy would refuse it.
    pub audit_denied_by: Option<Arc<str>>,
}

// === impl Authz ===

impl Authz {
    pub fn build<'a>(
        service: &str,
        policies: impl IntoIterator<Item = (&'a String, &'a AuthorizationSpec)>,
        default: AuthzDefault,
    ) -> Self {
        let mut a = Self {
            deny: Vec::new(),
            allow: Vec::new(),
            audit_deny: Vec::new(),
            audit_allow: Vec::new(),
            default,
            default_name: Arc::from(DEFAULT_DENY),
        };
        for (name, spec) in policies {
            if spec.service != service {
                continue;
            }
            let p = Policy {
                name: Arc::from(name.as_str()),
                rules: spec.rules.clone(),
            };
            match (spec.mode, spec.action) {
                (AuthzMode::Enforce, AuthzAction::Deny) => a.deny.push(p),
                (AuthzMode::Enforce, AuthzAction::Allow) => a.allow.push(p),
                (AuthzMode::Audit, AuthzAction::Deny) => a.audit_deny.push(p),
                (AuthzMode::Audit, AuthzAction::Allow) => a.audit_allow.push(p),
            }
        }
        a
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty()
            && self.allow.is_empty()
            && self.audit_deny.is_empty()
            && self.audit_allow.is_empty()
            && self.default == AuthzDefault::Allow
    }

    pub fn evaluate(&self, who: &Principal, method: &Method, path: &str) -> Verdict {
        let matching = |ps: &[Policy]| {
            ps.iter()
                .find(|p| p.rules.iter().any(|r| rule_matches(r, who, method, path)))
                .map(|p| p.name.clone())
        };
        let denied_by = matching(&self.deny).or_else(|| {
            if !self.allow.is_empty() {
                match matching(&self.allow) {
                    Some(_) => None,
                    // Refused for matching none of the allow policies: name the first.
                    None => Some(self.allow[0].name.clone()),
                }
            } else if self.default == AuthzDefault::Deny {
                Some(self.default_name.clone())
            } else {
                None
            }
        });
        let audit_denied_by = matching(&self.audit_deny).or_else(|| {
            (!self.audit_allow.is_empty() && matching(&self.audit_allow).is_none())
                .then(|| self.audit_allow[0].name.clone())
        });
        Verdict {
            denied_by,
            audit_denied_by,
        }
    }
}

fn rule_matches(r: &AuthzRule, who: &Principal, method: &Method, path: &str) -> bool {
    let f = &r.from;
    let identity = who.identity.as_deref();
    if !f.identities.is_empty()
        && !identity.is_some_and(|id| f.identities.iter().any(|p| identity_matches(p, id)))
    {
        return false;
    }
    if !f.consumers.is_empty()
        && !who
            .consumer
            .as_deref()
            .is_some_and(|c| f.consumers.iter().any(|x| x == c))
    {
        return false;
    }
    if !f.claims.is_empty() {
        let Some(token) = &who.token else {
            return false;
        };
        for (claim, want) in &f.claims {
            let ok = match token.claims.get(claim) {
                Some(Value::String(s)) => s == want,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
                Some(Value::Bool(b)) => want == if *b { "true" } else { "false" },
                Some(Value::Number(n)) => n.to_string() == *want,
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    if !f.scopes.is_empty() {
        let Some(token) = &who.token else {
            return false;
        };
        if !f.scopes.iter().all(|s| token.scopes.contains(s)) {
            return false;
        }
    }
    if let Some(want) = f.authenticated {
        if who.is_authenticated() != want {
            return false;
        }
    }
    r.to.routes.is_empty()
        || r.to
            .routes
            .iter()
            .any(|route| route.matches(method.as_str(), path))
}

/// Exact, or a prefix when the pattern ends in `*`.
pub(crate) fn identity_matches(pattern: &str, id: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => id.starts_with(prefix),
        None => pattern == id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn authz(yaml: &str, default: AuthzDefault) -> Authz {
        let policies: BTreeMap<String, AuthorizationSpec> =
            serde_norway::from_str(yaml).expect("policies");
        Authz::build("orders", &policies, default)
    }

    fn who(identity: Option<&str>, consumer: Option<&str>) -> Principal {
        Principal {
            identity: identity.map(Arc::from),
            consumer: consumer.map(Arc::from),
            ..Principal::default()
        }
    }

    const POLICIES: &str = r#"
allow-frontend:
  service: orders
  action: allow
  rules:
    - from: {identities: ["spiffe://td/service/frontend"]}
      to: {routes: [{path: {prefix: /api}, methods: [GET]}]}
    - from: {consumers: [acme]}
deny-admin:
  service: orders
  action: deny
  rules:
    - to: {routes: [{path: {prefix: /admin}}]}
audit-no-anon:
  service: orders
  action: deny
  mode: audit
  rules:
    - from: {authenticated: false}
other-service:
  service: payments
  action: deny
  rules: [{}]
"#;

    #[test]
    fn deny_wins_then_allow_rules_then_default() {
        let a = authz(POLICIES, AuthzDefault::Allow);
        let fe = who(Some("spiffe://td/service/frontend"), None);
        assert_eq!(a.evaluate(&fe, &Method::GET, "/api/x").denied_by, None);
        // Method outside the rule: matches no allow rule.
        assert_eq!(
            a.evaluate(&fe, &Method::POST, "/api/x")
                .denied_by
                .as_deref(),
            Some("allow-frontend")
        );
        // Deny wins over an allow rule that matches too.
        let acme = who(None, Some("acme"));
        assert_eq!(
            a.evaluate(&acme, &Method::GET, "/admin/users")
                .denied_by
                .as_deref(),
            Some("deny-admin")
        );
        assert_eq!(a.evaluate(&acme, &Method::DELETE, "/x").denied_by, None);
        // Audit: anonymous would be denied, but is only reported.
        let anon = who(None, None);
        let v = a.evaluate(&anon, &Method::GET, "/x");
        assert_eq!(v.denied_by.as_deref(), Some("allow-frontend"));
        assert_eq!(v.audit_denied_by.as_deref(), Some("audit-no-anon"));
        assert_eq!(a.evaluate(&acme, &Method::GET, "/x").audit_denied_by, None);
    }

    #[test]
    fn the_default_decides_when_no_allow_policy_exists() {
        let none = authz("{}", AuthzDefault::Deny);
        let v = none.evaluate(&who(None, None), &Method::GET, "/");
        assert_eq!(v.denied_by.as_deref(), Some(DEFAULT_DENY));
        let open = authz("{}", AuthzDefault::Allow);
        assert!(open.is_empty());
        assert_eq!(
            open.evaluate(&who(None, None), &Method::GET, "/").denied_by,
            None
        );
    }

    #[test]
    fn identity_prefixes() {
        assert!(identity_matches(
            "spiffe://td/service/*",
            "spiffe://td/service/a"
        ));
        assert!(!identity_matches(
            "spiffe://td/service/*",
            "spiffe://other/service/a"
        ));
        assert!(!identity_matches(
            "spiffe://td/service/a",
            "spiffe://td/service/ab"
        ));
    }
}
