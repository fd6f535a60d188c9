//! `mesh-agent run`: one sidecar, configured from a file, fed by the file store, stopped by
//! SIGTERM/SIGINT or `POST /shutdown`.

use std::sync::Arc;

use tokio::sync::watch;
use trellis_proxy::app::{Proxy, Running, StartError};
use trellis_proxy::config::Config;
use trellis_proxy::snapshot::Snapshot;

use crate::store::FileStore;

/// Build and start a sidecar for `config`, with its store.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let (tx, rx) = watch::channel(None);
    match &config.store.file {
        Some(path) => {
            let mut proxy = Proxy::new(config.clone(), rx);
            let fs = FileStore::new(
                path.clone(),
                config.trust_domain.clone(),
                config.store.reload_interval,
                proxy.registry_mut(),
            );
            let status = fs.status();
            proxy.dump_section(
                "store",
                Arc::new(move || {
                    let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    serde_json::to_value(s).unwrap_or_default()
                }),
            );
            let running = proxy.start().await?;
            tokio::spawn(fs.run(tx));
            Ok(running)
        }
        None => {
            tracing::warn!("no store configured: the outbound side has no services to route to");
            tx.send_replace(Some(Arc::new(Snapshot {
                source: "none".into(),
                ..Default::default()
            })));
            // Keep the sender alive for the sidecar's lifetime: dropping it is harmless (the
            // last snapshot stays) but would log a warning.
            let running = Proxy::new(config, rx).start().await?;
            std::mem::forget(tx);
            Ok(running)
        }
    }
}

/// Run until a signal or `/shutdown`, then drain.
pub async fn run(config: Config) -> Result<(), StartError> {
    let running = start(config).await?;
    tracing::info!(
        inbound = %running.bound.inbound,
        outbound = %running.bound.outbound,
        admin = %running.bound.admin,
        "sidecar started"
    );
    let handle = running.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        handle.shutdown();
    });
    running.wait().await;
    Ok(())
}

/// SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the sidecar");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
