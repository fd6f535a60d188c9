//! Per-endpoint state shared by balancers, outlier detection and metrics. Everything is atomics:
//! the request path never takes a lock here.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

// tokio's clock, so that tests with paused time can drive ejection and re-admission.
use tokio::time::Instant;

/// RTT assumed for an endpoint with no measurement yet (Linkerd's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Peak-EWMA decay time constant: a latency spike is forgotten over ~10 s (Linkerd's default).
const DECAY: Duration = Duration::from_secs(10);

pub struct EndpointStats {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// f64 bits: the peak-sensitive moving average RTT in nanoseconds.
    ewma_ns: AtomicU64,
    /// Nanoseconds since `epoch` of the last RTT sample.
    stamp_ns: AtomicU64,
    /// Nanoseconds since `epoch` until which the endpoint is ejected (0: not ejected). Once
    /// that time passes the endpoint is on probation until a request succeeds.
    ejected_until_ns: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Ejections since the endpoint last proved healthy: the backoff exponent.
    ejections: AtomicU32,
    /// A probation trial request is in flight.
    probing: AtomicBool,
    /// Active health-check verdict (true until checks say otherwise).
    healthy: AtomicBool,
    /// Consecutive check results: positive = successes, negative = failures.
    check_streak: std::sync::atomic::AtomicI32,
}

/// What an outcome did to an endpoint's outlier state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutlierEvent {
    None,
    Ejected(Duration),
    Readmitted,
}

/// Outlier-detection parameters, resolved from policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierParams {
    /// 0 disables ejection.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

/// Counts a request in flight on an endpoint until dropped.
pub struct InFlight(Arc<EndpointStats>);

// === impl EndpointStats ===

