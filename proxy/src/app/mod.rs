//! The one place that wires a sidecar together. Everything external is injected: the
//! configuration, the snapshot channel (file store, etcd, or a test), extra metrics and extra
//! `/config_dump` sections from the agent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use trellis_policies::SpiffeId;

use crate::admin::{Admin, DumpFn};
use crate::config::Config;
use crate::drain;
use crate::identity::{spawn_reloader, IdentityError, IdentityFiles, TlsContext};
use crate::listeners::inbound::Inbound;
use crate::listeners::outbound::Outbound;
use crate::policy::ratelimit::RateLimits;
use crate::readiness::Ready;
use crate::state::pool::PeerPool;
use crate::state::route::{RouteTable, StatsRegistry};
use crate::state::snapshot::Snapshot;
use crate::telemetry::metrics::Metrics;

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

/// Runs when shutdown is requested, before draining starts (e.g. deregistration, so that peers
/// stop sending before the listeners close).
pub type BeforeDrain = Box<dyn FnOnce() -> futures_util::future::BoxFuture<'static, ()> + Send>;

pub struct Proxy {
    config: Config,
    snapshots: SnapshotRx,
    registry: Registry,
    dump_sections: Vec<(&'static str, DumpFn)>,
    ready: Ready,
    before_drain: Vec<BeforeDrain>,
    limits: Arc<RateLimits>,
    access_control: Arc<crate::policy::access::AccessControl>,
    log_level: Option<crate::admin::LogLevelFn>,
    /// Endpoint stats and per-service counters, shared by successive route tables.
    stats: Arc<StatsRegistry>,
    discover: Option<Arc<dyn crate::state::discover::Discover>>,
}

/// The addresses the listeners actually bound (port 0 in the config picks a free port).
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// The ingress TLS listener and its plain HTTP listener, when configured.
    pub ingress: Option<SocketAddr>,
    pub ingress_http: Option<SocketAddr>,
}

/// Asks a running sidecar to drain and stop. Cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<watch::Sender<bool>>);

pub struct Running {
    pub bound: Bound,
    pub ready: Ready,
    pub metrics: Arc<Metrics>,
    /// Version of the snapshot the data plane is routing with (0 before the first).
    pub applied: watch::Receiver<u64>,
    shutdown: ShutdownHandle,
    done: tokio::task::JoinHandle<()>,
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
        Self {
            access_control,
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

    /// Add a section to `/config_dump`.
    pub fn dump_section(&mut self, name: &'static str, f: DumpFn) {
        self.dump_sections.push((name, f));
    }

    /// Validate, load the identity, bind every listener and start serving.
    pub async fn start(mut self) -> Result<Running, StartError> {
        self.config.validate()?;
        let cfg = self.config;
        let ready = self.ready;
        let snapshot_ready = ready.block("snapshot");
        let metrics = Metrics::register(&mut self.registry);
        self.registry.register_collector(Box::new(
            crate::telemetry::process_metrics::ProcessCollector::new(),
        ));

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
        let tls = Arc::new(ArcSwap::from_pointee(tls));
        let spiffe = own_id.to_string();

        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let inbound_l = bind("inbound", cfg.inbound.listen).await?;
        let outbound_l = bind("outbound", cfg.outbound.listen).await?;
        let admin_l = bind("admin", cfg.admin.listen).await?;
        let (ingress_l, ingress_http_l) = match &cfg.ingress {
            Some(ing) => {
                let http = match &ing.http {
                    Some(h) => Some(bind("ingress http", h.listen).await?),
                    None => None,
                };
                (Some(bind("ingress", ing.listen).await?), http)
            }
            None => (None, None),
        };
        let local = |l: &TcpListener, what, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { what, addr, source })
        };
        let bound = Bound {
            inbound: local(&inbound_l, "inbound", cfg.inbound.listen)?,
            outbound: local(&outbound_l, "outbound", cfg.outbound.listen)?,
            admin: local(&admin_l, "admin", cfg.admin.listen)?,
            // Each listener's error names its own configured address.
            ingress: match (&ingress_l, &cfg.ingress) {
                (Some(l), Some(ing)) => Some(local(l, "ingress", ing.listen)?),
                _ => None,
            },
            ingress_http: match (
                &ingress_http_l,
                cfg.ingress.as_ref().and_then(|i| i.http.as_ref()),
            ) {
                (Some(l), Some(http)) => Some(local(l, "ingress http", http.listen)?),
                _ => None,
            },
        };

