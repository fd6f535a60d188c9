//! `AlertRule`: a threshold on what the dashboard sees of one service, held for a `for`
//! duration, or an availability objective with multi-window burn-rate alerts. Sidecars ignore
//! these documents; exactly one dashboard of the fleet evaluates them.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::validate_service_name;

/// The longest window a rule may use: what a dashboard keeps (24 h of minutes).
pub const MAX_ALERT_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What a rule watches, per service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertSignal {
    /// Share of requests answered 5xx over `window`.
    ErrorRatio,
    /// p99 latency over `window`, in milliseconds.
    P99LatencyMs,
    /// Share of minutes up over `window` (see the dashboard's availability).
    Availability,
    /// Instances that answered the last read.
    InstancesUp,
    /// Requests refused by rate limits over `window`, per second.
    RateLimitRejections,
    /// Endpoints ejected by the service's callers now.
    Ejections,
    /// Error budget burn against `objective`, with the standard multi-window pairs (14.4x over
    /// 1 h and 5 min, 6x over 6 h and 30 min); `above`, `below` and `window` are not used.
    BurnRate,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRuleSpec {
    pub service: String,
    pub signal: AlertSignal,
    /// Fires when the value is above this (or below `below`): exactly one of them, except for
    /// `burn_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    #[serde(default = "d_window", with = "humantime_serde")]
    pub window: Duration,
    /// How long the condition must hold before the alert fires.
    #[serde(rename = "for", default, with = "humantime_serde")]
    pub for_: Duration,
    /// For `burn_rate`: the availability objective, e.g. 0.999.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<f64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

fn d_window() -> Duration {
    Duration::from_secs(300)
}

// === impl AlertRuleSpec ===

impl AlertRuleSpec {
    pub fn validate(&self) -> Result<(), String> {
        validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        let finite = |v: Option<f64>, f: &str| match v {
            Some(x) if !x.is_finite() => Err(format!("{f}: {x} is not a number")),
            _ => Ok(()),
        };
        finite(self.above, "above")?;
        finite(self.below, "below")?;
        if self.signal == AlertSignal::BurnRate {
            match self.objective {
                Some(o) if o > 0.0 && o < 1.0 => {}
                _ => {
                    return Err(
                        "objective: burn_rate needs an objective between 0 and 1, e.g. 0.999"
                            .into(),
                    )
                }
            }
        } else if self.above.is_some() == self.below.is_some() {
            return Err("above / below: exactly one threshold".into());
        }
        if self.window < Duration::from_secs(1) || self.window > MAX_ALERT_WINDOW {
            return Err("window: between 1s and 24h".into());
        }
        if self.for_ > MAX_ALERT_WINDOW {
            return Err("for: at most 24h".into());
        }
        for (k, _) in self.labels.iter().chain(&self.annotations) {
            let ok = !k.is_empty()
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !k.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(format!(
                    "labels / annotations: `{k}` is not a label name ([a-zA-Z_][a-zA-Z0-9_]*)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Result<AlertRuleSpec, String> {
        let spec: AlertRuleSpec = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        spec.validate().map(|_| spec)
    }

    #[test]
    fn thresholds_objectives_and_names_are_checked() {
        let ok = rule(
            "service: orders\nsignal: error_ratio\nabove: 0.05\nfor: 2m\nlabels: {severity: page}",
        )
        .expect("valid");
        assert_eq!(ok.for_, Duration::from_secs(120));
        assert_eq!(ok.window, Duration::from_secs(300));
        for (bad, why) in [
            (
                "service: orders\nsignal: error_ratio",
                "exactly one threshold",
            ),
            (
                "service: orders\nsignal: error_ratio\nabove: 1\nbelow: 2",
                "exactly one threshold",
            ),
            ("service: orders\nsignal: burn_rate", "objective"),
            (
                "service: orders\nsignal: burn_rate\nobjective: 1.5",
                "objective",
            ),
            (
                "service: orders\nsignal: p99_latency_ms\nabove: 5\nwindow: 48h",
                "window",
            ),
            (
                "service: orders\nsignal: instances_up\nbelow: 2\nlabels: {a-b: x}",
                "label name",
            ),
            ("service: Orders\nsignal: instances_up\nbelow: 2", "service"),
            ("service: orders\nsignal: nope\nbelow: 2", "unknown variant"),
        ] {
            let e = rule(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
