//! The cache's metrics: results by `X-Cache-Status`, bytes stored, evictions, coalesced waits
//! and purges applied.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::{Arc, OnceLock};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Default)]
pub struct CacheMetrics {
    pub requests: Family<StatusLabel, Counter>,
    /// `requests`' counter of each status, taken from the family at its first use: a lookup
    /// by label hashes it (SipHash) under the family's lock, about 250 instructions per
    /// request. Lazily, so that a status never seen has no series, as before.
    by_status: Arc<[OnceLock<Counter>; 6]>,
    pub bytes: Gauge,
    pub evictions: Counter,
    pub coalesced: Counter,
    pub coalesce_timeouts: Counter,
    pub purges: Counter,
    pub purge_errors: Counter,
    pub purge_gaps: Counter,
    pub disk_hits: Counter,
    pub disk_bytes: Gauge,
    pub disk_writes: Counter,
    pub disk_write_failures: Counter,
    pub disk_writes_skipped: Counter,
    pub disk_corrupt: Counter,
    pub disk_down: Gauge,
}

// === impl CacheMetrics ===

impl CacheMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "cache_requests",
            "Requests a cache policy applied to, by X-Cache-Status",
            m.requests.clone(),
        );
        registry.register(
            "cache_bytes",
            "Bytes held by the response cache (keys, headers and bodies)",
            m.bytes.clone(),
        );
        registry.register(
            "cache_evictions",
            "Entries evicted to stay within the memory bound",
            m.evictions.clone(),
        );
        registry.register(
            "cache_coalesced_waits",
            "Requests that waited for an identical request's response instead of going upstream",
            m.coalesced.clone(),
        );
        registry.register(
            "cache_coalesce_timeouts",
            "Waits for an identical request that timed out (the request went upstream itself)",
            m.coalesce_timeouts.clone(),
        );
        registry.register(
            "cache_purges_applied",
            "Cache purges applied from the store",
            m.purges.clone(),
        );
        registry.register(
            "cache_purge_gaps",
            "Purge records that did not follow the last one applied (at least one purge was missed): everything of the service was purged",
            m.purge_gaps.clone(),
        );
        registry.register(
            "cache_purge_errors",
            "Cache purge records refused (the last good state is kept)",
            m.purge_errors.clone(),
        );
        m.register_disk(registry);
        m
    }

    fn register_disk(&self, registry: &mut Registry) {
        registry.register(
            "cache_disk_hits",
            "Responses answered from the disk tier (X-Cache-Status stays HIT, STALE or REVALIDATED)",
            self.disk_hits.clone(),
        );
        registry.register(
            "cache_disk_bytes",
            "Bytes of the disk tier's files (headers, bodies and checksums)",
            self.disk_bytes.clone(),
        );
        registry.register(
            "cache_disk_writes",
            "Files written to the disk tier",
            self.disk_writes.clone(),
        );
        registry.register(
            "cache_disk_write_failures",
            "Disk tier writes that failed (full disk, read-only or unwritable directory): writes stop for a cool-down",
            self.disk_write_failures.clone(),
        );
        registry.register(
            "cache_disk_writes_skipped",
            "Disk tier writes not made because the disk was behind (every writer busy, or the bound of files being written reached)",
            self.disk_writes_skipped.clone(),
        );
        registry.register(
            "cache_disk_corrupt",
            "Disk tier files dropped because their length, checksums or key did not match (answered as a miss)",
            self.disk_corrupt.clone(),
        );
        registry.register(
            "cache_disk_down",
            "Disk tiers whose writes are off after a failure (memory only until a write succeeds)",
            self.disk_down.clone(),
        );
    }

    pub fn count(&self, status: &'static str) {
        use super::{BYPASS, EXPIRED, HIT, MISS, REVALIDATED, STALE};
        let i = match status {
            HIT => 0,
            MISS => 1,
            STALE => 2,
            REVALIDATED => 3,
            BYPASS => 4,
            EXPIRED => 5,
            _ => {
                self.requests.get_or_create(&StatusLabel { status }).inc();
                return;
            }
        };
        self.by_status[i]
            .get_or_init(|| self.requests.get_or_create(&StatusLabel { status }).clone())
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_counted_in_their_family_and_unseen_ones_have_no_series() {
        let mut registry = Registry::default();
        let m = CacheMetrics::register(&mut registry);
        let clone = m.clone();
        m.count(super::super::HIT);
        clone.count(super::super::HIT);
        m.count(super::super::MISS);
        m.count("OTHER");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let series = |s: &str| {
            text.lines()
                .find(|l| l.starts_with("cache_requests_total{") && l.contains(&format!("\"{s}\"")))
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(series("HIT").as_deref(), Some("2"), "{text}");
        assert_eq!(series("MISS").as_deref(), Some("1"));
        assert_eq!(series("OTHER").as_deref(), Some("1"));
        assert_eq!(series("STALE"), None, "never counted: no series");
    }
}