impl EndpointStats {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            ewma_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            stamp_ns: AtomicU64::new(0),
            ejected_until_ns: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            probing: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            check_streak: std::sync::atomic::AtomicI32::new(0),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Record a response time. A sample above the average replaces it at once (peak); lower
    /// samples pull it down with an exponential decay over time.
    pub fn observe_rtt(&self, rtt: Duration) {
        let now = self.now_ns();
        let sample = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let elapsed = now.saturating_sub(self.stamp_ns.swap(now, Ordering::Relaxed)) as f64;
        let next = if sample > prev {
            sample
        } else {
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            prev * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
    }

    /// Peak-EWMA cost: latency estimate times (in-flight + 1).
    pub fn cost(&self) -> f64 {
        f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) * (self.in_flight() as f64 + 1.0)
    }

    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma_ns.load(Ordering::Relaxed)) as u64)
    }

    /// Eject until `until` (outlier detection).
    pub fn eject_for(&self, d: Duration) {
        self.ejected_until_ns
            .store(self.now_ns() + d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn readmit(&self) {
        self.ejected_until_ns.store(0, Ordering::Relaxed);
        self.ejections.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.probing.store(false, Ordering::Relaxed);
    }

    /// Passing health checks, and not ejected (or on probation with no trial in flight).
    pub fn available(&self) -> bool {
        if !self.healthy.load(Ordering::Relaxed) {
            return false;
        }
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until == 0 || (self.now_ns() >= until && !self.probing.load(Ordering::Relaxed))
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Fold in one active health-check result; `Some(new state)` when the verdict changes.
    pub fn record_check(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        let prev = self.check_streak.load(Ordering::Relaxed);
        let streak = match (ok, prev > 0) {
            (true, true) => prev.saturating_add(1),
            (true, false) => 1,
            (false, false) => prev.saturating_sub(1),
            (false, true) => -1,
        };
        self.check_streak.store(streak, Ordering::Relaxed);
        let healthy = self.healthy.load(Ordering::Relaxed);
        if healthy && !ok && streak.unsigned_abs() >= unhealthy_threshold {
            self.healthy.store(false, Ordering::Relaxed);
            return Some(false);
        }
        if !healthy && ok && streak as u32 >= healthy_threshold {
            self.healthy.store(true, Ordering::Relaxed);
            return Some(true);
        }
        None
    }

    /// Ejected and not yet due for a trial.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until != 0 && self.now_ns() < until
    }

    fn on_probation(&self) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until != 0 && self.now_ns() >= until
    }

    /// Call before sending to this endpoint: `false` means it is on probation and another
    /// trial request is already in flight (pick another endpoint). Re-admission is by one probe
    /// at a time, as in Linkerd.
    pub fn claim(&self) -> bool {
        !self.on_probation()
            || self
                .probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// A request to this endpoint succeeded.
    pub fn record_success(&self) -> OutlierEvent {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.on_probation() {
            self.readmit();
            return OutlierEvent::Readmitted;
        }
        OutlierEvent::None
    }

    /// A request to this endpoint failed. `may_eject` is asked only when this failure would
    /// eject (it enforces the max-ejection percentage).
    pub fn record_failure(
        &self,
        p: &OutlierParams,
        may_eject: impl FnOnce() -> bool,
    ) -> OutlierEvent {
        if p.consecutive_failures == 0 {
            return OutlierEvent::None;
        }
        if self.on_probation() {
            // The trial failed: back off further.
            self.probing.store(false, Ordering::Relaxed);
            return OutlierEvent::Ejected(self.eject_backoff(p));
        }
        if self.is_ejected() {
            return OutlierEvent::None;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= p.consecutive_failures && may_eject() {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return OutlierEvent::Ejected(self.eject_backoff(p));
        }
        OutlierEvent::None
    }

    /// Eject for base x 2^(ejections so far), capped.
    fn eject_backoff(&self, p: &OutlierParams) -> Duration {
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let d = p.base_ejection.saturating_mul(1 << k).min(p.max_ejection);
        self.eject_for(d);
        d
    }
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ewma_jumps_to_peaks_and_decays_slowly() {
        let s = EndpointStats::new();
        s.observe_rtt(Duration::from_millis(100));
        assert_eq!(s.ewma(), Duration::from_millis(100));
        s.observe_rtt(Duration::from_millis(1));
        // Almost no time passed: the spike is still remembered.
        assert!(s.ewma() > Duration::from_millis(90), "{:?}", s.ewma());
    }

    #[test]
    fn in_flight_guard_counts() {
        let s = Arc::new(EndpointStats::new());
        let a = s.start();
        let b = s.start();
        assert_eq!(s.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(s.in_flight(), 0);
        assert!(s.cost() > 0.0);
    }

    const P: OutlierParams = OutlierParams {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(1),
        max_ejection: Duration::from_secs(4),
    };

    #[tokio::test(start_paused = true)]
    async fn ejection_backoff_and_readmission_by_one_probe() {
        let s = EndpointStats::new();
        assert_eq!(s.record_failure(&P, || true), OutlierEvent::None);
        assert_eq!(s.record_failure(&P, || true), OutlierEvent::None);
        assert_eq!(
            s.record_success(),
            OutlierEvent::None,
            "a success resets the count"
        );
        for _ in 0..2 {
            s.record_failure(&P, || true);
        }
        assert_eq!(
            s.record_failure(&P, || true),
            OutlierEvent::Ejected(Duration::from_secs(1))
        );
        assert!(!s.available() && s.is_ejected());
        tokio::time::advance(Duration::from_millis(1001)).await;
        // Probation: one trial at a time.
        assert!(s.available());
        assert!(s.claim());
        assert!(!s.available() && !s.claim(), "a second trial must wait");
        // The trial fails: ejected twice as long.
        assert_eq!(
            s.record_failure(&P, || true),
            OutlierEvent::Ejected(Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!s.available());
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(s.claim());
        assert_eq!(
            s.record_failure(&P, || true),
            OutlierEvent::Ejected(Duration::from_secs(4))
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(s.claim());
        assert_eq!(
            s.record_failure(&P, || true),
            OutlierEvent::Ejected(Duration::from_secs(4)),
            "capped at max"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(s.claim());
        assert_eq!(s.record_success(), OutlierEvent::Readmitted);
        assert!(s.available() && !s.is_ejected());
        // Healthy again: the backoff starts over.
        for _ in 0..2 {
            s.record_failure(&P, || true);
        }
        assert_eq!(
            s.record_failure(&P, || true),
            OutlierEvent::Ejected(Duration::from_secs(1))
        );
    }

    #[test]
    fn health_check_thresholds() {
        let s = EndpointStats::new();
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(
            s.record_check(true, 2, 3),
            None,
            "a success breaks the failure streak"
        );
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), None);
        assert_eq!(s.record_check(false, 2, 3), Some(false));
        assert!(!s.available());
        assert_eq!(s.record_check(true, 2, 3), None);
        assert_eq!(s.record_check(true, 2, 3), Some(true));
        assert!(s.available());
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_guard_and_disabled_detection() {
        let s = EndpointStats::new();
        for _ in 0..10 {
            assert_eq!(s.record_failure(&P, || false), OutlierEvent::None);
        }
        assert!(s.available(), "the guard refused the ejection");
        let off = OutlierParams {
            consecutive_failures: 0,
            ..P
        };
        for _ in 0..10 {
            assert_eq!(s.record_failure(&off, || true), OutlierEvent::None);
        }
        s.eject_for(Duration::ZERO);
        assert!(s.available());
    }
}
