//! The etcd key layout, versioned under a configurable prefix:
//!
//! ```text
//! <prefix>/v1/mesh/services/<service>/instances/<instance>   registration (JSON), under the instance's lease
//! <prefix>/v1/mesh/policies/<Kind>/<name>                    policy document (JSON)
//! <prefix>/v1/status/<service>/<instance>                    applied revision (JSON), under the instance's lease
//! <prefix>/v1/ratelimit/<service>/<instance>                 demand for global rate limits (JSON), under the instance's lease
//! <prefix>/v1/history/<Kind>/<name>/<seq, 20 digits>          one audit entry per policy change (JSON)
//! <prefix>/v1/alerts/evaluator                               the dashboard evaluating alert rules, under its lease
//! <prefix>/v1/alerts/state/<rule>                            an alert rule's state (JSON)
//! <prefix>/v1/apis/specs/<sha256 hex>                        an OpenAPI document: gzip of its canonical JSON, once per content
//! <prefix>/v1/apis/index/<service>/<version>                 which document a service's API version has (JSON)
//! ```
//!
//! Sidecars watch `<prefix>/v1/mesh/` only: status writes, which every sidecar makes, never
//! wake the others, and neither do history entries, written in the same transaction as each
//! policy change.

/// Parsed meaning of a key under the mesh prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshKey<'a> {
    Instance { service: &'a str, instance: &'a str },
    Policy { kind: &'a str, name: &'a str },
}

#[derive(Clone, Debug)]
pub struct Keys {
    /// `<prefix>/`: everything this mesh stores, in every layout version.
    base: String,
    root: String,
}

// === impl Keys ===

impl Keys {
    pub fn new(prefix: &str) -> Self {
        let prefix = prefix.trim_end_matches('/');
        Self {
            base: format!("{prefix}/"),
            root: format!("{prefix}/v1"),
        }
    }

    /// Every key of this mesh (all layout versions): what an operator may change.
    pub fn all(&self) -> &str {
        &self.base
    }

    /// Everything a sidecar routes with.
    pub fn mesh(&self) -> String {
        format!("{}/mesh/", self.root)
    }

    pub fn instance(&self, service: &str, instance: &str) -> String {
        format!("{}/mesh/services/{service}/instances/{instance}", self.root)
    }

    /// The registrations of one service's instances: what its sidecars write. The trailing
    /// `/` keeps `orders` from matching `orders-v2` when used as an etcd permission prefix.
    pub fn instances(&self, service: &str) -> String {
        format!("{}/mesh/services/{service}/instances/", self.root)
    }

    pub fn services(&self) -> String {
        format!("{}/mesh/services/", self.root)
    }

    pub fn policy(&self, kind: &str, name: &str) -> String {
        format!("{}/mesh/policies/{kind}/{name}", self.root)
    }

    pub fn policies(&self) -> String {
        format!("{}/mesh/policies/", self.root)
    }

    pub fn status(&self, service: &str, instance: &str) -> String {
        format!("{}/status/{service}/{instance}", self.root)
    }

    /// The status keys of one service's instances.
    pub fn service_statuses(&self, service: &str) -> String {
        format!("{}/status/{service}/", self.root)
    }

    pub fn statuses(&self) -> String {
        format!("{}/status/", self.root)
    }

    /// Who evaluates the alert rules (one dashboard of the fleet, under its lease).
    pub fn alert_evaluator(&self) -> String {
        format!("{}/alerts/evaluator", self.root)
    }

    /// Every alert rule's state (pending, firing, resolved), written by the evaluator.
    pub fn alert_states(&self) -> String {
        format!("{}/alerts/state/", self.root)
    }

    pub fn alert_state(&self, rule: &str) -> String {
        format!("{}/alerts/state/{rule}", self.root)
    }

    /// An OpenAPI document, keyed by the SHA-256 of its canonical JSON: written once however
    /// many versions or instances carry the same document.
    pub fn api_spec(&self, sha256_hex: &str) -> String {
        format!("{}/apis/specs/{sha256_hex}", self.root)
    }

