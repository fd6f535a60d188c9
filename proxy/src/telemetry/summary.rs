//! A sidecar's compact summary: what a dashboard needs of its metrics (traffic per direction,
//! service and route with a latency histogram, consumers, error causes, connections, endpoint
//! states, rate-limit use), as JSON of a few KB instead of the full exposition.
//!
//! Counters are cumulative since the sidecar started, as in Prometheus: a reader takes the
//! difference between two summaries (and treats a smaller value as a restart).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::exposition::{Exposition, Sample};

/// Bumped when a field changes meaning; readers refuse what they do not know.
pub const SUMMARY_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub version: u32,
    /// The service this sidecar fronts.
    pub service: String,
    pub unix_ms: u64,
    /// The mesh snapshot in use (file generation or etcd revision).
    pub snapshot_version: u64,
    pub traffic: Vec<Traffic>,
    pub consumers: Vec<ConsumerTraffic>,
    pub causes: Vec<CauseCount>,
    /// Open client connections by direction.
    pub open_connections: BTreeMap<String, f64>,
    /// Requests received and not yet answered, by direction, at `unix_ms`. The inbound figure
    /// is this instance's share of its service's in-flight requests (a sidecar fronts one
    /// service). Absent from summaries of older sidecars, hence the default: the version
    /// stays 1.
    #[serde(default)]
    pub in_flight: BTreeMap<String, f64>,
    pub endpoints: Vec<EndpointStates>,
    pub rate_limits: Vec<RateLimitUse>,
}

/// Requests of one direction to one service (and HTTPRoute rule): `inbound` for the requests
/// this sidecar's service received, `outbound`/`ingress` for the calls it made.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub direction: String,
    pub service: String,
    pub route: String,
    /// Requests by status code.
    pub statuses: BTreeMap<u16, f64>,
    pub latency: Histogram,
}

/// Requests of one consumer to one service, through one HTTPRoute rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsumerTraffic {
    pub service: String,
    pub consumer: String,
    /// The HTTPRoute rule that routed them (at an ingress); `default` when none did (inbound,
    /// refused before routing), and in the summaries of older sidecars, which had no route:
    /// the version stays 1.
    #[serde(default = "default_route")]
    pub route: String,
    pub statuses: BTreeMap<u16, f64>,
}

impl Default for ConsumerTraffic {
    fn default() -> Self {
        Self {
            service: String::new(),
            consumer: String::new(),
            route: default_route(),
            statuses: BTreeMap::new(),
        }
    }
}

fn default_route() -> String {
    crate::policy::routing::DEFAULT_ROUTE.to_string()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CauseCount {
    pub direction: String,
    pub cause: String,
    pub count: f64,
}

/// Endpoints of a destination service by state, as this sidecar sees them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointStates {
    pub service: String,
    pub available: f64,
    pub ejected: f64,
    pub unhealthy: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RateLimitUse {
    pub policy: String,
    pub allowed: f64,
    pub limited: f64,
    /// This sidecar's share of the limit, requests per second.
    pub share_per_second: f64,
    /// Sidecars sharing a global limit, this one included.
    pub peers: f64,
}

/// A cumulative latency histogram in seconds: `counts[i]` requests took at most `bounds[i]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<f64>,
    pub count: f64,
    pub sum: f64,
}

// === impl Summary ===

