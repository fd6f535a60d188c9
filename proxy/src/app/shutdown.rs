//! Shutdown: on request, run the hooks (deregistration, so that peers stop sending), then
//! drain the inbound side before the outbound one (the app keeps calling out while its
//! callers go), each within what remains of the grace period.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::drain;
use crate::readiness::Ready;
use crate::telemetry::trace::Tracing;

/// Runs when shutdown is requested, before draining starts (e.g. deregistration, so that peers
/// stop sending before the listeners close).
pub type BeforeDrain = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// Asks a running sidecar to drain and stop. Cheap to clone.
#[derive(Clone)]
pub struct ShutdownHandle(pub(super) Arc<watch::Sender<bool>>);

/// What a shutdown drains, flushes and stops.
pub(super) struct Shutdown {
    pub requested: watch::Receiver<bool>,
    pub ready: Ready,
    pub hooks: Vec<BeforeDrain>,
    pub grace: Duration,
    pub inbound: drain::Trigger,
    pub outbound: drain::Trigger,
    pub admin: drain::Trigger,
    pub tracing: Arc<Tracing>,
    /// Background tasks that end with the sidecar.
    pub tasks: Vec<JoinHandle<()>>,
}

// === impl ShutdownHandle ===

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

// === impl Shutdown ===

impl Shutdown {
    /// Wait for the request, then shut down; the task ends when the sidecar has drained.
    pub fn spawn(self) -> JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(mut self) {
        let _ = self.requested.wait_for(|stop| *stop).await;
        let _not_ready = self.ready.block("draining");
        let start = Instant::now();
        let grace = self.grace;
        for hook in self.hooks {
            if tokio::time::timeout(grace, hook()).await.is_err() {
                tracing::warn!("shutdown hook did not finish within the grace period");
            }
        }
        tracing::info!(grace = ?grace, "draining: inbound stops accepting, outbound keeps serving the app");
        let inbound_done = self
            .inbound
            .drain(grace.saturating_sub(start.elapsed()))
            .await;
        let outbound_done = self
            .outbound
            .drain(grace.saturating_sub(start.elapsed()))
            .await;
        if inbound_done && outbound_done {
            tracing::info!(elapsed = ?start.elapsed(), "drained");
        } else {
            tracing::warn!(grace = ?grace, "grace period ended with requests still in flight");
        }
        // Spans of the last requests go out before the process exits.
        self.tracing.flush(Duration::from_secs(2)).await;
        for task in self.tasks {
            task.abort();
        }
        drop(self.admin);
    }
}