        let snapshot = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));
        let pool = Arc::new(PeerPool::new(tls.clone(), metrics.clone()));
        let reloader = spawn_reloader(
            tls.clone(),
            files,
            own_id,
            cfg.identity.reload_interval,
            metrics.clone(),
        );
        let (applied_tx, applied) = watch::channel(0u64);
        let applied_clock = crate::telemetry::route_metrics::AppliedClock::default();
        self.registry.register_collector(Box::new(
            crate::telemetry::route_metrics::RouteCollector::new(snapshot.clone(), &applied_clock),
        ));
        let applier = Applier {
            clock: applied_clock,
            current: snapshot.clone(),
            local_zone: cfg.zone.clone(),
            gateway: cfg.ingress.as_ref().map(|_| cfg.service.clone()),
            pool: pool.clone(),
            metrics: metrics.clone(),
            limits: self.limits.clone(),
            access_control: self.access_control.clone(),
            registry: self.stats.clone(),
        };
        let snapshot_task = tokio::spawn(applier.run(self.snapshots, snapshot_ready, applied_tx));
        // Idle rate-limit keys are forgotten in every mode, with or without an etcd agent.
        let key_sweeper = tokio::spawn(RateLimits::sweeper(Arc::downgrade(&self.limits)));

        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        let shutdown = ShutdownHandle(Arc::new(shutdown_tx));
        let (inbound_trigger, inbound_drain) = drain::channel();
        let (outbound_trigger, outbound_drain) = drain::channel();
        let (admin_trigger, admin_drain) = drain::channel();

        let instance = format!("{}-{}", cfg.service, bound.inbound.port());

        let tracing_ = crate::telemetry::trace::Tracing::start(
            &cfg.tracing,
            crate::telemetry::trace::Identity {
                service: &cfg.service,
                instance: &instance,
                spiffe_id: &spiffe,
            },
            &mut self.registry,
        );
        let access =
            crate::telemetry::access_log::AccessLog::start(&cfg.access_log, &mut self.registry);
        let inbound = Arc::new(Inbound::new(
            &cfg,
            tls.clone(),
            metrics.clone(),
            self.limits.clone(),
            self.access_control.clone(),
            tracing_.clone(),
            access.clone(),
        ));
        let outbound = Arc::new(
            Outbound::new(
                &cfg,
                snapshot.clone(),
                pool.clone(),
                tls.clone(),
                metrics.clone(),
                tracing_.clone(),
                access,
            )
            .with_on_demand(
                self.discover
                    .clone()
                    .map(|d| crate::state::discover::OnDemand::new(d, applied.clone())),
            ),
        );
        let mut ingress_certs = None;
        if let (Some(ing), Some(listener)) = (&cfg.ingress, ingress_l) {
            let certs = crate::listeners::ingress::certs::SniCerts::load(&ing.certificates)
                .map_err(|e| StartError::Ingress(e.to_string()))?;
            let resolver = crate::listeners::ingress::certs::Resolver::new(certs);
            self.registry.register_collector(Box::new(
                crate::listeners::ingress::certs::ExpiryCollector(resolver.clone()),
            ));
            ingress_certs = Some(resolver.clone());
            crate::listeners::ingress::certs::spawn_reloader(
                resolver.clone(),
                ing.certificates.clone(),
                cfg.identity.reload_interval,
                metrics.clone(),
            );
            let server_config = crate::listeners::ingress::server_config(resolver.clone())
                .map_err(|e| StartError::Ingress(e.to_string()))?;
            let edge = crate::listeners::ingress::Edge {
                certs: resolver,
                tls: server_config,
                trusted_proxies: crate::http::headers::TrustedProxies::parse(&ing.trusted_proxies)
                    .map_err(|m| StartError::Ingress(format!("trusted_proxies: {m}")))?,
                https_port: bound.ingress.map_or(443, |a| a.port()),
            };
            let ingress = Arc::new(crate::listeners::ingress::Ingress::new(
                outbound.clone(),
                self.access_control.clone(),
                self.limits.clone(),
                metrics.clone(),
                cfg.limits.clone(),
                edge,
            ));
            // Outside clients stop with the inbound listener: first in the drain order.
            tokio::spawn(ingress.clone().serve_tls(listener, inbound_drain.clone()));
            if let (Some(h), Some(l)) = (&ing.http, ingress_http_l) {
                tokio::spawn(ingress.serve_http(l, inbound_drain.clone(), h.redirect_to_https));
            }
        }
        let app_speaks = inbound.app_knowledge();
        tokio::spawn(inbound.serve(inbound_l, inbound_drain));
        tokio::spawn(outbound.serve(outbound_l, outbound_drain));

        let dump = {
            let cfg = cfg.clone();
            let snapshot = snapshot.clone();
            let tls = tls.clone();
            let pool = pool.clone();
            let ready = ready.clone();
            let limits = self.limits.clone();
            let access_control = self.access_control.clone();
            let ingress_certs = ingress_certs.clone();
            let sections = self.dump_sections;
            Arc::new(move || {
                let t = tls.load();
                let mut v = serde_json::json!({
                    "config": cfg,
                    "identity": {
                        "spiffe_id": t.identity().to_string(),
                        "not_after_unix": t.not_after(),
                        "generation": t.generation(),
                    },
                    // What `inbound.app_protocol: auto` found the app to speak.
                    "app_speaks": app_speaks.dump(),
                                        "snapshot": &*snapshot.load().snapshot,
                    "load_balancers": snapshot.load().dump(),
                    "routing": snapshot.load().routing.dump(),
                    // The only hosts the ingress routes (empty without an ingress).
                    "gateway_routing": snapshot.load().gateway_routing.dump(),
                                        "limits": limits.dump(),
                    "access": access_control.dump(),
                    "ingress_certificates": ingress_certs.as_ref().map(|r| {
                        r.expiry()
                            .into_iter()
                            .map(|(host, not_after)| serde_json::json!({"host": host, "not_after_unix": not_after}))
                            .collect::<Vec<_>>()
                    }),
                    "peer_connections": pool.len(),
                    "ready": { "pending": ready.pending() },
                });
                for (name, f) in &sections {
                    v[*name] = f();
                }
                v
            }) as DumpFn
        };
        let admin = Arc::new(Admin {
            ready: ready.clone(),
            registry: Arc::new(self.registry),
            dump,
            shutdown: shutdown.0.clone(),
            log_level: self.log_level,
        });
        tokio::spawn(admin.serve(admin_l, admin_drain));

        let grace = cfg.drain.grace_period;
        let drain_ready = ready.clone();
        let hooks = self.before_drain;
        let done = tokio::spawn(async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
            let _not_ready = drain_ready.block("draining");
            let start = Instant::now();
            for hook in hooks {
                if tokio::time::timeout(grace, hook()).await.is_err() {
                    tracing::warn!("shutdown hook did not finish within the grace period");
                }
            }
            tracing::info!(grace = ?grace, "draining: inbound stops accepting, outbound keeps serving the app");
            let inbound_done = inbound_trigger
                .drain(grace.saturating_sub(start.elapsed()))
                .await;
            let outbound_done = outbound_trigger
                .drain(grace.saturating_sub(start.elapsed()))
                .await;
            if inbound_done && outbound_done {
                tracing::info!(elapsed = ?start.elapsed(), "drained");
            } else {
                tracing::warn!(grace = ?grace, "grace period ended with requests still in flight");
            }
            // Spans of the last requests go out before the process exits.
            tracing_.flush(std::time::Duration::from_secs(2)).await;
            reloader.abort();
            snapshot_task.abort();
            key_sweeper.abort();
            drop(admin_trigger);
        });

        Ok(Running {
            bound,
            ready,
            metrics,
            applied,
            shutdown,
            done,
        })
    }
}

