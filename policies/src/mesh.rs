//! The mesh document: services, their endpoints, and per-service policy.
//!
//! In standalone mode this is the file store's content; later sources (etcd) produce the same
//! types, so the data plane never learns where its state came from.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything a sidecar needs to route: the services of the mesh.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshDocument {
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
    /// HTTP routing by policy name (`HTTPRoute`, see `docs/routing.md`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub http_routes: BTreeMap<String, crate::HttpRouteSpec>,
    /// Rate limits by policy name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rate_limits: BTreeMap<String, crate::RateLimitSpec>,
    /// Concurrency limits by policy name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub concurrency_limits: BTreeMap<String, crate::ConcurrencyLimitSpec>,
    /// Authentication policies by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub authentication: BTreeMap<String, crate::AuthenticationSpec>,
    /// Consumers by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consumers: BTreeMap<String, crate::ConsumerSpec>,
    /// Authorization policies by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub authorization: BTreeMap<String, crate::AuthorizationSpec>,
    /// Cache policies by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cache_policies: BTreeMap<String, crate::CachePolicySpec>,
    /// The latest cache purge of each service, by service.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cache_purges: BTreeMap<String, crate::CachePurgeSpec>,
}

/// One service: where its instances are and how to call it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub policy: ServicePolicy,
    /// A destination outside the mesh: plain HTTP to `host:port`, resolved through DNS and
    /// balanced across its records. Mutually exclusive with `endpoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalSpec>,
}

/// Where an external service lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalSpec {
    /// A DNS name (or an IP address).
    pub host: String,
    #[serde(default = "default_http_port")]
    pub port: u16,
}

fn default_http_port() -> u16 {
    80
}

/// One instance of a service: the address of its sidecar's inbound listener.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `ip:port` or `host:port` of the peer sidecar's inbound (mTLS) listener; host names are
    /// resolved through DNS (one endpoint per record).
    pub address: String,
    /// The SPIFFE ID the peer must present. Defaults to the service's identity,
    /// `spiffe://<trust-domain>/service/<service>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Relative weight for weighted balancing (1..=10000).
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// Per-service policy overrides. Unset fields fall back to the sidecar's configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// Time allowed to establish a connection (TCP + TLS) to an endpoint.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub connect_timeout: Option<Duration>,
    /// Time allowed from sending a request to receiving the response headers.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub request_timeout: Option<Duration>,
    /// Idle time allowed between frames of a response body (the sidecar's default when unset).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub stream_idle_timeout: Option<Duration>,
    /// How endpoints are chosen; round robin when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
    /// Ejection of failing endpoints; on with the defaults below when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Concurrency limits for calls to this service (Envoy's defaults when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// Retries by the caller's sidecar (the defaults below when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetrySpec>,
    /// Active health checks of this service's endpoints (off when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
}

/// Active health checking. Each sidecar checks each endpoint at most once per interval (with
/// jitter), one check at a time per service, so N sidecars x M endpoints cost at most
/// N x M / interval checks per second.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// HTTP check: `GET <path>` through the peer sidecar to the app, healthy on 2xx. Without a
    /// path, a TCP connect to the peer's inbound listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    #[serde(default = "d_hc_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "d_hc_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Successes in a row that make an unhealthy endpoint healthy again.
    #[serde(default = "d_hc_healthy")]
    pub healthy_threshold: u32,
    /// Failures in a row that make an endpoint unhealthy.
    #[serde(default = "d_hc_unhealthy")]
    pub unhealthy_threshold: u32,
}

fn d_hc_interval() -> Duration {
    Duration::from_secs(10)
}
fn d_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn d_hc_healthy() -> u32 {
    2
}
fn d_hc_unhealthy() -> u32 {
    3
}

/// Retries: only for requests whose body is known and small enough to replay, only for
/// idempotent methods unless `allow_non_idempotent`, and never beyond the budget.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Retries after the first try (0 turns retries off).
    #[serde(default = "d_attempts")]
    pub attempts: u32,
    /// Response statuses that are retried (connect failures and resets always are).
    #[serde(default = "d_retry_statuses")]
    pub retry_on_status: Vec<u16>,
    /// gRPC status codes (from a trailers-only response) that are retried, e.g. 14 UNAVAILABLE.
    #[serde(default = "d_retry_grpc")]
    pub retry_on_grpc: Vec<u32>,
    /// Time allowed for each try (the request timeout still bounds them all).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Backoff before retry k: random in [0, min(max, base x 2^k)] (full jitter).
    #[serde(default = "d_backoff_base", with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(default = "d_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    #[serde(default)]
    pub allow_non_idempotent: bool,
    /// Larger request bodies (or unknown lengths) stream once and are not retried.
    #[serde(default = "d_max_body")]
    pub max_body_bytes: u64,
    /// Retries may add this share of the live request rate...
    #[serde(default = "d_budget_ratio")]
    pub budget_ratio: f64,
    /// ...plus this many per second (over a 10 s window).
    #[serde(default = "d_budget_min")]
    pub budget_min_per_second: u32,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: d_attempts(),
            retry_on_status: d_retry_statuses(),
            retry_on_grpc: d_retry_grpc(),
            per_try_timeout: None,
            backoff_base: d_backoff_base(),
            backoff_max: d_backoff_max(),
            allow_non_idempotent: false,
            max_body_bytes: d_max_body(),
            budget_ratio: d_budget_ratio(),
            budget_min_per_second: d_budget_min(),
        }
    }
}

