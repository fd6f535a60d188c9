//! The mesh state the data plane routes with. A snapshot is immutable; a new one replaces the
//! old one atomically (see `app`), so a request sees one consistent version from start to end.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use trellis_policies::{
    CircuitBreakerSpec, ConcurrencyLimitSpec, HealthCheckSpec, LoadBalancerSpec, MeshDocument,
    OutlierDetectionSpec, RateLimitSpec, RetrySpec, SpiffeId,
};

#[derive(Debug, Default, Serialize)]
pub struct Snapshot {
    /// Monotonic version from the source (file generation, later the etcd revision).
    pub version: u64,
    /// Human-readable origin, e.g. `file:/etc/trellis/mesh.yaml`.
    pub source: String,
    pub services: HashMap<String, Arc<Service>>,
    /// HTTPRoutes by policy name (compiled into the route table's routing table).
    /// Shared between successive snapshots while unchanged (an instance change elsewhere).
    #[serde(skip_serializing_if = "no_routes")]
    pub http_routes: Arc<BTreeMap<String, trellis_policies::HttpRouteSpec>>,
    /// Rate limits by policy name (each sidecar enforces those of its own service).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rate_limits: BTreeMap<String, RateLimitSpec>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub concurrency_limits: BTreeMap<String, ConcurrencyLimitSpec>,
    /// Authentication policies by name (each sidecar enforces those of its own service).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub authentication: BTreeMap<String, trellis_policies::AuthenticationSpec>,
    /// Consumers by name. Not dumped: `/config_dump` shows them through the auth state,
    /// without key digests.
    #[serde(skip)]
    pub consumers: BTreeMap<String, trellis_policies::ConsumerSpec>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub authorization: BTreeMap<String, trellis_policies::AuthorizationSpec>,
    /// Cache policies by name (each sidecar applies those of its own service).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cache_policies: BTreeMap<String, trellis_policies::CachePolicySpec>,
    /// The latest cache purge of each service.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cache_purges: BTreeMap<String, trellis_policies::CachePurgeSpec>,
}

