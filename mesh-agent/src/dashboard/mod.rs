//! `mesh-agent dashboard`: the mesh seen whole, with etcd as the only shared part.
//!
//! A stateless process with its own identity: every interval it reads the fleet from etcd
//! ([`fleet`]), fetches each instance's summary over mTLS with bounded concurrency
//! ([`scrape`]; the sidecars answer only identities in their `telemetry.readers`), keeps the
//! last hour in memory ([`model`]) and serves a web UI and its JSON API ([`api`]). Run one or
//! several, anywhere: they share nothing and each rebuilds its hour by itself.

pub mod alerts;
pub mod api;
mod evaluator;
pub mod fleet;
pub mod model;
pub mod notify;
pub mod policies;
pub mod prometheus;
pub mod scrape;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use trellis_proxy::identity::{IdentityFiles, SpiffeId, TlsContext};

use crate::config::EtcdConfig;
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;

/// Default refresh interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// Default summaries fetched at once.
pub const DEFAULT_CONCURRENCY: usize = 32;
/// Default timeout of one summary fetch (connect, handshake, answer).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Everything a dashboard runs with.
#[derive(Clone, Debug)]
pub struct DashboardConfig {
    pub listen: SocketAddr,
    pub etcd: EtcdConfig,
    /// This dashboard's identity: `<dir>/<name>.pem`, `<dir>/<name>-key.pem`, `<dir>/ca.pem`,
    /// as `mesh-agent cert issue --service <name>` writes them.
    pub identity_dir: PathBuf,
    pub name: String,
    pub trust_domain: String,
    pub interval: Duration,
    pub concurrency: usize,
    pub fetch_timeout: Duration,
    /// Required for the UI and API when `listen` is not a loopback address.
    pub token: Option<String>,
    /// Where alerts go (the dashboard that holds the evaluator lease sends them).
    pub notify: alerts::Notify,
    /// TTL of the evaluator lease: how long the fleet goes without an evaluator when the one
    /// evaluating dies.
    pub evaluator_ttl: Duration,
}

/// Default TTL of the alert evaluator's lease.
pub const DEFAULT_EVALUATOR_TTL: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error("dashboard identity: {0}")]
    Identity(String),
    #[error("listening on {0} (not loopback) needs --token-file: the pages show the whole mesh")]
    TokenRequired(SocketAddr),
    #[error("alert notifications: {0}")]
    Notify(#[from] notify::NotifyConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running dashboard: its address, its model (for tests) and its tasks.
pub struct Running {
    pub addr: SocketAddr,
    pub model: Arc<Mutex<model::Model>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stop at once, as a killed process would: nothing is released (the evaluator lease
    /// expires by itself).
    pub fn abort(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Bind, then refresh and serve until the process ends.
pub async fn start(cfg: DashboardConfig) -> Result<Running, DashboardError> {
    if !cfg.listen.ip().is_loopback() && cfg.token.is_none() {
        return Err(DashboardError::TokenRequired(cfg.listen));
    }
    let reader = scrape::Reader::new(Arc::new(identity(&cfg)?), cfg.fetch_timeout);
    let notifier = Arc::new(notify::Notifier::new(&cfg.notify)?);
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| DashboardError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| DashboardError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let model = Arc::new(Mutex::new(model::Model::default()));
    let api = Arc::new(api::Api::new(
        model.clone(),
        reader.clone(),
        cfg.interval,
        cfg.concurrency,
        cfg.token.clone(),
        api::PolicyReader::new(cfg.etcd.clone()),
    ));
    let tasks = vec![
        tokio::spawn(api.serve(listener)),
        tokio::spawn(evaluator::run(
            cfg.clone(),
            notifier,
            model.clone(),
            addr.port(),
        )),
        tokio::spawn(refresh(cfg, reader, model.clone())),
    ];
    tracing::info!(%addr, "dashboard serving");
    Ok(Running { addr, model, tasks })
}

fn identity(cfg: &DashboardConfig) -> Result<TlsContext, DashboardError> {
    let own = SpiffeId::for_service(&cfg.trust_domain, &cfg.name)
        .map_err(|e| DashboardError::Identity(e.to_string()))?;
    let files = IdentityFiles {
        cert: cfg.identity_dir.join(format!("{}.pem", cfg.name)),
        key: cfg.identity_dir.join(format!("{}-key.pem", cfg.name)),
        bundle: cfg.identity_dir.join("ca.pem"),
    };
    TlsContext::load(&files, &own, 1).map_err(|e| DashboardError::Identity(e.to_string()))
}

/// Every interval: the fleet from etcd, then every instance's summary.
async fn refresh(cfg: DashboardConfig, reader: scrape::Reader, model: Arc<Mutex<model::Model>>) {
    let keys = Keys::new(&cfg.etcd.prefix);
    let mut conn = Connection::default();
    let mut every = ticker(cfg.interval);
    loop {
        every.tick().await;
        let started = std::time::Instant::now();
        let started_ms = trellis_proxy::telemetry::route_metrics::unix_ms();
        let Some(client) = conn.get(&cfg.etcd).await else {
            continue;
        };
        let fleet = match fleet::read(client, &keys).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "reading the fleet from etcd failed; keeping what it has");
                continue;
            }
        };
        let fleet_took = started.elapsed();
        let reads = futures_util::stream::iter(fleet.members.iter().cloned())
            .map(|m| {
                let reader = reader.clone();
                async move { read_one(&reader, &m).await }
            })
            .buffered(cfg.concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let now = trellis_proxy::telemetry::route_metrics::unix_ms();
        let took = started.elapsed();
        if let Ok(mut m) = model.lock() {
            m.refreshed(started_ms, fleet_took, took, &reads);
            m.tick(now, fleet.revision, fleet.members, reads);
        }
    }
}

async fn read_one(
    reader: &scrape::Reader,
    m: &fleet::Member,
) -> Result<trellis_proxy::telemetry::summary::Summary, String> {
    let addr: SocketAddr = m
        .address
        .parse()
        .map_err(|_| format!("registered address {:?} is not ip:port", m.address))?;
    let id = SpiffeId::parse(&m.identity)
        .map_err(|e| format!("registered identity {:?}: {e}", m.identity))?;
    reader.summary(addr, &id).await.map_err(|e| {
        tracing::debug!(instance = %m.instance, error = %e, "summary read failed");
        e.to_string()
    })
}

/// A tick every `interval`; a late one is not caught up (a slow round delays the next).
fn ticker(interval: Duration) -> tokio::time::Interval {
    let mut every = tokio::time::interval(interval);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every
}

/// An etcd connection, made again after a member fault.
#[derive(Default)]
struct Connection(Option<Etcd>);

impl Connection {
    /// The connection, or `None` (logged) while etcd cannot be reached: the caller keeps
    /// what it has and tries again next round.
    async fn get(&mut self, cfg: &EtcdConfig) -> Option<&Etcd> {
        if self.0.as_ref().is_none_or(|e| e.has_failed()) {
            self.0 = match Etcd::connect(cfg).await {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard cannot reach etcd; keeping what it has");
                    None
                }
            };
        }
        self.0.as_ref()
    }
}
