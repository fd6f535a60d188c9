//! The mesh state a sidecar holds from etcd: every key's last *valid* value. An invalid value
//! is recorded as rejected and the previous good value of that key stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde::Serialize;
use trellis_policies::{
    EndpointSpec, MeshDocument, Policy, PolicyDocument, Registration, ServiceSpec,
};

use super::keys::{Keys, MeshKey};
use super::scope::Scope;

/// A validated value, kept as the raw JSON text it came from (for the cache).
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    Instance(Registration),
    Policy(PolicyDocument, Policy),
}

#[derive(Clone, Debug, Serialize)]
pub struct Rejection {
    pub revision: i64,
    pub reason: String,
}

#[derive(Default)]
pub struct MeshState {
    /// Revision of the last applied read or event.
    pub revision: i64,
    /// Raw values are shared (`Arc`) so that handing the state to the cache writer copies
    /// no value.
    entries: BTreeMap<String, (Entry, std::sync::Arc<[u8]>)>,
    pub rejected: BTreeMap<String, Rejection>,
    /// Instances whose registration vanished without a graceful deregistration while their
    /// endpoint still answered: kept in routing until the deadline (or their owner registers
    /// again). Not in etcd, so not in the cache.
    retained: BTreeMap<String, (Registration, Instant)>,
    /// Instances that announced a graceful deregistration: their deletion is expected.
    draining: BTreeSet<String>,
    /// Policies this sidecar can never use are validated and then not kept (nor cached):
    /// a scoped sidecar pays nothing for another gateway's thousand routes.
    keep: Option<fn(&Policy, &PolicyOwner) -> bool>,
    owner: PolicyOwner,
}

/// Who the kept policies are for (see [`MeshState::keep_only`]).
#[derive(Clone, Debug, Default)]
pub struct PolicyOwner {
    pub service: String,
    pub gateway: Option<String>,
}

/// What one update changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    pub applied: usize,
    pub removed: usize,
    pub rejected: usize,
    /// Registrations removed without a graceful deregistration (candidates for retention).
    pub vanished: Vec<(String, Registration)>,
}

/// What a delete did.
#[derive(Debug, PartialEq)]
pub enum Deleted {
    Nothing,
    /// A policy, or an instance that announced it was draining.
    Removed,
    /// A registration that vanished unannounced (lease expired or revoked).
    Vanished(Registration),
}

impl Changes {
    pub fn merge(&mut self, other: Changes) {
        self.applied += other.applied;
        self.removed += other.removed;
        self.rejected += other.rejected;
        self.vanished.extend(other.vanished);
    }

    pub fn any(&self) -> bool {
        self.applied > 0 || self.removed > 0 || !self.vanished.is_empty()
    }
}

// === impl MeshState ===

impl MeshState {
    /// Validate and store `value` under `key`. Returns `Err(reason)` when it was rejected (the
    /// previous value, if any, stays).
    /// Keep only the policies `keep` accepts for `owner` from now on.
    pub fn keep_only(&mut self, keep: fn(&Policy, &PolicyOwner) -> bool, owner: PolicyOwner) {
        self.keep = Some(keep);
        self.owner = owner;
    }

    pub fn put(
        &mut self,
        keys: &Keys,
        key: &str,
        value: &[u8],
        revision: i64,
    ) -> Result<bool, String> {
        let parsed = parse_entry(keys, key, value);
        if let (Ok(Entry::Policy(_, p)), Some(keep)) = (&parsed, self.keep) {
            if !keep(p, &self.owner) {
                // Valid, and of no use here: as if it were not there.
                self.rejected.remove(key);
                return Ok(self.entries.remove(key).is_some());
            }
        }
        match parsed {
            Ok(Entry::Instance(r)) if r.draining => {
                // Leaving on purpose: out of routing now, and its deletion is no surprise.
                self.rejected.remove(key);
                self.retained.remove(key);
                self.draining.insert(key.to_string());
                Ok(self.entries.remove(key).is_some())
            }
            Ok(entry) => {
                self.rejected.remove(key);
                self.draining.remove(key);
                let was_retained = match (self.retained.remove(key), &entry) {
                    (Some((old, _)), Entry::Instance(new)) => Some(old == *new),
                    (Some(_), _) => Some(false),
                    (None, _) => None,
                };
                if self.entries.get(key).is_some_and(|(e, _)| e == &entry) {
                    return Ok(false);
                }
                self.entries
                    .insert(key.to_string(), (entry, std::sync::Arc::from(value)));
                // A retained instance registering again as it was changes nothing routed.
                Ok(was_retained != Some(true))
            }
            Err(reason) => {
                self.rejected.insert(
                    key.to_string(),
                    Rejection {
                        revision,
                        reason: reason.clone(),
                    },
                );
                Err(reason)
            }
        }
    }

