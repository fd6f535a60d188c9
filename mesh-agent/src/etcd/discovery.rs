//! The mesh state a sidecar holds, followed in etcd and fed to the data plane.
//!
//! What is held is the [`Scope`]: the whole mesh prefix (one watch), or, by default, the
//! policies plus the instances of each service this sidecar uses, each a watch on one shared
//! gRPC stream ([`Watches`]); services the app calls are learned on demand (`answer`) and
//! dropped when unused (`sweep`). A change to one service's instances rebuilds that service
//! only (`publish_services`); policies and scope changes rebuild the snapshot.
//!
//! The rules (../shared/design/NOTES.md section 1): range-read the prefix, then watch from that
//! read's revision + 1; advance the revision only by applied events or progress notifications;
//! on `compacted`, re-read and apply only the differences; check an idle watch with progress
//! requests, because a watch served by a dying member just goes quiet; on any failure, back off,
//! reconnect and resume from the last applied revision. Start from the cache when etcd cannot be
//! reached at startup, and report it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::EtcdConfig;
use etcd_client::{EventType, GetOptions};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use trellis_proxy::app::ServiceUsage;
use trellis_proxy::readiness::Ready;
use trellis_proxy::state::discover::{Discover, Discovered};
use trellis_proxy::state::snapshot::{Service, Snapshot};

use super::cache::Cache;
use super::cache_writer::{self, CacheMetrics, CacheSlot};
use super::keys::{Keys, MeshKey};
use super::on_demand::{Ask, Link, OnDemandStore, MAX_QUEUED};
use super::scope::Scope;
use super::state::{Deleted, MeshState, Rejection};
use super::watches::Watches;
use super::{backoff, Etcd, EtcdError};
use crate::dns::Dns;
use crate::store::SnapshotTx;
use trellis_policies::{MeshDocument, Registration};

/// The fail-static cache is written at most this often (the newest state wins).
const CACHE_EVERY: Duration = Duration::from_secs(1);

