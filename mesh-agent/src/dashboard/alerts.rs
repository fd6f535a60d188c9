//! Alert rules (`AlertRule` policies), evaluated by exactly one dashboard of the fleet.
//!
//! Dashboards campaign for `<prefix>/v1/alerts/evaluator` with a lease: the holder evaluates
//! every rule each interval against its model, keeps each rule's state (pending, firing,
//! resolved) in etcd under `<prefix>/v1/alerts/state/<rule>`, and notifies Alertmanager's v2
//! API and a generic JSON webhook. When the holder dies its lease expires, another dashboard
//! takes the key, reads the states and goes on: a firing alert stays firing (and keeps being
//! sent), a pending one keeps the time it started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use trellis_policies::{AlertRuleSpec, AlertSignal, Policy, PolicyDocument};

use super::model::Model;
use crate::etcd::keys::Keys;
use crate::etcd::{Etcd, EtcdError};

/// The multi-window burn-rate pairs (long window, short window, burn factor) of the SRE
/// workbook: 2 % of a 30-day budget in 1 h, 5 % in 6 h.
const BURN_PAIRS: [(u64, u64, f64); 2] =
    [(3_600_000, 300_000, 14.4), (6 * 3_600_000, 1_800_000, 6.0)];

/// Where alerts go, and the TLS settings of `https://` destinations (checked at startup by
/// [`super::notify::Notifier::new`]).
#[derive(Clone, Debug, Default)]
pub struct Notify {
    /// Alertmanager base URLs (`http://host:9093`, `https://am.internal`); alerts are posted
    /// to `/api/v2/alerts`.
    pub alertmanagers: Vec<String>,
    /// A URL receiving one JSON object per state change.
    pub webhook: Option<String>,
    /// PEM bundle that https destinations' certificates must chain to, instead of the
    /// compiled-in public roots (a private CA, or the system's bundle file).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to https destinations (mTLS); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
}

/// One rule's state, as kept in etcd.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    pub rule: String,
    pub service: String,
    /// `inactive`, `pending` or `firing`.
    pub state: String,
    /// When the condition started to hold (pending and firing).
    pub active_since_ms: Option<u64>,
    pub fired_at_ms: Option<u64>,
    pub resolved_at_ms: Option<u64>,
    pub value: Option<f64>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Which dashboard last evaluated it.
    pub evaluator: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// The value of `spec`'s signal now, and whether the rule's condition holds. `None`: nothing
/// to judge by (no traffic in the window, say), which does not fire.
pub fn evaluate(spec: &AlertRuleSpec, m: &Model, now: u64) -> (Option<f64>, bool) {
    let window = u64::try_from(spec.window.as_millis()).unwrap_or(u64::MAX);
    let stats = || {
        m.services
            .get(&spec.service)
            .map(|s| Model::stats(s, now, window))
            .unwrap_or_default()
    };
    let value = match spec.signal {
        AlertSignal::ErrorRatio => stats().error_ratio,
        AlertSignal::P99LatencyMs => stats().p99_ms,
        AlertSignal::Availability => m.availability(&spec.service, now, window).ratio,
        AlertSignal::InstancesUp => Some(m.instances_up(&spec.service) as f64),
        AlertSignal::RateLimitRejections => Some(stats().limited_rps),
        AlertSignal::Ejections => Some(m.ejected(&spec.service)),
        AlertSignal::BurnRate => return burn_rate(spec, m, now),
    };
    let holds = value
        .is_some_and(|v| spec.above.is_some_and(|a| v > a) || spec.below.is_some_and(|b| v < b));
    (value, holds)
}

/// The highest burn factor of the pairs; fires when both windows of a pair burn faster than it
/// allows.
fn burn_rate(spec: &AlertRuleSpec, m: &Model, now: u64) -> (Option<f64>, bool) {
    let budget = 1.0 - spec.objective.unwrap_or(0.999);
    let burn = |w| {
        m.minute_error_ratio(&spec.service, now, w)
            .map(|r| r / budget)
    };
    let mut worst: Option<f64> = None;
    let mut holds = false;
    for (long, short, factor) in BURN_PAIRS {
        let (l, s) = (burn(long), burn(short));
        if let (Some(l), Some(s)) = (l, s) {
            holds |= l > factor && s > factor;
            worst = Some(worst.map_or(l.min(s), |w: f64| w.max(l.min(s))));
        }
    }
    (worst, holds)
}

/// The next state of a rule whose condition `holds` (or not) at `now`; whether it changed
/// between firing and not.
pub fn step(prev: &AlertState, spec: &AlertRuleSpec, holds: bool, now: u64) -> AlertState {
    let mut next = prev.clone();
    let for_ms = u64::try_from(spec.for_.as_millis()).unwrap_or(u64::MAX);
    if holds {
        let since = prev
            .active_since_ms
            .filter(|_| prev.state != "inactive")
            .unwrap_or(now);
        next.active_since_ms = Some(since);
        if now.saturating_sub(since) >= for_ms {
            if prev.state != "firing" {
                next.fired_at_ms = Some(now);
            }
            next.state = "firing".into();
        } else {
            next.state = "pending".into();
        }
    } else {
        if prev.state == "firing" {
            next.resolved_at_ms = Some(now);
        }
        next.state = "inactive".into();
        next.active_since_ms = None;
    }
    next
}

