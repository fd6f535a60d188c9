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
}

fn default_weight() -> u32 {
    1
}
