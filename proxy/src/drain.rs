//! Graceful shutdown.
//!
//! A [`Trigger`] signals every [`Watcher`] that draining started, then waits until all watchers
//! are dropped. Each listener and each connection holds a watcher, so "all dropped" means "every
//! in-flight request finished". The trigger's wait is bounded by the caller (grace period).

use std::time::Duration;

use tokio::sync::{mpsc, watch};

/// Create a linked trigger and watcher.
pub fn channel() -> (Trigger, Watcher) {
    let (signal_tx, signal_rx) = watch::channel(false);
    let (release_tx, release_rx) = mpsc::channel(1);
    (
        Trigger {
            signal_tx,
            release_rx,
        },
        Watcher {
            signal_rx,
            _release: release_tx,
        },
    )
}

pub struct Trigger {
    signal_tx: watch::Sender<bool>,
    release_rx: mpsc::Receiver<()>,
}

/// Held by anything that must finish before shutdown completes.
#[derive(Clone)]
pub struct Watcher {
    signal_rx: watch::Receiver<bool>,
    _release: mpsc::Sender<()>,
}

// === impl Trigger ===

impl Trigger {
    /// Signal drain, then wait up to `grace` for every watcher to be dropped.
    /// Returns `true` if everything finished in time.
    pub async fn drain(mut self, grace: Duration) -> bool {
        let _ = self.signal_tx.send(true);
        // `recv` returns `None` once every sender (one per watcher) is gone.
        tokio::time::timeout(grace, async {
            while self.release_rx.recv().await.is_some() {}
        })
        .await
        .is_ok()
    }
}

// === impl Watcher ===

impl Watcher {
    /// Resolves once draining has started (never, if the trigger is dropped without draining).
    pub async fn signaled(&self) {
        let mut rx = self.signal_rx.clone();
        if rx.wait_for(|draining| *draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub fn is_draining(&self) -> bool {
        *self.signal_rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_watchers_then_completes() {
        let (trigger, watcher) = channel();
        let held = watcher.clone();
        let task = tokio::spawn(async move {
            held.signaled().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            drop(held);
        });
        drop(watcher);
        assert!(trigger.drain(Duration::from_secs(5)).await);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_after_grace() {
        let (trigger, watcher) = channel();
        let _stuck = watcher;
        assert!(!trigger.drain(Duration::from_secs(1)).await);
    }
}
