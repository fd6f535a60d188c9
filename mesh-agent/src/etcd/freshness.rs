//! How stale the mesh state in use may be: `trellis_etcd_state_staleness_seconds`.
//!
//! While the watch is established the state is current (the watch's liveness probes bound how
//! long a silent stream may go unnoticed), so the staleness is 0. When the watch is lost it
//! grows from the moment it was lost; when the sidecar started from the on-disk cache it grows
//! from the moment the cache was written. Read at scrape time, so it needs no timer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

#[derive(Clone, Debug, Default)]
pub struct Freshness(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    connected: AtomicBool,
    /// Unix milliseconds since which the state has not been confirmed; 0 = no state yet.
    since_ms: AtomicU64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// === impl Freshness ===

impl Freshness {
    pub fn connected(&self) {
        self.0.connected.store(true, Ordering::Relaxed);
        self.0.since_ms.store(unix_ms(), Ordering::Relaxed);
    }

    /// The watch ended: from now on the state ages.
    pub fn disconnected(&self) {
        if self.0.connected.swap(false, Ordering::Relaxed) {
            self.0.since_ms.store(unix_ms(), Ordering::Relaxed);
        }
    }

    /// Serving a cache written at `saved_at_unix` (seconds).
    pub fn serving_cache(&self, saved_at_unix: u64) {
        self.0.connected.store(false, Ordering::Relaxed);
        self.0
            .since_ms
            .store(saved_at_unix.saturating_mul(1000), Ordering::Relaxed);
    }

    /// Seconds the state in use may be behind etcd; `None` before there is any state.
    pub fn staleness(&self) -> Option<f64> {
        if self.0.connected.load(Ordering::Relaxed) {
            return Some(0.0);
        }
        let since = self.0.since_ms.load(Ordering::Relaxed);
        (since > 0).then(|| unix_ms().saturating_sub(since) as f64 / 1000.0)
    }
}

impl Collector for Freshness {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(s) = self.staleness() {
            let g = ConstGauge::new(s);
            let e = encoder.encode_descriptor(
                "etcd_state_staleness",
                "How far the mesh state in use may be behind etcd: 0 while the watch is established, else the time since it was lost (or since the cache in use was written)",
                Some(&Unit::Seconds),
                g.metric_type(),
            )?;
            g.encode(e)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_follows_the_watch_and_the_cache() {
        let f = Freshness::default();
        assert_eq!(f.staleness(), None);
        f.connected();
        assert_eq!(f.staleness(), Some(0.0));
        f.disconnected();
        let s = f.staleness().expect("aging");
        assert!((0.0..5.0).contains(&s), "{s}");
        let hour_ago = unix_ms() / 1000 - 3600;
        f.serving_cache(hour_ago);
        let s = f.staleness().expect("cache age");
        assert!((3599.0..3700.0).contains(&s), "{s}");
    }
}
