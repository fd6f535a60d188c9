//! The agent's configuration: the keys of the sidecar file that only `mesh-agent` reads.
//!
//! The data plane is fed by snapshots and never reads a store: where the snapshots come from
//! (`store:`, a mesh file or etcd with this instance's registration and discovery) and how host
//! names are resolved to build them (`dns:`) are the agent's business, so they live here and
//! not in `trellis_proxy::config`. The file is still one YAML file per sidecar with `store:`
//! and `dns:` next to the data plane's keys; [`AgentConfig::from_yaml`] splits it (see
//! [`split`]), each half refusing its own unknown keys with the key, line and column.
//!
//! Defaults live here as constants so that the docs, `/config_dump` and the code agree.

mod split;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_proxy::config::{Config, ConfigError};

// === defaults ===

/// How often a store file is checked for changes: as often as the identity files.
pub const DEFAULT_STORE_RELOAD_INTERVAL: Duration = trellis_proxy::config::DEFAULT_RELOAD_INTERVAL;
/// Key prefix in etcd; several meshes can share one etcd under different prefixes.
pub const DEFAULT_ETCD_PREFIX: &str = "/trellis";
/// Registration lease TTL. etcd raises TTLs below ~2 s, so shorter values are refused.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// Timeout of one etcd call (connect included).
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a sidecar re-reads etcd's member list. Members are replaced rarely, and every
/// sidecar reading it costs the cluster N / interval calls/s (the Go client does not sync at
/// all by default): 5 minutes is a few calls per second for 1,000 sidecars.
pub const DEFAULT_AUTO_SYNC: Duration = Duration::from_secs(300);
/// A service learned on demand and not called for this long is dropped (its watch cancelled).
pub const DEFAULT_DISCOVERY_IDLE: Duration = Duration::from_secs(600);
/// Most services a sidecar learns on demand (declared and routed ones do not count): bounds
/// what an app calling made-up names can make it hold.
pub const DEFAULT_MAX_LEARNED: usize = 1000;
/// How often the app's OpenAPI document is fetched again (`api_spec.interval`); until the
/// first answer (the app is still starting) it is tried every [`API_SPEC_STARTUP_RETRY`].
pub const DEFAULT_API_SPEC_INTERVAL: Duration = Duration::from_secs(60);
pub const MIN_API_SPEC_INTERVAL: Duration = Duration::from_secs(1);
pub const API_SPEC_STARTUP_RETRY: Duration = Duration::from_secs(1);
/// Timeout of one fetch of the app's document, body included.
pub const DEFAULT_API_SPEC_TIMEOUT: Duration = Duration::from_secs(5);

/// The top-level keys of the sidecar file the agent owns; the data plane's [`Config`] is read
/// from every other key.
const AGENT_KEYS: &[&str] = &["store", "dns", "api_spec"];

/// The whole sidecar configuration file: the data plane's part, handed to the proxy, and the
/// agent's. Serialized as one flat document (for `/config_dump`), as the file is written.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentConfig {
    #[serde(flatten)]
    pub proxy: Config,
    /// Where endpoints and policies come from.
    pub store: StoreConfig,
    /// Name resolution for host-name endpoints and external services.
    pub dns: DnsConfig,
    /// The app's own OpenAPI document, fetched and stored in etcd (docs/api-specs.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_spec: Option<ApiSpecFetchConfig>,
}

/// `api_spec:`: where the app serves its OpenAPI document and under which version the mesh
/// lists it. Needs `store.etcd`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSpecFetchConfig {
    /// Path on the app (`inbound.app`), e.g. `/openapi.json`; JSON or YAML.
    pub path: String,
    /// The version the mesh lists it under; default: the document's `info.version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default = "d_api_spec_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "d_api_spec_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl ApiSpecFetchConfig {
    /// Defaults for everything but the path.
    pub fn new(path: &str) -> Self {
        Self {
            path: path.to_string(),
            version: None,
            interval: DEFAULT_API_SPEC_INTERVAL,
            timeout: DEFAULT_API_SPEC_TIMEOUT,
        }
    }

    fn validate(&self, etcd: bool) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: format!("api_spec.{field}"),
            message,
        };
        let is_path = self.path.starts_with('/')
            && format!("http://localhost{}", self.path)
                .parse::<http::Uri>()
                .is_ok_and(|u| u.path_and_query().is_some_and(|p| p.as_str() == self.path));
        if !is_path {
            return Err(invalid(
                "path",
                format!(
                    "`{}` is not a URL path starting with `/` (e.g. `/openapi.json`)",
                    self.path
                ),
            ));
        }
        if let Some(v) = &self.version {
            trellis_policies::validate_api_version(v).map_err(|m| invalid("version", m))?;
        }
        if self.interval < MIN_API_SPEC_INTERVAL {
            return Err(invalid("interval", "must be at least 1s".into()));
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            return Err(invalid(
                "timeout",
                format!(
                    "must be greater than zero and at most the interval ({})",
                    humantime::format_duration(self.interval)
                ),
            ));
        }
        if !etcd {
            return Err(invalid(
                "path",
                "needs `store.etcd`: fetched documents are stored in etcd".into(),
            ));
        }
        Ok(())
    }
}

