//! The data plane's routing view of a snapshot: per service, its endpoints with their live
//! stats and the balancer its policy asks for. Built off the request path whenever a snapshot
//! arrives; endpoints that persist across snapshots keep their stats (in-flight counts, latency,
//! ejection).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use http::Request;
use serde::Serialize;
use trellis_policies::{HashOn, SpiffeId};

use crate::balance::{self, hash_key, Balancer, EndpointStats, PickContext};
use crate::snapshot::{Endpoint, Service, Snapshot};

pub struct RouteTable {
    pub snapshot: Arc<Snapshot>,
    routes: HashMap<String, Arc<Route>>,
}

pub struct Route {
    pub service: Arc<Service>,
    pub stats: Vec<Arc<EndpointStats>>,
    balancer: Box<dyn Balancer>,
    hash_on: Option<HashOn>,
}

/// Stats per endpoint identity, shared by successive route tables.
#[derive(Default)]
pub struct StatsRegistry(Mutex<HashMap<(SocketAddr, SpiffeId), Arc<EndpointStats>>>);

// === impl RouteTable ===

impl RouteTable {
    pub fn empty() -> Self {
        Self {
            snapshot: Arc::new(Snapshot::default()),
            routes: HashMap::new(),
        }
    }

    pub fn build(
        snapshot: Arc<Snapshot>,
        registry: &StatsRegistry,
        local_zone: Option<&str>,
    ) -> Self {
        let mut stats_by_key = registry.lock();
        let mut routes = HashMap::with_capacity(snapshot.services.len());
        for (name, svc) in &snapshot.services {
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
            let zones: Vec<Option<&str>> =
                svc.endpoints.iter().map(|e| e.zone.as_deref()).collect();
            let spec = svc.load_balancer.as_ref();
            let balancer = balance::build(spec, &stats, &weights, &keys, &zones, local_zone);
            let hash_on = spec.and_then(|s| s.hash_on.clone());
            routes.insert(
                name.clone(),
                Arc::new(Route {
                    service: svc.clone(),
                    stats,
                    balancer,
                    hash_on,
                }),
            );
        }
        // Forget endpoints that left the mesh.
        stats_by_key.retain(|(addr, id), _| snapshot.has_endpoint(*addr, id));
        Self { snapshot, routes }
    }

    /// The route for a host, case-insensitively.
    pub fn route(&self, host: &str) -> Option<&Arc<Route>> {
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
                    ewma_ms: s.ewma().as_secs_f64() * 1000.0,
                    available: s.available(),
                })
                .collect();
            out.insert(
                name.clone(),
                serde_json::json!({ "balancer": r.balancer.name(), "endpoints": endpoints }),
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
    ewma_ms: f64,
    available: bool,
}

// === impl Route ===

impl Route {
    /// Choose an endpoint for `req` from `client`. Allocation-free.
    pub fn pick<B>(
        &self,
        req: &Request<B>,
        client: IpAddr,
    ) -> Option<(&Endpoint, &Arc<EndpointStats>)> {
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
        let i = self.balancer.pick(&self.stats, &PickContext { hash })?;
        Some((self.service.endpoints.get(i)?, self.stats.get(i)?))
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

// === impl StatsRegistry ===

impl StatsRegistry {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(SocketAddr, SpiffeId), Arc<EndpointStats>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str, registry: &StatsRegistry) -> RouteTable {
        let doc = trellis_policies::parse_mesh_yaml(yaml).unwrap();
        let snap = Snapshot::from_document(&doc, "td", 1, "t".into()).unwrap();
        RouteTable::build(Arc::new(snap), registry, Some("a"))
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
