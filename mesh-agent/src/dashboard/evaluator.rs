//! The loop of the dashboard that may evaluate alert rules: campaign for the evaluator key each
//! round under its own lease, and while holding it, evaluate, save and notify (see
//! [`super::alerts`] for why one evaluator and what survives a failover).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use super::alerts::{self, AlertState, Notify};
use super::model::Model;
use super::DashboardConfig;
use crate::etcd::keys::Keys;
use crate::etcd::{Etcd, EtcdError};

type Http = Client<HttpConnector, Full<Bytes>>;

/// One dashboard's evaluator side.
struct Evaluator {
    keys: Keys,
    me: String,
    notify: Notify,
    http: Http,
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
pub async fn run(cfg: DashboardConfig, model: Arc<Mutex<Model>>, port: u16) {
    let me = format!("{}-{}-{port}", crate::run::hostname(), std::process::id());
    let mut ev = Evaluator {
        keys: Keys::new(&cfg.etcd.prefix),
        me,
        notify: cfg.notify.clone(),
        http: Client::builder(TokioExecutor::new()).build_http(),
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
                self.webhook(&next).await;
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
        if !outgoing.is_empty() {
            self.alertmanagers(&serde_json::Value::Array(outgoing))
                .await;
        }
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

    async fn alertmanagers(&self, alerts: &serde_json::Value) {
        for base in &self.notify.alertmanagers {
            let url = format!("{}/api/v2/alerts", base.trim_end_matches('/'));
            self.post(&url, alerts).await;
        }
    }

    async fn webhook(&self, s: &AlertState) {
        if let Some(url) = &self.notify.webhook {
            let body = serde_json::json!({
                "status": if s.state == "firing" { "firing" } else { "resolved" },
                "alert": s,
            });
            self.post(url, &body).await;
        }
    }

    /// POST `body` as JSON; a failure is logged, never retried past the next round (firing
    /// alerts are sent again every round anyway).
    async fn post(&self, url: &str, body: &serde_json::Value) {
        let req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        let Ok(req) = req else {
            tracing::warn!(%url, "alert destination is not a valid URL");
            return;
        };
        match tokio::time::timeout(Duration::from_secs(5), self.http.request(req)).await {
            Ok(Ok(r)) if r.status().is_success() => {}
            Ok(Ok(r)) => tracing::warn!(%url, status = %r.status(), "alert destination refused"),
            Ok(Err(e)) => tracing::warn!(%url, error = %e, "alert destination unreachable"),
            Err(_) => tracing::warn!(%url, "alert destination timed out"),
        }
    }
}