    /// Every API version's index entry.
    pub fn api_index(&self) -> String {
        format!("{}/apis/index/", self.root)
    }

    /// The index entries of one service's API versions.
    pub fn api_service(&self, service: &str) -> String {
        format!("{}/apis/index/{service}/", self.root)
    }

    pub fn api_version(&self, service: &str, version: &str) -> String {
        format!("{}{version}", self.api_service(service))
    }

    /// One sidecar's demand for its service's global rate limits.
    pub fn demand(&self, service: &str, instance: &str) -> String {
        format!("{}/ratelimit/{service}/{instance}", self.root)
    }

    /// The demand table of one service: each of its sidecars watches only this.
    pub fn demands(&self, service: &str) -> String {
        format!("{}/ratelimit/{service}/", self.root)
    }

    /// The history of one policy. The sequence numbers are zero-padded so that key order is
    /// numeric order, which lets one range delete prune the oldest entries.
    pub fn history(&self, kind: &str, name: &str) -> String {
        format!("{}/history/{kind}/{name}/", self.root)
    }

    pub fn history_entry(&self, kind: &str, name: &str, seq: u64) -> String {
        format!("{}{seq:020}", self.history(kind, name))
    }

    /// Classify a key read from the mesh prefix; `None` for keys this version does not know.
    pub fn parse<'a>(&self, key: &'a str) -> Option<MeshKey<'a>> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("/mesh/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["services", service, "instances", instance]
                if !service.is_empty() && !instance.is_empty() =>
            {
                Some(MeshKey::Instance { service, instance })
            }
            ["policies", kind, name] if !kind.is_empty() && !name.is_empty() => {
                Some(MeshKey::Policy { kind, name })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_round_trips() {
        let k = Keys::new("/trellis/");
        assert_eq!(
            k.instance("orders", "a-1"),
            "/trellis/v1/mesh/services/orders/instances/a-1"
        );
        assert_eq!(
            k.parse(&k.instance("orders", "a-1")),
            Some(MeshKey::Instance {
                service: "orders",
                instance: "a-1"
            })
        );
        assert_eq!(
            k.parse(&k.policy("ServicePolicy", "orders")),
            Some(MeshKey::Policy {
                kind: "ServicePolicy",
                name: "orders"
            })
        );
        assert!(k.parse("/trellis/v1/mesh/other/x").is_none());
        assert!(k.parse("/other/v1/mesh/policies/a/b").is_none());
        assert!(
            !k.status("a", "b").starts_with(&k.mesh()),
            "status keys are outside the watched prefix"
        );
        let h = k.history_entry("ServicePolicy", "orders", 7);
        assert_eq!(
            h,
            "/trellis/v1/history/ServicePolicy/orders/00000000000000000007"
        );
        assert!(
            !h.starts_with(&k.mesh()),
            "history keys are outside the watched prefix"
        );
        assert!(h.starts_with(&k.history("ServicePolicy", "orders")));
    }

    /// Everything a sidecar of `orders` writes lies under one of its per-service prefixes
    /// (the etcd role `trellis-service-orders` grants exactly those), and no prefix of
    /// `orders` covers a key of `orders-v2`.
    #[test]
    fn a_service_writes_only_under_its_own_prefixes() {
        let k = Keys::new("/trellis");
        assert_eq!(k.all(), "/trellis/");
        let own = [
            k.instances("orders"),
            k.service_statuses("orders"),
            k.demands("orders"),
        ];
        for key in [
            k.instance("orders", "a-1"),
            k.status("orders", "a-1"),
            k.demand("orders", "a-1"),
        ] {
            assert!(own.iter().any(|p| key.starts_with(p.as_str())), "{key}");
        }
        for key in [
            k.instance("orders-v2", "a-1"),
            k.status("orders-v2", "a-1"),
            k.demand("orders-v2", "a-1"),
            k.policy("ServicePolicy", "orders"),
        ] {
            assert!(!own.iter().any(|p| key.starts_with(p.as_str())), "{key}");
        }
        assert!(k.instances("orders").starts_with(&k.mesh()));
    }
}
