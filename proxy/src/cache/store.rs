//! Stored responses: complete entries only (a body is inserted once it has arrived whole), in a
//! concurrent cache bounded in bytes (moka, with a weigher counting the key, the headers and
//! the body), each entry kept until its freshness lifetime and stale windows are over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::control::CacheControl;
use super::metrics::CacheMetrics;

/// Bytes an entry costs besides its key, headers and body (see [`Entry::weight`]).
const ENTRY_OVERHEAD: usize = 1280;
/// Bytes a stored header costs besides its name and value (the header map's bucket and index).
const HEADER_OVERHEAD: usize = 96;

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// The response's end-to-end headers, as the origin sent them (without `Age`, which is
    /// computed for each hit).
    pub headers: HeaderMap,
    pub body: Bytes,
    pub cc: CacheControl,
    pub lifetime: Duration,
    /// RFC 9111 4.2.3's corrected initial age.
    pub initial_age: Duration,
    /// When the response arrived (monotonic: resident time never jumps with the wall clock).
    pub stored: Instant,
    /// When its request was sent: invalidations and purges after it select it.
    pub fetched: Instant,
    /// `authority SEP path?query`, for purges and invalidation.
    pub resource: Arc<str>,
    /// `Surrogate-Key` tags.
    pub tags: Vec<String>,
    /// The request headers its `Vary` names, lower-case: the variant it answers.
    pub vary: Arc<[String]>,
}

/// What a purge removes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    All,
    /// Paths starting with this prefix (any query).
    Prefix(String),
    /// One path with its query, exactly.
    Key(String),
    Tag(String),
}

pub struct Store {
    entries: moka::sync::Cache<String, Arc<Entry>>,
    /// The `Vary` names last seen for each primary key: which variant key a request looks up.
    vary: moka::sync::Cache<String, Arc<[String]>>,
    /// Some response stored here had a `Vary`: until one has, lookups skip `vary` (one
    /// concurrent-map lookup less per request).
    any_vary: AtomicBool,
}

/// Each entry lives for its lifetime, its stale windows and (when it can be revalidated) as
/// long again, so that an expired entry can still answer a 304.
struct KeepFor;

// === impl Entry ===

impl Entry {
    /// RFC 9111 4.2.3's `current_age`.
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored)
    }

    fn keep(&self) -> Duration {
        let windows = self
            .cc
            .stale_while_revalidate
            .max(self.cc.stale_if_error)
            .unwrap_or(0);
        let revalidate = if super::control::validators(&self.headers) {
            self.lifetime.max(Duration::from_secs(60))
        } else {
            Duration::ZERO
        };
        (self.lifetime + Duration::from_secs(windows.min(86_400)) + revalidate)
            .saturating_sub(self.initial_age)
            .max(Duration::from_secs(1))
    }

    /// The memory this entry holds, as the bound counts it: its key, headers and body, and
    /// the fixed cost of an entry (this struct, its header map's table, the store's own
    /// nodes and the allocator's rounding). Measured: a sidecar holding 97,000 small
    /// responses (5 headers, 3-byte bodies) used 2.05 KiB of RSS per entry; counting 256
    /// bytes of fixed cost made a 64 MiB cache take 200 MB.
    fn weight(&self, key: &str) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + HEADER_OVERHEAD)
            .sum();
        let total = key.len() + headers + self.body.len() + self.resource.len() + ENTRY_OVERHEAD;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    pub fn matches(&self, s: &Selector) -> bool {
        let path = super::key::path_of(&self.resource);
        match s {
            Selector::All => true,
            Selector::Prefix(p) => path.starts_with(p.as_str()),
            Selector::Key(k) => path == k,
            Selector::Tag(t) => self.tags.iter().any(|x| x == t),
        }
    }
}

// === impl KeepFor ===

impl moka::Expiry<String, Arc<Entry>> for KeepFor {
    fn expire_after_create(&self, _: &String, e: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(e.keep())
    }

    fn expire_after_update(
        &self,
        _: &String,
        e: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(e.keep())
    }
}

// === impl Store ===

