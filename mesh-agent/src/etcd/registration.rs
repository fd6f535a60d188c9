//! Registration: this instance's record under its own lease, kept alive, revoked first on
//! shutdown so peers stop sending before the listeners close. The same lease carries the
//! status key with the revision this sidecar has applied (how `mesh-agent status` shows
//! convergence) and the rate-limit demand report.
//!
//! Only the keepalive keeps a registration alive, so only etcd saying the lease is gone
//! (a keepalive answered with TTL 0) makes this sidecar register again under a new lease. A
//! member dying, a leader election, a refused write (etcd out of space) or a broken stream
//! ends the *connection*: the same lease is kept alive through another member, and its keys
//! stay as they are. Status and demand writes are reports: a failed one is logged, counted
//! and retried on its own, and never touches the registration.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::EtcdConfig;
use etcd_client::PutOptions;
use serde::Serialize;
use tokio::sync::watch;
use trellis_policies::Registration;

use super::keys::Keys;
use super::{backoff, Etcd, EtcdError};

/// Status writes wait this long so that a burst of changes costs etcd one write.
const STATUS_DEBOUNCE: Duration = Duration::from_millis(25);
/// A keepalive not answered within this long (after the next one was due) means the member
/// is gone or paused: move to another one while the lease still has most of its TTL left.
const MAX_ACK_WAIT: Duration = Duration::from_secs(2);
/// Failed report writes are retried this often.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// What a sidecar writes under its status key.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct InstanceStatus {
    pub service: String,
    pub instance: String,
    pub applied_revision: i64,
    pub updated_at_unix: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RegistrationStatus {
    pub key: String,
    pub registered: bool,
    pub lease_id: Option<i64>,
    /// Leases granted: 1 unless etcd reported a lease gone.
    pub registrations: u64,
    /// Connections to etcd after the first (failovers between members).
    pub reconnects: u64,
    /// The member in use.
    pub endpoint: Option<String>,
    pub last_error: Option<String>,
    /// Status and demand writes that failed (each is retried).
    pub write_failures: u64,
    pub last_write_error: Option<String>,
    /// etcd refuses writes for lack of space (its NOSPACE alarm).
    pub no_space: bool,
}

/// The registrar's metrics.
#[derive(Clone, Default)]
pub struct RegistrationMetrics {
    write_failures: prometheus_client::metrics::family::Family<KindLabels, Counter>,
    leases: Counter,
    reconnects: Counter,
    no_space: prometheus_client::metrics::gauge::Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

impl RegistrationMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "etcd_write_failures",
            "Writes to etcd that failed and will be retried, by kind (registration, status, demand); none ends a registration",
            m.write_failures.clone(),
        );
        registry.register(
            "etcd_lease_grants",
            "Leases granted to this instance's registration: 1, plus one each time etcd reported the lease gone",
            m.leases.clone(),
        );
        registry.register(
            "etcd_reconnects",
            "Connections to another etcd member after a failure (the lease is kept)",
            m.reconnects.clone(),
        );
        registry.register(
            "etcd_no_space",
            "1 while etcd refuses writes for lack of space (NOSPACE alarm): registrations and traffic continue, reports wait",
            m.no_space.clone(),
        );
        m
    }
}

use prometheus_client::metrics::counter::Counter;

/// Stops the registrar: revoke the lease, then return.
pub struct RegistrationHandle {
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    pub status: Arc<Mutex<RegistrationStatus>>,
}

impl RegistrationHandle {
    /// Revoke the lease (bounded by the etcd timeout) so peers stop routing here.
    pub async fn deregister(self) {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.done).await;
    }

    /// Stop as a crash would: no revoke, the lease expires after its TTL (for benchmarks).
    #[cfg(feature = "testing")]
    pub fn abandon(self) {
        self.done.abort();
    }
}

