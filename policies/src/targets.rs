//! Which services a policy applies to, for readers that show a service's policies (the
//! dashboard). Sidecars do not use this: each kind's own consumer decides what it enforces.

use crate::document::Policy;

// === impl Policy ===

impl Policy {
    /// How this policy bears on `service`, in a few words, or `None` when it does not name it.
    ///
    /// A `Consumer`'s quota becomes a limit on every service with an authentication policy,
    /// which this policy alone cannot tell: it answers `None`, and a reader that knows the
    /// service's other policies decides (see [`Policy::quota_applies`]).
    pub fn applies_to(&self, service: &str) -> Option<&'static str> {
        match self {
            Self::ServicePolicy { service: s, .. } => (s == service).then_some("calls to it"),
            Self::ExternalService { service: s, .. } => {
                (s == service).then_some("defines it (outside the mesh)")
            }
            Self::HttpRoute { spec, .. } => {
                if spec.hosts.iter().any(|h| h == service) {
                    Some("routes calls to it")
                } else if spec.rules.iter().any(|r| {
                    r.backends.iter().any(|b| b.service == service)
                        || r.mirror.as_ref().is_some_and(|m| m.service == service)
                }) {
                    Some("sends traffic to it")
                } else {
                    None
                }
            }
            Self::RateLimit { spec, .. } => (spec.service == service).then_some("rate-limits it"),
            Self::ConcurrencyLimit { spec, .. } => {
                (spec.service == service).then_some("limits its concurrency")
            }
            Self::Authentication { spec, .. } => {
                (spec.service == service).then_some("authenticates its callers")
            }
            Self::Authorization { spec, .. } => {
                (spec.service == service).then_some("authorizes its callers")
            }
            Self::AlertRule { spec, .. } => (spec.service == service).then_some("alerts on it"),
            Self::CachePolicy { spec, .. } => {
                (spec.service == service).then_some("caches its responses")
            }
            Self::CachePurge { spec, .. } => {
                (spec.service == service).then_some("purged its cache")
            }
            Self::ApiSpec { spec, .. } => (spec.service == service).then_some("documents its API"),
            Self::Consumer { .. } => None,
        }
    }

    /// Whether this is a `Consumer` with a quota, which applies to every service that has an
    /// authentication policy.
    pub fn quota_applies(&self) -> bool {
        matches!(self, Self::Consumer { spec, .. } if spec.quota.is_some())
    }
}

#[cfg(test)]
mod tests {
    use crate::parse_documents;

    fn policy(yaml: &str) -> crate::Policy {
        let doc = parse_documents(yaml, "t").remove(0).expect("parses");
        doc.validate().expect("valid")
    }

    #[test]
    fn kinds_name_their_service() {
        let sp = policy("apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {name: echo}\nspec: {request_timeout: 1s}\n");
        assert_eq!(sp.applies_to("echo"), Some("calls to it"));
        assert_eq!(sp.applies_to("echo-v2"), None);
        let rl = policy("apiVersion: trellis.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: lim}\nspec: {service: echo, scope: local, limit: {requests: 5, per: second}}\n");
        assert_eq!(rl.applies_to("echo"), Some("rate-limits it"));
        assert_eq!(rl.applies_to("lim"), None);
        let route = policy("apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {hosts: [front], rules: [{backends: [{service: echo}]}]}\n");
        assert_eq!(route.applies_to("front"), Some("routes calls to it"));
        assert_eq!(route.applies_to("echo"), Some("sends traffic to it"));
        assert!(!route.quota_applies());
    }
}
