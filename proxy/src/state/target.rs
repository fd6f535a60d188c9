//! The data plane's service targets, built from a snapshot: per service, what a request to
//! it is sent to (not an HTTPRoute, which decides *which* service: see
//! [`crate::policy::routing`]): its endpoints with their live
//! stats and the balancer its policy asks for. Built off the request path whenever a snapshot
//! arrives; endpoints that persist across snapshots keep their stats (in-flight counts, latency,
//! ejection).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::Request;
use serde::Serialize;
use trellis_policies::{AllEjected, HashOn, RetrySpec, SpiffeId};

use crate::policy::breaker::ServiceCounters;
use crate::state::balance::{
    self, hash_key, Balancer, EndpointStats, OutlierEvent, OutlierParams, PickContext,
};
use crate::state::snapshot::{Endpoint, Service, Snapshot};

/// Every service's [`Target`] by name, with the HTTPRoutes compiled against them.
pub struct TargetTable {
    pub snapshot: Arc<Snapshot>,
    routes: HashMap<String, Arc<Target>>,
    /// The snapshot's HTTPRoutes bound to the mesh (the outbound side), compiled against
    /// these routes.
    pub routing: Arc<crate::policy::routing::RoutingTable>,
    /// Those bound to this sidecar's ingress gateway (empty without one): the only hosts the
    /// edge routes.
    pub gateway_routing: Arc<crate::policy::routing::RoutingTable>,
}

/// One service as a destination: its endpoints with their live stats, the balancer its
/// policy asks for, outlier detection, breakers and the retry policy.
pub struct Target {
    pub service: Arc<Service>,
    pub stats: Vec<Arc<EndpointStats>>,
    balancer: Box<dyn Balancer>,
    hash_on: Option<HashOn>,
    outlier: OutlierParams,
    /// Most endpoints that may be ejected at once (at least one).
    max_ejected: usize,
    when_all_ejected: AllEjected,
    /// Round robin over all endpoints when every one is ejected (panic mode).
    panic_next: AtomicUsize,
    pub counters: Arc<ServiceCounters>,
    pub max_requests: usize,
    pub max_pending: usize,
    pub max_retries: usize,
    pub retry: RetrySpec,
}

/// The outcome of choosing an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Endpoint(usize),
    /// Every endpoint is ejected and the policy says to route anyway: this one.
    Panic(usize),
    NoEndpoints,
    /// Every endpoint is ejected and the policy says to fail fast.
    AllEjected,
}

/// Stats per endpoint identity and breaker counters per service, shared by successive route
/// tables.
#[derive(Default)]
pub struct StatsRegistry {
    endpoints: Mutex<HashMap<(SocketAddr, SpiffeId), Arc<EndpointStats>>>,
    services: Mutex<HashMap<String, Arc<ServiceCounters>>>,
}

// === impl TargetTable ===

impl TargetTable {
    pub fn empty() -> Self {
        Self {
            snapshot: Arc::new(Snapshot::default()),
            routes: HashMap::new(),
            routing: Arc::default(),
            gateway_routing: Arc::default(),
        }
    }

    /// `gateway`: this sidecar's service name when it runs an ingress gateway.
    pub fn build(
        snapshot: Arc<Snapshot>,
        registry: &StatsRegistry,
        local_zone: Option<&str>,
        gateway: Option<&str>,
    ) -> Self {
        Self::update(&Self::empty(), snapshot, registry, local_zone, gateway)
    }

