//! The one place that wires a sidecar together. Everything external is injected: the
//! configuration, the snapshot channel (file store, etcd, or a test), extra metrics and extra
//! `/config_dump` sections from the agent.

mod applier;
mod bind;
mod dump;
mod edge;
mod inputs;
pub mod shutdown;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use trellis_policies::SpiffeId;

use crate::admin::{Admin, DumpFn};
use crate::config::Config;
use crate::drain;
use crate::identity::{spawn_reloader, IdentityError, IdentityFiles, IdentityStore, TlsContext};
use crate::policy::ratelimit::RateLimits;
use crate::readiness::Ready;
use crate::state::discover::OnDemand;
use crate::state::pool::PeerPool;
use crate::state::snapshot::Snapshot;
use crate::state::target::{StatsRegistry, TargetTable};
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::Tracing;
use applier::Applier;
use bind::Listeners;
use edge::IngressListeners;
use inputs::ProxyInputs;
use shutdown::Shutdown;

pub use applier::ServiceUsage;
pub use bind::Bound;
pub use shutdown::{BeforeDrain, ShutdownHandle};

/// Snapshots arrive here; `None` until the source has produced its first one.
pub type SnapshotRx = watch::Receiver<Option<Arc<Snapshot>>>;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("ingress: {0}")]
    Ingress(String),
    #[error("cannot bind {what} listener on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Proxy {
    config: Config,
    snapshots: SnapshotRx,
    registry: Registry,
    dump_sections: Vec<(&'static str, DumpFn)>,
    ready: Ready,
    before_drain: Vec<BeforeDrain>,
    limits: Arc<RateLimits>,
    access_control: Arc<crate::policy::access::AccessControl>,
    cache: Arc<crate::cache::ResponseCache>,
    log_level: Option<crate::admin::LogLevelFn>,
    /// Endpoint stats and per-service counters, shared by successive route tables.
    stats: Arc<StatsRegistry>,
    discover: Option<Arc<dyn crate::state::discover::Discover>>,
    portal: crate::listeners::ingress::portal::PortalDocs,
    /// OpenAPI validation at the ingress: its compiled documents (published by the agent) and
    /// metrics.
    validation: Arc<crate::validate::EdgeValidation>,
}

pub struct Running {
    pub bound: Bound,
    pub ready: Ready,
    pub metrics: Arc<Metrics>,
    /// Version of the snapshot the data plane is routing with (0 before the first).
    pub applied: watch::Receiver<u64>,
    shutdown: ShutdownHandle,
    done: tokio::task::JoinHandle<()>,
}

/// What [`Proxy::start`] builds before the listeners: shared with them and the applier.
struct SharedState {
    routes: Arc<ArcSwap<TargetTable>>,
    pool: Arc<PeerPool>,
    /// Version of the snapshot the data plane is routing with.
    applied: watch::Receiver<u64>,
    /// The background tasks the shutdown sequence ends.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

// === impl Proxy ===

impl Proxy {
    pub fn new(config: Config, snapshots: SnapshotRx) -> Self {
        let mut registry = Registry::with_prefix("trellis");
        let limits = RateLimits::new(&config.service, &mut registry);
        let access_control = crate::policy::access::AccessControl::new(
            &config.service,
            &config.authorization,
            &mut registry,
        );
        let cache = crate::cache::ResponseCache::new(&config.service, &mut registry);
        let validation = Arc::new(crate::validate::EdgeValidation::new(&mut registry));
        Self {
            validation,
            access_control,
            cache,
            config,
            snapshots,
            registry,
            dump_sections: Vec::new(),
            ready: Ready::new(),
            before_drain: Vec::new(),
            limits,
            log_level: None,
            stats: Arc::default(),
            discover: None,
            portal: Arc::default(),
        }
    }

    /// Let the outbound side ask `store` about services the snapshots do not hold (scoped
    /// discovery), instead of answering `unknown-service` at once.
    pub fn on_demand(&mut self, store: Arc<dyn crate::state::discover::Discover>) {
        self.discover = Some(store);
    }

    /// How much each service is used, for a scoped store to drop the ones nobody calls.
    pub fn service_usage(&self) -> ServiceUsage {
        ServiceUsage(self.stats.clone())
    }

    /// The inbound rate and concurrency limits, for the agent to share global limits.
    /// Where the agent publishes the developer portal's documents (an ingress with `portal`).
    pub fn portal_docs(&self) -> crate::listeners::ingress::portal::PortalDocs {
        self.portal.clone()
    }