fn d_attempts() -> u32 {
    2
}
fn d_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn d_retry_grpc() -> Vec<u32> {
    vec![14]
}
fn d_backoff_base() -> Duration {
    Duration::from_millis(25)
}
fn d_backoff_max() -> Duration {
    Duration::from_millis(250)
}
fn d_max_body() -> u64 {
    64 * 1024
}
fn d_budget_ratio() -> f64 {
    0.2
}
fn d_budget_min() -> u32 {
    10
}

/// Per-destination limits; exceeding one answers 503 at once (`trellis-error:
/// breaker-max-requests` / `breaker-max-pending`) instead of queueing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSpec {
    /// Requests in flight to the service (sent, response headers not yet received).
    #[serde(default = "d_breaker")]
    pub max_requests: u32,
    /// Requests waiting for a connection to be established.
    #[serde(default = "d_breaker")]
    pub max_pending: u32,
    /// Retries in flight at once (Envoy's default 3); past it a failed try is not retried.
    #[serde(default = "d_max_retries")]
    pub max_retries: u32,
}

impl Default for CircuitBreakerSpec {
    fn default() -> Self {
        Self {
            max_requests: d_breaker(),
            max_pending: d_breaker(),
            max_retries: d_max_retries(),
        }
    }
}

fn d_max_retries() -> u32 {
    3
}

fn d_breaker() -> u32 {
    1024
}

/// Consecutive-failure ejection with exponential backoff and probe re-admission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Failures in a row (connect/TLS errors, timeouts, resets, 5xx) that eject an endpoint;
    /// 0 turns ejection off. Envoy uses 5, Linkerd 7.
    #[serde(default = "d_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection; each further one doubles it (Linkerd: 1 s).
    #[serde(default = "d_base_ejection", with = "humantime_serde")]
    pub base_ejection_time: Duration,
    /// Longest ejection (Linkerd: 60 s).
    #[serde(default = "d_max_ejection", with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// At most this share of a service's endpoints ejected at once (one may always be).
    #[serde(default = "d_max_percent")]
    pub max_ejection_percent: u32,
    /// What to do when every endpoint is ejected.
    #[serde(default)]
    pub when_all_ejected: AllEjected,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllEjected {
    /// Route to all endpoints as if none were ejected (Envoy's panic mode), counted and logged.
    #[default]
    IgnoreEjections,
    /// Answer 503 `all-endpoints-ejected` at once.
    FailFast,
}

impl Default for OutlierDetectionSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: d_consecutive(),
            base_ejection_time: d_base_ejection(),
            max_ejection_time: d_max_ejection(),
            max_ejection_percent: d_max_percent(),
            when_all_ejected: AllEjected::default(),
        }
    }
}

fn d_consecutive() -> u32 {
    5
}
fn d_base_ejection() -> Duration {
    Duration::from_secs(1)
}
fn d_max_ejection() -> Duration {
    Duration::from_secs(60)
}
fn d_max_percent() -> u32 {
    50
}

/// Load-balancing policy for calls to one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancerSpec {
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// What consistent hashing hashes: `{header: NAME}`, `{cookie: NAME}` or `{source_ip: true}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// Prefer endpoints in the sidecar's own zone, spilling over when they are ejected or
    /// clearly overloaded.
    #[serde(default)]
    pub zone_aware: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbAlgorithm {
    #[default]
    RoundRobin,
    /// Smooth weighted round robin over endpoint weights.
    WeightedRoundRobin,
    Random,
    /// Power of two choices on in-flight requests (weighted).
    LeastRequest,
    /// Power of two choices on latency x in-flight ("least response time").
    PeakEwma,
    /// Maglev consistent hashing on `hash_on`.
    ConsistentHash,
}

/// Written as `{header: NAME}`, `{cookie: NAME}` or `{source_ip: true}`: a map rather than a
/// YAML-tagged enum, so the same text works in YAML files and JSON documents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "HashOnSpec", into = "HashOnSpec")]
pub enum HashOn {
    Header(String),
    Cookie(String),
    SourceIp,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HashOnSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    source_ip: bool,
}

impl TryFrom<HashOnSpec> for HashOn {
    type Error = String;
    fn try_from(s: HashOnSpec) -> Result<Self, String> {
        match (s.header, s.cookie, s.source_ip) {
            (Some(h), None, false) => Ok(Self::Header(h)),
            (None, Some(c), false) => Ok(Self::Cookie(c)),
            (None, None, true) => Ok(Self::SourceIp),
            _ => Err("hash_on takes exactly one of `header`, `cookie`, `source_ip: true`".into()),
        }
    }
}

impl From<HashOn> for HashOnSpec {
    fn from(h: HashOn) -> Self {
        match h {
            HashOn::Header(header) => Self {
                header: Some(header),
                ..Default::default()
            },
            HashOn::Cookie(cookie) => Self {
                cookie: Some(cookie),
                ..Default::default()
            },
            HashOn::SourceIp => Self {
                source_ip: true,
                ..Default::default()
            },
        }
    }
}

fn default_weight() -> u32 {
    1
}