struct Registrar {
    cfg: EtcdConfig,
    conn: super::Connector,
    keys: Keys,
    record: Registration,
    app_health: Option<(std::net::SocketAddr, String)>,
    applied: watch::Receiver<i64>,
    /// Rate-limit demand to publish under the lease (empty: nothing to publish).
    demand: watch::Receiver<Vec<u8>>,
    stop: watch::Receiver<bool>,
    status: Arc<Mutex<RegistrationStatus>>,
    metrics: RegistrationMetrics,
    ready: Option<trellis_proxy::readiness::Ready>,
    /// The lease in use, kept across connections until etcd says it is gone.
    lease: Option<i64>,
    /// Reports not yet written under the current lease.
    status_due: bool,
    demand_due: bool,
    sessions: u64,
}

/// Why a session ended.
enum End {
    Stopped,
    /// etcd says the lease no longer exists: register again under a new one.
    LeaseGone,
    /// The connection failed: keep the lease, reconnect (to another member first).
    Failed(EtcdError),
}

/// Start registering `record`; `applied` carries the data plane's applied revision and
/// `demand` the rate-limit demand report, both written under the instance's lease.
pub fn spawn(
    conn: impl Into<super::Connector>,
    record: Registration,
    app_health: Option<(std::net::SocketAddr, String)>,
    applied: watch::Receiver<i64>,
    demand: watch::Receiver<Vec<u8>>,
    metrics: RegistrationMetrics,
    ready: Option<trellis_proxy::readiness::Ready>,
) -> RegistrationHandle {
    let conn = conn.into();
    let cfg = conn.cfg().clone();
    let keys = Keys::new(&cfg.prefix);
    let status = Arc::new(Mutex::new(RegistrationStatus {
        key: keys.instance(&record.service, &record.instance),
        ..Default::default()
    }));
    let (stop_tx, stop) = watch::channel(false);
    let r = Registrar {
        cfg,
        conn,
        keys,
        record,
        app_health,
        applied,
        demand,
        stop,
        status: status.clone(),
        metrics,
        ready,
        lease: None,
        status_due: true,
        demand_due: true,
        sessions: 0,
    };
    let done = tokio::spawn(r.run());
    RegistrationHandle {
        stop: stop_tx,
        done,
        status,
    }
}

// === impl Registrar ===

impl Registrar {
    async fn run(mut self) {
        if let Some((app, path)) = self.app_health.clone() {
            if !self.wait_app_healthy(app, &path).await {
                return;
            }
        }
        let mut attempt = 0;
        loop {
            let start = Instant::now();
            match self.session().await {
                End::Stopped => return,
                End::LeaseGone => {
                    tracing::warn!(
                        key = self
                            .status
                            .lock()
                            .map(|s| s.key.clone())
                            .unwrap_or_default(),
                        "etcd reports the registration lease gone; registering again"
                    );
                    self.lease = None;
                    self.set(|s| {
                        s.registered = false;
                        s.lease_id = None;
                    });
                    // Nothing is wrong with the connection: register again at once.
                    continue;
                }
                End::Failed(e) => {
                    tracing::warn!(error = %e, lease = self.lease, "etcd connection for the registration failed; keeping the lease and reconnecting");
                    self.set(|s| s.last_error = Some(e.to_string()));
                }
            }
            if start.elapsed() > Duration::from_secs(10) {
                attempt = 0;
            }
            // The first retry goes to another member at once: failover, not backoff.
            let pause = if attempt == 0 {
                Duration::ZERO
            } else {
                backoff(attempt - 1)
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopped(&mut self.stop) => {
                    self.revoke_after_stop().await;
                    return;
                }
            }
            attempt += 1;
        }
    }