/// The agent's keys of a sidecar file. Not `deny_unknown_fields`: the data plane's keys are
/// passed over here and checked by [`Config`]'s own deserializer; the sections below refuse
/// unknown keys themselves.
#[derive(Deserialize)]
struct AgentKeys {
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    dns: DnsConfig,
    #[serde(default)]
    api_spec: Option<ApiSpecFetchConfig>,
}

/// Where endpoints and policies come from (`store:`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Standalone mode: a YAML mesh document, watched and hot-reloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    #[serde(default = "d_store_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Production mode: registration, discovery and policies in etcd. Only the agent reads
    /// it; the data plane only ever sees the snapshots built from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdConfig>,
}

/// How to reach etcd and where this sidecar keeps its fail-static cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// e.g. `http://10.0.0.1:2379`; several for a cluster.
    pub endpoints: Vec<String>,
    #[serde(default = "d_etcd_prefix")]
    pub prefix: String,
    /// PEM CA bundle for TLS to etcd (use `https://` endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key for mutual TLS to etcd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Never shown in `/config_dump`. `TRELLIS_ETCD_PASSWORD` overrides it.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    #[serde(default = "d_etcd_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "d_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// The last applied mesh state and its revision, for fail-static starts. Default:
    /// `<temp dir>/trellis-<service>-<inbound port>.cache.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_file: Option<PathBuf>,
    /// How often the cluster's members are learned from etcd, so a member replaced on a new
    /// address is used without a configuration change (the Go client's auto-sync). `0s`:
    /// never; only `endpoints` are dialled.
    #[serde(default = "d_auto_sync", with = "humantime_serde")]
    pub auto_sync_interval: Duration,
    /// How this instance registers itself.
    #[serde(default)]
    pub registration: RegistrationConfig,
    /// What this sidecar holds of the mesh.
    #[serde(default)]
    pub discovery: DiscoveryConfig,
}

/// Which part of the mesh a sidecar watches. Its cost (memory, CPU per change) follows what it
/// holds, so by default it holds only what it uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiscoveryScope {
    /// Its own service, the declared `dependencies`, the backends of the HTTPRoutes its
    /// ingress serves, and every service the app calls, learned on the first request.
    #[default]
    OnDemand,
    /// Every service of the mesh (one watch on the whole mesh prefix).
    Full,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    #[serde(default)]
    pub scope: DiscoveryScope,
    /// Services the app calls, watched from the start (no first-request lookup).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<String>,
    /// A service learned on demand and not called for this long is dropped.
    #[serde(default = "d_discovery_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most services learned on demand at once; beyond it, unknown names answer 503.
    #[serde(default = "d_max_learned")]
    pub max_learned: usize,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            scope: DiscoveryScope::default(),
            dependencies: Vec::new(),
            idle_timeout: DEFAULT_DISCOVERY_IDLE,
            max_learned: DEFAULT_MAX_LEARNED,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    /// Register at all (a client-only sidecar may not).
    #[serde(default = "d_true")]
    pub enabled: bool,
    /// The address peers use to reach the inbound listener. Required when `inbound.listen` is
    /// a wildcard address (`TRELLIS_ADVERTISE_ADDR`, e.g. the pod IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<SocketAddr>,
    /// Unique per instance; default `<hostname>-<inbound port>` (`TRELLIS_INSTANCE_ID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(default = "d_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Register only once `GET <app><path>` answers 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_health_path: Option<String>,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            address: None,
            instance_id: None,
            weight: 1,
            zone: None,
            metadata: Default::default(),
            app_health_path: None,
        }
    }
}

fn d_etcd_prefix() -> String {
    DEFAULT_ETCD_PREFIX.to_string()
}
fn d_etcd_timeout() -> Duration {
    DEFAULT_ETCD_TIMEOUT
}
fn d_lease_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}
fn d_store_reload() -> Duration {
    DEFAULT_STORE_RELOAD_INTERVAL
}
fn d_true() -> bool {
    true
}
fn d_weight() -> u32 {
    1
}
fn d_discovery_idle() -> Duration {
    DEFAULT_DISCOVERY_IDLE
}

