//! Stored responses: complete entries only (a body is inserted once it has arrived whole), in a
//! concurrent cache bounded in bytes ([quick_cache]'s S3-FIFO store, weighed by the key, the
//! headers and the body), each entry kept until its freshness lifetime and stale windows are
//! over.
//!
//! quick_cache rather than moka (the miss path's profile, docs/caching.md#benchmark): an insert
//! into a full moka cache with an eviction listener took per-key locks, rehashed its tombstones
//! and ran its housekeeping, about 6.7 µs per stored response; quick_cache's shards are plain
//! locked tables with no background work. It has no per-entry expiry, so each entry carries its
//! deadline, checked at lookup (an expired entry found is removed); the rest are evicted by the
//! byte bound like any other.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Equivalent, Lifecycle, OptionsBuilder, Weighter};

use super::control::CacheControl;
use super::disk::DiskTier;
use super::fields::Fields;
use super::metrics::CacheMetrics;

/// Bytes an entry costs besides its key, headers and body (see [`Entry::weight`]).
const ENTRY_OVERHEAD: usize = 1280;
/// Bytes a stored header costs besides its name and value (the header map's bucket and index).
const HEADER_OVERHEAD: usize = 96;
/// The weight of a typical small entry, to size the store's tables (an estimate: within an
/// order of magnitude is enough).
const TYPICAL_WEIGHT: u64 = 2048;

/// One stored response.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// The response's end-to-end headers, as the origin sent them (without `Age`, which is
    /// computed for each hit), their values in one buffer.
    pub headers: Fields,
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
    pub resource: super::key::Resource,
    /// `Surrogate-Key` tags.
    pub tags: Vec<String>,
    /// The request headers its `Vary` names, lower-case: the variant it answers.
    pub vary: Arc<[String]>,
    /// Loaded from the disk tier: the body is streamed from its file (`body` is empty).
    pub disk: Option<Arc<super::disk::DiskBody>>,
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
    /// The policy's disk tier, if it has one: evicted entries go there, and lookups that
    /// miss here look there.
    disk: Option<Arc<DiskTier>>,
    entries: Cache<Key, Slot, ByWeight, Prehashed, Accounting>,
    /// The `Vary` names last seen for each primary key: which variant key a request looks up.
    vary: Cache<String, Arc<[String]>>,
    /// Some response stored here had a `Vary`: until one has, lookups skip `vary` (one
    /// concurrent-map lookup less per request).
    any_vary: AtomicBool,
    /// Some response for this store had a `Vary` (stored or not): from then on misses keep a
    /// copy of their request's headers, which a variant key is made of. Until then they do
    /// not (most services never send `Vary`, and the copy was a large share of a miss).
    keep_headers: AtomicBool,
    /// Hashes the keys (seeded per store): [`Store::hash`].
    hasher: DefaultHashBuilder,
    bytes: Gauge,
    evictions: Counter,
}

/// What the store holds for a key: the entry, its weight (computed once: the store weighs an
/// entry again whenever it considers evicting it) and until when it may be used.
#[derive(Clone)]
struct Slot {
    entry: Arc<Entry>,
    weight: u32,
    /// The length of the primary key the variant key starts with (for the disk tier's
    /// `Vary` map when the entry is evicted there; fits in the slot's padding).
    primary_len: u32,
    /// Its lifetime, its stale windows and (when it can be revalidated) as long again, so
    /// that an expired entry can still answer a 304.
    until: Instant,
}

#[derive(Clone)]
struct ByWeight;

/// Counts what leaves the store by eviction (the bytes gauge for every departure, the
/// evictions counter only for entries pushed out by the bound, not for replaced ones).
#[derive(Clone)]
struct Accounting;

/// A key of the store with its hash, computed once per request ([`Store::hash`]): the
/// lookup, the coalescing slot, the insert and the eviction hook all use it (hashing the key
/// took about 160 instructions each time, four times per stored miss). The store's hasher
/// ([`Prehashed`]) takes the hash as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    hash: u64,
    text: Arc<str>,
}

/// A key borrowed with its hash (lookups, removals).
#[derive(Clone, Copy, Debug)]
pub struct KeyRef<'a> {
    pub hash: u64,
    pub text: &'a str,
}