    /// Where the agent publishes the compiled OpenAPI documents the gateway's routes validate
    /// with (an ingress).
    pub fn api_validators(&self) -> crate::validate::ApiValidators {
        self.validation.validators.clone()
    }

    pub fn rate_limits(&self) -> Arc<RateLimits> {
        self.limits.clone()
    }

    /// The readiness state `/ready` reports, for sources to add detail to.
    pub fn ready(&self) -> Ready {
        self.ready.clone()
    }

    /// Run `hook` when shutdown is requested, before draining.
    pub fn before_drain(&mut self, hook: BeforeDrain) {
        self.before_drain.push(hook);
    }

    /// The registry `/metrics` serves, for the agent to add its own metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Let `/log_level` read and change the process's log filter.
    pub fn log_level_control(&mut self, f: crate::admin::LogLevelFn) {
        self.log_level = Some(f);
    }

    /// Add a section to `/config_dump`. One named like a section of the data plane's replaces
    /// it: the agent shows the whole configuration file (its `store` and `dns` too) under
    /// `config`.
    pub fn dump_section(&mut self, name: &'static str, f: DumpFn) {
        self.dump_sections.push((name, f));
    }

    /// Validate, load the identity, bind every listener and start serving.
    pub async fn start(mut self) -> Result<Running, StartError> {
        self.config.validate()?;
        let ready = self.ready.clone();
        // Not ready until the first snapshot is applied: blocked before anything can ask.
        let snapshot_ready = ready.block("snapshot");
        let metrics = Metrics::register(&mut self.registry);
        self.registry.register_collector(Box::new(
            crate::telemetry::process_metrics::ProcessCollector::new(),
        ));
        let (own_id, files, tls) = load_identity(&self.config, &metrics)?;
        let spiffe = own_id.to_string();
        let listeners = Listeners::bind(&self.config).await?;
        let bound = listeners.bound(&self.config)?;
        let state = self.spawn_state(&tls, files, own_id, &metrics, snapshot_ready);
        let inputs = self.inputs(tls, &metrics, &state, &bound, &spiffe);
        let (shutdown, done) = self.serve(inputs, listeners, &bound, state.tasks)?;
        Ok(Running {
            bound,
            ready,
            metrics,
            applied: state.applied,
            shutdown,
            done,
        })
    }

    /// The state the listeners read: the target table, fed by the snapshot applier; the peer
    /// pool; the certificate reloader; the sweeper of idle rate-limit keys (in every mode,
    /// with or without an etcd agent).
    fn spawn_state(
        &mut self,
        tls: &IdentityStore,
        files: IdentityFiles,
        own_id: SpiffeId,
        metrics: &Arc<Metrics>,
        snapshot_ready: crate::readiness::BlockReady,
    ) -> SharedState {
        let cfg = &self.config;
        let routes = Arc::new(ArcSwap::from_pointee(TargetTable::empty()));
        let pool = Arc::new(PeerPool::new(tls.clone(), metrics.clone()));
        let reload = cfg.identity.reload_interval;
        let reloader = spawn_reloader(tls.clone(), files, own_id, reload, metrics.clone());
        let (applied_tx, applied) = watch::channel(0u64);
        let clock = crate::telemetry::route_metrics::AppliedClock::default();
        self.registry.register_collector(Box::new(
            crate::telemetry::route_metrics::RouteCollector::new(routes.clone(), &clock),
        ));
        let applier = Applier {
            clock,
            current: routes.clone(),
            local_zone: cfg.zone.clone(),
            gateway: cfg.ingress.as_ref().map(|_| cfg.service.clone()),
            pool: pool.clone(),
            metrics: metrics.clone(),
            limits: self.limits.clone(),
            access_control: self.access_control.clone(),
            cache: self.cache.clone(),
            registry: self.stats.clone(),
        };
        let snapshots = self.snapshots.clone();
        let snapshot_task = tokio::spawn(applier.run(snapshots, snapshot_ready, applied_tx));
        let key_sweeper = tokio::spawn(RateLimits::sweeper(Arc::downgrade(&self.limits)));
        SharedState {
            routes,
            pool,
            applied,
            tasks: vec![reloader, snapshot_task, key_sweeper],
        }
    }