/// What a snapshot updates: the route table, the connection pool, metrics and the limits.
struct Applier {
    clock: crate::telemetry::route_metrics::AppliedClock,
    current: Arc<ArcSwap<RouteTable>>,
    local_zone: Option<String>,
    /// This sidecar's service when it is an ingress gateway: HTTPRoutes naming it in
    /// `gateways` are compiled for the edge.
    gateway: Option<String>,
    pool: Arc<PeerPool>,
    metrics: Arc<Metrics>,
    limits: Arc<RateLimits>,
    access_control: Arc<crate::policy::access::AccessControl>,
    registry: Arc<StatsRegistry>,
}

/// Requests per service so far, read by a scoped store to find services nobody calls.
#[derive(Clone)]
pub struct ServiceUsage(Arc<StatsRegistry>);

impl ServiceUsage {
    /// Requests to `service` so far; `None` when the data plane does not hold it.
    pub fn admitted(&self, service: &str) -> Option<u64> {
        self.0.admitted(service)
    }
}

// === impl Applier ===

impl Applier {
    /// Apply each snapshot the source sends, and evict pooled connections to removed endpoints.
    async fn run(
        self,
        mut rx: SnapshotRx,
        ready: crate::readiness::BlockReady,
        applied: watch::Sender<u64>,
    ) {
        let Applier {
            clock,
            current,
            local_zone,
            gateway,
            pool,
            metrics,
            limits,
            access_control,
            registry,
        } = self;
        let mut ready = Some(ready);
        let mut health = crate::state::health::HealthChecks::default();
        loop {
            let next = rx.borrow_and_update().clone();
            if let Some(snap) = next {
                tracing::info!(version = snap.version, source = %snap.source, services = snap.services.len(), "applied mesh snapshot");
                metrics.snapshots_applied.inc();
                metrics
                    .snapshot_version
                    .set(i64::try_from(snap.version).unwrap_or(i64::MAX));
                let prev = current.load_full();
                let gone = crate::state::route::departed(&prev.snapshot, &snap);
                if !gone.is_empty() {
                    pool.retain(|addr, id| !gone.iter().any(|(a, i)| *a == addr && i == id));
                }
                let version = snap.version;
                limits.update(&snap);
                access_control.update(&snap);
                let table = Arc::new(RouteTable::update(
                    &prev,
                    snap,
                    &registry,
                    local_zone.as_deref(),
                    gateway.as_deref(),
                ));
                drop(prev);
                health.update(&table, &pool, &metrics);
                current.store(table);
                clock.mark();
                applied.send_replace(version);
                ready.take();
            }
            if rx.changed().await.is_err() {
                // The source is gone; keep serving the last snapshot.
                tracing::warn!("snapshot source closed; serving the last snapshot");
                return;
            }
        }
    }
}

// === impl ShutdownHandle ===

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
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