    pub fn delete(&mut self, key: &str) -> Deleted {
        self.rejected.remove(key);
        let announced = self.draining.remove(key);
        match self.entries.remove(key) {
            Some((Entry::Instance(r), _)) if !announced => Deleted::Vanished(r),
            Some(_) => Deleted::Removed,
            None => Deleted::Nothing,
        }
    }

    /// Keep a vanished registration in routing until `until`.
    pub fn retain(&mut self, key: String, registration: Registration, until: Instant) {
        self.retained.insert(key, (registration, until));
    }

    /// Drop retained instances whose grace period has ended; their keys.
    pub fn expire_retained(&mut self, now: Instant) -> Vec<String> {
        let expired: Vec<String> = self
            .retained
            .iter()
            .filter(|(_, (_, until))| *until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            self.retained.remove(k);
        }
        expired
    }

    /// When the next retained instance's grace period ends.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.retained.values().map(|(_, until)| *until).min()
    }

    pub fn retained_len(&self) -> usize {
        self.retained.len()
    }

    /// Replace everything with a full read at `revision`, applying only the differences.
    /// `on_reject` sees each rejected key and reason.
    pub fn resync<'a>(
        &mut self,
        keys: &Keys,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        revision: i64,
        on_reject: impl FnMut(&str, &str),
    ) -> Changes {
        let changes = self.resync_prefix(keys, "", kvs, revision, on_reject);
        self.revision = revision;
        changes
    }

    /// Replace the keys under `prefix` with a read of that prefix at `revision`, applying only
    /// the differences; keys elsewhere are untouched (another watch keeps them).
    pub fn resync_prefix<'a>(
        &mut self,
        keys: &Keys,
        prefix: &str,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        revision: i64,
        mut on_reject: impl FnMut(&str, &str),
    ) -> Changes {
        let mut changes = Changes::default();
        let mut seen = std::collections::HashSet::new();
        for (key, value) in kvs {
            seen.insert(key.to_string());
            match self.put(keys, key, value, revision) {
                Ok(true) => changes.applied += 1,
                Ok(false) => {}
                Err(reason) => {
                    changes.rejected += 1;
                    on_reject(key, &reason);
                }
            }
        }
        let gone: Vec<String> = self
            .entries
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            match self.delete(&key) {
                Deleted::Vanished(r) => changes.vanished.push((key, r)),
                _ => changes.removed += 1,
            }
        }
        self.rejected
            .retain(|k, _| !k.starts_with(prefix) || seen.contains(k));
        changes
    }

    /// Forget every key under `prefix` (a service no longer watched). Returns whether any
    /// instance was routed.
    pub fn drop_prefix(&mut self, prefix: &str) -> bool {
        let before = self.entries.len() + self.retained.len();
        self.entries.retain(|k, _| !k.starts_with(prefix));
        self.retained.retain(|k, _| !k.starts_with(prefix));
        self.rejected.retain(|k, _| !k.starts_with(prefix));
        self.draining.retain(|k| !k.starts_with(prefix));
        before != self.entries.len() + self.retained.len()
    }

    /// Every valid policy.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.entries.values().filter_map(|(e, _)| match e {
            Entry::Policy(_, p) => Some(p),
            Entry::Instance(_) => None,
        })
    }

    /// Names of the services with a registration held (retained ones included).
    pub fn registered_services(&self) -> BTreeSet<String> {
        self.instances().map(|r| r.service.clone()).collect()
    }

    /// One service as the data plane needs it: its registrations (retained ones included)
    /// and its `ServicePolicy` or `ExternalService`; `None` when there is neither. Reads only
    /// that service's keys and the policies: the cost of a change follows the service.
    pub fn service_spec(&self, keys: &Keys, name: &str) -> Option<ServiceSpec> {
        let prefix = keys.instances(name);
        let under = |k: &String| k.starts_with(&prefix);
        let mut spec: Option<ServiceSpec> = None;
        let registered = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| under(k))
            .filter_map(|(_, (e, _))| match e {
                Entry::Instance(r) => Some(r),
                Entry::Policy(..) => None,
            })
            .chain(
                self.retained
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| under(k))
                    .map(|(_, (r, _))| r),
            );
        for r in registered {
            spec.get_or_insert_with(ServiceSpec::default)
                .endpoints
                .push(endpoint(r));
        }
        let policies = keys.policies();
        for (_, (e, _)) in self
            .entries
            .range(policies.clone()..)
            .take_while(|(k, _)| k.starts_with(&policies))
        {
            match e {
                Entry::Policy(_, Policy::ServicePolicy { service, policy }) if service == name => {
                    spec.get_or_insert_with(ServiceSpec::default).policy = (**policy).clone();
                }
                Entry::Policy(_, Policy::ExternalService { service, external })
                    if service == name =>
                {
                    spec.get_or_insert_with(ServiceSpec::default).external = Some(external.clone());
                }
                _ => {}
            }
        }
        if let Some(s) = spec.as_mut() {
            s.endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            s.endpoints.dedup_by(|a, b| a.address == b.address);
        }
        spec
    }

    /// Raw values of every entry, for the cache.
    pub fn raw(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(k, (_, v))| (k.as_str(), &v[..]))
    }

    /// Raw values of every entry, shared, for the cache writer.
    pub fn raw_shared(&self) -> Vec<(String, std::sync::Arc<[u8]>)> {
        self.entries
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Registrations (retained ones included), for `/config_dump`, status and routing.
    pub fn instances(&self) -> impl Iterator<Item = &Registration> {
        self.entries
            .values()
            .filter_map(|(e, _)| match e {
                Entry::Instance(r) => Some(r),
                Entry::Policy(..) => None,
            })
            .chain(self.retained.values().map(|(r, _)| r))
    }

    /// The mesh document the data plane's snapshot is built from: one service per registered
    /// service (or per `ServicePolicy`), endpoints sorted by address for a stable order; only
    /// what `scope` holds and wants.
    pub fn to_document(&self, scope: &Scope) -> MeshDocument {
        let authenticates = scope.is_full()
            || self.policies().any(
                |p| matches!(p, Policy::Authentication { spec, .. } if spec.service == scope.own()),
            );
        let mut doc = MeshDocument::default();
        let retained = self
            .retained
            .values()
            .map(|(r, _)| Entry::Instance(r.clone()));
        let entries: Vec<Entry> = self
            .entries
            .values()
            .map(|(e, _)| e.clone())
            .chain(retained)
            .filter(|e| match e {
                Entry::Instance(r) => scope.holds(&r.service),
                Entry::Policy(_, p) => scope.wants(p, authenticates),
            })
            .collect();
        for entry in &entries {
            match entry {
                Entry::Instance(r) => {
                    doc.services
                        .entry(r.service.clone())
                        .or_insert_with(ServiceSpec::default)
                        .endpoints
                        .push(endpoint(r));
                }
                Entry::Policy(_, Policy::ServicePolicy { service, policy }) => {
                    doc.services
                        .entry(service.clone())
                        .or_insert_with(ServiceSpec::default)
                        .policy = (**policy).clone();
                }
                Entry::Policy(_, Policy::ExternalService { service, external }) => {
                    doc.services
                        .entry(service.clone())
                        .or_insert_with(ServiceSpec::default)
                        .external = Some(external.clone());
                }
                Entry::Policy(_, Policy::HttpRoute { name, spec }) => {
                    doc.http_routes.insert(name.clone(), (**spec).clone());
                }
                Entry::Policy(_, Policy::RateLimit { name, spec }) => {
                    doc.rate_limits.insert(name.clone(), spec.clone());
                }
                Entry::Policy(_, Policy::ConcurrencyLimit { name, spec }) => {
                    doc.concurrency_limits.insert(name.clone(), spec.clone());
                }
                Entry::Policy(_, Policy::Authentication { name, spec }) => {
                    doc.authentication.insert(name.clone(), spec.clone());
                }
                Entry::Policy(_, Policy::Consumer { name, spec }) => {
                    doc.consumers.insert(name.clone(), spec.clone());
                }
                Entry::Policy(_, Policy::Authorization { name, spec }) => {
                    doc.authorization.insert(name.clone(), spec.clone());
                }
                Entry::Policy(_, Policy::CachePolicy { name, spec }) => {
                    doc.cache_policies.insert(name.clone(), (**spec).clone());
                }
                Entry::Policy(_, Policy::CachePurge { name, spec }) => {
                    doc.cache_purges.insert(name.clone(), spec.clone());
                }
                // Evaluated by a dashboard, not routed with.
                Entry::Policy(_, Policy::AlertRule { .. }) => {}
                // Stored by content hash outside the mesh prefix; never routed with.
                Entry::Policy(_, Policy::ApiSpec { .. }) => {}
            }
        }
        for svc in doc.services.values_mut() {
            svc.endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            svc.endpoints.dedup_by(|a, b| a.address == b.address);
        }
        doc
    }
}

