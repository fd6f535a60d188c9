//! Registration: this instance's record under its own lease, kept alive, re-created after the
//! lease is lost, revoked first on shutdown so peers stop sending before the listeners close.
//! The same lease carries the status key with the revision this sidecar has applied, which is
//! how `mesh-agent status` shows convergence.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::PutOptions;
use serde::Serialize;
use tokio::sync::watch;
use trellis_policies::Registration;
use trellis_proxy::config::EtcdConfig;

use super::keys::Keys;
use super::{backoff, Etcd, EtcdError};

/// Status writes wait this long so that a burst of changes costs etcd one write.
const STATUS_DEBOUNCE: Duration = Duration::from_millis(100);

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
    pub registrations: u64,
    pub last_error: Option<String>,
}

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
    keys: Keys,
    record: Registration,
    app_health: Option<(std::net::SocketAddr, String)>,
    applied: watch::Receiver<i64>,
    /// Rate-limit demand to publish under the lease (empty: nothing to publish).
    demand: watch::Receiver<Vec<u8>>,
    stop: watch::Receiver<bool>,
    status: Arc<Mutex<RegistrationStatus>>,
}

/// Start registering `record`; `applied` carries the data plane's applied revision and
/// `demand` the rate-limit demand report, both written under the instance's lease.
pub fn spawn(
    cfg: EtcdConfig,
    record: Registration,
    app_health: Option<(std::net::SocketAddr, String)>,
    applied: watch::Receiver<i64>,
    demand: watch::Receiver<Vec<u8>>,
) -> RegistrationHandle {
    let keys = Keys::new(&cfg.prefix);
    let status = Arc::new(Mutex::new(RegistrationStatus {
        key: keys.instance(&record.service, &record.instance),
        ..Default::default()
    }));
    let (stop_tx, stop) = watch::channel(false);
    let r = Registrar {
        cfg,
        keys,
        record,
        app_health,
        applied,
        demand,
        stop,
        status: status.clone(),
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
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "registration in etcd failed; retrying");
                    self.set(|s| {
                        s.registered = false;
                        s.lease_id = None;
                        s.last_error = Some(e.to_string());
                    });
                }
            }
            if start.elapsed() > Duration::from_secs(10) {
                attempt = 0;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt)) => {}
                _ = stopped(&mut self.stop) => return,
            }
            attempt += 1;
        }
    }

    /// Register under a new lease and keep it alive. `Ok` means stopped and deregistered.
    async fn session(&mut self) -> Result<(), EtcdError> {
        let etcd = Etcd::connect(&self.cfg).await?;
        let mut client = etcd.client.clone();
        let ttl = self.cfg.lease_ttl.as_secs() as i64;
        let lease = etcd.call(client.lease_grant(ttl, None)).await?.id();
        let key = self
            .keys
            .instance(&self.record.service, &self.record.instance);
        let value = serde_json::to_vec(&self.record).unwrap_or_default();
        etcd.call(client.put(
            key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        ))
        .await?;
        self.put_status(&etcd, lease).await?;
        self.put_demand(&etcd, lease).await?;
        let (mut keeper, mut responses) = etcd.call(client.lease_keep_alive(lease)).await?;
        tracing::info!(key, lease, ttl, "registered in etcd");
        self.set(|s| {
            s.registered = true;
            s.lease_id = Some(lease);
            s.registrations += 1;
            s.last_error = None;
        });

        let mut tick = tokio::time::interval(self.cfg.lease_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ack = Instant::now();
        let (mut applied, mut stop) = (self.applied.clone(), self.stop.clone());
        let mut demand = self.demand.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if last_ack.elapsed() > self.cfg.lease_ttl {
                        return Err(EtcdError::Timeout { endpoints: self.cfg.endpoints.join(", "), timeout: self.cfg.lease_ttl });
                    }
                    keeper.keep_alive().await.map_err(|e| etcd.err(e))?;
                }
                msg = responses.message() => {
                    match msg.map_err(|e| etcd.err(e))? {
                        Some(r) if r.ttl() > 0 => last_ack = Instant::now(),
                        _ => {
                            tracing::warn!(lease, "registration lease lost; registering again");
                            return Err(etcd.err(etcd_client::Error::LeaseKeepAliveError("lease expired".into())));
                        }
                    }
                }
                changed = applied.changed() => {
                                        if changed.is_ok() {
                        // Coalesce bursts of changes into one write.
                        tokio::time::sleep(STATUS_DEBOUNCE).await;
                        self.put_status(&etcd, lease).await?;
                    }
                }
                                changed = demand.changed() => {
                    if changed.is_ok() {
                        self.put_demand(&etcd, lease).await?;
                    }
                }
                _ = stopped(&mut stop) => {
                    match etcd.call(client.lease_revoke(lease)).await {
                        Ok(_) => tracing::info!(key, "deregistered: lease revoked"),
                        Err(e) => tracing::warn!(error = %e, "could not revoke the lease; it expires within its TTL"),
                    }
                    self.set(|s| s.registered = false);
                    return Ok(());
                }
            }
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

/// Resolves once `rx` says stop (the `Ref` guard `wait_for` returns must not live across awaits).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