    /// The bundle every listener is built from, with tracing and the access log started.
    fn inputs(
        &mut self,
        tls: IdentityStore,
        metrics: &Arc<Metrics>,
        state: &SharedState,
        bound: &Bound,
        spiffe: &str,
    ) -> ProxyInputs {
        let cfg = self.config.clone();
        let instance = format!("{}-{}", cfg.service, bound.inbound.port());
        let who = crate::telemetry::trace::Identity {
            service: &cfg.service,
            instance: &instance,
            spiffe_id: spiffe,
        };
        let tracing = Tracing::start(&cfg.tracing, who, &mut self.registry);
        let access_log = AccessLog::start(&cfg.access_log, &mut self.registry);
        let on_demand = self
            .discover
            .clone()
            .map(|d| OnDemand::new(d, state.applied.clone()));
        ProxyInputs {
            cfg,
            tls,
            metrics: metrics.clone(),
            routes: state.routes.clone(),
            pool: state.pool.clone(),
            tracing,
            access_log,
            rate_limits: self.limits.clone(),
            access_control: self.access_control.clone(),
            portal: self.portal.clone(),
            validation: self.validation.clone(),
            cache: self.cache.clone(),
            on_demand,
        }
    }

    /// Serve the listeners and the admin API, and spawn the shutdown sequence.
    fn serve(
        self,
        inputs: ProxyInputs,
        listeners: Listeners,
        bound: &Bound,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    ) -> Result<(ShutdownHandle, tokio::task::JoinHandle<()>), StartError> {
        let mut registry = self.registry;
        let ready = self.ready;
        let (shutdown_tx, requested) = watch::channel(false);
        let shutdown = ShutdownHandle(Arc::new(shutdown_tx));
        let (inbound_trigger, inbound_drain) = drain::channel();
        let (outbound_trigger, outbound_drain) = drain::channel();
        let (admin_trigger, admin_drain) = drain::channel();

        let outbound = inputs.outbound();
        let ingress = IngressListeners {
            tls: listeners.ingress,
            http: listeners.ingress_http,
        };
        let ingress_certs = edge::start(
            &inputs,
            &outbound,
            &mut registry,
            ingress,
            bound,
            &inbound_drain,
        )?;
        // Complete now: `/metrics` and the telemetry readers see the same registry.
        let registry = Arc::new(registry);
        let inbound = inputs.inbound(registry.clone());
        let extra = dump::Extra {
            app_speaks: inbound.app_knowledge(),
            ready: ready.clone(),
            ingress_certs,
            sections: self.dump_sections,
        };
        tokio::spawn(inbound.serve(listeners.inbound, inbound_drain));
        tokio::spawn(outbound.serve(listeners.outbound, outbound_drain));
        let admin = Arc::new(Admin {
            ready: ready.clone(),
            registry,
            dump: dump::config_dump(&inputs, extra),
            shutdown: shutdown.0.clone(),
            log_level: self.log_level,
        });
        tokio::spawn(admin.serve(listeners.admin, admin_drain));

        let done = Shutdown {
            requested,
            ready,
            hooks: self.before_drain,
            grace: inputs.cfg.drain.grace_period,
            inbound: inbound_trigger,
            outbound: outbound_trigger,
            admin: admin_trigger,
            tracing: inputs.tracing.clone(),
            tasks,
        }
        .spawn();
        Ok((shutdown, done))
    }
}

/// This sidecar's SPIFFE ID, its identity files, and the identity loaded from them.
fn load_identity(
    cfg: &Config,
    metrics: &Metrics,
) -> Result<(SpiffeId, IdentityFiles, IdentityStore), StartError> {
    let own_id = SpiffeId::for_service(&cfg.trust_domain, &cfg.service).map_err(|e| {
        crate::config::ConfigError::Invalid {
            field: "trust_domain".into(),
            message: e.to_string(),
        }
    })?;
    let files = IdentityFiles {
        cert: cfg.identity.cert.clone(),
        key: cfg.identity.key.clone(),
        bundle: cfg.identity.bundle.clone(),
    };
    let tls = TlsContext::load(&files, &own_id, 1)?;
    metrics.cert_expiry.set(tls.not_after());
    tracing::info!(identity = %own_id, not_after = tls.not_after(), "identity loaded");
    Ok((own_id, files, Arc::new(ArcSwap::from_pointee(tls))))
}

// === impl Running ===

impl Running {
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Resolves when the sidecar has drained after a shutdown request.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}
