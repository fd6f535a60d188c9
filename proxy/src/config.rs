//! The data plane's configuration: its part of the sidecar's YAML file plus `TRELLIS_*`
//! environment overrides.
//!
//! The data plane is fed by snapshots and never reads a store, so where the snapshots come
//! from (`store:` with its file or etcd, registration and discovery) and name resolution
//! (`dns:`) are the agent's configuration (`mesh_agent::config`), which reads the same file and
//! hands this part to the data plane.
//!
//! Defaults live here as constants so that the docs, `/config_dump` and the code agree.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

// === defaults ===

pub const DEFAULT_OUTBOUND_ADDR: &str = "127.0.0.1:15001";
pub const DEFAULT_INBOUND_ADDR: &str = "0.0.0.0:15006";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_INGRESS_ADDR: &str = "0.0.0.0:8443";
pub const DEFAULT_APP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_TRUST_DOMAIN: &str = "trellis.local";
/// Largest request head (request line + headers) accepted, in bytes. Larger: 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most headers accepted in one request. More: 431.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// A client must send a complete request head within this time (slowloris guard).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request in flight for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Accepted connections per listener; past it, new connections wait in the kernel backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// TCP + TLS connect to a peer sidecar or the local app (Envoy's default is 5 s).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Request sent to response headers received (Envoy's route default is 15 s). Bodies may
/// stream for longer: streaming RPCs are not cut by this timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A response stream with no frame for this long is ended with an error (Envoy's
/// stream_idle_timeout default).
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long in-flight requests may run after SIGTERM before the sidecar exits anyway.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(10);
/// How often the identity files are checked for changes (the agent checks a store file as
/// often: `mesh_agent::config`).
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Share of requests without trace context that start a sampled trace (parent-based after).
pub const DEFAULT_TRACE_SAMPLING: f64 = 0.01;
/// Finished spans waiting for export; beyond it spans are dropped (and counted), never waited on.
pub const DEFAULT_TRACE_QUEUE: usize = 2048;
/// Spans per OTLP export call.
pub const DEFAULT_TRACE_BATCH: usize = 512;
/// A partial batch is exported after this long.
pub const DEFAULT_TRACE_FLUSH: Duration = Duration::from_secs(2);
/// One export call; a collector slower than this loses the batch (counted).
pub const DEFAULT_TRACE_EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

// The mesh's header names live with the HTTP layer; named here too for existing users.
pub use crate::http::headers::{
    CONSUMER_HEADER, ERROR_HEADER, ORIG_PROTO_HEADER, PEER_IDENTITY_HEADER, RETRIED_HEADER,
};

/// Whether the inbound listener accepts plaintext as well as mTLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InboundMode {
    /// mTLS only: plaintext connections are refused.
    #[default]
    Strict,
    /// mTLS and plaintext (for migrating services into the mesh). Plaintext callers have no
    /// verified identity.
    Permissive,
}

/// How the inbound side talks to the local app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// Find out what the app speaks (see [`crate::listeners::inbound::app_protocol`]): the caller's version when
    /// the app speaks it, gRPC as h2c, HTTP/1.1 to an app that does not answer h2c. A plain
    /// HTTP/1.1 app behind an h2 client must just work, so this never guesses.
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge (gRPC servers).
    H2c,
}

/// The data plane's part of the sidecar configuration file (every key but the agent's
/// `store` and `dns`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The service this sidecar fronts; its identity is `spiffe://<trust_domain>/service/<service>`.
    pub service: String,
    #[serde(default = "d_trust_domain")]
    pub trust_domain: String,
    /// This sidecar's zone (e.g. `eu-west-1a`), for zone-aware balancing and registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub identity: IdentityConfig,
    #[serde(default)]
    pub inbound: InboundConfig,
    #[serde(default)]
    pub outbound: OutboundConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub drain: DrainConfig,
    /// Distributed tracing (OTLP/gRPC export).
    #[serde(default)]
    pub tracing: TracingConfig,
    /// One line per proxied request.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// What inbound requests no authorization policy speaks for get.
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    /// Who may read this sidecar's metrics over the mesh.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Ingress gateway listeners (`mesh-agent run --mode ingress`): TLS from outside clients,
    /// routed to mesh services over mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressConfig>,
}