    /// Build the table for `snapshot`, reusing `prev`'s route of every service whose
    /// [`Service`] is the same object: a change to one service rebuilds that service's
    /// balancer only, whatever the size of the mesh. Stats of endpoints that left are dropped.
    pub fn update(
        prev: &TargetTable,
        snapshot: Arc<Snapshot>,
        registry: &StatsRegistry,
        local_zone: Option<&str>,
        gateway: Option<&str>,
    ) -> Self {
        let mut stats_by_key = registry.lock();
        let mut counters = registry.services.lock().unwrap_or_else(|p| p.into_inner());
        counters.retain(|name, _| snapshot.services.contains_key(name));
        // Forget endpoints that left the mesh.
        for key in departed(&prev.snapshot, &snapshot) {
            stats_by_key.remove(&key);
        }
        let mut routes = HashMap::with_capacity(snapshot.services.len());
        for (name, svc) in &snapshot.services {
            let route = match prev.routes.get(name) {
                Some(r) if Arc::ptr_eq(&r.service, svc) => r.clone(),
                _ => {
                    let counters = counters.entry(name.clone()).or_default().clone();
                    build_route(svc, &mut stats_by_key, counters, local_zone)
                }
            };
            routes.insert(name.clone(), route);
        }
        // HTTPRoutes name services, resolved per request: recompiled only when the routes
        // or the set of services (which hosts are services) changed.
        let same_services = prev.snapshot.services.len() == snapshot.services.len()
            && snapshot
                .services
                .keys()
                .all(|k| prev.snapshot.services.contains_key(k));
        let (routing, gateway_routing) =
            if same_services && Arc::ptr_eq(&prev.snapshot.http_routes, &snapshot.http_routes) {
                (prev.routing.clone(), prev.gateway_routing.clone())
            } else {
                let compile = |gateway: &str| {
                    Arc::new(crate::policy::routing::RoutingTable::build(
                        &snapshot.http_routes,
                        gateway,
                        |name| routes.contains_key(name),
                    ))
                };
                let routing = compile(trellis_policies::MESH_GATEWAY);
                (routing, gateway.map(compile).unwrap_or_default())
            };
        Self {
            snapshot,
            routes,
            routing,
            gateway_routing,
        }
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.routes.values()
    }

    /// The route for a host, case-insensitively.
    pub fn route(&self, host: &str) -> Option<&Arc<Target>> {
        match self.routes.get(host) {
            Some(r) => Some(r),
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                self.routes.get(&host.to_ascii_lowercase())
            }
            None => None,
        }
    }

    /// Balancer and endpoint state, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (name, r) in &self.routes {
            let endpoints: Vec<EndpointDump> = r
                .service
                .endpoints
                .iter()
                .zip(&r.stats)
                .map(|(e, s)| EndpointDump {
                    addr: e.addr,
                    weight: e.weight,
                    in_flight: s.in_flight(),
                    healthy: s.is_healthy(),
                    ewma_ms: s.ewma().as_secs_f64() * 1000.0,
                    available: s.available(),
                })
                .collect();
            out.insert(
                name.clone(),
                serde_json::json!({
                    "balancer": r.balancer.name(),
                    "endpoints": endpoints,
                    "requests_in_flight": r.counters.in_flight(),
                    "max_requests": r.max_requests,
                    "max_pending": r.max_pending,
                }),
            );
        }
        serde_json::Value::Object(out)
    }
}

#[derive(Serialize)]
struct EndpointDump {
    addr: SocketAddr,
    weight: u32,
    in_flight: usize,
    healthy: bool,
    ewma_ms: f64,
    available: bool,
}

// === impl Target ===

impl Target {
    /// Choose an endpoint for `req`, other than `exclude` (an endpoint that just failed to
    /// connect), claiming the trial slot of an endpoint on probation. Allocation-free.
    pub fn choose<B>(&self, req: &Request<B>, client: IpAddr, exclude: Option<usize>) -> Choice {
        let n = self.stats.len();
        if n == 0 {
            return Choice::NoEndpoints;
        }
        for _ in 0..4 {
            match self.pick_index(req, client) {
                Some(i) if Some(i) == exclude && n > 1 => continue,
                Some(i) if self.stats[i].claim() => return Choice::Endpoint(i),
                Some(_) => continue,
                None => break,
            }
        }
        if self.stats.iter().any(|s| s.available()) {
            // Unlucky draws (the excluded endpoint or busy probes): take any available one.
            let start = self.panic_next.fetch_add(1, Ordering::Relaxed);
            let found = (0..n)
                .map(|k| (start + k) % n)
                .find(|&i| Some(i) != exclude && self.stats[i].available());
            if let Some(i) = found {
                if self.stats[i].claim() {
                    return Choice::Endpoint(i);
                }
            }
        }
        match self.when_all_ejected {
            AllEjected::FailFast => Choice::AllEjected,
            AllEjected::IgnoreEjections => {
                Choice::Panic(self.panic_next.fetch_add(1, Ordering::Relaxed) % n)
            }
        }
    }

    /// Feed the outcome of a request to endpoint `i` into outlier detection.
    pub fn record(&self, i: usize, success: bool) -> OutlierEvent {
        let Some(s) = self.stats.get(i) else {
            return OutlierEvent::None;
        };
        if success {
            s.record_success()
        } else {
            s.record_failure(&self.outlier, || {
                self.stats.iter().filter(|s| s.is_ejected()).count() < self.max_ejected
            })
        }
    }