/// How long a vanished registration whose endpoint still answers stays in routing: several
/// lease TTLs, long enough for its owner to notice and register again.
pub const RETAIN_FOR: Duration = Duration::from_secs(15);
/// A vanished instance "answers" when its inbound port accepts a connection this fast.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Whether `address` (`host:port` of a peer's inbound listener) accepts a TCP connection.
async fn answers(address: String) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(address))
        .await
        .is_ok_and(|r| r.is_ok())
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DiscoveryStatus {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub connected: bool,
    /// Revision of the mesh state in use.
    pub revision: i64,
    /// Set while serving the cached state because etcd has not been reached since startup.
    pub serving_from_cache: Option<i64>,
    pub cache_file: PathBuf,
    /// Why the last write of the cache file failed (cleared by the next that lands).
    pub cache_error: Option<String>,
    pub last_error: Option<String>,
    pub watch_restarts: u64,
    pub resyncs: u64,
    /// Keys whose latest value was refused, with the revision and reason.
    pub rejected: BTreeMap<String, Rejection>,
    /// `full` or `on-demand`.
    pub scope: &'static str,
    /// Services whose instances are held, and why (own, declared, routed, learned).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, &'static str>,
    /// Key ranges watched on the one watch stream.
    pub watches: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

struct Metrics {
    retained: Gauge,
    retained_total: Counter,
    connected: Gauge,
    revision: Gauge,
    from_cache: Gauge,
    watch_restarts: Counter,
    resyncs: Counter,
    rejected: Family<KindLabels, Counter>,
    freshness: super::freshness::Freshness,
    on_demand: Family<ResultLabels, Counter>,
    held: Gauge,
    dropped: Counter,
    publishes: Family<KindLabels, Counter>,
    cache: CacheMetrics,
}

pub struct Discovery {
    cfg: EtcdConfig,
    conn: super::Connector,
    keys: Keys,
    trust_domain: String,
    state: MeshState,
    need_resync: bool,
    tx: SnapshotTx,
    cache: Cache,
    /// The newest state to persist; a background writer saves it off the async runtime.
    cache_tx: Arc<CacheSlot>,
    cache_tried: bool,
    dns: Arc<Dns>,
    /// The last document sent to the data plane, after DNS resolution.
    last_doc: Option<MeshDocument>,
    ready: Ready,
    status: Arc<Mutex<DiscoveryStatus>>,
    applied: watch::Sender<i64>,
    metrics: Metrics,
    scope: Scope,
    /// Revision applied per watched prefix: where its watch resumes.
    ranges: BTreeMap<String, i64>,
    asks: mpsc::Receiver<Ask>,
    asks_tx: mpsc::Sender<Ask>,
    link: Arc<Link>,
    usage: Option<ServiceUsage>,
    /// Services whose instances changed since the last publish.
    dirty: BTreeSet<String>,
    /// Policies changed since the last publish (the whole snapshot is rebuilt).
    policies_dirty: bool,
    /// The state changed since the cache was last written.
    cache_dirty: bool,
    cache_saved: Option<Instant>,
}

// === impl Discovery ===

impl Discovery {
    /// `service`: this sidecar's service; `gateway`: the same when it runs an ingress.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: EtcdConfig,
        trust_domain: String,
        service: &str,
        gateway: Option<&str>,
        cache_file: PathBuf,
        tx: SnapshotTx,
        ready: Ready,
        dns: Arc<Dns>,
        registry: &mut Registry,
    ) -> Self {
        let metrics = Metrics {
            retained: Gauge::default(),
            retained_total: Counter::default(),
            connected: Gauge::default(),
            revision: Gauge::default(),
            from_cache: Gauge::default(),
            watch_restarts: Counter::default(),
            resyncs: Counter::default(),
            rejected: Family::default(),
            freshness: Default::default(),
            on_demand: Family::default(),
            held: Gauge::default(),
            dropped: Counter::default(),
            publishes: Family::default(),
            cache: CacheMetrics::register(registry),
        };
        registry.register(
            "discovery_on_demand",
            "Lookups of services the data plane did not hold, by result (found, missing, unavailable)",
            metrics.on_demand.clone(),
        );
        registry.register(
            "discovery_services",
            "Services whose instances this sidecar holds (0 in full scope: the whole mesh)",
            metrics.held.clone(),
        );
        registry.register(
            "discovery_dropped",
            "Services learned on demand and dropped after the idle timeout",
            metrics.dropped.clone(),
        );
        registry.register(
            "discovery_publishes",
            "Snapshots sent to the data plane, by kind (full: rebuilt; services: only changed services rebuilt)",
            metrics.publishes.clone(),
        );
        registry.register_collector(Box::new(metrics.freshness.clone()));
        registry.register(
            "etcd_retained_endpoints",
            "Instances whose registration vanished without a graceful deregistration while their endpoint still answered, kept in routing for a grace period",
            metrics.retained.clone(),
        );
        registry.register(
            "etcd_retained",
            "Vanished registrations kept in routing because their endpoint still answered",
            metrics.retained_total.clone(),
        );
        registry.register(
            "etcd_connected",
            "1 while the watch on etcd is established",
            metrics.connected.clone(),
        );
        registry.register(
            "etcd_applied_revision",
            "etcd revision of the mesh state in use",
            metrics.revision.clone(),
        );
        registry.register(
            "etcd_serving_from_cache",
            "1 while serving the cached state because etcd has not been reached since startup",
            metrics.from_cache.clone(),
        );
        registry.register(
            "etcd_watch_restarts",
            "Watch streams re-created after a failure",
            metrics.watch_restarts.clone(),
        );
        registry.register(
            "etcd_resyncs",
            "Full re-reads of the mesh prefix (startup, compaction)",
            metrics.resyncs.clone(),
        );
        registry.register(
            "policy_rejected",
            "Values read from etcd that failed validation, by kind (instance, policy)",
            metrics.rejected.clone(),
        );
        let scope = Scope::new(&cfg.discovery, service, gateway);
        let mut state = MeshState::default();
        if !scope.is_full() {
            let owner = super::state::PolicyOwner {
                service: service.to_string(),
                gateway: gateway.map(str::to_string),
            };
            state.keep_only(Scope::could_want, owner);
        }
        let status = DiscoveryStatus {
            endpoints: cfg.endpoints.clone(),
            prefix: cfg.prefix.clone(),
            cache_file: cache_file.clone(),
            scope: if scope.is_full() { "full" } else { "on-demand" },
            ..Default::default()
        };
        let (applied, _) = watch::channel(0);
        let (asks_tx, asks) = mpsc::channel(MAX_QUEUED);
        Self {
            conn: super::Connector::new(cfg.clone()),
            scope,
            ranges: BTreeMap::new(),
            asks,
            asks_tx,
            link: Arc::default(),
            usage: None,
            dirty: BTreeSet::new(),
            policies_dirty: false,
            cache_dirty: false,
            cache_saved: None,
            keys: Keys::new(&cfg.prefix),
            cache: Cache::new(cache_file, &cfg.prefix),
            cfg,
            trust_domain,
            state,
            need_resync: true,
            tx,
            cache_tx: Arc::default(),
            cache_tried: false,
            dns,
            last_doc: None,
            ready,
            status: Arc::new(Mutex::new(status)),
            applied,
            metrics,
        }
    }

    pub fn status(&self) -> Arc<Mutex<DiscoveryStatus>> {
        self.status.clone()
    }

    /// The handle the data plane asks about services it does not hold; `None` in full scope,
    /// where it holds them all.
    pub fn on_demand(&self) -> Option<Arc<dyn Discover>> {
        if self.scope.is_full() {
            return None;
        }
        let store = OnDemandStore::new(self.asks_tx.clone(), self.link.clone());
        Some(Arc::new(store))
    }

    /// Share `conn` (with the registration and the rate-limit sharing of this sidecar).
    pub fn set_connector(&mut self, conn: super::Connector) {
        self.conn = conn;
    }

    /// Where the data plane counts requests per service, to drop learned services nobody
    /// calls any more.
    pub fn set_usage(&mut self, usage: ServiceUsage) {
        self.usage = Some(usage);
    }

    /// The revision of the last published snapshot, for the status key.
    pub fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Run until the data plane is gone.
    pub async fn run(mut self) {
        let status = self.status.clone();
        cache_writer::spawn(
            self.cache.clone(),
            self.cache_tx.clone(),
            self.metrics.cache.clone(),
            move |error| status.lock().unwrap_or_else(|p| p.into_inner()).cache_error = error,
        );
        let mut attempt = 0;
        loop {
            let start = Instant::now();
            let err = self.session().await.err();
            self.flush_cache();
            let cause = err.as_ref().map_or_else(
                || "the watch is being re-established".to_string(),
                |e| e.to_string(),
            );
            self.link.down(&cause);
            while let Ok((service, reply)) = self.asks.try_recv() {
                self.metrics
                    .on_demand
                    .get_or_create(&ResultLabels {
                        result: "unavailable",
                    })
                    .inc();
                let _ = reply.send(Discovered::Unavailable(format!(
                    "etcd is unreachable and `{service}` is not in the state this sidecar holds ({cause})"
                )));
            }
            self.metrics.connected.set(0);
            self.metrics.freshness.disconnected();
            self.with_status(|s| {
                s.connected = false;
                s.last_error = err.as_ref().map(|e| e.to_string());
            });
            if self.tx.is_closed() {
                return;
            }
            if let Some(e) = &err {
                tracing::warn!(error = %e, revision = self.state.revision, "etcd watch failed; serving the last applied state");
            }
            if self.state.revision == 0 && !self.cache_tried {
                self.start_from_cache().await;
            }
            // A session that ran for a while was healthy: start backing off from scratch.
            if start.elapsed() > Duration::from_secs(10) {
                attempt = 0;
            }
            self.metrics.watch_restarts.inc();
            self.with_status(|s| s.watch_restarts += 1);
            tokio::time::sleep(backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// The prefixes this sidecar watches: the whole mesh, or the policies and each held
    /// service's instances.
    fn wanted_ranges(&self) -> Vec<String> {
        if self.scope.is_full() {
            return vec![self.keys.mesh()];
        }
        let mut ranges = vec![self.keys.policies()];
        ranges.extend(self.scope.services().map(|s| self.keys.instances(s)));
        ranges
    }

    /// Connect, read what is not current, then follow the watches until they fail.
    async fn session(&mut self) -> Result<(), EtcdError> {
        let etcd = self.conn.connect().await?;
        if self.need_resync {
            self.ranges.clear();
        }
        if !self.scope.is_full() {
            // Services held from the cache are watched again (and dropped when unused).
            for service in self.state.registered_services() {
                self.scope.learn(&service);
            }
        }
        self.catch_up(&etcd).await?;
        let ranges: Vec<(String, i64)> = self
            .ranges
            .iter()
            .map(|(p, rev)| (p.clone(), rev + 1))
            .collect();
        let mut watches = Watches::open(&etcd, &ranges).await?;
        self.metrics.connected.set(1);
        self.metrics.freshness.connected();
        self.link.up();
        self.with_status(|s| {
            s.connected = true;
            s.last_error = None;
        });
        tracing::info!(revision = self.state.revision, watches = watches.len(), endpoints = ?self.cfg.endpoints, "watching etcd");

        let mut live = super::WatchLiveness::new();
        let mut sweep = tokio::time::interval(self.scope.sweep_every());
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cache_tick = tokio::time::interval(CACHE_EVERY);
        loop {
            let dns_due = self.dns.next_refresh().map(tokio::time::Instant::from_std);
            let grace_ends = self.state.next_expiry().map(tokio::time::Instant::from_std);
            let msg = tokio::select! {
                msg = watches.stream.message() => msg.map_err(|e| etcd.err(e))?,
                Some((service, reply)) = self.asks.recv() => {
                    let answer = self.answer(&etcd, &mut watches, &service).await;
                    let (result, label, error) = match answer {
                        Ok((a, label)) => (a, label, None),
                        Err(e) => (Discovered::Unavailable(e.to_string()), "unavailable", Some(e)),
                    };
                    self.metrics.on_demand.get_or_create(&ResultLabels { result: label }).inc();
                    let _ = reply.send(result);
                    match error {
                        Some(e) => return Err(e),
                        None => continue,
                    }
                }
                _ = sweep.tick() => {
                    self.sweep(&etcd, &mut watches).await?;
                    continue;
                }
                _ = cache_tick.tick() => {
                    self.flush_cache();
                    continue;
                }
                _ = sleep_until_opt(dns_due) => {
                    self.publish("etcd").await;
                    continue;
                }
                _ = sleep_until_opt(grace_ends) => {
                    self.expire_retained().await;
                    continue;
                }
                _ = live.tick() => {
                    live.check(&etcd, &mut watches.stream).await?;
                    etcd.sync_members_if_due(self.cfg.auto_sync_interval).await;
                    continue;
                }
            };
            live.heard();
            let Some(resp) = msg else {
                return Err(etcd.err(etcd_client::Error::WatchError("watch stream ended".into())));
            };
            if resp.compact_revision() > 0 {
                tracing::warn!(
                    compacted = resp.compact_revision(),
                    revision = self.state.revision,
                    "watch revision was compacted; re-reading and applying the differences"
                );
                self.need_resync = true;
                return Ok(());
            }
            if resp.canceled() {
                if watches.expected_cancel(resp.watch_id()) {
                    continue;
                }
                self.need_resync = true;
                return Err(etcd.err(etcd_client::Error::WatchError(format!(
                    "watch canceled: {}",
                    resp.cancel_reason()
                ))));
            }
            if resp.created() {
                watches.created(resp.watch_id());
                if resp.events().is_empty() {
                    continue;
                }
            }
            let prefix = watches.prefix(resp.watch_id()).map(str::to_string);
            if resp.events().is_empty() {
                // A progress notification: every event up to this revision has been delivered
                // (to this watch, or to all of them when it names none).
                let rev = resp.header().map_or(0, |h| h.revision());
                for (p, r) in self.ranges.iter_mut() {
                    if prefix.as_deref().is_none_or(|x| x == p) {
                        *r = (*r).max(rev);
                    }
                }
                self.state.revision = self.state.revision.max(rev);
                self.note_revision();
                continue;
            }
            let Some(prefix) = prefix else {
                // Events of a watch dropped before it was created.
                continue;
            };
            self.apply_events(&prefix, resp.events()).await;
            if self.dirty.is_empty() && !self.policies_dirty {
                self.note_revision();
                // Seen and nothing to apply (a registration written again as it was): still
                // report it, or `mesh-agent status` waits for this sidecar forever.
                self.applied.send_replace(self.state.revision);
                continue;
            }
            if std::mem::take(&mut self.policies_dirty) {
                self.follow_routes(&etcd, &mut watches).await?;
                self.dirty.clear();
                self.publish("etcd").await;
            } else {
                self.publish_services().await;
            }
        }
    }

    /// Apply one watch response's events (all for `prefix`), noting what changed.
    async fn apply_events(&mut self, prefix: &str, events: &[etcd_client::Event]) {
        let mut vanished = Vec::new();
        let mut revision = self.state.revision;
        let mut range_rev = self.ranges.get(prefix).copied().unwrap_or(0);
        for ev in events {
            let Some(kv) = ev.kv() else { continue };
            let Ok(key) = kv.key_str() else { continue };
            revision = revision.max(kv.mod_revision());
            range_rev = range_rev.max(kv.mod_revision());
            let changed = match ev.event_type() {
                EventType::Put => {
                    match self
                        .state
                        .put(&self.keys, key, kv.value(), kv.mod_revision())
                    {
                        Ok(c) => c,
                        Err(reason) => {
                            self.rejected(key, kv.mod_revision(), &reason);
                            false
                        }
                    }
                }
                EventType::Delete => match self.state.delete(key) {
                    Deleted::Nothing => false,
                    Deleted::Removed => true,
                    Deleted::Vanished(r) => {
                        vanished.push((key.to_string(), r));
                        false
                    }
                },
            };
            if changed {
                self.mark_dirty(key);
            }
        }
        for (key, _) in &vanished {
            self.mark_dirty(key);
        }
        self.retain_answering(vanished).await;
        if let Some(r) = self.ranges.get_mut(prefix) {
            *r = range_rev;
        }
        self.state.revision = revision;
    }

    fn mark_dirty(&mut self, key: &str) {
        match self.keys.parse(key) {
            Some(MeshKey::Instance { service, .. }) => {
                self.dirty.insert(service.to_string());
            }
            Some(MeshKey::Policy { .. }) => self.policies_dirty = true,
            None => {}
        }
    }

    /// Read every wanted range that is not current (all of them after a compaction), then
    /// publish once. Policies first: the routes bound to an ingress name more services.
    async fn catch_up(&mut self, etcd: &Etcd) -> Result<(), EtcdError> {
        let unread = |this: &Self| {
            this.wanted_ranges()
                .iter()
                .any(|p| !this.ranges.contains_key(p))
        };
        if !unread(self) {
            // Every watch resumes where it stopped: nothing to read.
            return Ok(());
        }
        let first = self.wanted_ranges().into_iter().take(1);
        let mut read = self.read_ranges(etcd, first.collect()).await?;
        let delta = self.scope.follow_policies(self.state.policies());
        for service in &delta.dropped {
            self.forget(service);
        }
        if !delta.added.is_empty() {
            tracing::info!(services = ?delta.added, "holding the services the policies name");
        }
        let rest = self.wanted_ranges().into_iter().skip(1).collect();
        read.merge(self.read_ranges(etcd, rest).await?);
        self.resynced(read).await;
        Ok(())
    }

    /// Read the `prefixes` not read yet (a few at a time), applying each to the state.
    async fn read_ranges(
        &mut self,
        etcd: &Etcd,
        prefixes: Vec<String>,
    ) -> Result<super::state::Changes, EtcdError> {
        use futures_util::StreamExt;
        let todo: Vec<String> = prefixes
            .into_iter()
            .filter(|p| !self.ranges.contains_key(p))
            .collect();
        let client = etcd.client.clone();
        let reads: Vec<(String, Result<etcd_client::GetResponse, EtcdError>)> =
            futures_util::stream::iter(todo)
                .map(|prefix| {
                    let mut client = client.clone();
                    async move {
                        let opts = GetOptions::new().with_prefix();
                        let resp = etcd.call(client.get(prefix.as_str(), Some(opts))).await;
                        (prefix, resp)
                    }
                })
                .buffer_unordered(16)
                .collect()
                .await;
        let mut all = super::state::Changes::default();
        for (prefix, resp) in reads {
            let resp = resp?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let changes = self.apply_read(&prefix, &resp, revision);
            self.ranges.insert(prefix, revision);
            all.merge(changes);
        }
        Ok(all)
    }

    /// Apply a range read of `prefix` at `revision`.
    fn apply_read(
        &mut self,
        prefix: &str,
        resp: &etcd_client::GetResponse,
        revision: i64,
    ) -> super::state::Changes {
        let kvs: Vec<(&str, &[u8])> = resp
            .kvs()
            .iter()
            .filter_map(|kv| Some((kv.key_str().ok()?, kv.value())))
            .collect();
        let mut rejected = Vec::new();
        let changes = self
            .state
            .resync_prefix(&self.keys, prefix, kvs, revision, |k, r| {
                rejected.push((k.to_string(), r.to_string()))
            });
        for (k, r) in rejected {
            self.rejected(&k, revision, &r);
        }
        changes
    }

    /// The policies changed: hold (read and watch) the services they now name, drop the
    /// own service when no policy needs it any more.
    async fn follow_routes(&mut self, etcd: &Etcd, watches: &mut Watches) -> Result<(), EtcdError> {
        let delta = self.scope.follow_policies(self.state.policies());
        for service in &delta.dropped {
            let prefix = self.forget(service);
            watches.cancel(etcd, &prefix).await?;
        }
        if delta.added.is_empty() {
            return Ok(());
        }
        let prefixes: Vec<String> = delta.added.iter().map(|s| self.keys.instances(s)).collect();
        let read = self.read_ranges(etcd, prefixes.clone()).await?;
        let vanished = read.vanished;
        self.retain_answering(vanished).await;
        for prefix in prefixes {
            let from = self.ranges.get(&prefix).copied().unwrap_or(0) + 1;
            watches.add(etcd, &prefix, from).await?;
        }
        tracing::info!(services = ?delta.added, "the policies name more services: now held");
        Ok(())
    }

    /// Answer the data plane about a service it does not hold: read its instances once and,
    /// if it exists, hold and watch it from then on.
    async fn answer(
        &mut self,
        etcd: &Etcd,
        watches: &mut Watches,
        service: &str,
    ) -> Result<(Discovered, &'static str), EtcdError> {
        if self.scope.holds(service) {
            let published = self
                .tx
                .borrow()
                .as_ref()
                .is_some_and(|s| s.services.contains_key(service));
            return Ok(if published {
                (Discovered::Found, "found")
            } else {
                (Discovered::Missing, "missing")
            });
        }
        if self.scope.recently_missing(service) {
            // From the negative cache: no read.
            return Ok((Discovered::Missing, "missing-cached"));
        }
        if !self.scope.can_learn() {
            let cause = format!(
                "this sidecar already holds {} services learned on demand (store.etcd.discovery.max_learned): declare `{service}` in store.etcd.discovery.dependencies",
                self.scope.learned()
            );
            return Ok((Discovered::Unavailable(cause), "unavailable"));
        }
        let prefix = self.keys.instances(service);
        let mut client = etcd.client.clone();
        let opts = GetOptions::new().with_prefix();
        let resp = etcd.call(client.get(prefix.as_str(), Some(opts))).await?;
        let declared = self.state.service_spec(&self.keys, service).is_some();
        if resp.kvs().is_empty() && !declared {
            self.scope.note_missing(service);
            return Ok((Discovered::Missing, "missing"));
        }
        let revision = resp.header().map_or(0, |h| h.revision());
        self.scope.learn(service);
        let changes = self.apply_read(&prefix, &resp, revision);
        self.retain_answering(changes.vanished).await;
        self.ranges.insert(prefix.clone(), revision);
        watches.add(etcd, &prefix, revision + 1).await?;
        tracing::info!(
            service,
            revision,
            "learned a service on its first request: now held"
        );
        self.publish("etcd").await;
        Ok((Discovered::Found, "found"))
    }

    /// Drop the learned services nobody called for the idle timeout.
    async fn sweep(&mut self, etcd: &Etcd, watches: &mut Watches) -> Result<(), EtcdError> {
        let Some(usage) = self.usage.clone() else {
            return Ok(());
        };
        let dropped = self.scope.sweep(|s| usage.admitted(s));
        if dropped.is_empty() {
            return Ok(());
        }
        for service in &dropped {
            let prefix = self.forget(service);
            watches.cancel(etcd, &prefix).await?;
            self.metrics.dropped.inc();
        }
        tracing::info!(services = ?dropped, idle = ?self.cfg.discovery.idle_timeout, "services not called for the idle timeout: dropped");
        self.publish("etcd").await;
        Ok(())
    }

    /// Keep the vanished registrations whose endpoint still accepts connections in routing
    /// for [`RETAIN_FOR`]: a store that loses leases (a paused leader revoking them, a
    /// partition) must not empty a service whose instances are serving; their owners
    /// register again meanwhile. Returns whether routing changed (some were dropped).
    async fn retain_answering(&mut self, vanished: Vec<(String, Registration)>) -> bool {
        if vanished.is_empty() {
            return false;
        }
        let mut probes = tokio::task::JoinSet::new();
        for (i, (_, r)) in vanished.iter().enumerate() {
            let address = r.address.clone();
            probes.spawn(async move { (i, answers(address).await) });
        }
        let mut answering = vec![false; vanished.len()];
        while let Some(done) = probes.join_next().await {
            if let Ok((i, ok)) = done {
                answering[i] = ok;
            }
        }
        let until = Instant::now() + RETAIN_FOR;
        let mut dropped = false;
        for ((key, reg), answers) in vanished.into_iter().zip(answering) {
            if answers {
                tracing::warn!(
                    key,
                    address = %reg.address,
                    grace = ?RETAIN_FOR,
                    "registration vanished from etcd but the instance answers: kept in routing for the grace period"
                );
                self.metrics.retained_total.inc();
                self.state.retain(key, reg, until);
            } else {
                tracing::info!(key, address = %reg.address, "registration vanished and the instance does not answer: removed");
                dropped = true;
            }
        }
        self.metrics.retained.set(self.state.retained_len() as i64);
        dropped
    }

    /// Remove retained instances whose grace period ended without a new registration.
    async fn expire_retained(&mut self) {
        let expired = self.state.expire_retained(Instant::now());
        self.metrics.retained.set(self.state.retained_len() as i64);
        if !expired.is_empty() {
            tracing::warn!(keys = ?expired, "retained instances did not register again within the grace period: removed");
            self.publish("etcd").await;
        }
    }

    /// After reading ranges: note it, keep answering vanished instances, publish if needed.
    async fn resynced(&mut self, mut changes: super::state::Changes) {
        if let Some(min) = self.ranges.values().min() {
            self.state.revision = self.state.revision.max(*min);
        }
        let revision = self.state.revision;
        self.metrics.resyncs.inc();
        let vanished = std::mem::take(&mut changes.vanished);
        let count = vanished.len();
        if self.retain_answering(vanished).await {
            changes.removed += count;
        }
        self.need_resync = false;
        self.with_status(|s| s.resyncs += 1);
        tracing::info!(
            revision,
            applied = changes.applied,
            removed = changes.removed,
            rejected = changes.rejected,
            "read mesh state from etcd"
        );
        let from_cache = self.serving_cache();
        if changes.any() || from_cache || self.tx.borrow().is_none() {
            self.publish("etcd").await;
        } else {
            self.note_revision();
        }
    }

    async fn start_from_cache(&mut self) {
        self.cache_tried = true;
        match self.cache.load() {
            Ok(Some(cached)) => {
                let entries: Vec<(&str, &[u8])> = cached
                    .entries
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_slice()))
                    .collect();
                self.state
                    .resync(&self.keys, entries, cached.revision, |k, r| {
                        tracing::warn!(
                            key = k,
                            reason = r,
                            "cached value no longer valid; skipped"
                        );
                    });
                // What was held is held again (learned services were in use before the
                // restart); the session watches them and drops them when unused.
                for service in self.state.registered_services() {
                    self.scope.learn(&service);
                }
                // The cache is a fallback: a reachable etcd always gets a full read.
                self.need_resync = true;
                self.metrics.freshness.serving_cache(cached.saved_at_unix);
                self.metrics.cache.loaded(cached.revision);
                tracing::warn!(
                    revision = cached.revision,
                    saved_at_unix = cached.saved_at_unix,
                    cache = %self.cache.path().display(),
                    "etcd unreachable at startup: serving from cache at revision {}",
                    cached.revision
                );
                self.publish("cache").await;
            }
            Ok(None) => {
                tracing::warn!(cache = %self.cache.path().display(), "etcd unreachable at startup and no cache: not ready until etcd answers")
            }
            Err(e) => {
                tracing::error!(error = %e, "etcd unreachable at startup and the cache is unusable")
            }
        }
    }

    /// Build and send a snapshot of the current state; persist it unless it came from the cache.
    async fn publish(&mut self, source: &'static str) {
        let revision = self.state.revision;
        // Validate the state as declared; resolution then turns names into addresses.
        self.dirty.clear();
        self.policies_dirty = false;
        let declared = self.state.to_document(&self.scope);
        let declared_ok = trellis_policies::validate(&declared).map_err(|e| e.to_string());
        let doc = self.dns.resolve(&declared).await;
        let from_cache = source == "cache";
        let serving_cache = self.serving_cache();
        // Nothing the data plane would see changed (e.g. a DNS refresh with the same records).
        if !from_cache && !serving_cache && self.last_doc.as_ref() == Some(&doc) {
            self.cache_changed();
            self.note_revision();
            self.applied.send_replace(revision);
            return;
        }
        let origin = format!("{source}:{}@{revision}", self.cfg.prefix);
        let snapshot = match declared_ok.and_then(|()| {
            Snapshot::from_document(&doc, &self.trust_domain, revision.max(0) as u64, origin)
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, revision, "mesh state from etcd does not form a valid snapshot; keeping the current one");
                return;
            }
        };
        self.tx.send_replace(Some(Arc::new(snapshot)));
        self.last_doc = Some(doc);
        if from_cache {
            self.ready
                .set_detail(Some(format!("serving from cache at revision {revision}")));
            self.metrics.from_cache.set(1);
        } else {
            self.ready.set_detail(None);
            self.metrics.from_cache.set(0);
            self.cache_changed();
        }
        self.metrics
            .publishes
            .get_or_create(&KindLabels { kind: "full" })
            .inc();
        self.note_scope();
        self.with_status(|s| s.serving_from_cache = from_cache.then_some(revision));
        self.note_revision();
        // Only a published snapshot changes what this sidecar reports as applied: progress
        // notifications move the resume revision with every write anywhere in etcd (including
        // other sidecars' status keys), and reporting those would make sidecars wake each other.
        self.applied.send_replace(revision);
        tracing::debug!(revision, source, "published mesh snapshot");
    }

    /// Rebuild only the services whose instances changed, sharing everything else with the
    /// snapshot in use: the cost of a change follows the service, not the mesh. Falls back to
    /// a full rebuild when a changed service needs DNS (an `ExternalService`, a host name).
    async fn publish_services(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        let specs: Vec<(String, Option<trellis_policies::ServiceSpec>)> = dirty
            .into_iter()
            .map(|name| {
                let spec = self
                    .scope
                    .holds(&name)
                    .then(|| self.state.service_spec(&self.keys, &name))
                    .flatten();
                (name, spec)
            })
            .collect();
        let needs_dns = specs.iter().any(|(_, s)| {
            s.as_ref().is_some_and(|s| {
                s.external.is_some()
                    || s.endpoints
                        .iter()
                        .any(|e| e.address.parse::<SocketAddr>().is_err())
            })
        });
        let prev = self.tx.borrow().clone();
        let serving_cache = self.serving_cache();
        let (Some(prev), Some(last), false, false) =
            (prev, self.last_doc.as_mut(), needs_dns, serving_cache)
        else {
            return self.publish("etcd").await;
        };
        let revision = self.state.revision;
        let mut changes = Vec::new();
        for (name, spec) in specs {
            if last.services.get(&name) == spec.as_ref() {
                continue;
            }
            let Some(spec) = spec else {
                last.services.remove(&name);
                changes.push((name, None));
                continue;
            };
            let one = MeshDocument {
                services: BTreeMap::from([(name.clone(), spec.clone())]),
                ..MeshDocument::default()
            };
            let built = trellis_policies::validate(&one)
                .map_err(|e| e.to_string())
                .and_then(|()| Service::from_spec(&name, &spec, &self.trust_domain));
            match built {
                Ok(svc) => {
                    last.services.insert(name.clone(), spec);
                    changes.push((name, Some(Arc::new(svc))));
                }
                Err(e) => {
                    tracing::error!(service = %name, error = %e, revision, "service state from etcd is not valid; keeping its current version")
                }
            }
        }
        if !changes.is_empty() {
            let origin = format!("etcd:{}@{revision}", self.cfg.prefix);
            let snapshot = prev.with_services(revision.max(0) as u64, origin, changes);
            self.tx.send_replace(Some(Arc::new(snapshot)));
            self.metrics
                .publishes
                .get_or_create(&KindLabels { kind: "services" })
                .inc();
            self.cache_changed();
        }
        self.note_revision();
        self.applied.send_replace(revision);
    }

    /// The state to persist changed: write it now, or at the next tick when the last write
    /// was less than [`CACHE_EVERY`] ago (a busy mesh costs one write per second at most).
    fn cache_changed(&mut self) {
        self.cache_dirty = true;
        if self.cache_saved.is_none_or(|t| t.elapsed() >= CACHE_EVERY) {
            self.flush_cache();
        }
    }

    fn flush_cache(&mut self) {
        if !std::mem::take(&mut self.cache_dirty) {
            return;
        }
        self.cache_saved = Some(Instant::now());
        self.save_cache();
    }

    fn save_cache(&self) {
        self.cache_tx
            .submit((self.state.revision, self.state.raw_shared()));
    }

    /// Whether the snapshot in use came from the cache (etcd not reached since startup).
    fn serving_cache(&self) -> bool {
        self.status
            .lock()
            .map(|s| s.serving_from_cache.is_some())
            .unwrap_or(false)
    }

    /// Stop holding `service`: forget its read revision and its keys. Returns its prefix (for
    /// cancelling its watch).
    fn forget(&mut self, service: &str) -> String {
        let prefix = self.keys.instances(service);
        self.ranges.remove(&prefix);
        self.state.drop_prefix(&prefix);
        prefix
    }

    fn note_revision(&self) {
        let revision = self.state.revision;
        self.metrics.revision.set(revision);
        let rejected = if self.state.rejected.is_empty() {
            BTreeMap::new()
        } else {
            self.state.rejected.clone()
        };
        self.with_status(|s| {
            s.revision = revision;
            s.rejected = rejected;
        });
    }

    /// Show what is held (after the scope changed, at full publishes).
    fn note_scope(&self) {
        let services: BTreeMap<String, &'static str> = self
            .scope
            .services()
            .filter_map(|s| Some((s.to_string(), self.scope.why(s)?)))
            .collect();
        self.metrics.held.set(services.len() as i64);
        let watches = self.ranges.len();
        self.with_status(|s| {
            s.services = services;
            s.watches = watches;
        });
    }

    fn rejected(&self, key: &str, revision: i64, reason: &str) {
        let kind = if key.starts_with(&self.keys.policies()) {
            "policy"
        } else {
            "instance"
        };
        self.metrics
            .rejected
            .get_or_create(&KindLabels { kind })
            .inc();
        tracing::error!(
            key,
            revision,
            reason,
            "rejected invalid value from etcd; keeping the last good version"
        );
    }

    fn with_status(&self, f: impl FnOnce(&mut DiscoveryStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
