//! A sidecar that can crash: it runs on its own tokio runtime in its own thread, and
//! [`CrashableSidecar::crash`] drops that runtime, so its sockets close and its tasks vanish
//! without any shutdown step (no lease revoke, no deregistration), as with `kill -9`.

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use mesh_agent::config::AgentConfig;
use trellis_proxy::app::Bound;

pub struct CrashableSidecar {
    pub bound: Bound,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

// === impl CrashableSidecar ===

impl CrashableSidecar {
    /// Start `mesh_agent::run::start(cfg)` on a fresh runtime; panics if it does not start
    /// within 20 s.
    pub fn start(cfg: AgentConfig) -> Self {
        let (bound_tx, bound_rx) = mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let running = mesh_agent::run::start(cfg)
                    .await
                    .expect("crashable sidecar starts");
                let _ = bound_tx.send(running.bound);
                let _ = stop_rx.await;
                // Leak the handle's shutdown path: dropping the runtime below kills it all.
                std::mem::forget(running);
            });
            rt.shutdown_background();
        });
        let bound = bound_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("crashable sidecar bound its listeners");
        Self {
            bound,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stop abruptly: every task and socket of this sidecar is dropped at once.
    pub fn crash(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CrashableSidecar {
    fn drop(&mut self) {
        self.crash();
    }
}