/// An ingress gateway: TLS termination with a certificate per SNI host name, then the same
/// routing as the outbound listener, after this sidecar's authentication, authorization and
/// rate limits (policies naming `service`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    #[serde(default = "d_ingress_listen")]
    pub listen: SocketAddr,
    /// Server certificates; the first is the default for clients without (or with an unknown)
    /// SNI name. Re-read when they change, like the identity files.
    pub certificates: Vec<ServerCertificate>,
    /// A plain HTTP listener, e.g. on port 80.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<IngressHttpConfig>,
    /// Addresses or CIDRs of the proxies in front of the ingress (an L7 load balancer, a
    /// CDN) whose `X-Forwarded-For` / `Forwarded` / `X-Forwarded-Proto` are believed, as
    /// nginx's `set_real_ip_from`. Default none: every client's forwarding headers are
    /// replaced by its TCP address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trusted_proxies: Vec<String>,
    /// The developer portal: the public API documents, answered on a host of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal: Option<PortalConfig>,
}

/// Where the ingress answers with the public view of the mesh's APIs
/// (`listeners/ingress/portal.rs`, docs/api-specs.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalConfig {
    /// The portal's host name; requests for it are answered by the portal, never routed.
    pub host: String,
    /// The URL consumers call, shown as the APIs' server; `https://<route host>` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Let anyone sign up without an invite; such accounts wait for `mesh-agent consumer
    /// approve`. Off: an invite (`mesh-agent consumer invite`) is required.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open_signup: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerCertificate {
    /// Host names it serves: exact, or `*.example.com` for one label.
    pub hosts: Vec<String>,
    /// PEM: leaf then intermediates.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressHttpConfig {
    pub listen: SocketAddr,
    /// Answer every request with a redirect to `https://` (308) instead of serving it.
    #[serde(default = "d_true")]
    pub redirect_to_https: bool,
}

fn d_ingress_listen() -> SocketAddr {
    parse_addr(DEFAULT_INGRESS_ADDR)
}

/// Telemetry over the mesh: `/.well-known/trellis/metrics` and `/.well-known/trellis/summary`
/// on the mTLS inbound listener, for a dashboard or Prometheus on another host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Peers allowed to read (SPIFFE IDs; a trailing `*` matches a prefix), e.g.
    /// `["spiffe://example.org/service/dashboard"]`. Default none: everyone gets 403.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readers: Vec<String>,
}

/// The sidecar's authorization default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationConfig {
    /// `allow` (default): requests pass unless a policy says otherwise. `deny`: a request must
    /// match an `allow` rule of an `AuthorizationPolicy` of this service (zero trust).
    #[serde(default)]
    pub default: AuthzDefault,
    /// Mesh peers (SPIFFE IDs; a trailing `*` matches a prefix) whose identity assertions
    /// are believed: the `trellis-consumer` header and JWT claim headers that an ingress or an
    /// earlier hop verified. Default none: name the ingress gateways' identities, e.g.
    /// `["spiffe://example.org/service/gateway"]`. From anyone else these headers are removed.
    #[serde(default)]
    pub consumer_from_peers: Vec<String>,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        Self {
            default: AuthzDefault::Allow,
            consumer_from_peers: Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthzDefault {
    #[default]
    Allow,
    Deny,
}

/// Access log lines: JSON (one object per line) or text, to stdout or a file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub format: AccessLogFormat,
    /// Append to this file; unset: stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Share of successful requests logged (0..=1); errors are always logged.
    #[serde(default = "d_one")]
    pub sample: f64,
    /// Only requests that failed (status >= 400 or refused by the sidecar).
    #[serde(default)]
    pub errors_only: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Json,
    Text,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            format: AccessLogFormat::Json,
            path: None,
            sample: 1.0,
            errors_only: false,
        }
    }
}

fn d_one() -> f64 {
    1.0
}