/// The hasher of maps whose keys are hashes already (or carry theirs): [`Key`], [`KeyRef`]
/// and the coalescing slots' `u64`s write one `u64`, which is the hash.
#[derive(Clone, Copy, Debug, Default)]
pub struct Prehashed;

#[derive(Default)]
pub struct PrehashedHasher(u64);

// === impl Key ===

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.hash == key.hash && self.text == &*key.text
    }
}

// === impl Prehashed ===

impl BuildHasher for Prehashed {
    type Hasher = PrehashedHasher;

    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

impl Hasher for PrehashedHasher {
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    /// Not used by the keys above; anything else hashed here is folded in (FNV-1a), so that
    /// a mistake would cost speed, never correctness.
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// One insert's departures.
#[derive(Default)]
struct Departed {
    /// The hash of the key being inserted: an entry leaving under it was replaced (or was
    /// the new one, refused as too heavy), not evicted.
    inserting: u64,
    freed: i64,
    evicted: u64,
    /// The first entry that left, dropped after the shard's lock is released.
    dropped: Option<Slot>,
    /// With a disk tier: the entries the bound evicted, written there after the insert.
    demoted: Option<Vec<(Arc<str>, Slot)>>,
}

// === impl Entry ===

impl Entry {
    /// RFC 9111 4.2.3's `current_age`.
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored)
    }

