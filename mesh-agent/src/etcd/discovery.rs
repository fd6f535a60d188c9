//! One watch per sidecar over the mesh prefix, feeding the data plane.
//!
//! The rules (../shared/design/NOTES.md section 1): range-read the prefix, then watch from that
//! read's revision + 1; advance the revision only by applied events or progress notifications;
//! on `compacted`, re-read and apply only the differences; check an idle watch with progress
//! requests, because a watch served by a dying member just goes quiet; on any failure, back off,
//! reconnect and resume from the last applied revision. Start from the cache when etcd cannot be
//! reached at startup, and report it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use trellis_proxy::config::EtcdConfig;
use trellis_proxy::readiness::Ready;
use trellis_proxy::snapshot::Snapshot;

use super::cache::Cache;
use super::keys::Keys;
use super::state::{Deleted, MeshState, Rejection};
use super::{backoff, Etcd, EtcdError};
use crate::dns::Dns;
use crate::store::SnapshotTx;
use trellis_policies::{MeshDocument, Registration};

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

/// A revision and the raw values to persist at it.
type CacheState = (i64, Vec<(String, Vec<u8>)>);

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
    pub last_error: Option<String>,
    pub watch_restarts: u64,
    pub resyncs: u64,
    /// Keys whose latest value was refused, with the revision and reason.
    pub rejected: BTreeMap<String, Rejection>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
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
}

pub struct Discovery {
    cfg: EtcdConfig,
    keys: Keys,
    trust_domain: String,
    state: MeshState,
    need_resync: bool,
    tx: SnapshotTx,
    cache: Cache,
    /// The newest state to persist; a background writer saves it off the async runtime.
    cache_tx: watch::Sender<Option<CacheState>>,
    cache_tried: bool,
    dns: Arc<Dns>,
    /// The last document sent to the data plane, after DNS resolution.
    last_doc: Option<MeshDocument>,
    ready: Ready,
    status: Arc<Mutex<DiscoveryStatus>>,
    applied: watch::Sender<i64>,
    metrics: Metrics,
}

// === impl Discovery ===

