//! Metrics read from the route table in use at scrape time: endpoints per service by state, and
//! how long ago the snapshot in use was applied.
//!
//! Why a collector instead of gauges updated on every change: endpoint state moves on the
//! request path (ejections, probation trials) and in health checks; counting it at scrape time
//! costs nothing per request and can never drift from what `/config_dump` shows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Unit;

use crate::state::target::TargetTable;

/// Endpoint states, as counted by `trellis_endpoints`.
pub const AVAILABLE: &str = "available";
/// Ejected by outlier detection (including on probation with its trial in flight).
pub const EJECTED: &str = "ejected";
/// Failing active health checks.
pub const UNHEALTHY: &str = "unhealthy";

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StateLabels {
    service: String,
    state: &'static str,
}

pub struct RouteCollector {
    table: Arc<ArcSwap<TargetTable>>,
    /// Unix milliseconds at which the snapshot in use was applied; 0 before the first.
    applied_at_ms: Arc<AtomicU64>,
}

/// Marks when a snapshot was applied, for `trellis_snapshot_age_seconds`.
#[derive(Clone, Debug, Default)]
pub struct AppliedClock(Arc<AtomicU64>);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// === impl AppliedClock ===

impl AppliedClock {
    pub fn mark(&self) {
        self.0.store(unix_ms(), Ordering::Relaxed);
    }
}

// === impl RouteCollector ===

impl RouteCollector {
    pub fn new(table: Arc<ArcSwap<TargetTable>>, clock: &AppliedClock) -> Self {
        Self {
            table,
            applied_at_ms: clock.0.clone(),
        }
    }
}

impl std::fmt::Debug for RouteCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCollector").finish_non_exhaustive()
    }
}

impl Collector for RouteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let table = self.table.load();
        let family = Family::<StateLabels, Gauge>::default();
        for route in table.routes() {
            let service = route.service.name.as_str();
            // Every state is reported, zeros included, so that alerts on `ejected > 0` and
            // ratios available/total work without absent series.
            for state in [AVAILABLE, EJECTED, UNHEALTHY] {
                let _ = family.get_or_create(&StateLabels {
                    service: service.to_string(),
                    state,
                });
            }
            for s in &route.stats {
                let state = if !s.is_healthy() {
                    UNHEALTHY
                } else if s.available() {
                    AVAILABLE
                } else {
                    EJECTED
                };
                family
                    .get_or_create(&StateLabels {
                        service: service.to_string(),
                        state,
                    })
                    .inc();
            }
        }
        let e = encoder.encode_descriptor(
            "endpoints",
            "Endpoints per destination service by state (available, ejected, unhealthy), read at scrape time",
            None,
            family.metric_type(),
        )?;
        family.encode(e)?;

        let at = self.applied_at_ms.load(Ordering::Relaxed);
        if at > 0 {
            let age = unix_ms().saturating_sub(at) as f64 / 1000.0;
            let g = ConstGauge::new(age);
            let e = encoder.encode_descriptor(
                "snapshot_age",
                "Time since the mesh snapshot in use was applied",
                Some(&Unit::Seconds),
                g.metric_type(),
            )?;
            g.encode(e)?;
        }
        Ok(())
    }
}
