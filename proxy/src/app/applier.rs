//! Applying the mesh state: each snapshot the source sends updates the route table, the
//! connection pool, the limits, access control and health checks, off the request path.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::SnapshotRx;
use crate::policy::access::AccessControl;
use crate::policy::ratelimit::RateLimits;
use crate::state::pool::PeerPool;
use crate::state::target::{StatsRegistry, TargetTable};
use crate::telemetry::metrics::Metrics;

/// What a snapshot updates: the route table, the connection pool, metrics and the limits.
pub(super) struct Applier {
    pub(super) clock: crate::telemetry::route_metrics::AppliedClock,
    pub(super) current: Arc<ArcSwap<TargetTable>>,
    pub(super) local_zone: Option<String>,
    /// This sidecar's service when it is an ingress gateway: HTTPRoutes naming it in
    /// `gateways` are compiled for the edge.
    pub(super) gateway: Option<String>,
    pub(super) pool: Arc<PeerPool>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) limits: Arc<RateLimits>,
    pub(super) access_control: Arc<AccessControl>,
    pub(super) cache: Arc<crate::cache::ResponseCache>,
    pub(super) registry: Arc<StatsRegistry>,
}

/// Requests per service so far, read by a scoped store to find services nobody calls.
#[derive(Clone)]
pub struct ServiceUsage(pub(super) Arc<StatsRegistry>);

impl ServiceUsage {
    /// Requests to `service` so far; `None` when the data plane does not hold it.
    pub fn admitted(&self, service: &str) -> Option<u64> {
        self.0.admitted(service)
    }
}

// === impl Applier ===

impl Applier {
    /// Apply each snapshot the source sends, and evict pooled connections to removed endpoints.
    pub(super) async fn run(
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
            cache,
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
                let gone = crate::state::target::departed(&prev.snapshot, &snap);
                if !gone.is_empty() {
                    pool.retain(|addr, id| !gone.iter().any(|(a, i)| *a == addr && i == id));
                }
                let version = snap.version;
                limits.update(&snap);
                access_control.update(&snap);
                cache.update(&snap);
                let table = Arc::new(TargetTable::update(
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
