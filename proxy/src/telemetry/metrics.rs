//! The data plane's Prometheus metrics. Label values are bounded: directions, status classes,
//! causes and reasons are fixed tokens; services come from the mesh state (bounded by its size),
//! never from raw request data.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Traffic the app sends out, or traffic from peers to the app.
pub const OUTBOUND: &str = "outbound";
pub const INBOUND: &str = "inbound";
/// Label used when the request named a service the mesh does not know.
pub const UNKNOWN_SERVICE: &str = "unknown";

/// Labels of the per-consumer request metrics (bounded: consumers are declared in policies).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub service: Arc<String>,
    pub consumer: Arc<str>,
    /// The HTTPRoute rule that routed the request (ingress), `default` when none did
    /// (inbound, or refused before routing).
    pub route: Arc<String>,
    pub status_code: u16,
}

/// Labels of request totals and latencies. `status_code` is bounded (HTTP codes are three
/// digits, and only a few dozen occur); `route` by the HTTPRoute policies.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub service: Arc<String>,
    /// The HTTPRoute rule's name, `default` when none routed the request (bounded by the
    /// policies).
    pub route: Arc<String>,
    pub status_code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub direction: &'static str,
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutlierLabels {
    pub service: Arc<String>,
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub service: Arc<String>,
    pub endpoint: String,
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub consumer_requests: Family<ConsumerLabels, Counter>,
    pub consumer_duration: Family<ConsumerLabels, Histogram>,
    pub open_connections: Family<DirectionLabels, Gauge>,
    /// Requests received and not yet answered, by direction (see [`InFlight`]).
    pub requests_in_flight: Family<DirectionLabels, Gauge>,
    pub connections: Family<DirectionLabels, Counter>,
    pub read_bytes: Family<DirectionLabels, Counter>,
    pub written_bytes: Family<DirectionLabels, Counter>,
    pub tls_handshakes: Family<DirectionLabels, Counter>,
    pub tls_handshake_failures: Family<ReasonLabels, Counter>,
    /// `accept` failures by listener (out of file descriptors, out of memory).
    pub accept_errors: Family<DirectionLabels, Counter>,
    pub proxy_errors: Family<CauseLabels, Counter>,
    pub cert_expiry: Gauge,
    pub cert_reloads: Family<ResultLabels, Counter>,
    pub snapshots_applied: Counter,
    pub snapshot_version: Gauge,
    pub outlier_events: Family<OutlierLabels, Counter>,
    pub endpoint_events: Family<EndpointLabels, Counter>,
    /// The `route` label of requests no HTTPRoute routed.
    pub default_route: Arc<String>,
}

