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
    /// How endpoints are chosen; round robin when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerSpec>,
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