impl Summary {
    /// The summary of `exposition` (this sidecar's registry, read back).
    pub fn from_exposition(service: &str, unix_ms: u64, e: &Exposition) -> Self {
        let mut s = Summary {
            version: SUMMARY_VERSION,
            service: service.to_string(),
            unix_ms,
            ..Default::default()
        };
        // Keyed by labels borrowed from `e`: a lookup allocates nothing (a read is every
        // sample of the registry, ~20 per series with the histogram buckets).
        let mut traffic: BTreeMap<(&str, &str, &str), Traffic> = BTreeMap::new();
        let mut consumers: BTreeMap<(&str, &str, &str), ConsumerTraffic> = BTreeMap::new();
        let mut endpoints: BTreeMap<&str, EndpointStates> = BTreeMap::new();
        let mut limits: BTreeMap<&str, RateLimitUse> = BTreeMap::new();
        for x in &e.samples {
            let l = |k| x.label(k).unwrap_or_default().to_string();
            let b = |k| x.label(k).unwrap_or_default();
            match x.name {
                "trellis_requests_total" => {
                    let t = traffic_of(&mut traffic, x);
                    *t.statuses.entry(status(x)).or_default() += x.value;
                }
                "trellis_request_duration_seconds_bucket" => {
                    let le = x.label("le").and_then(|v| v.parse::<f64>().ok());
                    let t = traffic_of(&mut traffic, x);
                    if let Some(le) = le.filter(|le| le.is_finite()) {
                        t.latency.add_bucket(le, x.value);
                    }
                }
                "trellis_request_duration_seconds_sum" => {
                    traffic_of(&mut traffic, x).latency.sum += x.value
                }
                "trellis_request_duration_seconds_count" => {
                    traffic_of(&mut traffic, x).latency.count += x.value
                }
                "trellis_consumer_requests_total" => {
                    let c = consumers
                        .entry((b("service"), b("consumer"), route(x)))
                        .or_insert_with(|| ConsumerTraffic {
                            service: l("service"),
                            consumer: l("consumer"),
                            route: route(x).to_string(),
                            statuses: BTreeMap::new(),
                        });
                    *c.statuses.entry(status(x)).or_default() += x.value;
                }
                "trellis_proxy_errors_total" => s.causes.push(CauseCount {
                    direction: l("direction"),
                    cause: l("cause"),
                    count: x.value,
                }),
                "trellis_open_connections" => {
                    *s.open_connections.entry(l("direction")).or_default() += x.value;
                }
                "trellis_requests_in_flight" => {
                    *s.in_flight.entry(l("direction")).or_default() += x.value;
                }
                "trellis_snapshot_version" => s.snapshot_version = x.value.max(0.0) as u64,
                "trellis_endpoints" => {
                    let e = endpoints
                        .entry(b("service"))
                        .or_insert_with(|| EndpointStates {
                            service: l("service"),
                            ..Default::default()
                        });
                    match x.label("state") {
                        Some("available") => e.available += x.value,
                        Some("ejected") => e.ejected += x.value,
                        Some("unhealthy") => e.unhealthy += x.value,
                        _ => {}
                    }
                }
                "trellis_ratelimit_decisions_total" => {
                    let r = limit_of(&mut limits, x);
                    match x.label("decision") {
                        Some("allowed") => r.allowed += x.value,
                        Some("limited") => r.limited += x.value,
                        _ => {}
                    }
                }
                "trellis_ratelimit_share_per_second" => {
                    limit_of(&mut limits, x).share_per_second = x.value
                }
                "trellis_ratelimit_peers" => limit_of(&mut limits, x).peers = x.value,
                _ => {}
            }
        }
        s.traffic = traffic.into_values().collect();
        s.consumers = consumers.into_values().collect();
        s.endpoints = endpoints.into_values().collect();
        s.rate_limits = limits.into_values().collect();
        s
    }
}

/// The `route` label; `default` for a sidecar from before consumer series had one.
fn route<'e>(x: &'e Sample) -> &'e str {
    x.label("route")
        .unwrap_or(crate::policy::routing::DEFAULT_ROUTE)
}

fn status(x: &Sample) -> u16 {
    x.label("status_code")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn traffic_of<'m, 'e>(
    map: &'m mut BTreeMap<(&'e str, &'e str, &'e str), Traffic>,
    x: &'e Sample,
) -> &'m mut Traffic {
    let b = |k| x.label(k).unwrap_or_default();
    let l = |k| b(k).to_string();
    // Latency series have a status code too: one histogram per route, all statuses summed.
    map.entry((b("direction"), b("service"), b("route")))
        .or_insert_with(|| Traffic {
            direction: l("direction"),
            service: l("service"),
            route: l("route"),
            ..Default::default()
        })
}

fn limit_of<'m, 'e>(
    map: &'m mut BTreeMap<&'e str, RateLimitUse>,
    x: &'e Sample,
) -> &'m mut RateLimitUse {
    let policy = x.label("policy").unwrap_or_default();
    map.entry(policy).or_insert_with(|| RateLimitUse {
        policy: policy.to_string(),
        ..Default::default()
    })
}