impl Discovery {
    pub fn new(
        cfg: EtcdConfig,
        trust_domain: String,
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
        };
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
        let status = DiscoveryStatus {
            endpoints: cfg.endpoints.clone(),
            prefix: cfg.prefix.clone(),
            cache_file: cache_file.clone(),
            ..Default::default()
        };
        let (applied, _) = watch::channel(0);
        let (cache_tx, _) = watch::channel(None);
        Self {
            keys: Keys::new(&cfg.prefix),
            cache: Cache::new(cache_file, &cfg.prefix),
            cfg,
            trust_domain,
            state: MeshState::default(),
            need_resync: true,
            tx,
            cache_tx,
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

    /// The revision of the last published snapshot, for the status key.
    pub fn applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Run until the data plane is gone.
    pub async fn run(mut self) {
        tokio::spawn(write_cache(self.cache.clone(), self.cache_tx.subscribe()));
        let mut attempt = 0;
        loop {
            let start = Instant::now();
            let err = self.session().await.err();
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

    /// Connect, re-read if needed, then follow the watch until it fails.
    async fn session(&mut self) -> Result<(), EtcdError> {
        let etcd = Etcd::connect(&self.cfg).await?;
        let mut client = etcd.client.clone();
        let prefix = self.keys.mesh();
        if self.need_resync {
            let resp = etcd
                .call(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
                .await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            let kvs: Vec<(&str, &[u8])> = resp
                .kvs()
                .iter()
                .filter_map(|kv| Some((kv.key_str().ok()?, kv.value())))
                .collect();
            self.resync(kvs, revision).await;
        }
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.state.revision + 1)
            .with_progress_notify();
        let mut stream = etcd.call(client.watch(prefix.as_str(), Some(opts))).await?;
        self.metrics.connected.set(1);
        self.metrics.freshness.connected();
        self.with_status(|s| {
            s.connected = true;
            s.last_error = None;
        });
        tracing::info!(revision = self.state.revision, endpoints = ?self.cfg.endpoints, "watching etcd");

        let mut live = super::WatchLiveness::new();
        loop {
            let dns_due = self.dns.next_refresh().map(tokio::time::Instant::from_std);
            let grace_ends = self.state.next_expiry().map(tokio::time::Instant::from_std);
            let msg = tokio::select! {
                msg = stream.message() => msg.map_err(|e| etcd.err(e))?,
                _ = sleep_until_opt(dns_due) => {
                    self.publish("etcd").await;
                    continue;
                }
                _ = sleep_until_opt(grace_ends) => {
                    self.expire_retained().await;
                    continue;
                }
                _ = live.tick() => {
                    live.check(&etcd, &mut stream).await?;
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
                self.need_resync = true;
                return Err(etcd.err(etcd_client::Error::WatchError(format!(
                    "watch canceled: {}",
                    resp.cancel_reason()
                ))));
            }
            if resp.created() && resp.events().is_empty() {
                continue;
            }
            let mut changed = false;
            let mut vanished = Vec::new();
            let mut revision = self.state.revision;
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Ok(key) = kv.key_str() else { continue };
                revision = revision.max(kv.mod_revision());
                match ev.event_type() {
                    EventType::Put => {
                        match self
                            .state
                            .put(&self.keys, key, kv.value(), kv.mod_revision())
                        {
                            Ok(c) => changed |= c,
                            Err(reason) => self.rejected(key, kv.mod_revision(), &reason),
                        }
                    }
                    EventType::Delete => match self.state.delete(key) {
                        Deleted::Nothing => {}
                        Deleted::Removed => changed = true,
                        Deleted::Vanished(r) => vanished.push((key.to_string(), r)),
                    },
                }
            }
            changed |= self.retain_answering(vanished).await;
            if resp.events().is_empty() {
                // A progress notification: every event up to this revision has been delivered.
                revision = revision.max(resp.header().map_or(0, |h| h.revision()));
            }
            self.state.revision = revision;
            if changed {
                self.publish("etcd").await;
            } else {
                self.note_revision();
                if !resp.events().is_empty() {
                    // Seen and nothing to apply (a registration written again as it was):
                    // still report it, or `mesh-agent status` waits for this sidecar forever.
                    self.applied.send_replace(revision);
                }
            }
        }
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

    async fn resync(&mut self, kvs: Vec<(&str, &[u8])>, revision: i64) {
        self.metrics.resyncs.inc();
        let mut rejected = Vec::new();
        let mut changes = self.state.resync(&self.keys, kvs, revision, |k, r| {
            rejected.push((k.to_string(), r.to_string()))
        });
        let vanished = std::mem::take(&mut changes.vanished);
        let count = vanished.len();
        if self.retain_answering(vanished).await {
            changes.removed += count;
        }
        for (k, r) in rejected {
            self.rejected(&k, revision, &r);
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
        let from_cache = self
            .status
            .lock()
            .map(|s| s.serving_from_cache.is_some())
            .unwrap_or(false);
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
                // The cache is a fallback: a reachable etcd always gets a full read.
                self.need_resync = true;
                self.metrics.freshness.serving_cache(cached.saved_at_unix);
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
        let declared = self.state.to_document();
        let declared_ok = trellis_policies::validate(&declared).map_err(|e| e.to_string());
        let doc = self.dns.resolve(&declared).await;
        let from_cache = source == "cache";
        let serving_cache = self
            .status
            .lock()
            .map(|s| s.serving_from_cache.is_some())
            .unwrap_or(false);
        // Nothing the data plane would see changed (e.g. a DNS refresh with the same records).
        if !from_cache && !serving_cache && self.last_doc.as_ref() == Some(&doc) {
            self.save_cache();
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
            self.save_cache();
        }
        self.with_status(|s| s.serving_from_cache = from_cache.then_some(revision));
        self.note_revision();
        // Only a published snapshot changes what this sidecar reports as applied: progress
        // notifications move the resume revision with every write anywhere in etcd (including
        // other sidecars' status keys), and reporting those would make sidecars wake each other.
        self.applied.send_replace(revision);
        tracing::debug!(revision, source, "published mesh snapshot");
    }

    fn save_cache(&self) {
        let entries = self
            .state
            .raw()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        self.cache_tx
            .send_replace(Some((self.state.revision, entries)));
    }

    fn note_revision(&self) {
        let revision = self.state.revision;
        self.metrics.revision.set(revision);
        let rejected = self.state.rejected.clone();
        self.with_status(|s| {
            s.revision = revision;
            s.rejected = rejected;
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

/// Persist the newest state, one write at a time, on the blocking pool (write + fsync + rename
/// must not stall the async runtime). States that arrive during a write are coalesced: only the
/// latest is written.
async fn write_cache(cache: Cache, mut rx: watch::Receiver<Option<CacheState>>) {
    while rx.changed().await.is_ok() {
        let Some((revision, entries)) = rx.borrow_and_update().clone() else {
            continue;
        };
        let cache = cache.clone();
        let result = tokio::task::spawn_blocking(move || {
            cache.save(
                revision,
                entries.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            )
        })
        .await;
        match result {
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot write the fail-static cache"),
            Err(e) => tracing::warn!(error = %e, "cache writer failed"),
            Ok(Ok(())) => {}
        }
    }
}