    /// The balancer's choice, ignoring probation claims.
    pub fn pick<B>(
        &self,
        req: &Request<B>,
        client: IpAddr,
    ) -> Option<(&Endpoint, &Arc<EndpointStats>)> {
        let i = self.pick_index(req, client)?;
        Some((self.service.endpoints.get(i)?, self.stats.get(i)?))
    }

    fn pick_index<B>(&self, req: &Request<B>, client: IpAddr) -> Option<usize> {
        let hash = self.hash_on.as_ref().and_then(|h| match h {
            HashOn::Header(name) => req
                .headers()
                .get(name.as_str())
                .map(|v| hash_key(v.as_bytes())),
            HashOn::Cookie(name) => cookie(req, name).map(|v| hash_key(v.as_bytes())),
            HashOn::SourceIp => Some(match client {
                IpAddr::V4(ip) => hash_key(&ip.octets()),
                IpAddr::V6(ip) => hash_key(&ip.octets()),
            }),
        });
        self.balancer.pick(&self.stats, &PickContext { hash })
    }

    pub fn balancer_name(&self) -> &'static str {
        self.balancer.name()
    }
}

/// The value of cookie `name`, without allocating.
fn cookie<'a, B>(req: &'a Request<B>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            kv.trim()
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
        })
}

/// The route of one service: its endpoints' shared stats and the balancer its policy asks for.
fn build_route(
    svc: &Arc<Service>,
    stats_by_key: &mut HashMap<(SocketAddr, SpiffeId), Arc<EndpointStats>>,
    counters: Arc<ServiceCounters>,
    local_zone: Option<&str>,
) -> Arc<Target> {
    let stats: Vec<Arc<EndpointStats>> = svc
        .endpoints
        .iter()
        .map(|e| {
            stats_by_key
                .entry((e.addr, e.identity.clone()))
                .or_default()
                .clone()
        })
        .collect();
    let weights: Vec<u32> = svc.endpoints.iter().map(|e| e.weight).collect();
    let keys: Vec<u64> = svc
        .endpoints
        .iter()
        .map(|e| hash_key(e.addr.to_string().as_bytes()))
        .collect();
    let zones: Vec<Option<&str>> = svc.endpoints.iter().map(|e| e.zone.as_deref()).collect();
    let spec = svc.load_balancer.as_ref();
    let balancer = balance::build(spec, &stats, &weights, &keys, &zones, local_zone);
    let hash_on = spec.and_then(|s| s.hash_on.clone());
    let od = &svc.outlier_detection;
    let outlier = OutlierParams {
        consecutive_failures: od.consecutive_failures,
        base_ejection: od.base_ejection_time,
        max_ejection: od.max_ejection_time,
    };
    let max_ejected = (stats.len() * od.max_ejection_percent as usize / 100).max(1);
    Arc::new(Target {
        service: svc.clone(),
        stats,
        balancer,
        hash_on,
        outlier,
        max_ejected,
        when_all_ejected: od.when_all_ejected,
        panic_next: AtomicUsize::new(0),
        counters,
        max_requests: svc.circuit_breaker.max_requests as usize,
        max_pending: svc.circuit_breaker.max_pending as usize,
        max_retries: svc.circuit_breaker.max_retries as usize,
        retry: svc.retries.clone(),
    })
}

/// Endpoints (address and identity) that `prev` has and `next` does not. Only services that
/// changed (another [`Service`] object) or left are compared, so the cost follows the change,
/// not the mesh.
pub fn departed(prev: &Snapshot, next: &Snapshot) -> Vec<(SocketAddr, SpiffeId)> {
    let mut candidates = Vec::new();
    for (name, old) in &prev.services {
        let new = next.services.get(name);
        if new.is_some_and(|n| Arc::ptr_eq(n, old)) {
            continue;
        }
        for e in &old.endpoints {
            let kept = new.is_some_and(|n| {
                n.endpoints
                    .iter()
                    .any(|x| x.addr == e.addr && x.identity == e.identity)
            });
            if !kept {
                candidates.push((e.addr, e.identity.clone()));
            }
        }
    }
    // An endpoint may have moved to another service: rare, and checked against the whole
    // snapshot only for the few endpoints that left their service.
    candidates.retain(|(addr, id)| !next.has_endpoint(*addr, id));
    candidates
}

// === impl StatsRegistry ===