// === impl Traffic ===

impl Traffic {
    pub fn requests(&self) -> f64 {
        self.statuses.values().sum()
    }

    /// Requests answered 5xx: the server side failed them.
    pub fn errors(&self) -> f64 {
        self.statuses
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    }
}

// === impl Histogram ===

impl Histogram {
    /// Add `count` to the bucket bounded by `le` (buckets of several series with the same
    /// bounds are summed).
    fn add_bucket(&mut self, le: f64, count: f64) {
        match self.bounds.iter().position(|b| *b == le) {
            Some(i) => self.counts[i] += count,
            None => {
                let i = self.bounds.partition_point(|b| *b < le);
                self.bounds.insert(i, le);
                self.counts.insert(i, count);
            }
        }
    }

    /// What happened between `older` and `self` (same bounds); `None` after a restart
    /// (a count went down) or when the bounds differ.
    pub fn since(&self, older: &Histogram) -> Option<Histogram> {
        if older.bounds != self.bounds || older.count > self.count {
            return None;
        }
        Some(Histogram {
            bounds: self.bounds.clone(),
            counts: self
                .counts
                .iter()
                .zip(&older.counts)
                .map(|(a, b)| (a - b).max(0.0))
                .collect(),
            count: self.count - older.count,
            sum: (self.sum - older.sum).max(0.0),
        })
    }

