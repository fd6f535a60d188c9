//! Name resolution for the mesh state: endpoints given as `host:port` and external services
//! become one endpoint per DNS record. Records are re-resolved when their TTL expires (clamped
//! to 1 s .. 5 min); when a lookup fails, the last known records keep serving (fail static) and
//! the failure is logged and counted. Resolution happens in the agent, before a snapshot is
//! built: the data plane never waits on DNS.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use trellis_policies::{parse_host_port, EndpointSpec, MeshDocument};

const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(300);
/// After a failed lookup, try again this soon.
const RETRY_AFTER: Duration = Duration::from_secs(5);
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

struct Cached {
    ips: Vec<IpAddr>,
    valid_until: Instant,
}

pub struct Dns {
    resolver: Option<TokioResolver>,
    cache: Mutex<HashMap<String, Cached>>,
    lookups: Family<ResultLabels, Counter>,
}

// === impl Dns ===

impl Dns {
    /// A resolver using `nameservers`, or the system configuration when empty.
    pub fn new(nameservers: &[SocketAddr], registry: &mut Registry) -> Self {
        let lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "dns_lookups",
            "DNS lookups for endpoints and external services, by result",
            lookups.clone(),
        );
        let resolver = if nameservers.is_empty() {
            TokioResolver::builder_tokio().and_then(|b| b.build())
        } else {
            let servers = nameservers
                .iter()
                .map(|ns| {
                    let mut c = NameServerConfig::udp(ns.ip());
                    for conn in &mut c.connections {
                        conn.port = ns.port();
                    }
                    c
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
            .build()
        };
        let resolver = match resolver {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "no DNS resolver: host-name endpoints and external services will have no endpoints");
                None
            }
        };
        Self {
            resolver,
            cache: Mutex::new(HashMap::new()),
            lookups,
        }
    }

    /// `doc` with every host name replaced by its records (external services get their
    /// endpoints from their host). Endpoint order is stable (sorted), so an unchanged answer
    /// gives an identical document.
    pub async fn resolve(&self, doc: &MeshDocument) -> MeshDocument {
        let mut out = doc.clone();
        let mut used = BTreeSet::new();
        for svc in out.services.values_mut() {
            if let Some(ext) = &svc.external {
                used.insert(ext.host.clone());
                let ips = self.lookup(&ext.host).await;
                svc.endpoints = ips
                    .into_iter()
                    .map(|ip| EndpointSpec {
                        address: SocketAddr::new(ip, ext.port).to_string(),
                        identity: None,
                        weight: 1,
                        zone: None,
                    })
                    .collect();
                continue;
            }
            let mut endpoints = Vec::with_capacity(svc.endpoints.len());
            for ep in &svc.endpoints {
                if ep.address.parse::<SocketAddr>().is_ok() {
                    endpoints.push(ep.clone());
                    continue;
                }
                let Ok((host, port)) = parse_host_port(&ep.address) else {
                    continue;
                };
                used.insert(host.clone());
                for ip in self.lookup(&host).await {
                    endpoints.push(EndpointSpec {
                        address: SocketAddr::new(ip, port).to_string(),
                        ..ep.clone()
                    });
                }
            }
            endpoints.sort_by(|a, b| a.address.cmp(&b.address));
            endpoints.dedup_by(|a, b| a.address == b.address);
            svc.endpoints = endpoints;
        }
        self.lock().retain(|host, _| used.contains(host));
        out
    }

    /// When the earliest record in use expires (`None` when no names are in use).
    pub fn next_refresh(&self) -> Option<Instant> {
        self.lock().values().map(|c| c.valid_until).min()
    }

    async fn lookup(&self, host: &str) -> Vec<IpAddr> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return vec![ip];
        }
        let now = Instant::now();
        if let Some(c) = self.lock().get(host) {
            if now < c.valid_until {
                return c.ips.clone();
            }
        }
        let Some(resolver) = &self.resolver else {
            return Vec::new();
        };
        let result = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup_ip(host)).await;
        let mut cache = self.lock();
        match result {
            Ok(Ok(answer)) => {
                let mut ips: Vec<IpAddr> = answer.iter().collect();
                ips.sort();
                ips.dedup();
                let valid_until = answer.valid_until().clamp(now + MIN_TTL, now + MAX_TTL);
                self.count("ok");
                if cache.get(host).is_none_or(|c| c.ips != ips) {
                    tracing::info!(host, records = ?ips, "resolved");
                }
                cache.insert(
                    host.to_string(),
                    Cached {
                        ips: ips.clone(),
                        valid_until,
                    },
                );
                ips
            }
            failure => {
                let error = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {LOOKUP_TIMEOUT:?}"),
                };
                self.count("error");
                let entry = cache.entry(host.to_string()).or_insert(Cached {
                    ips: Vec::new(),
                    valid_until: now,
                });
                entry.valid_until = now + RETRY_AFTER;
                tracing::warn!(host, %error, keeping = ?entry.ips, "DNS lookup failed; keeping the last known records");
                entry.ips.clone()
            }
        }
    }

    fn count(&self, result: &'static str) {
        self.lookups.get_or_create(&ResultLabels { result }).inc();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