impl StatsRegistry {
    /// Requests to `service` so far; `None` when no route table holds it.
    pub fn admitted(&self, service: &str) -> Option<u64> {
        let counters = self.services.lock().unwrap_or_else(|p| p.into_inner());
        counters.get(service).map(|c| c.admitted())
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SpiffeId), Arc<EndpointStats>>> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str, registry: &StatsRegistry) -> TargetTable {
        let doc = trellis_policies::parse_mesh_yaml(yaml).unwrap();
        let snap = Snapshot::from_document(&doc, "td", 1, "t".into()).unwrap();
        TargetTable::build(Arc::new(snap), registry, Some("a"), None)
    }

    #[tokio::test(start_paused = true)]
    async fn choice_respects_exclusion_ejection_guard_and_all_ejected_mode() {
        let registry = StatsRegistry::default();
        let yaml = |mode: &str| {
            format!(
                "services:\n  s:\n    endpoints:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:2\n    policy:\n      outlier_detection: {{consecutive_failures: 2, max_ejection_percent: 50, when_all_ejected: {mode}}}\n"
            )
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let req = Request::get("/").body(()).unwrap();
        let t = table(&yaml("fail_fast"), &registry);
        let r = t.route("s").unwrap();
        for _ in 0..20 {
            assert_eq!(
                r.choose(&req, ip, Some(0)),
                Choice::Endpoint(1),
                "the excluded endpoint is avoided"
            );
        }
        // Two failures eject endpoint 0; the 50 % guard then protects endpoint 1.
        assert_eq!(r.record(0, false), OutlierEvent::None);
        assert!(matches!(r.record(0, false), OutlierEvent::Ejected(_)));
        for _ in 0..5 {
            assert_eq!(
                r.record(1, false),
                OutlierEvent::None,
                "max_ejection_percent holds"
            );
        }
        assert!((0..20).all(|_| r.choose(&req, ip, None) == Choice::Endpoint(1)));
        // Force both out: fail fast says so; ignore_ejections routes anyway.
        r.stats[1].eject_for(std::time::Duration::from_secs(60));
        assert_eq!(r.choose(&req, ip, None), Choice::AllEjected);
        let t = table(&yaml("ignore_ejections"), &registry);
        assert!(matches!(
            t.route("s").unwrap().choose(&req, ip, None),
            Choice::Panic(_)
        ));
        // Probation: after the ejection time one trial goes out, then the endpoint is re-admitted.
        tokio::time::advance(std::time::Duration::from_secs(61)).await;
        let r = t.route("s").unwrap();
        let Choice::Endpoint(i) = r.choose(&req, ip, None) else {
            panic!("expected a trial")
        };
        assert_eq!(r.record(i, true), OutlierEvent::Readmitted);
    }

    #[test]
    fn hash_on_header_cookie_and_source_sticks_and_stats_survive_snapshots() {
        let registry = StatsRegistry::default();
        let yaml = |lb: &str| {
            format!(
                "services:\n  s:\n    endpoints:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:2\n      - address: 127.0.0.1:3\n    policy:\n      load_balancer: {lb}\n"
            )
        };
        let t = table(
            &yaml("{algorithm: consistent_hash, hash_on: {header: x-user}}"),
            &registry,
        );
        let r = t.route("S").unwrap();
        let req = |user: &str| Request::get("/").header("x-user", user).body(()).unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let first = r.pick(&req("alice"), ip).unwrap().0.addr;
        assert!((0..50).all(|_| r.pick(&req("alice"), ip).unwrap().0.addr == first));
        let distinct: std::collections::HashSet<_> = (0..200)
            .map(|i| r.pick(&req(&format!("u{i}")), ip).unwrap().0.addr)
            .collect();
        assert_eq!(distinct.len(), 3, "keys spread over all endpoints");

        let t = table(
            &yaml("{algorithm: consistent_hash, hash_on: {cookie: sid}}"),
            &registry,
        );
        let r = t.route("s").unwrap();
        let req = Request::get("/")
            .header("cookie", "a=1; sid=xyz; b=2")
            .body(())
            .unwrap();
        let first = r.pick(&req, ip).unwrap().0.addr;
        assert!((0..20).all(|_| r.pick(&req, ip).unwrap().0.addr == first));

        // Stats are shared across tables for the same endpoint.
        let stats = t.route("s").unwrap().stats[0].clone();
        let _g = stats.start();
        let t2 = table(&yaml("{algorithm: least_request}"), &registry);
        assert_eq!(t2.route("s").unwrap().stats[0].in_flight(), 1);
        assert_eq!(t2.route("s").unwrap().balancer_name(), "least_request");
        assert!(t2.dump()["s"]["endpoints"][0]["in_flight"] == 1);
    }
}