fn d_max_learned() -> usize {
    DEFAULT_MAX_LEARNED
}

fn d_auto_sync() -> Duration {
    DEFAULT_AUTO_SYNC
}

fn d_api_spec_interval() -> Duration {
    DEFAULT_API_SPEC_INTERVAL
}

fn d_api_spec_timeout() -> Duration {
    DEFAULT_API_SPEC_TIMEOUT
}

/// Name resolution for host-name endpoints and external services (`dns:`); by default the system's resolver configuration (`/etc/resolv.conf`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`ip:port`) to use instead of the system's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<SocketAddr>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            file: None,
            reload_interval: DEFAULT_STORE_RELOAD_INTERVAL,
            etcd: None,
        }
    }
}

// === impl EtcdConfig ===

impl EtcdConfig {
    /// Defaults for everything but the endpoints.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: d_etcd_prefix(),
            ca: None,
            cert: None,
            key: None,
            username: None,
            password: None,
            timeout: d_etcd_timeout(),
            lease_ttl: d_lease_ttl(),
            cache_file: None,
            auto_sync_interval: d_auto_sync(),
            registration: RegistrationConfig::default(),
            discovery: DiscoveryConfig::default(),
        }
    }
}

// === impl AgentConfig ===

impl AgentConfig {
    /// Every default (no store, the system's resolver), for `service` with identity files in
    /// `cert_dir` (see [`Config::new`]).
    pub fn new(service: &str, cert_dir: &Path) -> Self {
        Self {
            proxy: Config::new(service, cert_dir),
            store: StoreConfig::default(),
            dns: DnsConfig::default(),
            api_spec: None,
        }
    }

    /// Read a YAML file, apply `TRELLIS_*` overrides from the process environment, validate.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_yaml(&text, &path.display().to_string())?;
        cfg.apply_env(std::env::vars())?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parse a whole sidecar file; `origin` names the source in errors. Two passes over the
    /// same text, so that serde_norway places every error: the data plane's keys with the
    /// agent's skipped, then the agent's keys with the data plane's passed over.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse = |e: serde_norway::Error| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        };
        let proxy = split::data_plane(serde_norway::Deserializer::from_str(text)).map_err(parse)?;
        let AgentKeys {
            store,
            dns,
            api_spec,
        } = AgentKeys::deserialize(serde_norway::Deserializer::from_str(text)).map_err(parse)?;
        Ok(Self {
            proxy,
            store,
            dns,
            api_spec,
        })
    }

    /// Apply overrides: the data plane's ([`Config::apply_env`]), then the store's. Unknown
    /// `TRELLIS_*` variables are ignored so that later versions' variables do not break older
    /// sidecars.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        self.proxy.apply_env(vars.iter().cloned())?;
        for (var, value) in vars {
            self.store.apply_env(var, value)?;
        }
        Ok(())
    }

    /// Semantic checks that serde cannot express, of both halves.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.proxy.validate()?;
        self.store.validate()?;
        match &self.api_spec {
            Some(a) => a.validate(self.store.etcd.is_some()),
            None => Ok(()),
        }
    }
}

// === impl StoreConfig ===

