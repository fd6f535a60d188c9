//! Per-endpoint state shared by balancers, outlier detection and metrics. Everything is atomics:
//! the request path never takes a lock here.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Nanoseconds since `epoch` until which the endpoint is ejected (0: not ejected).
    ejected_until_ns: AtomicU64,
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
    }

    pub fn available(&self) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until == 0 || self.now_ns() >= until
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

    #[test]
    fn ejection_expires() {
        let s = EndpointStats::new();
        s.eject_for(Duration::from_secs(60));
        assert!(!s.available());
        s.readmit();
        assert!(s.available());
        s.eject_for(Duration::ZERO);
        assert!(s.available());
    }
}
