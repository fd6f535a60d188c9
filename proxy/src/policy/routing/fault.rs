//! Fault injection and percentage draws. A draw is one lock-free random number compared with a
//! precomputed threshold, so a rule at 0 % costs nothing but a branch and 100 % always fires.

use std::time::Duration;

use http::StatusCode;
use trellis_policies::Fault;

use crate::state::balance::rand::Rng;

/// A share of requests, precomputed for [`Chance::draw`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chance {
    Never,
    Always,
    /// Fires when a uniform `u64` is below this.
    Below(u64),
}

#[derive(Debug, Default)]
pub struct FaultAction {
    delay: Option<(Duration, Chance)>,
    abort: Option<(StatusCode, Chance)>,
}

// === impl Chance ===

impl Chance {
    pub fn percent(p: f64) -> Self {
        if p.is_nan() || p <= 0.0 {
            Self::Never
        } else if p >= 100.0 {
            Self::Always
        } else {
            // p / 100 of the u64 range; the float product is below 2^64, so the cast is exact
            // enough (within 2^-52 relative).
            Self::Below((p / 100.0 * 18_446_744_073_709_551_616.0) as u64)
        }
    }

    pub(crate) fn draw(self, rng: &Rng) -> bool {
        match self {
            Self::Never => false,
            Self::Always => true,
            Self::Below(t) => rng.next() < t,
        }
    }
}

// === impl FaultAction ===

impl FaultAction {
    pub fn compile(f: &Fault) -> Result<Self, String> {
        let abort = f
            .abort
            .as_ref()
            .map(|a| {
                StatusCode::from_u16(a.status)
                    .map(|s| (s, Chance::percent(a.percent)))
                    .map_err(|e| format!("abort.status: {e}"))
            })
            .transpose()?;
        Ok(Self {
            delay: f
                .delay
                .as_ref()
                .map(|d| (d.duration, Chance::percent(d.percent))),
            abort,
        })
    }

    /// How long to hold this request, if it is one of the delayed ones.
    pub(crate) fn delay(&self, rng: &Rng) -> Option<Duration> {
        self.delay.filter(|(_, c)| c.draw(rng)).map(|(d, _)| d)
    }

    /// The status to answer with instead of forwarding, if this request is one of the aborted.
    pub(crate) fn abort(&self, rng: &Rng) -> Option<StatusCode> {
        self.abort.filter(|(_, c)| c.draw(rng)).map(|(s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_hold_within_a_binomial_bound() {
        let rng = Rng::new();
        assert!(!(0..1000).any(|_| Chance::percent(0.0).draw(&rng)));
        assert!((0..1000).all(|_| Chance::percent(100.0).draw(&rng)));
        // 100,000 draws at 10 %: sd = sqrt(n p (1-p)) ~ 95; 5 sd = 475.
        let n = 100_000;
        let hits = (0..n).filter(|_| Chance::percent(10.0).draw(&rng)).count();
        assert!((10_000usize.abs_diff(hits)) < 475, "{hits}");
    }

    #[test]
    fn fault_compiles_delay_and_abort() {
        let f = FaultAction::compile(
            &serde_norway::from_str(
                "{delay: {duration: 5ms, percent: 100}, abort: {status: 503, percent: 0}}",
            )
            .unwrap(),
        )
        .unwrap();
        let rng = Rng::new();
        assert_eq!(f.delay(&rng), Some(Duration::from_millis(5)));
        assert_eq!(f.abort(&rng), None);
    }
}
