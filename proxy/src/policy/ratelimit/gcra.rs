//! One token bucket as GCRA (the generic cell rate algorithm): a single atomic "theoretical
//! arrival time" per key, so a decision is one compare-and-swap, with no lock and no allocation.
//!
//! We do not use `governor` here although it implements the same algorithm: a global limit
//! changes each bucket's rate several times a second as shares move, governor fixes the quota
//! when a limiter is built (rebuilding it would forget the bucket's state), and the coordinator
//! also needs each key's demand, which governor does not count.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Slowest rate a bucket runs at, so that an interval never overflows.
const MIN_RATE: f64 = 1e-3;

pub struct Bucket {
    /// Theoretical arrival time of the next request, in nanoseconds since the limiter's epoch.
    tat: AtomicU64,
    /// Nanoseconds per request at the current rate.
    interval: AtomicU64,
    /// How far ahead of now `tat` may run: interval x burst.
    window: AtomicU64,
    /// Requests seen (admitted or not) since the last sample: the key's demand.
    attempts: AtomicU64,
    /// Smoothed demand in requests per second (`f64` bits), updated by sampling.
    demand: AtomicU64,
    /// Last time a request used this bucket, for eviction.
    last_used: AtomicU64,
}

// === impl Bucket ===

impl Bucket {
    pub fn new(rate: f64, burst: f64, now: u64) -> Self {
        let b = Self {
            tat: AtomicU64::new(now),
            interval: AtomicU64::new(0),
            window: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            demand: AtomicU64::new(0f64.to_bits()),
            last_used: AtomicU64::new(now),
        };
        b.set_rate(rate, burst);
        b
    }

    /// Change the rate (requests per second) and burst (requests) without losing the state:
    /// requests already admitted stay counted.
    pub fn set_rate(&self, rate: f64, burst: f64) {
        let interval = (1e9 / rate.max(MIN_RATE)).min(u64::MAX as f64 / 4.0) as u64;
        let window = (interval as f64 * burst.max(1.0)).min(u64::MAX as f64 / 4.0) as u64;
        self.interval.store(interval.max(1), Relaxed);
        self.window.store(window.max(1), Relaxed);
    }

    pub fn rate(&self) -> f64 {
        1e9 / self.interval.load(Relaxed) as f64
    }

    /// Admit one request at `now`, or say how many nanoseconds until one would be admitted.
    pub fn acquire(&self, now: u64) -> Result<(), u64> {
        self.attempts.fetch_add(1, Relaxed);
        self.last_used.store(now, Relaxed);
        let interval = self.interval.load(Relaxed);
        let window = self.window.load(Relaxed);
        let mut tat = self.tat.load(Relaxed);
        loop {
            let next = tat.max(now).saturating_add(interval);
            let ahead = next - now;
            if ahead > window {
                return Err(ahead - window);
            }
            match self.tat.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => tat = actual,
            }
        }
    }

    /// Fold the attempts since the last sample (`elapsed` ago) into the smoothed demand with
    /// an exponential moving average of time constant `tau`; returns the new demand.
    pub fn sample(&self, elapsed_secs: f64, tau_secs: f64) -> f64 {
        let n = self.attempts.swap(0, Relaxed) as f64;
        let old = f64::from_bits(self.demand.load(Relaxed));
        if elapsed_secs <= 0.0 {
            return old;
        }
        let rate = n / elapsed_secs;
        let alpha = 1.0 - (-elapsed_secs / tau_secs).exp();
        let new = old + alpha * (rate - old);
        self.demand.store(new.to_bits(), Relaxed);
        new
    }

    pub fn demand(&self) -> f64 {
        f64::from_bits(self.demand.load(Relaxed))
    }

    pub fn idle_since(&self) -> u64 {
        self.last_used.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn admits_the_burst_then_the_rate() {
        let b = Bucket::new(10.0, 5.0, 0);
        let now = 10 * SEC;
        for _ in 0..5 {
            assert!(b.acquire(now).is_ok());
        }
        let wait = b.acquire(now).unwrap_err();
        assert_eq!(wait, SEC / 10, "next token in one interval");
        // Over the next second exactly 10 more are admitted.
        let admitted = (1..=100)
            .filter(|i| b.acquire(now + i * SEC / 100).is_ok())
            .count();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn rate_changes_keep_what_was_admitted() {
        let b = Bucket::new(1.0, 1.0, 0);
        assert!(b.acquire(SEC).is_ok());
        assert!(b.acquire(SEC).is_err());
        b.set_rate(1000.0, 1.0);
        // The admitted request still occupies the bucket until its (old) interval has passed.
        assert!(b.acquire(SEC + SEC / 2).is_err());
        assert!(b.acquire(2 * SEC).is_ok());
        assert!(b.acquire(2 * SEC + SEC / 1000).is_ok());
    }

    #[test]
    fn demand_follows_attempts() {
        let b = Bucket::new(1.0, 1.0, 0);
        for _ in 0..50 {
            let _ = b.acquire(SEC);
        }
        // 50 attempts in 0.5 s is 100/s; with tau = elapsed, alpha = 1 - 1/e.
        let d = b.sample(0.5, 0.5);
        assert!((d - 100.0 * (1.0 - (-1f64).exp())).abs() < 1e-6, "{d}");
        for _ in 0..20 {
            for _ in 0..50 {
                let _ = b.acquire(SEC);
            }
            b.sample(0.5, 0.5);
        }
        assert!((b.demand() - 100.0).abs() < 0.01, "{}", b.demand());
    }
}
