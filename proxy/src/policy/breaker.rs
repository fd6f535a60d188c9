//! Circuit breakers: per-destination counters of requests in flight and requests waiting for a
//! connection. A request over a limit fails fast (503 with the breaker named) rather than
//! queueing behind a destination that is already saturated. Counters outlive snapshots.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Which limit was hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaker {
    MaxRequests,
    MaxPending,
}

impl Breaker {
    pub fn label(self) -> &'static str {
        match self {
            Self::MaxRequests => "max_requests",
            Self::MaxPending => "max_pending",
        }
    }
}

#[derive(Default)]
pub struct ServiceCounters {
    requests: AtomicUsize,
    pending: AtomicUsize,
    retries: AtomicUsize,
    /// Requests ever admitted: a store that drops unused services tells use from this.
    admitted: std::sync::atomic::AtomicU64,
    /// Retries to this service share one budget.
    pub budget: crate::policy::retry::RetryBudget,
}

/// Holds one unit of a counter until dropped.
pub struct Permit<'a>(&'a AtomicUsize);

impl ServiceCounters {
    /// Take a request slot, or `None` when `max` are in flight. Exact under concurrency: the
    /// increment happens first and is undone on overflow.
    pub fn request(self: &Arc<Self>, max: usize) -> Option<Permit<'_>> {
        self.admitted.fetch_add(1, Ordering::Relaxed);
        take(&self.requests, max)
    }

    /// Requests to this service so far (every attempt, admitted or refused by the breaker).
    pub fn admitted(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
    }

    pub fn pending(self: &Arc<Self>, max: usize) -> Option<Permit<'_>> {
        take(&self.pending, max)
    }

    /// A slot for one retry in flight.
    pub fn retry(self: &Arc<Self>, max: usize) -> Option<Permit<'_>> {
        take(&self.retries, max)
    }

    pub fn in_flight(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

fn take(counter: &AtomicUsize, max: usize) -> Option<Permit<'_>> {
    if counter.fetch_add(1, Ordering::AcqRel) >= max {
        counter.fetch_sub(1, Ordering::AcqRel);
        return None;
    }
    Some(Permit(counter))
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_limits() {
        let c = Arc::new(ServiceCounters::default());
        let a = c.request(2).unwrap();
        let b = c.request(2).unwrap();
        assert!(c.request(2).is_none());
        assert_eq!(c.in_flight(), 2, "a refused request leaves no trace");
        drop(a);
        let _c = c.request(2).unwrap();
        drop(b);
        assert!(c.pending(0).is_none());
        let r = c.retry(1).unwrap();
        assert!(c.retry(1).is_none(), "one retry in flight at most");
        drop(r);
        assert!(c.retry(1).is_some());
    }

    #[test]
    fn exact_under_contention() {
        let c = Arc::new(ServiceCounters::default());
        // Permits actually held (the shared counter itself briefly overshoots while a refused
        // request undoes its increment, so it is not the thing to observe).
        let held = AtomicUsize::new(0);
        let max_held = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(p) = c.request(5) {
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            max_held.fetch_max(now, Ordering::SeqCst);
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(p);
                        }
                    }
                });
            }
        });
        assert!(max_held.load(Ordering::SeqCst) <= 5);
        assert_eq!(c.in_flight(), 0);
    }
}
