//! The fail-static cache's writer: one thread that persists the newest mesh state, coalesces
//! the states that arrive during a write, and tries a failed write again until it lands or a
//! newer state replaces it.
//!
//! Why it retries: the cache is written after a change. If the disk is full (or the directory
//! read-only, or gone) at that moment and nothing changes afterwards, the file would keep the
//! state before the change, or none, for as long as the mesh stays quiet; a restart while etcd
//! is unreachable would then start from that older state, with nothing but one old log line to
//! say so. Retrying with a backoff closes that window once the disk has room again, and the
//! metrics ([`CacheMetrics`]) and `/config_dump` say while it is open.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::cache::Cache;

/// The first wait before a failed write is tried again; it doubles at each failure in a row.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failing write.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the idle writer checks whether discovery is gone (it ends then).
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A revision and the raw values to persist at it.
pub type CacheState = (i64, Vec<(String, Arc<[u8]>)>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// What the writer reports: every write by result, whether the newest state is on disk, and
/// the revision that is.
#[derive(Clone, Default)]
pub struct CacheMetrics {
    writes: Family<ResultLabels, Counter>,
    failing: Gauge,
    revision: Gauge,
}

// === impl CacheMetrics ===

impl CacheMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "etcd_cache_writes",
            "Writes of the fail-static cache file, by result (ok, error)",
            m.writes.clone(),
        );
        registry.register(
            "etcd_cache_write_failing",
            "1 while the newest mesh state is not in the cache file because writing it failed (retried with a backoff)",
            m.failing.clone(),
        );
        registry.register(
            "etcd_cache_revision",
            "etcd revision of the mesh state in the cache file, as this process last wrote or read it (0: neither)",
            m.revision.clone(),
        );
        m
    }

    fn written(&self, revision: i64) {
        self.writes
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
        self.failing.set(0);
        self.revision.set(revision);
    }

    /// The sidecar started from the cache file, at `revision`.
    pub fn loaded(&self, revision: i64) {
        self.revision.set(revision);
    }

    fn failed(&self) {
        self.writes
            .get_or_create(&ResultLabels { result: "error" })
            .inc();
        self.failing.set(1);
    }
}

/// The newest state to persist, handed from discovery to the writer thread (a newer one
/// replaces one not written yet). Discovery holds one handle, the writer the other: the
/// writer ends once it is the only holder.
#[derive(Default)]
pub struct CacheSlot {
    next: Mutex<Option<CacheState>>,
    ready: Condvar,
}

/// What the writer does next.
enum Next {
    Write(CacheState),
    /// The wait before trying the failed state again has passed, with no newer state.
    Retry,
    /// Discovery is gone.
    Stop,
}

// === impl CacheSlot ===

