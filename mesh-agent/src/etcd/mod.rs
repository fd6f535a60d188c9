//! Coordination through etcd: registration under leases, one watch per sidecar over the mesh
//! prefix, validated policies, and the fail-static cache. Nothing here is on the request path:
//! the data plane only receives snapshots.

pub mod cache;
pub mod discovery;
mod freshness;
pub mod keys;
pub mod ratelimit;
pub mod registration;
pub mod state;

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use trellis_proxy::config::EtcdConfig;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The call failed; the message names every endpoint that was tried.
    #[error("etcd at {endpoints}: {source}")]
    Call {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints}: no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        timeout: Duration,
    },
    #[error("etcd TLS: cannot read {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
}

/// A connected client plus what is needed to name it in errors.
#[derive(Clone)]
pub struct Etcd {
    pub client: Client,
    endpoints: String,
    timeout: Duration,
}

// === impl Etcd ===

impl Etcd {
    /// Create a client. etcd-client connects lazily, so this succeeds without a server; the
    /// first call reports an unreachable cluster.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, EtcdError> {
        let endpoints = cfg.endpoints.join(", ");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.timeout)
            .with_timeout(cfg.timeout)
            .with_keep_alive(Duration::from_secs(5), cfg.timeout);
        if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if cfg.ca.is_some() || cfg.cert.is_some() {
            let read = |p: &std::path::PathBuf| {
                std::fs::read(p).map_err(|source| EtcdError::TlsFile {
                    path: p.display().to_string(),
                    source,
                })
            };
            let mut tls = TlsOptions::new();
            if let Some(ca) = &cfg.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        let client = tokio::time::timeout(cfg.timeout, Client::connect(&cfg.endpoints, Some(opts)))
            .await
            .map_err(|_| EtcdError::Timeout {
                endpoints: endpoints.clone(),
                timeout: cfg.timeout,
            })?
            .map_err(|source| EtcdError::Call {
                endpoints: endpoints.clone(),
                source,
            })?;
        Ok(Self {
            client,
            endpoints,
            timeout: cfg.timeout,
        })
    }

    /// Name the endpoints in an error from a call.
    pub fn err(&self, source: etcd_client::Error) -> EtcdError {
        EtcdError::Call {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// Run one call with the configured timeout.
    pub async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.endpoints.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

/// Exponential backoff from 100 ms to 5 s with +-25 % jitter, so sidecars that lost etcd at the
/// same moment do not come back in lockstep.
/// An idle watch is probed this often with a progress request...
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// ...and declared dead when nothing arrives for this long. (The Rust client does not fail
/// over: a watch served by a dying member just goes quiet.)
pub const WATCH_SILENCE_LIMIT: Duration = Duration::from_secs(6);

/// Keeps a watch honest: `tick` fires every [`PROGRESS_EVERY`]; `check` then asks etcd for a
/// progress notification when the watch has been idle, or fails it after
/// [`WATCH_SILENCE_LIMIT`] of silence. Call `heard` on every message.
pub struct WatchLiveness {
    probe: tokio::time::Interval,
    last_heard: std::time::Instant,
}

// === impl WatchLiveness ===

impl WatchLiveness {
    pub fn new() -> Self {
        let mut probe = tokio::time::interval(PROGRESS_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            probe,
            last_heard: std::time::Instant::now(),
        }
    }

    pub async fn tick(&mut self) {
        self.probe.tick().await;
    }

    pub fn heard(&mut self) {
        self.last_heard = std::time::Instant::now();
    }

    pub async fn check(
        &self,
        etcd: &Etcd,
        stream: &mut etcd_client::WatchStream,
    ) -> Result<(), EtcdError> {
        let silent = self.last_heard.elapsed();
        if silent > WATCH_SILENCE_LIMIT {
            return Err(EtcdError::Timeout {
                endpoints: etcd.endpoints.clone(),
                timeout: WATCH_SILENCE_LIMIT,
            });
        }
        if silent >= PROGRESS_EVERY {
            stream.request_progress().await.map_err(|e| etcd.err(e))?;
        }
        Ok(())
    }
}

impl Default for WatchLiveness {
    fn default() -> Self {
        Self::new()
    }
}

pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let jitter = (nanos % (base / 2 + 1)) as i64 - (base / 4) as i64;
    Duration::from_millis((base as i64 + jitter).max(10) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(0) <= Duration::from_millis(125));
        for a in 0..20 {
            let b = backoff(a);
            assert!(
                b >= Duration::from_millis(10) && b <= Duration::from_millis(6250),
                "{a}: {b:?}"
            );
        }
        assert!(backoff(10) >= Duration::from_millis(3750));
    }
}