fn endpoint(r: &Registration) -> EndpointSpec {
    EndpointSpec {
        address: r.address.clone(),
        identity: Some(r.identity.clone()),
        weight: r.weight,
        zone: r.zone.clone(),
    }
}

fn parse_entry(keys: &Keys, key: &str, value: &[u8]) -> Result<Entry, String> {
    match keys.parse(key) {
        Some(MeshKey::Instance { service, instance }) => {
            let r: Registration =
                serde_json::from_slice(value).map_err(|e| format!("registration: {e}"))?;
            r.validate(service, instance)?;
            Ok(Entry::Instance(r))
        }
        Some(MeshKey::Policy { kind, name }) => {
            let doc: PolicyDocument =
                serde_json::from_slice(value).map_err(|e| format!("policy: {e}"))?;
            if doc.kind != kind || doc.metadata.name != name {
                return Err(format!("document {} stored under {kind}/{name}", doc.id()));
            }
            let policy = doc.validate().map_err(|e| e.to_string())?;
            Ok(Entry::Policy(doc, policy))
        }
        None => Err("unknown key under the mesh prefix".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Scope {
        let cfg = crate::config::DiscoveryConfig {
            scope: crate::config::DiscoveryScope::Full,
            ..Default::default()
        };
        Scope::new(&cfg, "web", None)
    }

    fn reg(service: &str, instance: &str, port: u16) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "service": service, "instance": instance, "address": format!("127.0.0.1:{port}"),
            "identity": format!("spiffe://td/service/{service}"), "version": "t", "ttl_seconds": 10
        }))
        .unwrap()
    }

    #[test]
    fn invalid_value_keeps_the_last_good_one() {
        let keys = Keys::new("/t");
        let mut s = MeshState::default();
        let policy = |t: &str| {
            format!(
                r#"{{"apiVersion":"trellis.dev/v1","kind":"ServicePolicy","metadata":{{"name":"orders"}},"spec":{{"request_timeout":"{t}"}}}}"#
            )
        };
        let k = keys.policy("ServicePolicy", "orders");
        assert_eq!(s.put(&keys, &k, policy("2s").as_bytes(), 5), Ok(true));
        assert!(s.put(&keys, &k, policy("0s").as_bytes(), 6).is_err());
        assert_eq!(s.rejected[&k].revision, 6);
        let doc = s.to_document(&full());
        assert_eq!(
            doc.services["orders"].policy.request_timeout,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(s.put(&keys, &k, policy("3s").as_bytes(), 7), Ok(true));
        assert!(s.rejected.is_empty());
    }

    /// A composed route whose jq program does not compile is refused with the reason; the
    /// route's last good version stays in the document (docs/composition.md).
    #[test]
    fn an_http_route_whose_jq_does_not_compile_keeps_the_last_good_one() {
        let keys = Keys::new("/t");
        let mut s = MeshState::default();
        let route = |jq: &str| {
            serde_json::to_vec(&serde_json::json!({
                "apiVersion": "trellis.dev/v1", "kind": "HTTPRoute", "metadata": {"name": "shop"},
                "spec": {"hosts": ["api.example.com"], "gateways": ["edge"], "rules": [{
                    "backends": [{"service": "orders"}],
                    "transform": {"response": {"jq": jq}}}]}
            }))
            .unwrap()
        };
        let k = keys.policy("HTTPRoute", "shop");
        assert_eq!(s.put(&keys, &k, &route("{data: .}"), 5), Ok(true));
        let e = s.put(&keys, &k, &route("{data: .} |"), 6).unwrap_err();
        assert!(
            e.to_string()
                .contains("transform.response.jq: `{data: .} |` does not parse"),
            "{e}"
        );
        let doc = s.to_document(&full());
        let kept = doc.http_routes["shop"].rules[0].transform.as_ref().unwrap();
        assert_eq!(
            kept.response.as_ref().unwrap().jq.as_deref(),
            Some("{data: .}")
        );
    }

    #[test]
    fn resync_applies_only_differences() {
        let keys = Keys::new("/t");
        let mut s = MeshState::default();
        let (a, b, c) = (
            keys.instance("orders", "a"),
            keys.instance("orders", "b"),
            keys.instance("pay", "c"),
        );
        let (ra, rb, rc) = (
            reg("orders", "a", 1),
            reg("orders", "b", 2),
            reg("pay", "c", 3),
        );
        let ch = s.resync(
            &keys,
            [(a.as_str(), ra.as_slice()), (b.as_str(), rb.as_slice())],
            10,
            |_, _| {},
        );
        assert_eq!(
            ch,
            Changes {
                applied: 2,
                ..Changes::default()
            }
        );
        let ch = s.resync(
            &keys,
            [(a.as_str(), ra.as_slice()), (c.as_str(), rc.as_slice())],
            12,
            |_, _| {},
        );
        assert_eq!((ch.applied, ch.removed, ch.rejected), (1, 0, 0));
        assert_eq!(ch.vanished.len(), 1, "b vanished unannounced");
        assert_eq!(s.revision, 12);
        let doc = s.to_document(&full());
        assert_eq!(doc.services["orders"].endpoints.len(), 1);
        assert_eq!(doc.services["pay"].endpoints[0].address, "127.0.0.1:3");
        let mut rejected = Vec::new();
        let bad = b"{".as_slice();
        let ch = s.resync(&keys, [(a.as_str(), bad)], 13, |k, _| {
            rejected.push(k.to_string())
        });
        assert_eq!(ch.rejected, 1);
        assert_eq!(rejected, vec![a.clone()]);
        // The rejected key keeps its last good value; the others are gone.
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn registration_under_the_wrong_key_is_rejected() {
        let keys = Keys::new("/t");
        let mut s = MeshState::default();
        let err = s
            .put(
                &keys,
                &keys.instance("orders", "x"),
                &reg("orders", "a", 1),
                1,
            )
            .unwrap_err();
        assert!(err.contains("stored under"), "{err}");
    }

    #[test]
    fn a_scoped_document_keeps_what_the_sidecar_uses_and_every_authentication_policy() {
        let keys = Keys::new("/t");
        let mut s = MeshState::default();
        let yaml = include_str!("../../../examples/gateway/policies.yaml");
        for doc in trellis_policies::parse_documents(yaml, "gateway") {
            let doc = doc.unwrap();
            let k = keys.policy(&doc.kind, &doc.metadata.name);
            let v = serde_json::to_vec(&doc).unwrap();
            assert_eq!(s.put(&keys, &k, &v, 1), Ok(true), "{k}");
        }
        let (a, b) = (keys.instance("orders", "a"), keys.instance("stock", "b"));
        s.put(&keys, &a, &reg("orders", "a", 1), 2).unwrap();
        s.put(&keys, &b, &reg("stock", "b", 2), 3).unwrap();
        let scoped = |service: &str, deps: &[&str]| {
            let cfg = crate::config::DiscoveryConfig {
                dependencies: deps.iter().map(|d| d.to_string()).collect(),
                ..Default::default()
            };
            Scope::new(&cfg, service, None)
        };
        // A sidecar of `web` calling orders: orders only; the gateway's authentication (its
        // claim headers are stripped everywhere) but not its authorization, nor the
        // consumers' key digests.
        let doc = s.to_document(&scoped("web", &["orders"]));
        assert_eq!(doc.services.keys().collect::<Vec<_>>(), vec!["orders"]);
        assert!(doc.authentication.contains_key("gateway-auth"));
        assert!(doc.authorization.is_empty());
        assert!(doc.consumers.is_empty());
        // The gateway itself: its authorization and the consumers.
        let doc = s.to_document(&scoped("gateway", &[]));
        assert!(doc.services.is_empty());
        assert!(!doc.authorization.is_empty());
        assert!(doc.consumers.contains_key("acme"));
        // Full scope: everything.
        let doc = s.to_document(&full());
        assert_eq!(doc.services.len(), 2);
        assert!(doc.consumers.contains_key("acme"));
    }
}