impl CacheSlot {
    /// Hand the newest state to the writer.
    pub fn submit(&self, state: CacheState) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        *next = Some(state);
        self.ready.notify_one();
    }

    /// Wait for a state to write, or for `retry_in` to pass (when a failed state waits).
    fn wait(self: &Arc<Self>, retry_in: Option<Duration>) -> Next {
        let deadline = retry_in.map(|d| Instant::now() + d);
        let mut guard = self.next.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(state) = guard.take() {
                return Next::Write(state);
            }
            if Arc::strong_count(self) == 1 {
                return Next::Stop;
            }
            let mut wait = IDLE_CHECK;
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Next::Retry;
                }
                wait = wait.min(left);
            }
            guard = self
                .ready
                .wait_timeout(guard, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// Persist the newest state, one write at a time, on one thread of its own: write + fsync +
/// rename must not stall the async runtime, and one thread (rather than the blocking pool's
/// many) keeps the allocator from holding a peak-sized arena per thread that ever wrote a
/// large mesh. `report` is told each write's error, and `None` when one lands after a failure
/// (for `/config_dump`). The thread ends once discovery is gone.
pub fn spawn(
    cache: Cache,
    slot: Arc<CacheSlot>,
    metrics: CacheMetrics,
    report: impl Fn(Option<String>) + Send + 'static,
) {
    let run = move || {
        let mut writer = Writer {
            cache,
            metrics,
            report: Box::new(report),
            failing: false,
            pending: None,
            backoff: RETRY_FIRST,
        };
        loop {
            let state = match slot.wait(writer.pending.as_ref().map(|p| p.1)) {
                // A newer state replaces a failed one: only the newest is worth writing.
                Next::Write(state) => state,
                Next::Retry => match writer.pending.take() {
                    Some((state, _)) => state,
                    None => continue,
                },
                Next::Stop => return,
            };
            writer.write(state);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("trellis-cache".into())
        .spawn(run)
    {
        tracing::error!(error = %e, "cannot start the fail-static cache writer: the cache is not written");
    }
}

/// The writer thread's state.
struct Writer {
    cache: Cache,
    metrics: CacheMetrics,
    report: Box<dyn Fn(Option<String>) + Send>,
    /// Whether the last write failed.
    failing: bool,
    /// A state whose write failed, and how long to wait before trying it again.
    pending: Option<(CacheState, Duration)>,
    /// The wait after the next failure.
    backoff: Duration,
}

// === impl Writer ===

impl Writer {
    fn write(&mut self, state: CacheState) {
        self.pending = None;
        let (revision, entries) = &state;
        let saved = self
            .cache
            .save(*revision, entries.iter().map(|(k, v)| (k.as_str(), &v[..])));
        match saved {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    (self.report)(None);
                    tracing::info!(revision, cache = %self.cache.path().display(), "the fail-static cache is written again");
                }
                self.metrics.written(*revision);
                self.backoff = RETRY_FIRST;
            }
            Err(e) => {
                let retry_in = self.backoff;
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                self.metrics.failed();
                self.failing = true;
                (self.report)(Some(e.to_string()));
                tracing::warn!(
                    error = %e,
                    revision,
                    retry_in = ?retry_in,
                    "cannot write the fail-static cache (retrying): a restart while etcd is unreachable would start from the file's older state"
                );
                self.pending = Some((state, retry_in));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(revision: i64) -> CacheState {
        (
            revision,
            vec![("/a/v1/mesh/k".into(), Arc::from(&b"{}"[..]))],
        )
    }

    fn metric(registry: &Registry, name: &str) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.lines()
            .filter(|l| l.starts_with(name))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A writer whose cache file lies under a regular file (`blocker`), so that creating its
    /// directory fails until the blocker is removed.
    struct Blocked {
        _dir: tempfile::TempDir,
        blocker: std::path::PathBuf,
        path: std::path::PathBuf,
        registry: Registry,
        slot: Arc<CacheSlot>,
        error: Arc<Mutex<Option<String>>>,
    }

    impl Blocked {
        fn start() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let blocker = dir.path().join("sub");
            std::fs::write(&blocker, b"not a directory").unwrap();
            let path = blocker.join("cache.json");
            let mut registry = Registry::default();
            let metrics = CacheMetrics::register(&mut registry);
            let (slot, error) = (Arc::new(CacheSlot::default()), Arc::new(Mutex::new(None)));
            let reported = error.clone();
            spawn(
                Cache::new(path.clone(), "/a"),
                slot.clone(),
                metrics,
                move |e| *reported.lock().unwrap() = e,
            );
            Self {
                _dir: dir,
                blocker,
                path,
                registry,
                slot,
                error,
            }
        }

        fn metric(&self, name: &str) -> String {
            metric(&self.registry, name)
        }

        fn cached_revision(&self) -> i64 {
            Cache::new(self.path.clone(), "/a")
                .load()
                .unwrap()
                .unwrap()
                .revision
        }
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A write into a directory that cannot be created fails, is reported, and is retried
    /// without a new state once the directory can be made.
    #[test]
    fn a_failed_write_is_reported_and_retried_until_it_lands() {
        let w = Blocked::start();
        w.slot.submit(state(7));
        wait_until("the failure", || {
            w.metric("etcd_cache_write_failing").ends_with(" 1")
        });
        let message = w.error.lock().unwrap().clone().unwrap();
        assert!(message.contains("sub"), "{message}");
        assert!(w
            .metric("etcd_cache_writes_total")
            .contains("result=\"error\""));
        // Room again: the same state lands with no new submission.
        std::fs::remove_file(&w.blocker).unwrap();
        wait_until("the retry", || w.path.exists());
        wait_until("the metrics", || {
            w.metric("etcd_cache_write_failing").ends_with(" 0")
        });
        assert!(w.metric("etcd_cache_revision").ends_with(" 7"));
        assert!(w.error.lock().unwrap().is_none(), "the error is cleared");
        assert_eq!(w.cached_revision(), 7);
    }

    /// A newer state submitted while a failed one waits replaces it: the newest is written.
    #[test]
    fn a_newer_state_replaces_a_failed_one() {
        let w = Blocked::start();
        w.slot.submit(state(1));
        wait_until("the failure", || {
            w.metric("etcd_cache_write_failing").ends_with(" 1")
        });
        std::fs::remove_file(&w.blocker).unwrap();
        w.slot.submit(state(2));
        wait_until("the write", || w.path.exists());
        // Written once, at the newest revision: the failed state is not written after it,
        // which only waiting past its retry can show.
        std::thread::sleep(RETRY_FIRST + Duration::from_millis(200));
        assert_eq!(w.cached_revision(), 2);
        assert!(w
            .metric("etcd_cache_writes_total")
            .contains("result=\"ok\"} 1"));
    }
}
