//! Uniform random choice with a lock-free SplitMix64 sequence (no global RNG, no lock).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{next_available, Balancer, EndpointStats, PickContext};

/// A per-balancer pseudo-random sequence: a Weyl counter finalized with SplitMix64. Good
/// statistical quality for load spreading, one atomic add per number.
pub(crate) struct Rng(AtomicU64);

impl Rng {
    pub(crate) fn new() -> Self {
        // Seed from the clock so that sidecars do not share a sequence.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x9E37_79B9, |d| d.as_nanos() as u64);
        Self(AtomicU64::new(seed))
    }

    pub(crate) fn next(&self) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; n > 0).
    pub(crate) fn below(&self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

pub struct Random {
    rng: Rng,
}

impl Random {
    pub fn new() -> Self {
        Self { rng: Rng::new() }
    }
}

impl Default for Random {
    fn default() -> Self {
        Self::new()
    }
}

impl Balancer for Random {
    fn pick(&self, endpoints: &[Arc<EndpointStats>], _: &PickContext) -> Option<usize> {
        if endpoints.is_empty() {
            return None;
        }
        next_available(endpoints, self.rng.below(endpoints.len()))
    }

    fn name(&self) -> &'static str {
        "random"
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn roughly_uniform() {
        let eps = endpoints(4);
        let h = histogram(&Random::new(), &eps, 40_000, |_| None);
        for c in h {
            assert!((9_000..11_000).contains(&c), "{c}");
        }
    }
}
