//! On-demand discovery: how the data plane learns a service it has not been told about.
//!
//! A sidecar that holds the whole mesh pays for every instance of every service, called or not
//! (Istio sidecars reached 400-500 MB at 2,000 pods). Scoped stores send the data plane only the
//! services it calls; the first request to any other name asks the store through [`Discover`]
//! and waits for the answer (one range read in etcd: a few milliseconds, for that request only).
//! The data plane still never calls the store itself: the store's agent does, off the request
//! path of every other request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::state::target::{Target, TargetTable};

/// The longest a request waits for the store to answer about an unknown service. The store's
/// agent answers promptly itself when it knows the store is unreachable; this bounds the rest.
pub const DISCOVER_WAIT: Duration = Duration::from_secs(5);

/// The store's answer about a service name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Discovered {
    /// The service exists and a snapshot holding it has been sent to the data plane.
    Found,
    /// No such service in the store.
    Missing,
    /// The store cannot be asked now; the cause, for the `trellis-error` response.
    Unavailable(String),
}

pub type DiscoverFuture = Pin<Box<dyn Future<Output = Discovered> + Send>>;

/// Asks the store about a service. Implementations must answer promptly when the store is
/// unreachable (never hang a request), coalesce concurrent asks for the same name, and bound
/// what a flood of made-up names can cost (a negative cache, a bounded queue).
pub trait Discover: Send + Sync + 'static {
    fn discover(&self, service: &str) -> DiscoverFuture;
}

/// What the outbound side needs to learn a service and then route with it.
#[derive(Clone)]
pub struct OnDemand {
    store: Arc<dyn Discover>,
    /// Versions of the applied snapshots: a `Found` answer means a snapshot with the service was
    /// sent; the request waits until the data plane has applied it.
    applied: watch::Receiver<u64>,
}

// === impl OnDemand ===

impl OnDemand {
    pub fn new(store: Arc<dyn Discover>, applied: watch::Receiver<u64>) -> Self {
        Self { store, applied }
    }

    /// Learn `service` and return its route from the table that holds it. `Ok(None)`: the
    /// store has no such service. `Err(cause)`: the store could not be asked.
    pub async fn learn(
        &self,
        service: &str,
        table: &arc_swap::ArcSwap<TargetTable>,
    ) -> Result<Option<Arc<Target>>, String> {
        let lower;
        let service = if service.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = service.to_ascii_lowercase();
            lower.as_str()
        } else {
            service
        };
        if trellis_policies::validate_service_name(service).is_err() {
            return Ok(None);
        }
        let deadline = Instant::now() + DISCOVER_WAIT;
        let answer = tokio::time::timeout(DISCOVER_WAIT, self.store.discover(service))
            .await
            .unwrap_or_else(|_| {
                Discovered::Unavailable(format!(
                    "the store did not answer within {DISCOVER_WAIT:?}"
                ))
            });
        match answer {
            Discovered::Found => {}
            Discovered::Missing => return Ok(None),
            Discovered::Unavailable(cause) => return Err(cause),
        }
        let mut applied = self.applied.clone();
        loop {
            if let Some(route) = table.load().route(service) {
                return Ok(Some(route.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, applied.changed()).await {
                Ok(Ok(())) => continue,
                // The snapshot was replaced before this request saw it (the service went
                // away again), or the data plane is shutting down.
                Ok(Err(_)) | Err(_) => return Ok(None),
            }
        }
    }
}
