//! The loop of the dashboard that may evaluate alert rules: campaign for the evaluator key each
//! round under its own lease, and while holding it, evaluate, save and notify (see
//! [`super::alerts`] for why one evaluator and what survives a failover).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::alerts::{self, AlertState};
use super::model::Model;
use super::notify::Notifier;
use super::DashboardConfig;
use crate::etcd::keys::Keys;
use crate::etcd::{Etcd, EtcdError};

/// One dashboard's evaluator side.
struct Evaluator {
    keys: Keys,
    me: String,
    notifier: Arc<Notifier>,
    /// How long a firing alert sent to Alertmanager stays valid without being sent again.
    valid_for: Duration,
    lease: Option<Lease>,
}

struct Lease {
    id: i64,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

/// Evaluate while holding the lease; `port` (the bound one) tells dashboards of one host apart.
pub async fn run(
    cfg: DashboardConfig,
    notifier: Arc<Notifier>,
    model: Arc<Mutex<Model>>,
    port: u16,
) {
    let me = format!("{}-{}-{port}", crate::run::hostname(), std::process::id());
    let mut ev = Evaluator {
        keys: Keys::new(&cfg.etcd.prefix),
        me,
        notifier,
        valid_for: (cfg.interval * 4).max(Duration::from_secs(60)),
        lease: None,
    };
    let mut conn = super::Connection::default();
    let mut every = super::ticker(cfg.interval);
    loop {
        every.tick().await;
        let Some(client) = conn.get(&cfg.etcd).await else {
            ev.lease = None;
            continue;
        };
        match ev.round(client, &model, cfg.evaluator_ttl).await {
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(error = %e, "alert evaluation round failed");
                ev.lease = None;
            }
        }
    }
}

// === impl Evaluator ===

impl Evaluator {
    async fn round(
        &mut self,
        etcd: &Etcd,
        model: &Arc<Mutex<Model>>,
        ttl: Duration,
    ) -> Result<(), EtcdError> {
        let lease = self.keep_lease(etcd, ttl).await?;
        if !alerts::campaign(etcd, &self.keys, &self.me, lease).await? {
            return Ok(());
        }
        let rules = alerts::rules(etcd, &self.keys).await?;
        let mut states = alerts::states(etcd, &self.keys).await?;
        let now = trellis_proxy::telemetry::route_metrics::unix_ms();
        let mut outgoing = Vec::new();
        // Webhook bodies, sent after every rule is evaluated and saved: a slow or failing
        // destination must not hold back the evaluation of the other rules.
        let mut changes = Vec::new();
        for (name, spec) in &rules {
            let prev = states.remove(name).unwrap_or_else(|| AlertState {
                rule: name.clone(),
                service: spec.service.clone(),
                state: "inactive".into(),
                ..Default::default()
            });
            let (value, holds) = match model.lock() {
                Ok(m) => alerts::evaluate(spec, &m, now),
                Err(_) => continue,
            };
            let mut next = alerts::step(&prev, spec, holds, now);
            next.value = value;
            next.service = spec.service.clone();
            next.labels = spec.labels.clone();
            next.annotations = spec.annotations.clone();
            next.evaluator = self.me.clone();
            let changed = next.state != prev.state || next.active_since_ms != prev.active_since_ms;
            if changed || next.evaluator != prev.evaluator {
                alerts::save(etcd, &self.keys, &next).await?;
            }
            if changed && (next.state == "firing" || prev.state == "firing") {
                tracing::warn!(rule = %name, service = %spec.service, state = %next.state, value = ?value, "alert");
                changes.push(webhook_body(&next));
            }
            if next.state == "firing" || (prev.state == "firing" && changed) {
                outgoing.push(alerts::alertmanager_alert(&next, now, self.valid_for));
            }
        }
        // Rules deleted while firing end now.
        for (rule, mut gone) in states {
            if gone.state == "firing" {
                gone.state = "inactive".into();
                gone.resolved_at_ms = Some(now);
                outgoing.push(alerts::alertmanager_alert(&gone, now, self.valid_for));
            }
            let mut client = etcd.client.clone();
            etcd.call(client.delete(self.keys.alert_state(&rule), None))
                .await?;
        }
        self.deliver(changes, outgoing).await;
        Ok(())
    }

    /// This dashboard's lease, granted once and kept alive every round.
    async fn keep_lease(&mut self, etcd: &Etcd, ttl: Duration) -> Result<i64, EtcdError> {
        if let Some(l) = self.lease.as_mut() {
            let alive = etcd.call(l.keeper.keep_alive()).await.is_ok()
                && matches!(etcd.call(l.stream.message()).await, Ok(Some(r)) if r.ttl() > 0);
            if alive {
                return Ok(l.id);
            }
            self.lease = None;
        }
        let mut client = etcd.client.clone();
        let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(10);
        let id = etcd.call(client.lease_grant(secs, None)).await?.id();
        let (keeper, stream) = etcd.call(client.lease_keep_alive(id)).await?;
        self.lease = Some(Lease { id, keeper, stream });
        Ok(id)
    }

    /// Send this round's notifications, every destination at once, each within its own
    /// deadline. A failure (refused connection, TLS handshake, status, timeout) is logged by
    /// the notifier; Alertmanager gets its firing alerts again next round, as ever.
    async fn deliver(&self, changes: Vec<serde_json::Value>, outgoing: Vec<serde_json::Value>) {
        let n = &self.notifier;
        let any = !outgoing.is_empty();
        let alerts = serde_json::Value::Array(outgoing);
        let mut sends = Vec::new();
        if let Some(hook) = &n.webhook {
            sends.extend(changes.iter().map(|body| n.deliver(hook, body)));
        }
        if any {
            sends.extend(n.alertmanagers.iter().map(|am| n.deliver(am, &alerts)));
        }
        futures_util::future::join_all(sends).await;
    }
}

/// The webhook's object for a change between firing and not.
fn webhook_body(s: &AlertState) -> serde_json::Value {
    serde_json::json!({
        "status": if s.state == "firing" { "firing" } else { "resolved" },
        "alert": s,
    })
}