/// Spans for every proxied request, exported over OTLP/gRPC (Jaeger's port 4317).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// Off: no spans, but trace headers still pass through untouched.
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// Collector URL; unset: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
    /// else `http://127.0.0.1:4317`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Ratio of new traces sampled (0..=1); requests carrying context follow their parent.
    #[serde(default = "d_trace_sampling")]
    pub sampling: f64,
    #[serde(default = "d_trace_queue")]
    pub queue_size: usize,
    #[serde(default = "d_trace_batch")]
    pub batch_size: usize,
    #[serde(default = "d_trace_flush", with = "humantime_serde")]
    pub flush_interval: Duration,
    #[serde(default = "d_trace_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: None,
            sampling: DEFAULT_TRACE_SAMPLING,
            queue_size: DEFAULT_TRACE_QUEUE,
            batch_size: DEFAULT_TRACE_BATCH,
            flush_interval: DEFAULT_TRACE_FLUSH,
            export_timeout: DEFAULT_TRACE_EXPORT_TIMEOUT,
        }
    }
}

fn d_trace_sampling() -> f64 {
    DEFAULT_TRACE_SAMPLING
}
fn d_trace_queue() -> usize {
    DEFAULT_TRACE_QUEUE
}
fn d_trace_batch() -> usize {
    DEFAULT_TRACE_BATCH
}
fn d_trace_flush() -> Duration {
    DEFAULT_TRACE_FLUSH
}
fn d_trace_export_timeout() -> Duration {
    DEFAULT_TRACE_EXPORT_TIMEOUT
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// PEM: this sidecar's leaf certificate (followed by any intermediates).
    pub cert: PathBuf,
    /// PEM: the leaf's private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM: the trust bundle (CA certificates) peers are verified against.
    pub bundle: PathBuf,
    #[serde(default = "d_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "d_inbound")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub mode: InboundMode,
    /// The local app's address.
    #[serde(default = "d_app")]
    pub app: SocketAddr,
    #[serde(default)]
    pub app_protocol: AppProtocol,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    #[serde(default = "d_outbound")]
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "d_admin")]
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "d_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "d_max_headers")]
    pub max_headers: usize,
    #[serde(default = "d_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(default = "d_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "d_connect_timeout", with = "humantime_serde")]
    pub connect: Duration,
    #[serde(default = "d_request_timeout", with = "humantime_serde")]
    pub request: Duration,
    /// Idle time allowed between frames of a response body.
    #[serde(default = "d_stream_idle", with = "humantime_serde")]
    pub stream_idle: Duration,
}

fn d_stream_idle() -> Duration {
    DEFAULT_STREAM_IDLE_TIMEOUT
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainConfig {
    #[serde(default = "d_drain_grace", with = "humantime_serde")]
    pub grace_period: Duration,
}

fn d_true() -> bool {
    true
}
fn parse_addr(s: &str) -> SocketAddr {
    // The constants above are valid literals; a failure here is a programming error caught by
    // the `defaults_parse` test.
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}
fn d_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}
fn d_reload() -> Duration {
    DEFAULT_RELOAD_INTERVAL
}
fn d_inbound() -> SocketAddr {
    parse_addr(DEFAULT_INBOUND_ADDR)
}
fn d_outbound() -> SocketAddr {
    parse_addr(DEFAULT_OUTBOUND_ADDR)
}
fn d_admin() -> SocketAddr {
    parse_addr(DEFAULT_ADMIN_ADDR)
}
fn d_app() -> SocketAddr {
    parse_addr(DEFAULT_APP_ADDR)
}
fn d_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
fn d_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}
fn d_header_read_timeout() -> Duration {
    DEFAULT_HEADER_READ_TIMEOUT
}
fn d_idle_timeout() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn d_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn d_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn d_request_timeout() -> Duration {
    DEFAULT_REQUEST_TIMEOUT
}
fn d_drain_grace() -> Duration {
    DEFAULT_DRAIN_GRACE
}