    /// How long the entry is kept: its lifetime, its stale windows and (when it can be
    /// revalidated) as long again.
    pub(super) fn keep(&self) -> Duration {
        let windows = self
            .cc
            .stale_while_revalidate
            .max(self.cc.stale_if_error)
            .unwrap_or(0);
        let validators = self.headers.contains_key(&http::header::ETAG)
            || self.headers.contains_key(&http::header::LAST_MODIFIED);
        let revalidate = if validators {
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
        let headers = self.headers.bytes() + self.headers.len() * HEADER_OVERHEAD;
        let total = key.len() + headers + self.body.len() + self.resource.len() + ENTRY_OVERHEAD;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    pub fn matches(&self, s: &Selector) -> bool {
        selects(&self.resource, &self.tags, s)
    }
}

/// Whether `s` selects an entry of this resource and tags (in memory or on disk).
pub(super) fn selects(resource: &str, tags: &[String], s: &Selector) -> bool {
    let path = super::key::path_of(resource);
    match s {
        Selector::All => true,
        Selector::Prefix(p) => path.starts_with(p.as_str()),
        Selector::Key(k) => path == k,
        Selector::Tag(t) => tags.iter().any(|x| x == t),
    }
}

// === impl Slot ===

impl Weighter<Key, Slot> for ByWeight {
    fn weight(&self, _: &Key, s: &Slot) -> u64 {
        u64::from(s.weight)
    }
}

// === impl Accounting ===

impl Lifecycle<Key, Slot> for Accounting {
    type RequestState = Departed;

    fn on_evict(&self, d: &mut Departed, key: Key, s: Slot) {
        d.freed += i64::from(s.weight);
        if key.hash != d.inserting {
            d.evicted += 1;
            if let Some(demoted) = &mut d.demoted {
                demoted.push((key.text, s.clone()));
            }
        }
        if d.dropped.is_none() {
            d.dropped = Some(s);
        }
    }
}

// === impl Store ===

impl Store {
    /// A store of at most `max_bytes`, for objects of at most `max_object_bytes` (the policy
    /// keeps it within a quarter of the bound).
    pub fn new(max_bytes: u64, max_object_bytes: u64, metrics: &CacheMetrics) -> Self {
        let hasher = DefaultHashBuilder::default();
        let entries = Cache::with_options(
            options(max_bytes, shards(max_bytes, max_object_bytes)),
            ByWeight,
            Prehashed,
            Accounting,
        );
        // A few names per primary key; bounded by count, far below the entries' bytes.
        let vary = Cache::new(
            usize::try_from(max_bytes / 4096)
                .unwrap_or(1 << 20)
                .max(1024),
        );
        Self {
            disk: None,
            entries,
            vary,
            any_vary: AtomicBool::new(false),
            keep_headers: AtomicBool::new(false),
            hasher,
            bytes: metrics.bytes.clone(),
            evictions: metrics.evictions.clone(),
        }
    }

    /// This store with a disk tier behind it.
    pub fn with_disk(mut self, disk: Option<Arc<DiskTier>>) -> Self {
        self.disk = disk;
        self
    }

    pub fn disk(&self) -> Option<&Arc<DiskTier>> {
        self.disk.as_ref()
    }

    /// Whether misses must keep their request's headers (see `keep_headers`).
    pub fn keeps_request_headers(&self) -> bool {
        self.keep_headers.load(Ordering::Relaxed)
    }

    /// A response with `Vary` was seen: misses keep their request's headers from now on.
    pub fn keep_request_headers(&self) {
        self.keep_headers.store(true, Ordering::Relaxed);
    }

    /// The hash of a key of this store, computed once per request and carried with it.
    pub fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// [`Store::find`] by the key's text (tests).
    #[cfg(test)]
    pub fn lookup(&self, primary: &str, headers: &HeaderMap) -> Option<Arc<Entry>> {
        let hash = self.hash(primary);
        self.find(
            KeyRef {
                hash,
                text: primary,
            },
            headers,
        )
    }

    /// The entry a request with these headers may use under `primary`: the variant its
    /// `Vary` selects (without one, the primary key itself: no key is built).
    pub fn find(&self, primary: KeyRef<'_>, headers: &HeaderMap) -> Option<Arc<Entry>> {
        match self.vary_names(primary.text) {
            Some(names) => {
                let text = super::key::variant(primary.text, headers, &names);
                self.get(KeyRef {
                    hash: self.hash(&text),
                    text: &text,
                })
            }
            None => self.get(primary),
        }
    }

    /// The `Vary` names last stored under `primary`, if any.
    fn vary_names(&self, primary: &str) -> Option<Arc<[String]>> {
        match self.any_vary.load(Ordering::Relaxed) {
            true => self.vary.get(primary).filter(|n| !n.is_empty()),
            false => None,
        }
    }

    /// The entry stored under this variant key, unless it has outlived its keep (removed).
    fn get(&self, variant: KeyRef<'_>) -> Option<Arc<Entry>> {
        let slot = self.entries.get(&variant)?;
        if slot.until > Instant::now() {
            return Some(slot.entry);
        }
        let removed = self
            .entries
            .remove_if(&variant, |s| Arc::ptr_eq(&s.entry, &slot.entry));
        if let Some((_, s)) = removed {
            self.bytes.dec_by(i64::from(s.weight));
        }
        None
    }

    /// Store a complete entry under `primary`, keyed by the variant its `Vary` selects among
    /// `req_headers` (without them, an entry with `Vary` is not stored). An entry whose body is
    /// on disk (refreshed by a 304) is rewritten there instead. `primary` becomes the key of
    /// an entry without `Vary`, not copied. (Tests: the request path has the key's hash.)
    #[cfg(test)]
    pub fn insert<'h>(
        &self,
        primary: impl AsRef<str>,
        req_headers: impl Into<Option<&'h HeaderMap>>,
        entry: Entry,
    ) -> Arc<Entry> {
        let primary: Arc<str> = Arc::from(primary.as_ref());
        let hash = self.hash(&primary);
        self.insert_hashed(primary, hash, req_headers.into(), Arc::new(entry))
    }

    /// [`Store::insert`] with the primary key's hash, computed by [`Store::hash`] when the
    /// request was planned.
    pub fn insert_hashed(
        &self,
        primary: Arc<str>,
        hash: u64,
        req_headers: Option<&HeaderMap>,
        entry: Arc<Entry>,
    ) -> Arc<Entry> {
        if let (Some(disk), Some(_)) = (&self.disk, &entry.disk) {
            if let Some(key) = super::key::variant_of(&primary, req_headers, &entry.vary) {
                disk.refresh(key, primary.len(), entry.clone());
            }
            return entry;
        }
        let primary_len = u32::try_from(primary.len()).unwrap_or(u32::MAX);
        let key = match req_headers {
            _ if entry.vary.is_empty() => {
                if self.any_vary.load(Ordering::Relaxed) && self.vary.contains_key(&*primary) {
                    self.vary.insert(primary.to_string(), entry.vary.clone());
                }
                Key {
                    hash,
                    text: primary,
                }
            }
            Some(h) => {
                self.any_vary.store(true, Ordering::Relaxed);
                self.keep_request_headers();
                let text = super::key::variant(&primary, h, &entry.vary);
                self.vary.insert(primary.to_string(), entry.vary.clone());
                Key {
                    hash: self.hash(&text),
                    text: Arc::from(text),
                }
            }
            None => {
                // Its variant key cannot be built (the miss did not keep its headers).
                self.keep_request_headers();
                return entry;
            }
        };
        let slot = Slot {
            weight: entry.weight(&key.text),
            primary_len,
            until: entry.stored + entry.keep(),
            entry,
        };
        let entry = slot.entry.clone();
        let mut departed = Departed {
            inserting: key.hash,
            demoted: self.disk.as_ref().map(|_| Vec::new()),
            ..Departed::default()
        };
        if let Some(disk) = &self.disk {
            // An older copy on disk must not answer once this one is evicted unwritten.
            disk.forget(&key.text);
        }
        self.bytes.inc_by(i64::from(slot.weight));
        self.entries.insert_with_lifecycle(key, slot, &mut departed);
        self.bytes.dec_by(departed.freed);
        self.evictions.inc_by(departed.evicted);
        if let (Some(disk), Some(demoted)) = (&self.disk, departed.demoted) {
            for (key, s) in demoted {
                disk.demote(&key, s.primary_len as usize, s.entry, s.until);
            }
        }
        entry
    }

    /// Drop every entry `s` selects, at once (on disk too).
    pub fn purge(&self, s: Selector) {
        if let Some(disk) = &self.disk {
            disk.purge(&s);
        }
        self.entries.retain(|_, slot| {
            let keep = !slot.entry.matches(&s);
            if !keep {
                self.bytes.dec_by(i64::from(slot.weight));
            }
            keep
        });
    }

    pub fn entry_count(&self) -> u64 {
        u64::try_from(self.entries.len()).unwrap_or(u64::MAX)
    }

    /// The bytes held, as the bound counts them.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }
}

/// The store's shards: as many as lock contention wants (four per core, quick_cache's
/// default), but few enough that each shard (the bound is split between them) still holds
/// two of the largest objects: a heavier one would never be admitted.
pub(super) fn shards(max_bytes: u64, max_object_bytes: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let fit = max_bytes / (2 * (max_object_bytes + ENTRY_OVERHEAD as u64)).max(1);
    let fit = usize::try_from(fit).unwrap_or(usize::MAX).max(1);
    let n = (4 * cores).min(fit);
    // A power of two (quick_cache rounds up otherwise).
    1 << (usize::BITS - 1 - n.leading_zeros())
}

fn options(max_bytes: u64, shards: usize) -> quick_cache::Options {
    let items = usize::try_from(max_bytes / TYPICAL_WEIGHT).unwrap_or(usize::MAX);
    OptionsBuilder::new()
        .weight_capacity(max_bytes)
        .estimated_items_capacity(items.max(64))
        .shards(shards)
        .build()
        .expect("only a missing option is refused, and every one is set")
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    const MB: u64 = 1024 * 1024;

    pub(in crate::cache) fn entry(i: usize, size: usize) -> Entry {
        Entry {
            status: StatusCode::OK,
            headers: Fields::default(),
            body: Bytes::from(vec![(i % 251) as u8; size]),
            cc: CacheControl::default(),
            lifetime: Duration::from_secs(600),
            initial_age: Duration::ZERO,
            stored: Instant::now(),
            fetched: Instant::now(),
            resource: crate::cache::key::Resource::whole(&format!("h\0/o/{i}")),
            tags: vec![],
            vary: Arc::from([]),
            disk: None,
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

    /// The bytes gauge follows every departure (eviction, replacement, expiry found at
    /// lookup, purge), and only the bound's evictions count as evictions.
    #[test]
    fn bytes_and_evictions_are_accounted_for_every_departure() {
        let m = CacheMetrics::default();
        let store = Store::new(MB, MB / 4, &m);
        let h = HeaderMap::new();
        store.insert("a", &h, entry(1, 1000));
        let one = m.bytes.get();
        assert!(one > 1000);
        store.insert("a", &h, entry(2, 1000));
        assert_eq!(m.bytes.get(), one, "replaced, not added");
        assert_eq!(m.evictions.get(), 0, "a replacement is no eviction");
        assert_eq!(store.lookup("a", &h).map(|e| e.body[0]), Some(2));

        // Past its keep (lifetime, no windows, no validator): removed when found.
        let mut old = entry(3, 1000);
        old.lifetime = Duration::ZERO;
        old.stored = Instant::now() - Duration::from_secs(5);
        store.insert("old", &h, old);
        assert_eq!(store.entry_count(), 2);
        assert!(store.lookup("old", &h).is_none());
        assert_eq!(store.entry_count(), 1);
        assert_eq!(m.bytes.get(), one);

        // Filling past the bound evicts, counted; what is held stays within it.
        for i in 0..200 {
            store.insert(format!("k{i}"), &h, entry(i, 16 * 1024));
        }
        assert!(m.evictions.get() > 100, "{}", m.evictions.get());
        let held = u64::try_from(m.bytes.get()).unwrap_or(u64::MAX);
        assert!(held <= MB, "held {held}");
        store.purge(Selector::Prefix("/o/".into()));
        assert_eq!((store.entry_count(), m.bytes.get()), (0, 0));
    }

    /// A working set of 1 GiB of distinct 64 KiB objects through a 64 MiB store: the bytes
    /// held and the process's RSS stay within the bound.
    #[test]
    fn a_gigabyte_of_distinct_objects_stays_within_the_bound() {
        let m = CacheMetrics::default();
        let store = Store::new(64 * MB, MB, &m);
        let h = HeaderMap::new();
        let before = rss();
        let mut peak = before;
        for i in 0..16 * 1024 {
            store.insert(format!("k{i}"), &h, entry(i, 64 * 1024));
            if i % 1024 == 0 {
                peak = peak.max(rss());
            }
        }
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
    /// store (1/16 of the working set), reported: alone, and with as many one-hit wonders
    /// (distinct keys asked for once) between them, each with and without `min_uses: 2`
    /// (admission counted in the policy's sketch, as the plan does).
    #[test]
    fn zipf_hit_ratio_is_reported() {
        let mut ratios = Vec::new();
        for (wonders, min_uses) in [(false, 1), (false, 2), (true, 1), (true, 2)] {
            let ratio = zipf_hit_ratio(wonders, min_uses);
            eprintln!(
                "Zipf(1), 16384 objects of 64 KiB, 64 MiB store, one-hit wonders {wonders}, min_uses {min_uses}: hit ratio {ratio:.3}"
            );
            ratios.push(ratio);
        }
        // The most popular 1,000 objects fit and draw over half the requests.
        assert!(ratios[0] > 0.5 && ratios[1] > 0.5, "{ratios:?}");
        // One-hit wonders (half the requests, never hits) push popular objects out without
        // admission; with it they never enter.
        assert!(ratios[3] > ratios[2], "{ratios:?}");
    }

    /// Hits among the Zipf requests only.
    fn zipf_hit_ratio(wonders: bool, min_uses: u8) -> f64 {
        let m = CacheMetrics::default();
        let store = Store::new(64 * MB, MB, &m);
        let sketch = super::super::admission::Sketch::new(64 * MB);
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
        let miss = |key: &str, i: usize| {
            if min_uses == 1 || sketch.increment(key) >= min_uses {
                store.insert(key, &h, entry(i, 64 * 1024));
            }
        };
        for r in 0..requests {
            if wonders {
                let key = format!("once{r}");
                if store.lookup(&key, &h).is_none() {
                    miss(&key, 0);
                }
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64 * total;
            let i = cdf.partition_point(|c| *c < u);
            let key = format!("k{i}");
            if store.lookup(&key, &h).is_some() {
                hits += 1;
            } else {
                miss(&key, i);
            }
        }
        f64::from(hits) / f64::from(requests)
    }
}