fn latency_histogram() -> Histogram {
    // 0.1 ms .. ~26 s: sidecar overhead is sub-millisecond, upstream latency is not.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

// === impl Metrics ===

impl Metrics {
    /// Create the metrics and register them under `registry` (which should carry the
    /// `trellis` prefix).
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            consumer_requests: Family::default(),
            consumer_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            open_connections: Family::default(),
            requests_in_flight: Family::default(),
            connections: Family::default(),
            read_bytes: Family::default(),
            written_bytes: Family::default(),
            tls_handshakes: Family::default(),
            tls_handshake_failures: Family::default(),
            accept_errors: Family::default(),
            proxy_errors: Family::default(),
            cert_expiry: Gauge::default(),
            cert_reloads: Family::default(),
            snapshots_applied: Counter::default(),
            snapshot_version: Gauge::default(),
            outlier_events: Family::default(),
            endpoint_events: Family::default(),
            default_route: Arc::new(crate::policy::routing::DEFAULT_ROUTE.to_string()),
        };
        registry.register(
            "requests",
            "HTTP requests handled, by direction, destination service and status code",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its response headers",
            m.request_duration.clone(),
        );
        registry.register(
            "consumer_requests",
            "Requests of authenticated consumers received by this sidecar or ingress, by service, consumer, route and status code",
            m.consumer_requests.clone(),
        );
        registry.register(
            "consumer_request_duration_seconds",
            "Time from receiving a consumer's request to sending its response headers",
            m.consumer_duration.clone(),
        );
        registry.register(
            "open_connections",
            "Currently open client connections",
            m.open_connections.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests received and not yet answered (response headers not sent), by direction",
            m.requests_in_flight.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted",
            m.connections.clone(),
        );
        registry.register(
            "read_bytes",
            "Bytes read from client connections (after TLS decryption on inbound): app requests on outbound, peer requests on inbound",
            m.read_bytes.clone(),
        );
        registry.register(
            "written_bytes",
            "Bytes written to client connections (before TLS encryption on inbound)",
            m.written_bytes.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed mTLS handshakes (peer verified), by direction",
            m.tls_handshakes.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Rejected or failed mTLS handshakes by reason (expired, not_yet_valid, unknown_ca, wrong_trust_domain, wrong_identity, plaintext, ...)",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "accept_errors",
            "Connections a listener could not accept (out of file descriptors or memory: they wait in the kernel's backlog), by listener",
            m.accept_errors.clone(),
        );
        registry.register(
            "proxy_errors",
            "Responses generated by the sidecar instead of the upstream, by cause",
            m.proxy_errors.clone(),
        );
        registry.register(
            "cert_expiry_timestamp_seconds",
            "Unix time at which the sidecar's current leaf certificate expires",
            m.cert_expiry.clone(),
        );
        registry.register(
            "cert_reloads",
            "Certificate reload attempts by result",
            m.cert_reloads.clone(),
        );
        registry.register(
            "snapshots_applied",
            "Mesh snapshots applied by the data plane",
            m.snapshots_applied.clone(),
        );
        registry.register(
            "snapshot_version",
            "Version of the mesh snapshot in use (file generation or etcd revision)",
            m.snapshot_version.clone(),
        );
        registry.register(
            "outlier_events",
            "Outlier detection and circuit breaking by destination service: ejected, readmitted, panic_routing (every endpoint ejected, routed anyway), max_requests and max_pending (breaker overflows)",
            m.outlier_events.clone(),
        );
        registry.register(
            "endpoint_events",
            "Endpoint state changes: ejected, readmitted, unhealthy, healthy (endpoints come from the mesh state, so the label set is bounded)",
            m.endpoint_events.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Build information; always 1", build);
        Arc::new(m)
    }

    /// A request of an authenticated consumer, received by this sidecar (or its ingress),
    /// routed by the HTTPRoute rule `route` (`default`: none). The labels are reference
    /// counts of strings the caller holds: no allocation per request.
    pub fn record_consumer_request(
        &self,
        service: &Arc<String>,
        consumer: &Arc<str>,
        route: &Arc<String>,
        status: u16,
        seconds: f64,
    ) {
        let labels = ConsumerLabels {
            service: service.clone(),
            consumer: consumer.clone(),
            route: route.clone(),
            status_code: status,
        };
        self.consumer_requests.get_or_create(&labels).inc();
        self.consumer_duration
            .get_or_create(&labels)
            .observe(seconds);
    }

    pub fn record_request(
        &self,
        direction: &'static str,
        service: &Arc<String>,
        status: u16,
        seconds: f64,
    ) {
        self.record_routed_request(direction, service, &self.default_route, status, seconds);
    }

    /// The handles of `trellis_requests_total` and `trellis_request_duration_seconds` for one
    /// label set.
    fn request_handles(
        &self,
        direction: &'static str,
        service: &Arc<String>,
        route: &Arc<String>,
        status: u16,
    ) -> (Counter, Histogram) {
        let labels = RequestLabels {
            direction,
            service: service.clone(),
            route: route.clone(),
            status_code: status,
        };
        let count = self.requests.get_or_create(&labels).clone();
        let duration = self.request_duration.get_or_create(&labels).clone();
        (count, duration)
    }

    /// As [`Metrics::record_request`], for a request an HTTPRoute rule (`route`) routed.
    pub fn record_routed_request(
        &self,
        direction: &'static str,
        service: &Arc<String>,
        route: &Arc<String>,
        status: u16,
        seconds: f64,
    ) {
        let (count, duration) = self.request_handles(direction, service, route, status);
        count.inc();
        duration.observe(seconds);
    }

    /// The byte counters of connections accepted in `direction`.
    pub fn byte_counters(&self, direction: &'static str) -> ByteCounters {
        let labels = DirectionLabels { direction };
        ByteCounters {
            read: self.read_bytes.get_or_create(&labels).clone(),
            written: self.written_bytes.get_or_create(&labels).clone(),
        }
    }

    pub fn tls_handshake(&self, direction: &'static str) {
        self.tls_handshakes
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// The counter of `accept` failures of one listener.
    pub fn accept_errors(&self, direction: &'static str) -> Counter {
        self.accept_errors
            .get_or_create(&DirectionLabels { direction })
            .clone()
    }

    pub fn tls_failure(&self, direction: &'static str, reason: &'static str) {
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// A state change of one endpoint, counted per service too.
    pub fn endpoint_event(
        &self,
        service: &Arc<String>,
        endpoint: std::net::SocketAddr,
        event: &'static str,
    ) {
        self.outlier_event(service, event);
        let labels = EndpointLabels {
            service: service.clone(),
            endpoint: endpoint.to_string(),
            event,
        };
        self.endpoint_events.get_or_create(&labels).inc();
    }

    pub fn outlier_event(&self, service: &Arc<String>, event: &'static str) {
        self.outlier_events
            .get_or_create(&OutlierLabels {
                service: service.clone(),
                event,
            })
            .inc();
    }

    pub fn proxy_error(&self, direction: &'static str, cause: &'static str) {
        self.proxy_errors
            .get_or_create(&CauseLabels { direction, cause })
            .inc();
    }
}

/// Byte counters for one direction's client connections; cheap to clone (shared atomics), so
/// each connection's I/O wrapper holds its own handles and never looks up a label set.
#[derive(Clone, Debug, Default)]
pub struct ByteCounters {
    pub read: Counter,
    pub written: Counter,
}

/// Counts a connection as open until dropped.
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl ConnectionGuard {
    pub fn new(metrics: &Metrics, direction: &'static str) -> Self {
        let labels = DirectionLabels { direction };
        metrics.connections.get_or_create(&labels).inc();
        let gauge = metrics.open_connections.get_or_create(&labels).clone();
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Counts one request as in flight until dropped.
///
/// Why a guard borrowing the gauge: the request path pays exactly one atomic add when the
/// request starts and one atomic sub when it ends, with no label lookup, no lock, no
/// allocation and no reference count (the gauge is looked up once per listener, see
/// [`Metrics::in_flight_gauge`]). Dropping it is what ends the count, so a request whose
/// future is cancelled (the client went away, a timeout fired) is never counted forever.
pub struct InFlight<'a>(&'a Gauge);

impl<'a> InFlight<'a> {
    pub fn start(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// The in-flight gauge of `direction`, looked up once by a listener and held for its life.
    pub fn in_flight_gauge(&self, direction: &'static str) -> Gauge {
        self.requests_in_flight
            .get_or_create(&DirectionLabels { direction })
            .clone()
    }
}

/// Render a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The request counters one listener used last, by service, route and status.
///
/// Why: looking a finished request's label set up in the two families hashes it twice
/// (SipHash over the service and route names) under their locks, about 1,000 instructions per
/// request (docs/performance.md); a short scan here compares two pointers and a number. The
/// families never drop a label set, so a kept handle counts exactly where a lookup would. At
/// most [`RequestCounters::KEPT`] are kept; a new one past that replaces the oldest.
pub struct RequestCounters {
    direction: &'static str,
    kept: std::sync::Mutex<Vec<KeptCounters>>,
}

struct KeptCounters {
    service: Arc<String>,
    route: Arc<String>,
    status: u16,
    count: Counter,
    duration: Histogram,
}

// === impl RequestCounters ===

impl RequestCounters {
    const KEPT: usize = 32;

    pub fn new(direction: &'static str) -> Self {
        Self {
            direction,
            kept: std::sync::Mutex::new(Vec::with_capacity(Self::KEPT)),
        }
    }

    /// Count a finished request, as [`Metrics::record_routed_request`] does.
    pub fn record(
        &self,
        metrics: &Metrics,
        service: &Arc<String>,
        route: &Arc<String>,
        status: u16,
        seconds: f64,
    ) {
        // Counting must go on after a panic elsewhere held the lock: the list stays valid.
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let found = kept.iter().find(|k| {
            k.status == status && Arc::ptr_eq(&k.route, route) && Arc::ptr_eq(&k.service, service)
        });
        if let Some(k) = found {
            k.count.inc();
            k.duration.observe(seconds);
            return;
        }
        let (count, duration) = metrics.request_handles(self.direction, service, route, status);
        count.inc();
        duration.observe(seconds);
        if kept.len() >= Self::KEPT {
            kept.remove(0);
        }
        kept.push(KeptCounters {
            service: service.clone(),
            route: route.clone(),
            status,
            count,
            duration,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_request_and_connection_metrics() {
        let mut reg = Registry::with_prefix("trellis");
        let m = Metrics::register(&mut reg);
        m.record_request(OUTBOUND, &Arc::new("orders".into()), 503, 0.002);
        let guard = ConnectionGuard::new(&m, INBOUND);
        m.tls_failure(INBOUND, "expired");
        let text = encode(&reg);
        assert!(text.contains(r#"trellis_requests_total{direction="outbound",service="orders",route="default",status_code="503"} 1"#), "{text}");
        assert!(
            text.contains(r#"trellis_open_connections{direction="inbound"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"trellis_tls_handshake_failures_total{direction="inbound",reason="expired"} 1"#
            ),
            "{text}"
        );
        drop(guard);
        assert!(encode(&reg).contains(r#"trellis_open_connections{direction="inbound"} 0"#));
    }

    /// Kept handles count where a lookup would: per label set, with equal names from
    /// different `Arc`s (a new snapshot), and past the number kept.
    #[test]
    fn kept_request_counters_count_like_lookups() {
        let mut reg = Registry::with_prefix("trellis");
        let m = Metrics::register(&mut reg);
        let counters = RequestCounters::new(INBOUND);
        let svc = Arc::new("orders".to_string());
        let (a, b) = (Arc::new("a".to_string()), Arc::new("b".to_string()));
        for _ in 0..3 {
            counters.record(&m, &svc, &a, 200, 0.001);
        }
        counters.record(&m, &svc, &a, 503, 0.001);
        counters.record(&m, &svc, &b, 200, 0.001);
        // The same names from another snapshot's strings.
        let (svc2, a2) = (Arc::new("orders".to_string()), Arc::new("a".to_string()));
        counters.record(&m, &svc2, &a2, 200, 0.001);
        // More label sets than are kept, then the first ones again.
        let routes: Vec<Arc<String>> = (0..40).map(|i| Arc::new(format!("r{i}"))).collect();
        for _ in 0..2 {
            for r in &routes {
                counters.record(&m, &svc, r, 200, 0.001);
            }
        }
        counters.record(&m, &svc, &a, 200, 0.001);
        let text = encode(&reg);
        let count = |route: &str, status: u16| {
            let line = format!(
                r#"trellis_requests_total{{direction="inbound",service="orders",route="{route}",status_code="{status}"}} "#
            );
            text.lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map(|v| v.trim().to_string())
        };
        assert_eq!(count("a", 200).as_deref(), Some("5"), "{text}");
        assert_eq!(count("a", 503).as_deref(), Some("1"), "{text}");
        assert_eq!(count("b", 200).as_deref(), Some("1"), "{text}");
        for i in 0..40 {
            assert_eq!(count(&format!("r{i}"), 200).as_deref(), Some("2"), "{text}");
        }
        assert!(text.contains(
            r#"trellis_request_duration_seconds_count{direction="inbound",service="orders",route="a",status_code="200"} 5"#
        ), "{text}");
    }

    #[test]
    fn consumer_requests_are_counted_per_route() {
        let mut reg = Registry::with_prefix("trellis");
        let m = Metrics::register(&mut reg);
        let (gw, acme) = (Arc::new("gw".to_string()), Arc::<str>::from("acme"));
        let list = Arc::new("list".to_string());
        m.record_consumer_request(&gw, &acme, &list, 200, 0.001);
        m.record_consumer_request(&gw, &acme, &list, 200, 0.001);
        m.record_consumer_request(&gw, &acme, &m.default_route, 429, 0.0);
        let text = encode(&reg);
        for line in [
            r#"trellis_consumer_requests_total{service="gw",consumer="acme",route="list",status_code="200"} 2"#,
            r#"trellis_consumer_requests_total{service="gw",consumer="acme",route="default",status_code="429"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn a_request_is_in_flight_until_its_guard_drops() {
        let mut reg = Registry::with_prefix("trellis");
        let m = Metrics::register(&mut reg);
        let gauge = m.in_flight_gauge(INBOUND);
        let (a, b) = (InFlight::start(&gauge), InFlight::start(&gauge));
        let line = |n| format!(r#"trellis_requests_in_flight{{direction="inbound"}} {n}"#);
        assert!(encode(&reg).contains(&line(2)), "{}", encode(&reg));
        drop(a);
        // A cancelled request's future is dropped with its guard: the count goes back too.
        drop(b);
        assert!(encode(&reg).contains(&line(0)), "{}", encode(&reg));
    }
}