    /// One connection to a member: take up the lease (or grant one), make sure the record is
    /// there, then keep the lease alive and write reports until something ends it.
    async fn session(&mut self) -> End {
        let etcd = match self.conn.connect().await {
            Ok(e) => e,
            Err(e) => return End::Failed(e),
        };
        self.sessions += 1;
        if self.sessions > 1 {
            self.metrics.reconnects.inc();
        }
        let endpoint = etcd.endpoint().to_string();
        self.set(|s| {
            s.reconnects = self.sessions.saturating_sub(1);
            s.endpoint = Some(endpoint);
        });
        let mut client = etcd.client.clone();
        let ttl = self.cfg.lease_ttl;
        // Opening the keepalive stream sends one keepalive and reads its answer: that tells
        // whether the lease outlived the failover.
        let opened = match self.lease {
            Some(lease) => etcd.call(client.lease_keep_alive(lease)).await,
            None => self.grant(&etcd).await,
        };
        let (mut keeper, mut responses) = match opened {
            Ok(k) => k,
            Err(e) if is_lease_gone(&e) => return End::LeaseGone,
            Err(e) => return End::Failed(e),
        };
        let Some(lease) = self.lease else {
            return End::LeaseGone;
        };
        if let Err(e) = self.ensure_record(&etcd, lease).await {
            if e.is_no_space() {
                // Our record is kept by the lease unless it was never written; count and retry.
                self.write_failed("registration", &e);
            } else {
                return End::Failed(e);
            }
        }
        self.set(|s| {
            s.registered = true;
            s.lease_id = Some(lease);
            s.last_error = None;
        });

        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A keepalive goes out every TTL/3 whether or not the previous one was answered, and
        // the member counts as gone when nothing was acknowledged for TTL/3 + the ack wait.
        // Talking to a member, that is one unanswered keepalive (each is answered at once).
        // etcd's gRPC proxy (`etcd grpc-proxy`) does not answer each request: it keeps the
        // lease alive on its own schedule (every TTL/3, checked every 500 ms) and answers the
        // requests outstanding when its own keepalive is answered, up to TTL/3 + 0.5 s later.
        // Waiting for each request's own answer failed over, and lost leases, constantly.
        let silence_limit = ttl / 3 + (ttl / 3).min(MAX_ACK_WAIT);
        let mut last_ack = Instant::now();
        // Reports go out with the registration; one that fails is retried from the loop.
        let mut retry_at = (!self.write_reports(&etcd, lease).await)
            .then(|| tokio::time::Instant::now() + WRITE_RETRY);
        let (mut applied, mut stop) = (self.applied.clone(), self.stop.clone());
        let mut demand = self.demand.clone();
        loop {
            let ack_deadline = tokio::time::Instant::from_std(last_ack + silence_limit);
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        return End::Failed(etcd.err(e));
                    }
                }
                _ = tokio::time::sleep_until(ack_deadline) => {
                    etcd.mark_failed();
                    return End::Failed(EtcdError::Timeout {
                        endpoints: etcd.endpoint().to_string(),
                        timeout: silence_limit,
                    });
                }
                msg = responses.message() => {
                    match msg {
                        Ok(Some(r)) if r.ttl() > 0 => last_ack = Instant::now(),
                        Ok(Some(_)) => return End::LeaseGone,
                        Ok(None) => {
                            etcd.mark_failed();
                            return End::Failed(etcd.err(etcd_client::Error::LeaseKeepAliveError("keepalive stream ended".into())));
                        }
                        Err(e) => return End::Failed(etcd.err(e)),
                    }
                }
                changed = applied.changed() => {
                    if changed.is_ok() {
                        // Coalesce bursts of changes into one write.
                        tokio::time::sleep(STATUS_DEBOUNCE).await;
                        self.status_due = true;
                        retry_at = Some(tokio::time::Instant::now());
                    }
                }
                changed = demand.changed() => {
                    if changed.is_ok() {
                        self.demand_due = true;
                        retry_at = Some(tokio::time::Instant::now());
                    }
                }
                _ = sleep_until_opt(retry_at) => {
                    retry_at = None;
                    if !self.write_reports(&etcd, lease).await {
                        retry_at = Some(tokio::time::Instant::now() + WRITE_RETRY);
                    }
                }
                _ = stopped(&mut stop) => {
                    self.deregister(&etcd, lease).await;
                    return End::Stopped;
                }
            }
        }
    }

    /// Grant a lease and start keeping it alive; the record and reports are (re)written.
    async fn grant(
        &mut self,
        etcd: &Etcd,
    ) -> Result<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), EtcdError> {
        let mut client = etcd.client.clone();
        let ttl = self.cfg.lease_ttl.as_secs() as i64;
        let lease = etcd.call(client.lease_grant(ttl, None)).await?.id();
        self.lease = Some(lease);
        self.status_due = true;
        self.demand_due = true;
        self.metrics.leases.inc();
        self.set(|s| s.registrations += 1);
        let key = self
            .keys
            .instance(&self.record.service, &self.record.instance);
        tracing::info!(key, lease, ttl, "registering in etcd under a new lease");
        etcd.call(client.lease_keep_alive(lease)).await
    }

    /// Write the record under `lease` unless etcd already holds exactly it (a failover with
    /// the lease intact writes nothing, so peers see no change).
    async fn ensure_record(&self, etcd: &Etcd, lease: i64) -> Result<(), EtcdError> {
        let key = self
            .keys
            .instance(&self.record.service, &self.record.instance);
        let value = serde_json::to_vec(&self.record).unwrap_or_default();
        let mut client = etcd.client.clone();
        let current = etcd.call(client.get(key.as_str(), None)).await?;
        if current
            .kvs()
            .first()
            .is_some_and(|kv| kv.lease() == lease && kv.value() == value.as_slice())
        {
            return Ok(());
        }
        etcd.call(client.put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        tracing::info!(key, lease, "registered in etcd");
        Ok(())
    }

    /// Write the reports that are due; `false` if one failed (it stays due).
    async fn write_reports(&mut self, etcd: &Etcd, lease: i64) -> bool {
        let mut ok = true;
        if self.status_due {
            match self.put_status(etcd, lease).await {
                Ok(()) => self.status_due = false,
                Err(e) => {
                    self.write_failed("status", &e);
                    ok = false;
                }
            }
        }
        if self.demand_due {
            match self.put_demand(etcd, lease).await {
                Ok(()) => self.demand_due = false,
                Err(e) => {
                    self.write_failed("demand", &e);
                    ok = false;
                }
            }
        }
        if ok {
            self.no_space(false);
        }
        ok
    }

    fn write_failed(&self, kind: &'static str, e: &EtcdError) {
        self.metrics
            .write_failures
            .get_or_create(&KindLabels { kind })
            .inc();
        let first = self
            .status
            .lock()
            .map(|s| s.last_write_error.is_none())
            .unwrap_or(true);
        if first {
            tracing::warn!(kind, error = %e, "etcd write failed; the registration stays, the write is retried");
        } else {
            tracing::debug!(kind, error = %e, "etcd write failed again");
        }
        self.set(|s| {
            s.write_failures += 1;
            s.last_write_error = Some(e.to_string());
        });
        if e.is_no_space() {
            self.no_space(true);
        }
    }

    /// Report etcd's NOSPACE alarm (or its end): metric, log, `/ready` note, `/config_dump`.
    fn no_space(&self, on: bool) {
        let was = self.status.lock().map(|s| s.no_space).unwrap_or(false);
        if was == on {
            if !on {
                self.set(|s| s.last_write_error = None);
            }
            return;
        }
        self.metrics.no_space.set(i64::from(on));
        self.set(|s| {
            s.no_space = on;
            if !on {
                s.last_write_error = None;
            }
        });
        let note = on.then(|| "etcd is out of space (NOSPACE alarm): registration and traffic continue, status reports wait; compact, defragment and `etcdctl alarm disarm` (docs/etcd.md)".to_string());
        if let Some(r) = &self.ready {
            r.set_note("etcd", note);
        }
        if on {
            tracing::error!("etcd refuses writes: out of space (NOSPACE alarm); this sidecar keeps its registration and serves; free space with compaction + defragmentation, then `etcdctl alarm disarm`");
        } else {
            tracing::info!("etcd accepts writes again");
        }
    }

    /// Graceful stop: mark the record draining (peers drop it at once instead of keeping it
    /// as a vanished registration), then revoke the lease.
    async fn deregister(&mut self, etcd: &Etcd, lease: i64) {
        let key = self
            .keys
            .instance(&self.record.service, &self.record.instance);
        let mut draining = self.record.clone();
        draining.draining = true;
        let value = serde_json::to_vec(&draining).unwrap_or_default();
        let mut client = etcd.client.clone();
        if let Err(e) = etcd
            .call(client.put(
                key.as_str(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ))
            .await
        {
            tracing::debug!(error = %e, "could not mark the registration draining");
        }
        match etcd.call(client.lease_revoke(lease)).await {
            Ok(_) => tracing::info!(key, "deregistered: lease revoked"),
            Err(e) => {
                tracing::warn!(error = %e, "could not revoke the lease; it expires within its TTL")
            }
        }
        self.lease = None;
        self.set(|s| s.registered = false);
    }

    /// Stopped while between connections: one last try to revoke the lease.
    async fn revoke_after_stop(&mut self) {
        let Some(lease) = self.lease else {
            return;
        };
        if let Ok(etcd) = self.conn.connect().await {
            self.deregister(&etcd, lease).await;
        }
    }

    async fn put_status(&self, etcd: &Etcd, lease: i64) -> Result<(), EtcdError> {
        let status = InstanceStatus {
            service: self.record.service.clone(),
            instance: self.record.instance.clone(),
            applied_revision: *self.applied.borrow(),
            updated_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let key = self
            .keys
            .status(&self.record.service, &self.record.instance);
        let mut client = etcd.client.clone();
        let value = serde_json::to_vec(&status).unwrap_or_default();
        etcd.call(client.put(key, value, Some(PutOptions::new().with_lease(lease))))
            .await?;
        Ok(())
    }

    /// Publish the latest demand report, if there is one.
    async fn put_demand(&self, etcd: &Etcd, lease: i64) -> Result<(), EtcdError> {
        let value = self.demand.borrow().clone();
        if value.is_empty() {
            return Ok(());
        }
        let key = self
            .keys
            .demand(&self.record.service, &self.record.instance);
        let mut client = etcd.client.clone();
        etcd.call(client.put(key, value, Some(PutOptions::new().with_lease(lease))))
            .await?;
        Ok(())
    }

    /// Poll `GET http://<app><path>` until it answers 2xx; `false` if stopped meanwhile.
    async fn wait_app_healthy(&mut self, app: std::net::SocketAddr, path: &str) -> bool {
        use http_body_util::Empty;
        use hyper_util::client::legacy::Client;
        let client: Client<_, Empty<bytes::Bytes>> =
            Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let uri = format!("http://{app}{path}");
        let mut logged = false;
        loop {
            if let Ok(req) = http::Request::get(uri.as_str()).body(Empty::new()) {
                if let Ok(Ok(resp)) =
                    tokio::time::timeout(Duration::from_secs(2), client.request(req)).await
                {
                    if resp.status().is_success() {
                        tracing::info!(uri, "app is healthy; registering");
                        return true;
                    }
                }
            }
            if !logged {
                tracing::info!(
                    uri,
                    "waiting for the app to become healthy before registering"
                );
                logged = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stopped(&mut self.stop) => return false,
            }
        }
    }

    fn set(&self, f: impl FnOnce(&mut RegistrationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// etcd-client's answer to a keepalive for a lease etcd no longer has.
fn is_lease_gone(e: &EtcdError) -> bool {
    matches!(e, EtcdError::Call { source: etcd_client::Error::LeaseKeepAliveError(m), .. } if m.contains("lease not found"))
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Resolves once `rx` says stop (the `Ref` guard `wait_for` returns must not live across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The revision each instance last applied, by (service, instance), from the status keys;
/// values that do not parse are skipped.
pub async fn applied_revisions(
    etcd: &Etcd,
    keys: &Keys,
) -> Result<std::collections::BTreeMap<(String, String), i64>, EtcdError> {
    let mut client = etcd.client.clone();
    let statuses = etcd
        .call(client.get(
            keys.statuses(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        ))
        .await?;
    Ok(statuses
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<InstanceStatus>(kv.value()).ok())
        .map(|s| ((s.service, s.instance), s.applied_revision))
        .collect())
}
