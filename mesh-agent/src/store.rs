//! The file store: standalone mode's source of mesh state. A YAML [`MeshDocument`] file is
//! polled, validated and turned into snapshots for the data plane. An invalid edit is logged,
//! counted and shown in `/config_dump`, and the last good snapshot keeps serving.
//!
//! [`MeshDocument`]: trellis_policies::MeshDocument

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use trellis_policies::MeshDocument;
use trellis_proxy::state::snapshot::Snapshot;

use crate::dns::Dns;

pub type SnapshotTx = watch::Sender<Option<Arc<Snapshot>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpdateLabels {
    source: &'static str,
    result: &'static str,
}

/// What `/config_dump` shows about the store.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStatus {
    pub kind: &'static str,
    pub path: PathBuf,
    /// Version of the snapshot in use; 0 before the first valid file.
    pub version: u64,
    pub applied_at_unix: Option<u64>,
    /// The newest rejected version of the file, if it is newer than the applied one.
    pub rejected: Option<Rejected>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Rejected {
    pub at_unix: u64,
    pub error: String,
}

pub struct FileStore {
    path: PathBuf,
    trust_domain: String,
    interval: Duration,
    status: Arc<Mutex<StoreStatus>>,
    updates: Family<UpdateLabels, Counter>,
    dns: Arc<Dns>,
}

// === impl FileStore ===

impl FileStore {
    /// Create the store and register its metrics.
    pub fn new(
        path: PathBuf,
        trust_domain: String,
        interval: Duration,
        dns: Arc<Dns>,
        registry: &mut Registry,
    ) -> Self {
        let updates = Family::<UpdateLabels, Counter>::default();
        registry.register(
            "store_updates",
            "Mesh state updates received from the store, by result (applied, rejected)",
            updates.clone(),
        );
        let status = StoreStatus {
            kind: "file",
            path: path.clone(),
            ..Default::default()
        };
        Self {
            path,
            trust_domain,
            interval,
            status: Arc::new(Mutex::new(status)),
            updates,
            dns,
        }
    }

    /// A shared view of the status for `/config_dump`.
    pub fn status(&self) -> Arc<Mutex<StoreStatus>> {
        self.status.clone()
    }

    /// Poll the file and publish every valid new version; re-resolve host names when their
    /// records expire. Runs until `tx` has no receivers.
    pub async fn run(self, tx: SnapshotTx) {
        let mut last: Option<Result<Vec<u8>, String>> = None;
        let mut doc: Option<MeshDocument> = None;
        let mut resolved: Option<MeshDocument> = None;
        let mut version = 0u64;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            let current = tokio::fs::read(&self.path).await.map_err(|e| e.to_string());
            if last.as_ref() != Some(&current) {
                last = Some(current.clone());
                let parsed = current
                    .map_err(|e| format!("cannot read {}: {e}", self.path.display()))
                    .and_then(|bytes| {
                        String::from_utf8(bytes).map_err(|_| "file is not UTF-8".to_string())
                    })
                    .and_then(|text| {
                        trellis_policies::parse_mesh_yaml(&text).map_err(|e| e.to_string())
                    });
                match parsed {
                    Ok(d) => doc = Some(d),
                    Err(error) => {
                        self.reject(error, version);
                        continue;
                    }
                }
            } else if self
                .dns
                .next_refresh()
                .is_none_or(|t| t > std::time::Instant::now())
            {
                continue;
            }
            let Some(d) = &doc else { continue };
            let r = self.dns.resolve(d).await;
            if version > 0 && resolved.as_ref() == Some(&r) && self.lock().rejected.is_none() {
                continue;
            }
            let source = format!("file:{}", self.path.display());
            match Snapshot::from_document(&r, &self.trust_domain, version + 1, source) {
                Ok(snapshot) => {
                    version += 1;
                    {
                        let mut status = self.lock();
                        status.version = version;
                        status.applied_at_unix = Some(unix_now());
                        status.rejected = None;
                    }
                    self.count("applied");
                    tracing::info!(path = %self.path.display(), version, "mesh file applied");
                    tx.send_replace(Some(Arc::new(snapshot)));
                    resolved = Some(r);
                }
                Err(error) => self.reject(error, version),
            }
        }
    }

    fn reject(&self, error: String, serving_version: u64) {
        self.count("rejected");
        tracing::error!(path = %self.path.display(), %error, serving_version, "mesh file rejected; keeping the last good version");
        self.lock().rejected = Some(Rejected {
            at_unix: unix_now(),
            error,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StoreStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, result: &'static str) {
        self.updates
            .get_or_create(&UpdateLabels {
                source: "file",
                result,
            })
            .inc();
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
