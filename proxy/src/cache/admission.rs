//! Admission by use count (`min_uses`, nginx's `proxy_cache_min_uses`, "cache on second hit"
//! at Akamai and Fastly): a response is stored only once its key has been asked for
//! `min_uses` times, so a key asked for once (a one-hit wonder) neither costs an entry nor
//! evicts a popular one.
//!
//! Uses are counted in a count-min sketch (TinyLFU's frequency sketch): four rows of
//! saturating counts (at most 15, TinyLFU's 4 bits, held in a byte each for lock-free
//! updates), each key counted in one cell per row, its count the smallest of its four. The
//! sketch's memory is fixed when the policy is applied ([`Sketch::bytes`]: 4 bytes per 512
//! bytes of the store's bound, 0.8 %, between 4 KiB and 4 MiB), so a flood of distinct keys
//! cannot grow it. Collisions only over-count, which may admit a key early but never refuses
//! a popular one. Every `width / 2` counted uses all counts are halved (TinyLFU's reset): a
//! key asked for once is forgotten within that many misses (about as many as the store holds
//! entries of 1 KiB), keys popular long ago fade, and the cells stay sparse enough that a key
//! asked for once is rarely taken for one asked twice (all four of its cells hit by others:
//! about 2.4 % just before a halving, tested below).

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use quick_cache::DefaultHashBuilder;

/// Counts saturate here (TinyLFU's 4-bit counters); `min_uses` is at most this.
const MAX_COUNT: u8 = 15;
const ROWS: usize = 4;
/// Columns per row: one per this many bytes of the store's bound, within these.
const BYTES_PER_COLUMN: u64 = 512;
const MIN_WIDTH: usize = 1024;
const MAX_WIDTH: usize = 1 << 20;

/// Use counts of keys, bounded in memory.
pub struct Sketch {
    cells: Box<[AtomicU8]>,
    /// `width - 1` (the width is a power of two).
    mask: u64,
    /// Uses counted since the last halving.
    counted: AtomicU64,
    /// Uses between two halvings.
    sample: u64,
    hasher: DefaultHashBuilder,
}

impl Sketch {
    /// A sketch for a store of `max_bytes`.
    pub fn new(max_bytes: u64) -> Self {
        let width = usize::try_from(max_bytes / BYTES_PER_COLUMN)
            .unwrap_or(MAX_WIDTH)
            .clamp(MIN_WIDTH, MAX_WIDTH)
            .next_power_of_two();
        Self {
            cells: (0..ROWS * width).map(|_| AtomicU8::new(0)).collect(),
            mask: width as u64 - 1,
            counted: AtomicU64::new(0),
            sample: width as u64 / 2,
            hasher: DefaultHashBuilder::default(),
        }
    }

    /// The memory the counts take.
    pub fn bytes(&self) -> usize {
        self.cells.len()
    }

    /// Count one use of `key`; its count now (saturated at 15).
    pub fn increment(&self, key: &str) -> u8 {
        let mut count = MAX_COUNT;
        for cell in self.cells_of(key) {
            // Load and store rather than an atomic add: two racing uses may count as one,
            // which only delays an admission (a sketch is an estimate), and no count passes 15.
            let now = cell.load(Ordering::Relaxed);
            let next = now.saturating_add(1).min(MAX_COUNT);
            if next != now {
                cell.store(next, Ordering::Relaxed);
            }
            count = count.min(next);
        }
        if self.counted.fetch_add(1, Ordering::Relaxed) + 1 >= self.sample {
            self.halve();
        }
        count
    }

    /// The key's count, without counting a use.
    #[cfg(test)]
    pub fn estimate(&self, key: &str) -> u8 {
        self.cells_of(key)
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }

    /// Halve every count (one thread does it: the one that took the whole sample).
    fn halve(&self) {
        let n = self.counted.swap(0, Ordering::Relaxed);
        if n < self.sample {
            // Another thread took it first and is halving.
            self.counted.fetch_add(n, Ordering::Relaxed);
            return;
        }
        for c in self.cells.iter() {
            let v = c.load(Ordering::Relaxed);
            if v != 0 {
                c.store(v >> 1, Ordering::Relaxed);
            }
        }
    }

    /// The key's cell in each row, by double hashing from the two halves of its hash.
    fn cells_of(&self, key: &str) -> impl Iterator<Item = &AtomicU8> {
        let hash = self.hasher.hash_one(key);
        let (h1, h2) = (hash, (hash >> 32) | 1);
        let width = self.mask + 1;
        (0..ROWS as u64).map(move |row| {
            let col = h1.wrapping_add(row.wrapping_mul(h2)) & self.mask;
            // row < ROWS and col < width: within the cells.
            &self.cells[(row * width + col) as usize]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> &str {
        s
    }

    #[test]
    fn counts_uses_and_saturates() {
        let s = Sketch::new(64 << 20);
        assert_eq!(s.bytes(), 4 * 131_072, "4 bytes per 512 of a 64 MiB store");
        assert_eq!(s.estimate(h("a")), 0);
        assert_eq!(s.increment(h("a")), 1);
        assert_eq!(s.increment(h("a")), 2);
        assert_eq!(s.estimate(h("a")), 2);
        assert_eq!(s.estimate(h("b")), 0, "another key is not counted");
        for _ in 0..40 {
            s.increment(h("a"));
        }
        assert_eq!(s.estimate(h("a")), MAX_COUNT);
    }

    #[test]
    fn memory_is_bounded_and_counts_are_halved() {
        assert_eq!(Sketch::new(1).bytes(), 4 * MIN_WIDTH);
        assert_eq!(Sketch::new(u64::MAX).bytes(), 4 * MAX_WIDTH);
        let s = Sketch::new(64 << 20);
        for _ in 0..8 {
            s.increment(h("hot"));
        }
        assert_eq!(s.estimate(h("hot")), 8);
        // A flood of keys asked for once, up to just before a halving.
        let flood = s.sample - 9;
        for i in 0..flood {
            s.increment(&format!("once{i}"));
        }
        // A key never asked for then looks asked for once (all four cells hit) rarely.
        let probes = 20_000;
        let seen = (0..probes)
            .filter(|i| s.estimate(&format!("new{i}")) >= 1)
            .count();
        let rate = seen as f64 / f64::from(probes);
        eprintln!("an unseen key looks seen just before a halving: {rate:.4}");
        assert!(rate < 0.035, "{rate}: about 2.4 % expected");
        assert!(s.estimate(h("hot")) >= 8);
        // One more use: every count halved, the keys asked for once forgotten (but those whose
        // four cells all had another key's use too: about 0.39^4, 2.4 %).
        s.increment(h("tick"));
        assert_eq!(s.counted.load(Ordering::Relaxed), 0);
        let hot = s.estimate(h("hot"));
        assert!(
            (4..=7).contains(&hot),
            "{hot}: 8 or a little more (collisions), halved"
        );
        let remembered = (0..1000)
            .filter(|i| s.estimate(&format!("once{i}")) >= 1)
            .count();
        assert!(
            remembered < 60,
            "{remembered} of 1,000 keys asked for once still counted"
        );
    }
}
