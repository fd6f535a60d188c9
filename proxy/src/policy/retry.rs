//! Retry budget and backoff.
//!
//! The budget (Finagle's and Linkerd's design) lets retries add at most `ratio` of the live
//! request rate plus `min_per_second`, measured over a sliding 10 s window of 1 s buckets: during
//! a full outage, attempts stay bounded by (1 + ratio) x requests + min x window, instead of
//! multiplying load on a service that is already failing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::state::balance::rand::Rng;

const WINDOW_SECS: u64 = 10;

struct Bucket {
    /// The second (since `epoch`) this bucket counts; older values are stale.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

pub struct RetryBudget {
    epoch: Instant,
    buckets: [Bucket; WINDOW_SECS as usize],
    rng: Rng,
}

// === impl RetryBudget ===

impl RetryBudget {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            buckets: std::array::from_fn(|_| Bucket {
                second: AtomicU64::new(u64::MAX),
                requests: AtomicU64::new(0),
                retries: AtomicU64::new(0),
            }),
            rng: Rng::new(),
        }
    }

    fn bucket(&self) -> (&Bucket, u64) {
        let now = self.epoch.elapsed().as_secs();
        let b = &self.buckets[(now % WINDOW_SECS) as usize];
        if b.second.swap(now, Ordering::AcqRel) != now {
            // First use of this slot in this second: it held a second 10 s ago.
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        (b, now)
    }

    fn totals(&self, now: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| {
                let s = b.second.load(Ordering::Acquire);
                s != u64::MAX && s + WINDOW_SECS > now
            })
            .fold((0, 0), |(r, t), b| {
                (
                    r + b.requests.load(Ordering::Relaxed),
                    t + b.retries.load(Ordering::Relaxed),
                )
            })
    }

    /// Count an original request.
    pub fn deposit(&self) {
        self.bucket().0.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Take a retry from the budget if there is one.
    pub fn try_withdraw(&self, ratio: f64, min_per_second: u32) -> bool {
        let (b, now) = self.bucket();
        let (requests, retries) = self.totals(now);
        let allowed = ratio * requests as f64 + f64::from(min_per_second) * WINDOW_SECS as f64;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        b.retries.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Full-jitter exponential backoff before retry number `k` (0-based).
    pub fn backoff(&self, k: u32, base: Duration, max: Duration) -> Duration {
        let cap = base.saturating_mul(1 << k.min(16)).min(max);
        let nanos = cap.as_nanos().min(u128::from(u64::MAX)) as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.rng.next() % (nanos + 1))
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not used between services and is ignored).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Methods that may be sent twice without changing the outcome (RFC 9110 section 9.2.2).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn budget_bounds_attempts_during_a_full_outage() {
        let b = RetryBudget::new();
        let (ratio, min) = (0.2, 10);
        let mut attempts = 0u64;
        let mut requests = 0u64;
        // 20 s of 100 requests per second, every one failing and wanting 3 retries.
        for _ in 0..20 {
            for _ in 0..100 {
                b.deposit();
                requests += 1;
                attempts += 1;
                for _ in 0..3 {
                    if !b.try_withdraw(ratio, min) {
                        break;
                    }
                    attempts += 1;
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let bound = (1.0 + ratio) * requests as f64 + f64::from(min) * 20.0;
        assert!(
            attempts as f64 <= bound,
            "{attempts} attempts for {requests} requests (bound {bound})"
        );
        // ...and the budget is used, not just refused.
        assert!(attempts as f64 >= 1.15 * requests as f64, "{attempts}");
    }

    #[tokio::test(start_paused = true)]
    async fn minimum_allows_retries_at_low_traffic_and_window_slides() {
        let b = RetryBudget::new();
        for _ in 0..100 {
            assert!(
                b.try_withdraw(0.2, 10),
                "10/s over 10 s = 100 retries with no traffic"
            );
        }
        assert!(!b.try_withdraw(0.2, 10));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(b.try_withdraw(0.2, 10), "old retries left the window");
    }

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let b = RetryBudget::new();
        let (base, max) = (Duration::from_millis(25), Duration::from_millis(250));
        let samples: Vec<Duration> = (0..200).map(|_| b.backoff(5, base, max)).collect();
        assert!(samples.iter().all(|d| *d <= max));
        assert!(
            samples.iter().any(|d| *d < Duration::from_millis(100)),
            "jitter spreads retries"
        );
        assert!(b.backoff(0, base, max) <= base);
    }

    #[test]
    fn retry_after_and_idempotency() {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(
            http::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        assert!(idempotent(&http::Method::GET) && idempotent(&http::Method::PUT));
        assert!(!idempotent(&http::Method::POST) && !idempotent(&http::Method::PATCH));
    }
}