#[derive(Debug, Serialize)]
pub struct Service {
    pub name: Arc<String>,
    pub endpoints: Vec<Endpoint>,
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub stream_idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    pub outlier_detection: OutlierDetectionSpec,
    pub circuit_breaker: CircuitBreakerSpec,
    pub retries: RetrySpec,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// Set for a destination outside the mesh: the `Host` to send (`host[:port]`). Its
    /// endpoints are the host's DNS records, called over plain HTTP/1.1, without mTLS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_host: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    #[serde(serialize_with = "as_display")]
    pub identity: SpiffeId,
    pub weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

fn no_routes(r: &Arc<BTreeMap<String, trellis_policies::HttpRouteSpec>>) -> bool {
    r.is_empty()
}

fn as_display<S: serde::Serializer>(v: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

// === impl Snapshot ===

impl Snapshot {
    /// Build a snapshot from a validated document. Endpoints without an explicit identity get
    /// their service's identity in `trust_domain`.
    pub fn from_document(
        doc: &MeshDocument,
        trust_domain: &str,
        version: u64,
        source: String,
    ) -> Result<Self, String> {
        let mut services = HashMap::with_capacity(doc.services.len());
        for (name, spec) in &doc.services {
            let svc = Service::from_spec(name, spec, trust_domain)?;
            services.insert(name.clone(), Arc::new(svc));
        }
        let mut rate_limits = doc.rate_limits.clone();
        rate_limits.extend(quota_limits(doc));
        Ok(Self {
            version,
            source,
            services,
            http_routes: Arc::new(doc.http_routes.clone()),
            rate_limits,
            concurrency_limits: doc.concurrency_limits.clone(),
            authentication: doc.authentication.clone(),
            consumers: doc.consumers.clone(),
            authorization: doc.authorization.clone(),
            cache_policies: doc.cache_policies.clone(),
            cache_purges: doc.cache_purges.clone(),
        })
    }

    /// This snapshot with some services replaced (`Some`) or removed (`None`), everything
    /// else shared or copied as is: what a store sends when one service's instances changed.
    pub fn with_services(
        &self,
        version: u64,
        source: String,
        changes: impl IntoIterator<Item = (String, Option<Arc<Service>>)>,
    ) -> Self {
        let mut services = self.services.clone();
        for (name, svc) in changes {
            match svc {
                Some(svc) => services.insert(name, svc),
                None => services.remove(&name),
            };
        }
        Self {
            version,
            source,
            services,
            http_routes: self.http_routes.clone(),
            rate_limits: self.rate_limits.clone(),
            concurrency_limits: self.concurrency_limits.clone(),
            authentication: self.authentication.clone(),
            consumers: self.consumers.clone(),
            authorization: self.authorization.clone(),
            cache_policies: self.cache_policies.clone(),
            cache_purges: self.cache_purges.clone(),
        }
    }

    /// Find the service an app addressed, by host name without port, case-insensitively.
    pub fn service(&self, host: &str) -> Option<&Arc<Service>> {
        match self.services.get(host) {
            Some(s) => Some(s),
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.services.get(&host.to_ascii_lowercase())
            }
            None => None,
        }
    }

    /// True if `addr` is an endpoint of some service (used to evict pooled connections).
    pub fn has_endpoint(&self, addr: SocketAddr, identity: &SpiffeId) -> bool {
        self.services.values().any(|s| {
            s.endpoints
                .iter()
                .any(|e| e.addr == addr && &e.identity == identity)
        })
    }
}

// === impl Service ===

impl Service {
    /// Build one service from its declared (and resolved) spec. Endpoints without an explicit
    /// identity get the service's identity in `trust_domain`.
    pub fn from_spec(
        name: &str,
        spec: &trellis_policies::ServiceSpec,
        trust_domain: &str,
    ) -> Result<Self, String> {
        let default_id = SpiffeId::for_service(trust_domain, name)
            .map_err(|e| format!("services.{name}: {e}"))?;
        let mut endpoints = Vec::with_capacity(spec.endpoints.len());
        for (i, ep) in spec.endpoints.iter().enumerate() {
            let path = || format!("services.{name}.endpoints[{i}]");
            let addr = ep
                .address
                .parse()
                .map_err(|e| format!("{}.address: {e}", path()))?;
            let identity = match &ep.identity {
                Some(id) => SpiffeId::parse(id).map_err(|e| format!("{}.identity: {e}", path()))?,
                None => default_id.clone(),
            };
            endpoints.push(Endpoint {
                addr,
                identity,
                weight: ep.weight,
                zone: ep.zone.clone(),
            });
        }
        Ok(Service {
            name: Arc::new(name.to_string()),
            endpoints,
            connect_timeout: spec.policy.connect_timeout,
            request_timeout: spec.policy.request_timeout,
            external_host: spec.external.as_ref().map(|e| match e.port {
                80 => Arc::from(e.host.as_str()),
                port => Arc::from(format!("{}:{port}", e.host)),
            }),
            stream_idle_timeout: spec.policy.stream_idle_timeout,
            load_balancer: spec.policy.load_balancer.clone(),
            outlier_detection: spec.policy.outlier_detection.clone().unwrap_or_default(),
            circuit_breaker: spec.policy.circuit_breaker.clone().unwrap_or_default(),
            retries: spec.policy.retries.clone().unwrap_or_default(),
            health_check: spec.policy.health_check.clone(),
        })
    }
}

/// Consumers' quotas as global rate limits: one per (consumer, service that authenticates its
/// callers), named `quota.<consumer>.<service>`, counting only that consumer's requests. Every
/// sidecar derives the same names from the same state, so the shares are coordinated through
/// etcd like any global limit.
fn quota_limits(doc: &MeshDocument) -> Vec<(String, RateLimitSpec)> {
    let services: std::collections::BTreeSet<&str> = doc
        .authentication
        .values()
        .map(|a| a.service.as_str())
        .collect();
    let mut out = Vec::new();
    for (consumer, spec) in &doc.consumers {
        let Some(q) = spec.quota.filter(|_| !spec.disabled) else {
            continue;
        };
        for service in &services {
            out.push((
                format!("quota.{consumer}.{service}"),
                RateLimitSpec {
                    service: service.to_string(),
                    route: None,
                    scope: trellis_policies::Scope::Global,
                    key: Default::default(),
                    limit: q.limit,
                    burst: q.burst,
                    consumer: Some(consumer.clone()),
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        let doc = trellis_policies::parse_mesh_yaml(yaml).unwrap();
        Snapshot::from_document(&doc, "td", 1, "test".into()).unwrap()
    }

    #[test]
    fn default_identity_and_case_insensitive_lookup() {
        let s = snapshot(
            "services:\n  orders:\n    endpoints:\n      - address: 127.0.0.1:1\n  empty: {}\n",
        );
        let ep = &s.service("Orders").unwrap().endpoints[0];
        assert_eq!(ep.identity.to_string(), "spiffe://td/service/orders");
        assert!(s.service("empty").unwrap().endpoints.is_empty());
        assert!(s.service("missing").is_none());
    }
}
