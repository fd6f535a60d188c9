//! Consistent hashing with Maglev (Eisenbud et al., NSDI 2016): a lookup table of prime size M
//! (>= 100x the endpoints) filled from per-endpoint permutations. A pick is one table lookup;
//! when an endpoint joins or leaves, only about 1/n of the keys move. Permutations come from each
//! endpoint's identity (its address), so every sidecar builds the same table for the same set.

use std::sync::Arc;

use super::rand::Rng;
use super::{next_available, Balancer, EndpointStats, PickContext};

/// Table sizes: primes just above powers of two.
const PRIMES: [usize; 8] = [1021, 2053, 4099, 8191, 16381, 32771, 65537, 131_071];

/// A stable 64-bit hash (FNV-1a, then a SplitMix64 finalizer for avalanche): the same bytes give
/// the same value on every node and every run.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h = StableHasher::new();
    h.write(bytes);
    h.finish()
}

/// [`hash_key`] over several pieces fed one after the other. Unlike `std`'s `DefaultHasher`,
/// whose algorithm may change between Rust releases, this is fixed: nodes built by different
/// compilers agree.
#[derive(Clone, Copy, Debug)]
pub struct StableHasher(u64);

// === impl StableHasher ===

impl StableHasher {
    pub fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub fn finish(self) -> u64 {
        let h = self.0;
        let h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        let h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^ (h >> 31)
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Maglev {
    table: Vec<u32>,
    /// Requests without a hash key are spread at random.
    rng: Rng,
}

impl Maglev {
    /// A table for `n` endpoints identified by their position (see [`Maglev::with_keys`]).
    pub fn new(n: usize) -> Self {
        let keys: Vec<u64> = (0..n as u64).map(|i| hash_key(&i.to_be_bytes())).collect();
        Self::with_keys(&keys)
    }

    /// A table for endpoints identified by `keys` (hashes of their addresses, in list order).
    pub fn with_keys(keys: &[u64]) -> Self {
        let n = keys.len();
        if n == 0 {
            return Self {
                table: Vec::new(),
                rng: Rng::new(),
            };
        }
        let m = PRIMES
            .iter()
            .copied()
            .find(|&p| p >= 100 * n)
            .unwrap_or(PRIMES[PRIMES.len() - 1]);
        let perms: Vec<(usize, usize)> = keys
            .iter()
            .map(|&k| {
                let offset = (k % m as u64) as usize;
                let skip = ((k >> 32) % (m as u64 - 1) + 1) as usize;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut table = vec![u32::MAX; m];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while table[c] != u32::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                table[c] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Self {
            table,
            rng: Rng::new(),
        }
    }
}

impl Balancer for Maglev {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], ctx: &PickContext) -> Option<usize> {
        if endpoints.is_empty() || self.table.is_empty() {
            return None;
        }
        let h = ctx.hash.unwrap_or_else(|| self.rng.next());
        let i = self.table[(h % self.table.len() as u64) as usize] as usize % endpoints.len();
        if endpoints[i].available() {
            Some(i)
        } else {
            // Deterministic fallback so keys of an ejected endpoint stay together.
            next_available(endpoints, i)
        }
    }

    fn name(&self) -> &'static str {
        "consistent_hash"
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn keys(addrs: &[&str]) -> Vec<u64> {
        addrs.iter().map(|a| hash_key(a.as_bytes())).collect()
    }

    #[test]
    fn same_key_same_endpoint_and_even_spread() {
        let eps = endpoints(5);
        let m = Maglev::new(5);
        let ctx = PickContext {
            hash: Some(hash_key(b"user-42")),
        };
        let first = m.pick(&eps, &ctx);
        assert!((0..100).all(|_| m.pick(&eps, &ctx) == first));
        let h = histogram(&m, &eps, 50_000, |r| Some(hash_key(&r.to_be_bytes())));
        for c in h {
            assert!((9_000..11_000).contains(&c), "{c}");
        }
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth_of_the_keys() {
        let addrs: Vec<String> = (0..10).map(|i| format!("10.0.0.{i}:15006")).collect();
        let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let fewer: Vec<&str> = all
            .iter()
            .copied()
            .filter(|a| *a != "10.0.0.3:15006")
            .collect();
        let (t10, t9) = (
            Maglev::with_keys(&keys(&all)),
            Maglev::with_keys(&keys(&fewer)),
        );
        let (e10, e9) = (endpoints(10), endpoints(9));
        let mut moved = 0;
        let total = 20_000;
        for k in 0..total as u64 {
            let ctx = PickContext {
                hash: Some(hash_key(&k.to_be_bytes())),
            };
            let before = all[t10.pick(&e10, &ctx).unwrap()];
            let after = fewer[t9.pick(&e9, &ctx).unwrap()];
            if before != after {
                moved += 1;
            }
        }
        let share = moved as f64 / total as f64;
        // Ideal is 10 % (the removed endpoint's keys); Maglev adds a little disruption.
        assert!(share < 0.15, "{share}");
        assert!(share > 0.08, "{share}");
    }
}