impl Store {
    pub fn new(max_bytes: u64, metrics: &CacheMetrics) -> Self {
        let bytes = metrics.bytes.clone();
        let evictions = metrics.evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &String, e: &Arc<Entry>| e.weight(k))
            .expire_after(KeepFor)
            .support_invalidation_closures()
            .eviction_listener(move |k, e: Arc<Entry>, cause| {
                bytes.dec_by(i64::from(e.weight(&k)));
                if cause == moka::notification::RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        // A few names per primary key; bounded by count, far below the entries' bytes.
        let vary = moka::sync::Cache::builder()
            .max_capacity((max_bytes / 4096).max(1024))
            .time_to_idle(Duration::from_secs(24 * 3600))
            .build();
        Self {
            entries,
            vary,
            any_vary: AtomicBool::new(false),
        }
    }

    /// The variant key a request with these headers looks up under `primary`.
    pub fn variant_key(&self, primary: &str, headers: &HeaderMap) -> String {
        let names = match self.any_vary.load(Ordering::Relaxed) {
            true => self.vary.get(primary),
            false => None,
        };
        let names = names.unwrap_or_else(|| Arc::from([]));
        super::key::variant(primary, headers, &names)
    }

    pub fn get(&self, variant: &str) -> Option<Arc<Entry>> {
        self.entries.get(variant)
    }

    /// Store a complete entry under `primary`, keyed by the variant its `Vary` selects.
    pub fn insert(
        &self,
        primary: &str,
        req_headers: &HeaderMap,
        entry: Entry,
        metrics: &CacheMetrics,
    ) -> Arc<Entry> {
        if !entry.vary.is_empty() {
            self.any_vary.store(true, Ordering::Relaxed);
        }
        if !entry.vary.is_empty()
            || (self.any_vary.load(Ordering::Relaxed) && self.vary.contains_key(primary))
        {
            self.vary.insert(primary.to_string(), entry.vary.clone());
        }
        let key = super::key::variant(primary, req_headers, &entry.vary);
        metrics.bytes.inc_by(i64::from(entry.weight(&key)));
        let entry = Arc::new(entry);
        self.entries.insert(key, entry.clone());
        entry
    }

    /// Drop every entry `s` selects. Lookups stop returning them at once; moka removes them
    /// in its maintenance.
    pub fn purge(&self, s: Selector) {
        if s == Selector::All {
            self.entries.invalidate_all();
            return;
        }
        if let Err(e) = self
            .entries
            .invalidate_entries_if(move |_, e| e.matches(&s))
        {
            tracing::warn!(error = %e, "cache purge could not be registered; dropping every entry");
            self.entries.invalidate_all();
        }
    }

    /// Run moka's pending maintenance (tests and metrics readers).
    pub fn sync(&self) {
        self.entries.run_pending_tasks();
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const MB: u64 = 1024 * 1024;

    pub(in crate::cache) fn entry(i: usize, size: usize) -> Entry {
        Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![(i % 251) as u8; size]),
            cc: CacheControl::default(),
            lifetime: Duration::from_secs(600),
            initial_age: Duration::ZERO,
            stored: Instant::now(),
            fetched: Instant::now(),
            resource: Arc::from(format!("h\0/o/{i}")),
            tags: vec![],
            vary: Arc::from([]),
        }
    }

    fn rss() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb * 1024)
    }

    /// A working set of 1 GiB of distinct 64 KiB objects through a 64 MiB store: the bytes
    /// held and the process's RSS stay within the bound.
    #[test]
    fn a_gigabyte_of_distinct_objects_stays_within_the_bound() {
        let m = CacheMetrics::default();
        let store = Store::new(64 * MB, &m);
        let h = HeaderMap::new();
        let before = rss();
        let mut peak = before;
        for i in 0..16 * 1024 {
            store.insert(&format!("k{i}"), &h, entry(i, 64 * 1024), &m);
            if i % 1024 == 0 {
                store.sync();
                peak = peak.max(rss());
            }
        }
        store.sync();
        let held = u64::try_from(m.bytes.get()).unwrap_or(0);
        let growth = peak.saturating_sub(before);
        eprintln!(
            "held {} MiB, peak RSS growth {} MiB, {} evictions",
            held / MB,
            growth / MB,
            m.evictions.get()
        );
        assert!(held <= 64 * MB, "held {held}");
        assert!(m.evictions.get() > 10_000);
        assert!(growth <= 128 * MB, "RSS grew {} MiB", growth / MB);
    }

    /// The hit ratio on a Zipf(1) distribution over 16,384 objects (1 GiB) with a 64 MiB
    /// store (1/16 of the working set), reported.
    #[test]
    fn zipf_hit_ratio_is_reported() {
        let m = CacheMetrics::default();
        let store = Store::new(64 * MB, &m);
        let h = HeaderMap::new();
        let n = 16 * 1024;
        let cdf: Vec<f64> = (1..=n)
            .scan(0.0, |acc, k| {
                *acc += 1.0 / f64::from(k);
                Some(*acc)
            })
            .collect();
        let total = cdf[cdf.len() - 1];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let (mut hits, requests) = (0u32, 60_000u32);
        for _ in 0..requests {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64 * total;
            let i = cdf.partition_point(|c| *c < u);
            let key = format!("k{i}");
            if store.get(&store.variant_key(&key, &h)).is_some() {
                hits += 1;
            } else {
                store.insert(&key, &h, entry(i, 64 * 1024), &m);
            }
        }
        let ratio = f64::from(hits) / f64::from(requests);
        eprintln!("Zipf(1), 16384 objects of 64 KiB, 64 MiB store: hit ratio {ratio:.3}");
        // The most popular 1,000 objects fit and draw over half the requests.
        assert!(ratio > 0.5, "hit ratio {ratio}");
    }
}