impl StoreConfig {
    /// One `TRELLIS_*` override of the store's keys; other variables are left alone.
    fn apply_env(&mut self, var: String, value: String) -> Result<(), ConfigError> {
        match var.as_str() {
            "TRELLIS_STORE_FILE" => self.file = Some(value.into()),
            "TRELLIS_ETCD_ENDPOINTS" => {
                let endpoints = comma_list(&value);
                match &mut self.etcd {
                    Some(etcd) => etcd.endpoints = endpoints,
                    None => self.etcd = Some(EtcdConfig::new(endpoints)),
                }
            }
            "TRELLIS_ETCD_PASSWORD" => {
                if let Some(etcd) = &mut self.etcd {
                    etcd.password = Some(value);
                }
            }
            "TRELLIS_ADVERTISE_ADDR" => {
                let a = value.parse::<SocketAddr>().map_err(|e| ConfigError::Env {
                    var: var.clone(),
                    message: format!("`{value}` is not an ip:port address ({e})"),
                })?;
                if let Some(etcd) = &mut self.etcd {
                    etcd.registration.address = Some(a);
                }
            }
            "TRELLIS_INSTANCE_ID" => {
                if let Some(etcd) = &mut self.etcd {
                    etcd.registration.instance_id = Some(value);
                }
            }
            // The services the app calls (comma-separated), e.g. from a pod annotation.
            "TRELLIS_DEPENDENCIES" => {
                if let Some(etcd) = &mut self.etcd {
                    etcd.discovery.dependencies = comma_list(&value);
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, message: String| ConfigError::Invalid {
            field: field.to_string(),
            message,
        };
        if let Some(etcd) = &self.etcd {
            for d in &etcd.discovery.dependencies {
                trellis_policies::validate_service_name(d)
                    .map_err(|m| invalid("store.etcd.discovery.dependencies", m))?;
            }
            if etcd.discovery.idle_timeout < Duration::from_secs(1) {
                return Err(invalid(
                    "store.etcd.discovery.idle_timeout",
                    "must be at least 1s".into(),
                ));
            }
        }
        if self.reload_interval.is_zero() {
            return Err(invalid(
                "store.reload_interval",
                "must be greater than zero".into(),
            ));
        }
        Ok(())
    }
}

/// `a, b ,` -> `[a, b]`.
fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "service: orders\nidentity: {cert: c.pem, key: k.pem, bundle: ca.pem}\n";

    fn parse(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::from_yaml(text, "sidecar.yaml").map_err(|e| e.to_string())
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let cfg = parse(MINIMAL).unwrap();
        assert_eq!(cfg.store, StoreConfig::default());
        assert_eq!(cfg.store.reload_interval, DEFAULT_STORE_RELOAD_INTERVAL);
        assert_eq!(cfg.dns, DnsConfig::default());
        cfg.validate().unwrap();
    }

    #[test]
    fn store_and_dns_sit_next_to_the_data_plane_keys() {
        let cfg = parse(&format!(
            "{MINIMAL}inbound: {{listen: 127.0.0.1:7000}}\nstore:\n  reload_interval: 2s\n  \
             etcd:\n    endpoints: [http://e:2379]\n    password: secret\n    \
             discovery: {{scope: full}}\ndns: {{nameservers: [10.0.0.2:53]}}\n"
        ))
        .unwrap();
        assert_eq!(cfg.proxy.inbound.listen.port(), 7000);
        assert_eq!(cfg.store.reload_interval, Duration::from_secs(2));
        let etcd = cfg.store.etcd.as_ref().unwrap();
        assert_eq!(etcd.endpoints, ["http://e:2379"]);
        assert_eq!(etcd.prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(etcd.discovery.scope, DiscoveryScope::Full);
        assert_eq!(cfg.dns.nameservers.len(), 1);
        // Dumped as one flat document, as written, without the password.
        let dump = serde_json::to_value(&cfg).unwrap();
        assert_eq!(dump["service"], "orders");
        assert_eq!(dump["store"]["etcd"]["endpoints"][0], "http://e:2379");
        assert!(dump["store"]["etcd"].get("password").is_none(), "{dump}");
        assert_eq!(dump["dns"]["nameservers"][0], "10.0.0.2:53");
    }

    #[test]
    fn unknown_keys_are_named_with_their_position_in_either_half() {
        let err = parse(&format!("{MINIMAL}inbound:\n  listn: 1.2.3.4:5\n")).unwrap_err();
        assert!(err.starts_with("sidecar.yaml: "), "{err}");
        assert!(err.contains("unknown field `listn`"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        let err = parse(&format!("{MINIMAL}store:\n  etcd:\n    endpionts: []\n")).unwrap_err();
        assert!(err.starts_with("sidecar.yaml: "), "{err}");
        assert!(err.contains("unknown field `endpionts`"), "{err}");
        assert!(err.contains("line 5"), "{err}");
        // A misspelt top-level key: the agent's keys are among the expected ones.
        let err = parse(&format!("{MINIMAL}dsn: {{}}\n")).unwrap_err();
        assert!(err.contains("unknown field `dsn`"), "{err}");
        assert!(err.contains("`store`, `dns`"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        let err = parse(&format!("{MINIMAL}dns: {{}}\ndns: {{}}\n")).unwrap_err();
        assert!(err.contains("duplicate field `dns`"), "{err}");
        let err = parse("store: {}\n").unwrap_err();
        assert!(err.contains("missing field `service`"), "{err}");
    }

    #[test]
    fn env_overrides_apply_to_both_halves_and_bad_values_are_named() {
        let mut cfg = AgentConfig::new("orders", Path::new("/c"));
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        cfg.apply_env(env(&[
            ("TRELLIS_APP_ADDR", "127.0.0.1:9000"),
            ("TRELLIS_STORE_FILE", "/m.yaml"),
            // Without etcd configured, etcd-only overrides are ignored.
            ("TRELLIS_ETCD_PASSWORD", "early"),
            ("TRELLIS_ETCD_ENDPOINTS", "http://e:2379"),
            ("TRELLIS_DEPENDENCIES", " payments, stock ,"),
            ("TRELLIS_ADVERTISE_ADDR", "10.1.2.3:15006"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(cfg.proxy.inbound.app.port(), 9000);
        assert_eq!(cfg.store.file.as_deref(), Some(Path::new("/m.yaml")));
        let etcd = cfg.store.etcd.as_ref().unwrap();
        assert_eq!(etcd.password, None);
        assert_eq!(etcd.discovery.dependencies, ["payments", "stock"]);
        assert_eq!(etcd.registration.address.unwrap().port(), 15006);
        let err = cfg
            .apply_env(env(&[("TRELLIS_ADVERTISE_ADDR", "nope")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("TRELLIS_ADVERTISE_ADDR"), "{err}");
        let err = cfg
            .apply_env(env(&[("TRELLIS_ADMIN_ADDR", "nope")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("TRELLIS_ADMIN_ADDR"), "{err}");
        cfg.apply_env(env(&[("TRELLIS_DEPENDENCIES", "Bad_Name")]))
            .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("store.etcd.discovery.dependencies"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field_in_either_half() {
        let mut cfg = AgentConfig::new("Orders", Path::new("/c"));
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("service:"), "{err}");
        cfg.proxy.service = "orders".into();
        cfg.store.reload_interval = Duration::ZERO;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("store.reload_interval:"), "{err}");
        cfg.store.reload_interval = DEFAULT_STORE_RELOAD_INTERVAL;
        let mut etcd = EtcdConfig::new(vec!["http://e:2379".into()]);
        etcd.discovery.idle_timeout = Duration::from_millis(10);
        cfg.store.etcd = Some(etcd);
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("store.etcd.discovery.idle_timeout:"),
            "{err}"
        );
    }

    #[test]
    fn api_spec_section_gets_defaults_and_is_checked() {
        let etcd = "store: {etcd: {endpoints: [http://e:2379]}}\n";
        let cfg = parse(&format!(
            "{MINIMAL}{etcd}api_spec: {{path: /openapi.json}}\n"
        ))
        .unwrap();
        assert_eq!(cfg.api_spec, Some(ApiSpecFetchConfig::new("/openapi.json")));
        let a = cfg.api_spec.as_ref().unwrap();
        assert_eq!(a.interval, DEFAULT_API_SPEC_INTERVAL);
        assert_eq!(a.timeout, DEFAULT_API_SPEC_TIMEOUT);
        assert_eq!(a.version, None);
        cfg.validate().unwrap();
        let dump = serde_json::to_value(&cfg).unwrap();
        assert_eq!(dump["api_spec"]["path"], "/openapi.json");
        assert!(parse(MINIMAL).unwrap().api_spec.is_none());

        let cfg = parse(&format!(
            "{MINIMAL}{etcd}api_spec: {{path: /v2/openapi.yaml, version: v2, interval: 10s, timeout: 2s}}\n"
        ))
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(
            cfg.api_spec.as_ref().unwrap().version.as_deref(),
            Some("v2")
        );

        let err = parse(&format!(
            "{MINIMAL}{etcd}api_spec: {{path: /o, intervall: 1s}}\n"
        ))
        .unwrap_err();
        assert!(err.contains("unknown field `intervall`"), "{err}");
        let err = parse(&format!("{MINIMAL}{etcd}api_spec: {{interval: 1s}}\n")).unwrap_err();
        assert!(err.contains("missing field `path`"), "{err}");

        let invalid = |yaml: &str| {
            parse(&format!("{MINIMAL}{etcd}api_spec: {yaml}\n"))
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string()
        };
        let err = invalid("{path: openapi.json}");
        assert!(err.starts_with("api_spec.path:"), "{err}");
        assert!(err.contains("starting with `/`"), "{err}");
        let err = invalid("{path: '/open api.json'}");
        assert!(err.starts_with("api_spec.path:"), "{err}");
        let err = invalid("{path: /o, version: 'v 1'}");
        assert!(err.starts_with("api_spec.version:"), "{err}");
        let err = invalid("{path: /o, interval: 100ms}");
        assert!(
            err.starts_with("api_spec.interval: must be at least 1s"),
            "{err}"
        );
        let err = invalid("{path: /o, interval: 2s, timeout: 5s}");
        assert!(err.starts_with("api_spec.timeout:"), "{err}");
        let err = invalid("{path: /o, timeout: 0s}");
        assert!(err.starts_with("api_spec.timeout:"), "{err}");
        // Specs live in etcd: without it the section is refused.
        let err = parse(&format!("{MINIMAL}api_spec: {{path: /o}}\n"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs `store.etcd`"), "{err}");
    }
}