impl Default for InboundConfig {
    fn default() -> Self {
        Self {
            listen: d_inbound(),
            mode: InboundMode::default(),
            app: d_app(),
            app_protocol: AppProtocol::default(),
        }
    }
}
impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            listen: d_outbound(),
        }
    }
}
impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: d_admin() }
    }
}
impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: d_max_header_bytes(),
            max_headers: d_max_headers(),
            header_read_timeout: d_header_read_timeout(),
            idle_timeout: d_idle_timeout(),
            max_connections: d_max_connections(),
        }
    }
}
impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: d_connect_timeout(),
            request: d_request_timeout(),
            stream_idle: d_stream_idle(),
        }
    }
}
impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            grace_period: d_drain_grace(),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syntax or schema error; the message names the field, line and column.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
}

// === impl Config ===

impl Config {
    /// A configuration with every default, for `service`, with identity files in `cert_dir`
    /// named `<service>.pem`, `<service>-key.pem` and `ca.pem` (the `mesh-agent cert` layout).
    pub fn new(service: &str, cert_dir: &Path) -> Self {
        Self {
            service: service.to_string(),
            trust_domain: d_trust_domain(),
            zone: None,
            identity: IdentityConfig {
                cert: cert_dir.join(format!("{service}.pem")),
                key: cert_dir.join(format!("{service}-key.pem")),
                bundle: cert_dir.join("ca.pem"),
                reload_interval: d_reload(),
            },
            inbound: InboundConfig::default(),
            outbound: OutboundConfig::default(),
            admin: AdminConfig::default(),
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            drain: DrainConfig::default(),
            tracing: TracingConfig::default(),
            access_log: AccessLogConfig::default(),
            authorization: AuthorizationConfig::default(),
            telemetry: TelemetryConfig::default(),
            ingress: None,
        }
    }