    /// The `q` quantile (0..=1) in seconds, interpolated within its bucket like PromQL's
    /// `histogram_quantile`; `None` without observations.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * self.count;
        let mut lower = (0.0, 0.0);
        for (bound, cum) in self.bounds.iter().zip(&self.counts) {
            if *cum >= rank {
                let in_bucket = cum - lower.1;
                if in_bucket <= 0.0 {
                    return Some(*bound);
                }
                return Some(lower.0 + (bound - lower.0) * (rank - lower.1) / in_bucket);
            }
            lower = (*bound, *cum);
        }
        // Above the last finite bound: the best that can be said is that bound.
        self.bounds.last().copied()
    }

    /// Add another histogram with the same bounds (several instances of one service).
    pub fn merge(&mut self, other: &Histogram) {
        if self.bounds.is_empty() {
            *self = other.clone();
            return;
        }
        if self.bounds != other.bounds {
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::exposition::parse;

    const TEXT: &str = r#"
trellis_requests_total{direction="inbound",service="orders",route="default",status_code="200"} 90
trellis_requests_total{direction="inbound",service="orders",route="default",status_code="503"} 10
trellis_request_duration_seconds_bucket{direction="inbound",service="orders",route="default",status_code="200",le="0.1"} 80
trellis_request_duration_seconds_bucket{direction="inbound",service="orders",route="default",status_code="200",le="1.0"} 90
trellis_request_duration_seconds_bucket{direction="inbound",service="orders",route="default",status_code="200",le="+Inf"} 90
trellis_request_duration_seconds_bucket{direction="inbound",service="orders",route="default",status_code="503",le="0.1"} 10
trellis_request_duration_seconds_bucket{direction="inbound",service="orders",route="default",status_code="503",le="1.0"} 10
trellis_request_duration_seconds_bucket{direction="inbound",service="orders",route="default",status_code="503",le="+Inf"} 10
trellis_request_duration_seconds_count{direction="inbound",service="orders",route="default",status_code="200"} 90
trellis_request_duration_seconds_count{direction="inbound",service="orders",route="default",status_code="503"} 10
trellis_request_duration_seconds_sum{direction="inbound",service="orders",route="default",status_code="200"} 9.5
trellis_proxy_errors_total{direction="inbound",cause="no-endpoints"} 3
trellis_endpoints{service="payments",state="available"} 2
trellis_endpoints{service="payments",state="ejected"} 1
trellis_ratelimit_decisions_total{policy="p",decision="limited"} 4
trellis_ratelimit_peers{policy="p"} 3
trellis_snapshot_version 42
trellis_requests_in_flight{direction="inbound"} 7
trellis_requests_in_flight{direction="outbound"} 0
trellis_consumer_requests_total{service="orders",consumer="acme",route="list",status_code="200"} 5
trellis_consumer_requests_total{service="orders",consumer="acme",route="get",status_code="200"} 3
trellis_consumer_requests_total{service="orders",consumer="acme",route="get",status_code="429"} 2
trellis_consumer_requests_total{service="orders",consumer="old",status_code="200"} 1
"#;

    #[test]
    fn summarises_the_registry_text() {
        let s = Summary::from_exposition("orders", 1, &parse(TEXT).expect("parses"));
        assert_eq!(s.snapshot_version, 42);
        assert_eq!(s.traffic.len(), 1);
        let t = &s.traffic[0];
        assert_eq!((t.requests(), t.errors()), (100.0, 10.0));
        assert_eq!(t.latency.bounds, vec![0.1, 1.0]);
        assert_eq!(t.latency.counts, vec![90.0, 100.0]);
        assert_eq!(t.latency.count, 100.0);
        // Rank 50 of 100 falls in the first bucket: 0.1 * 50/90.
        let p50 = t.latency.quantile(0.5).expect("observations");
        assert!((p50 - 0.1 * 50.0 / 90.0).abs() < 1e-9, "{p50}");
        let p99 = t.latency.quantile(0.99).expect("observations");
        assert!((p99 - (0.1 + 0.9 * 9.0 / 10.0)).abs() < 1e-9, "{p99}");
        assert_eq!(s.causes[0].cause, "no-endpoints");
        assert_eq!(s.endpoints[0].ejected, 1.0);
        assert_eq!(s.rate_limits[0].limited, 4.0);
        assert_eq!(s.rate_limits[0].peers, 3.0);
        assert_eq!(s.in_flight.get("inbound"), Some(&7.0));
        assert_eq!(s.in_flight.get("outbound"), Some(&0.0));
        let consumers: Vec<_> = s
            .consumers
            .iter()
            .map(|c| (c.consumer.as_str(), c.route.as_str(), c.statuses.clone()))
            .collect();
        assert_eq!(
            consumers,
            vec![
                ("acme", "get", BTreeMap::from([(200, 3.0), (429, 2.0)])),
                ("acme", "list", BTreeMap::from([(200, 5.0)])),
                // A series without the label (an older sidecar's registry).
                ("old", "default", BTreeMap::from([(200, 1.0)])),
            ]
        );
    }

    #[test]
    fn a_consumer_without_route_reads_as_the_default_route() {
        // A consumer entry of a sidecar built before the field.
        let old = r#"{"version":1,"service":"gw","unix_ms":1,"snapshot_version":2,"traffic":[],"consumers":[{"service":"gw","consumer":"acme","statuses":{"200":4}}],"causes":[],"open_connections":{},"endpoints":[],"rate_limits":[]}"#;
        let s: Summary = serde_json::from_str(old).expect("older summaries read");
        assert_eq!(s.consumers[0].route, "default");
        assert_eq!(s.consumers[0].statuses.get(&200), Some(&4.0));
        // And what is written now carries it.
        let again: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn a_summary_without_in_flight_still_reads() {
        // What a sidecar built before the field answers.
        let old = r#"{"version":1,"service":"orders","unix_ms":1,"snapshot_version":2,"traffic":[],"consumers":[],"causes":[],"open_connections":{},"endpoints":[],"rate_limits":[]}"#;
        let s: Summary = serde_json::from_str(old).expect("older summaries read");
        assert!(s.in_flight.is_empty());
    }

    #[test]
    fn differences_survive_restarts_and_merge_instances() {
        let h = |counts: Vec<f64>, count| Histogram {
            bounds: vec![0.1, 1.0],
            counts,
            count,
            sum: 0.0,
        };
        let d = h(vec![5.0, 9.0], 10.0)
            .since(&h(vec![1.0, 2.0], 2.0))
            .expect("same sidecar");
        assert_eq!((d.counts, d.count), (vec![4.0, 7.0], 8.0));
        assert!(h(vec![0.0, 1.0], 1.0)
            .since(&h(vec![5.0, 9.0], 10.0))
            .is_none());
        let mut m = Histogram::default();
        m.merge(&h(vec![1.0, 1.0], 1.0));
        m.merge(&h(vec![0.0, 1.0], 1.0));
        assert_eq!((m.counts, m.count), (vec![1.0, 2.0], 2.0));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }
}
