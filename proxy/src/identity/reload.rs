//! Hot reload of the identity files.
//!
//! The files are polled (default every second) and compared by content. Polling three small
//! files is cheap, and unlike inotify it also sees Kubernetes' atomic symlink swaps of Secret
//! volumes. A new version is fully validated before it replaces the current one; an invalid
//! version is logged once, counted, and the last good identity keeps serving.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use trellis_policies::SpiffeId;

use super::tls::{IdentityFiles, TlsContext};
use crate::telemetry::metrics::{Metrics, ResultLabels};

/// The current identity, shared by listeners and the connection pool.
pub type IdentityStore = Arc<ArcSwap<TlsContext>>;

/// Poll the files every `interval` and swap in each valid new version.
pub fn spawn_reloader(
    store: IdentityStore,
    files: IdentityFiles,
    expected: SpiffeId,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_seen = read_all(&files).await;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let current = read_all(&files).await;
            if current == last_seen {
                continue;
            }
            last_seen = current;
            let Some((cert, key, bundle)) = &last_seen else {
                tracing::error!(cert = %files.cert.display(), "identity files unreadable; keeping the current certificate");
                metrics
                    .cert_reloads
                    .get_or_create(&ResultLabels { result: "error" })
                    .inc();
                continue;
            };
            let generation = store.load().generation() + 1;
            match TlsContext::from_pem(cert, key, bundle, &files, &expected, generation) {
                Ok(ctx) => {
                    metrics.cert_expiry.set(ctx.not_after());
                    metrics
                        .cert_reloads
                        .get_or_create(&ResultLabels { result: "ok" })
                        .inc();
                    tracing::info!(identity = %ctx.identity(), generation, not_after = ctx.not_after(), "certificate reloaded");
                    store.store(Arc::new(ctx));
                }
                Err(e) => {
                    metrics
                        .cert_reloads
                        .get_or_create(&ResultLabels { result: "error" })
                        .inc();
                    tracing::error!(error = %e, "rejected new certificate files; keeping the current certificate");
                }
            }
        }
    })
}

type Contents = Option<(Vec<u8>, Vec<u8>, Vec<u8>)>;

async fn read_all(files: &IdentityFiles) -> Contents {
    let cert = tokio::fs::read(&files.cert).await.ok()?;
    let key = tokio::fs::read(&files.key).await.ok()?;
    let bundle = tokio::fs::read(&files.bundle).await.ok()?;
    Some((cert, key, bundle))
}
