//! The data plane's way to ask discovery about a service it does not hold (see
//! `trellis_proxy::state::discover`): a bounded queue into the discovery task, answered promptly when
//! etcd is known to be unreachable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use trellis_proxy::state::discover::{Discover, DiscoverFuture, Discovered};

/// Asks waiting for the discovery task at most; beyond it a request is answered 503 at once
/// rather than queued behind a flood of made-up names.
pub const MAX_QUEUED: usize = 256;

/// One question: a service name and where to send the answer.
pub type Ask = (String, oneshot::Sender<Discovered>);

/// Whether etcd is reachable, as the discovery task last saw it.
#[derive(Default)]
pub struct Link {
    down: AtomicBool,
    cause: Mutex<String>,
}

// === impl Link ===

impl Link {
    pub fn up(&self) {
        self.down.store(false, Ordering::Release);
    }

    pub fn down(&self, cause: &str) {
        *self.cause.lock().unwrap_or_else(|p| p.into_inner()) = cause.to_string();
        self.down.store(true, Ordering::Release);
    }

    /// The reason etcd cannot be asked now, if it cannot.
    fn unreachable(&self) -> Option<String> {
        self.down
            .load(Ordering::Acquire)
            .then(|| self.cause.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The handle the data plane holds.
pub struct OnDemandStore {
    asks: mpsc::Sender<Ask>,
    link: Arc<Link>,
}

// === impl OnDemandStore ===

impl OnDemandStore {
    pub fn new(asks: mpsc::Sender<Ask>, link: Arc<Link>) -> Self {
        Self { asks, link }
    }
}

impl Discover for OnDemandStore {
    fn discover(&self, service: &str) -> DiscoverFuture {
        if let Some(cause) = self.link.unreachable() {
            let answer = Discovered::Unavailable(format!(
                "etcd is unreachable and `{service}` is not in the state this sidecar holds ({cause})"
            ));
            return Box::pin(std::future::ready(answer));
        }
        let (tx, rx) = oneshot::channel();
        if self.asks.try_send((service.to_string(), tx)).is_err() {
            let answer = Discovered::Unavailable(format!(
                "too many unknown services being looked up at once ({MAX_QUEUED} queued)"
            ));
            return Box::pin(std::future::ready(answer));
        }
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Discovered::Unavailable("discovery stopped before answering".into())
            })
        })
    }
}