/// The alert rules in etcd, valid ones only (an invalid one was refused by `policy apply`;
/// one written around it is logged and skipped).
pub async fn rules(etcd: &Etcd, keys: &Keys) -> Result<Vec<(String, AlertRuleSpec)>, EtcdError> {
    let mut client = etcd.client.clone();
    let prefix = format!("{}AlertRule/", keys.policies());
    let resp = etcd
        .call(client.get(prefix, Some(GetOptions::new().with_prefix())))
        .await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let parsed = serde_json::from_slice::<PolicyDocument>(kv.value())
            .map_err(|e| e.to_string())
            .and_then(|d| d.validate().map_err(|e| e.to_string()));
        match parsed {
            Ok(Policy::AlertRule { name, spec }) => out.push((name, spec)),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "alert rule skipped")
            }
        }
    }
    Ok(out)
}

/// Every rule's state in etcd.
pub async fn states(etcd: &Etcd, keys: &Keys) -> Result<BTreeMap<String, AlertState>, EtcdError> {
    let mut client = etcd.client.clone();
    let resp = etcd
        .call(client.get(keys.alert_states(), Some(GetOptions::new().with_prefix())))
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<AlertState>(kv.value()).ok())
        .map(|s| (s.rule.clone(), s))
        .collect())
}

/// Campaign: take the evaluator key under `lease` if nobody holds it (or we already do).
pub async fn campaign(etcd: &Etcd, keys: &Keys, me: &str, lease: i64) -> Result<bool, EtcdError> {
    let mut client = etcd.client.clone();
    let key = keys.alert_evaluator();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key.clone(),
            me,
            Some(PutOptions::new().with_lease(lease)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let resp = etcd.call(client.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(true);
    }
    let holder = resp.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    Ok(holder.as_deref() == Some(me.as_bytes()))
}

/// Write a rule's state.
pub async fn save(etcd: &Etcd, keys: &Keys, s: &AlertState) -> Result<(), EtcdError> {
    let mut client = etcd.client.clone();
    let value = serde_json::to_vec(s).unwrap_or_default();
    etcd.call(client.put(keys.alert_state(&s.rule), value, None))
        .await?;
    Ok(())
}

/// `mesh-agent alerts list`: the rules with their state.
pub async fn list(cfg: &crate::config::EtcdConfig) -> Result<String, AlertError> {
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let rules = rules(&etcd, &keys).await?;
    let states = states(&etcd, &keys).await?;
    let mut out = format!(
        "{:<24} {:<16} {:<22} {:<9} {:>12}  {}\n",
        "RULE", "SERVICE", "SIGNAL", "STATE", "VALUE", "SINCE"
    );
    for (name, spec) in &rules {
        let s = states.get(name);
        let state = s.map_or("inactive", |s| s.state.as_str());
        let value = s
            .and_then(|s| s.value)
            .map_or("-".to_string(), |v| format!("{v:.4}"));
        let since = s
            .and_then(|s| s.active_since_ms)
            .map_or("-".to_string(), rfc3339);
        let signal = serde_json::to_value(spec.signal)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        out.push_str(&format!(
            "{name:<24} {:<16} {signal:<22} {state:<9} {value:>12}  {since}\n",
            spec.service
        ));
    }
    Ok(out)
}

/// The Alertmanager v2 alert for a state: firing ones valid for `valid_for` (re-sent every
/// round, as Prometheus does), resolved ones ending now.
pub fn alertmanager_alert(s: &AlertState, now: u64, valid_for: Duration) -> serde_json::Value {
    let mut labels = s.labels.clone();
    labels.insert("alertname".into(), s.rule.clone());
    labels.insert("service".into(), s.service.clone());
    let ends = if s.state == "firing" {
        now + u64::try_from(valid_for.as_millis()).unwrap_or(0)
    } else {
        s.resolved_at_ms.unwrap_or(now)
    };
    let mut annotations = s.annotations.clone();
    if let Some(v) = s.value {
        annotations.insert("value".into(), format!("{v}"));
    }
    serde_json::json!({
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(s.fired_at_ms.unwrap_or(now)),
        "endsAt": rfc3339(ends),
    })
}

/// Unix ms as RFC 3339 UTC (what Alertmanager's API takes).
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(for_s: u64) -> AlertRuleSpec {
        serde_json::from_value(serde_json::json!({
            "service": "orders", "signal": "error_ratio", "above": 0.05, "for": format!("{for_s}s")
        }))
        .expect("spec")
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let s = spec(10);
        let st = step(&AlertState::default(), &s, true, 1_000);
        assert_eq!(
            (st.state.as_str(), st.active_since_ms),
            ("pending", Some(1_000))
        );
        let st = step(&st, &s, true, 5_000);
        assert_eq!(st.state, "pending");
        let st = step(&st, &s, true, 11_000);
        assert_eq!(
            (st.state.as_str(), st.fired_at_ms),
            ("firing", Some(11_000))
        );
        let st = step(&st, &s, true, 20_000);
        assert_eq!(st.fired_at_ms, Some(11_000), "still the same firing");
        let st = step(&st, &s, false, 21_000);
        assert_eq!(
            (st.state.as_str(), st.resolved_at_ms),
            ("inactive", Some(21_000))
        );
        // A pending alert that stops holding never fired.
        let st = step(&step(&AlertState::default(), &s, true, 0), &s, false, 1);
        assert_eq!((st.state.as_str(), st.fired_at_ms), ("inactive", None));
        assert!(rfc3339(0).starts_with("1970-01-01T00:00:00"));
    }
}