    /// Parse YAML text holding only the data plane's keys; `origin` names the source in errors.
    /// A whole sidecar file (with `store` and `dns`) is read by the agent, which hands this part
    /// over.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Apply overrides for the common fields. Unknown `TRELLIS_*` variables are ignored so that
    /// later versions' variables do not break older sidecars.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (var, value) in vars {
            let addr = |v: &str| {
                v.parse::<SocketAddr>().map_err(|e| ConfigError::Env {
                    var: var.clone(),
                    message: format!("`{v}` is not an ip:port address ({e})"),
                })
            };
            match var.as_str() {
                "TRELLIS_SERVICE" => self.service = value,
                "TRELLIS_TRUST_DOMAIN" => self.trust_domain = value,
                "TRELLIS_ZONE" => self.zone = Some(value),
                "TRELLIS_INBOUND_ADDR" => self.inbound.listen = addr(&value)?,
                "TRELLIS_OUTBOUND_ADDR" => self.outbound.listen = addr(&value)?,
                "TRELLIS_ADMIN_ADDR" => self.admin.listen = addr(&value)?,
                "TRELLIS_APP_ADDR" => self.inbound.app = addr(&value)?,
                "TRELLIS_INBOUND_MODE" => {
                    self.inbound.mode = match value.as_str() {
                        "strict" => InboundMode::Strict,
                        "permissive" => InboundMode::Permissive,
                        other => {
                            return Err(ConfigError::Env {
                                var,
                                message: format!("`{other}` is not one of strict, permissive"),
                            })
                        }
                    }
                }
                "TRELLIS_CERT" => self.identity.cert = value.into(),
                "TRELLIS_KEY" => self.identity.key = value.into(),
                "TRELLIS_BUNDLE" => self.identity.bundle = value.into(),
                _ => {}
            }
        }
        Ok(())
    }

    /// Semantic checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: field.to_string(),
            message,
        };
        trellis_policies::validate_service_name(&self.service)
            .map_err(|m| invalid("service", m))?;
        trellis_policies::SpiffeId::for_service(&self.trust_domain, &self.service)
            .map_err(|e| invalid("trust_domain", e.to_string()))?;
        if let Some(ing) = &self.ingress {
            if ing.certificates.is_empty() {
                return Err(invalid(
                    "ingress.certificates",
                    "at least one server certificate".into(),
                ));
            }
            for (i, c) in ing.certificates.iter().enumerate() {
                if c.hosts.is_empty() {
                    return Err(invalid(
                        &format!("ingress.certificates[{i}].hosts"),
                        "at least one host name".into(),
                    ));
                }
                for h in &c.hosts {
                    let bare = h.strip_prefix("*.").unwrap_or(h);
                    trellis_policies::validate_host(bare)
                        .map_err(|m| invalid(&format!("ingress.certificates[{i}].hosts"), m))?;
                }
            }
            crate::http::headers::TrustedProxies::parse(&ing.trusted_proxies)
                .map_err(|m| invalid("ingress.trusted_proxies", m))?;
        }
        for r in &self.telemetry.readers {
            if !(r == "*" || r.starts_with("spiffe://")) {
                return Err(invalid(
                    "telemetry.readers",
                    format!("{r:?} is not a SPIFFE ID (spiffe://<trust domain>/..., a trailing * matches a prefix)"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.access_log.sample) {
            return Err(invalid(
                "access_log.sample",
                format!("{} is not a ratio between 0 and 1", self.access_log.sample),
            ));
        }
        let t = &self.tracing;
        if !(0.0..=1.0).contains(&t.sampling) {
            return Err(invalid(
                "tracing.sampling",
                format!("{} is not a ratio between 0 and 1", t.sampling),
            ));
        }
        if t.queue_size == 0 || t.batch_size == 0 || t.batch_size > t.queue_size {
            return Err(invalid(
                "tracing.batch_size",
                "queue_size and batch_size must be >= 1, batch_size <= queue_size".into(),
            ));
        }
        if self.limits.max_header_bytes < 1024 {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be at least 1024".into(),
            ));
        }
        if self.limits.max_headers == 0 {
            return Err(invalid("limits.max_headers", "must be at least 1".into()));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "must be at least 1".into(),
            ));
        }
        for (field, d) in [
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
            ),
            ("limits.idle_timeout", self.limits.idle_timeout),
            ("timeouts.connect", self.timeouts.connect),
            ("timeouts.request", self.timeouts.request),
            ("timeouts.stream_idle", self.timeouts.stream_idle),
            ("identity.reload_interval", self.identity.reload_interval),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        for a in [
            DEFAULT_OUTBOUND_ADDR,
            DEFAULT_INBOUND_ADDR,
            DEFAULT_ADMIN_ADDR,
            DEFAULT_APP_ADDR,
        ] {
            assert!(a.parse::<SocketAddr>().is_ok(), "{a}");
        }
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let cfg = Config::from_yaml(
            "service: orders\nidentity: {cert: c.pem, key: k.pem, bundle: ca.pem}\n",
            "t",
        )
        .unwrap();
        assert_eq!(cfg.inbound.listen, parse_addr(DEFAULT_INBOUND_ADDR));
        assert_eq!(cfg.limits.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(cfg.inbound.mode, InboundMode::Strict);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_field_names_field_and_position() {
        let err = Config::from_yaml(
            "service: orders\nidentity: {cert: c, key: k, bundle: b}\ninbound:\n  listn: 1.2.3.4:5\n",
            "sidecar.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sidecar.yaml"), "{err}");
        assert!(err.contains("unknown field `listn`"), "{err}");
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn env_overrides_apply_and_bad_values_are_named() {
        let mut cfg = Config::new("orders", Path::new("/c"));
        cfg.apply_env([
            ("TRELLIS_APP_ADDR".to_string(), "127.0.0.1:9000".to_string()),
            ("TRELLIS_INBOUND_MODE".to_string(), "permissive".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ])
        .unwrap();
        assert_eq!(cfg.inbound.app.port(), 9000);
        assert_eq!(cfg.inbound.mode, InboundMode::Permissive);
        let err = cfg
            .apply_env([("TRELLIS_ADMIN_ADDR".to_string(), "nope".to_string())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TRELLIS_ADMIN_ADDR"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let mut cfg = Config::new("Orders", Path::new("/c"));
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("service:"));
        cfg.service = "orders".into();
        cfg.timeouts.request = Duration::ZERO;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("timeouts.request:"));
    }
}
