//! The disk tier of a `CachePolicy`: responses too large for the memory tier, and entries the
//! memory bound evicts, kept in files under the policy's directory (see docs/caching.md#disk-tier).
//!
//! What is on disk is the memory tier's entry (stored headers, freshness, Vary names, tags and
//! body, see [`format`]); what the tier keeps in memory is an index of its files (the variant
//! key, the file's name and size, the resource and tags purges match, the entry's times), bounded
//! in bytes of files like the memory store (quick_cache, weighed by file size). Lookups in the
//! index are memory operations; every file operation runs on tokio's blocking pool, never on a
//! runtime thread.
//!
//! The failure rules, for an operator:
//! - a file is written under a temporary name and renamed once its whole body arrived with the
//!   announced length; a body cut short, too large or too slow for the disk leaves nothing;
//! - a file whose length, checksums or key do not match is never served: a miss, counted in
//!   `trellis_cache_disk_corrupt_total`, and the file removed;
//! - a write that fails (full disk, read-only or unwritable directory) is counted, logged, and
//!   turns the tier's writes off for [`COOLDOWN`]: requests are served from memory meanwhile;
//! - file names are a hash of the key and a sequence number: nothing from a request names a
//!   path;
//! - at start the tier's files of earlier runs are removed, not indexed (their times are
//!   monotonic instants of another process, and purges or invalidations made while the sidecar
//!   was down cannot be known): only subdirectories named `trellis-cache.*` are touched.

mod format;
mod stream;

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::HeaderMap;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, OptionsBuilder, Weighter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use trellis_policies::CacheDiskSpec;

use super::coalesce::Leader;
use super::control::CacheControl;
use super::metrics::CacheMetrics;
use super::store::{Entry, Selector};
use format::ReadError;

pub use stream::{DiskBody, DiskStream};

/// Files written at once per tier; a write that finds none free is skipped (the disk is
/// slower than the responses it is offered: they stay in memory or stream through).
const WRITERS: usize = 8;
/// How long writes stay off after a failed one.
pub const COOLDOWN: Duration = Duration::from_secs(30);
/// Purges remembered, so that a file being written when one arrives is not indexed after it.
const RECENT_PURGES: usize = 64;
/// Frames queued between a response streaming to its client and the file it is written to;
/// a disk that falls this far behind loses the write, the client is never slowed.
const TEE_QUEUE: usize = 64;
/// Name prefix of the tier's directories under the policy's path.
const DIR_PREFIX: &str = "trellis-cache.";

pub struct DiskTier {
    shared: Arc<TierShared>,
    index: Cache<String, Arc<DiskFile>, BySize>,
    /// The `Vary` names last written under each primary key.
    vary: Cache<String, Arc<[String]>>,
    any_vary: AtomicBool,
    object_limit: u64,
    /// Bytes of files being written, bounded by `budget`; the index holds the rest of the
    /// bound, so that files and temporary files together stay within `max_bytes`.
    writing: AtomicU64,
    budget: u64,
    writers: Arc<Semaphore>,
    seq: AtomicU64,
    hasher: DefaultHashBuilder,
    recent: Mutex<VecDeque<(Instant, Selector)>>,
}

/// What the tier's files need to remove themselves.
struct TierShared {
    dir: PathBuf,
    metrics: CacheMetrics,
    /// The tier is being dropped: its directory goes as a whole.
    closing: AtomicBool,
    epoch: Instant,
    /// Writes are off until this many milliseconds after `epoch` (0: on).
    down_until: AtomicU64,
    down: AtomicBool,
}

/// One file of the tier, as the index holds it; the file is removed when the last reference
/// goes (evicted, replaced, purged, found corrupt, and no response still streaming it).
pub struct DiskFile {
    name: String,
    bytes: u64,
    resource: super::key::Resource,
    tags: Vec<String>,
    stored: Instant,
    fetched: Instant,
    until: Instant,
    shared: Arc<TierShared>,
}

#[derive(Clone)]
struct BySize;

/// A write's source of body bytes.
enum Source {
    /// An entry's body, in memory (an entry evicted from the memory tier).
    Memory,
    /// A response still streaming to its client.
    Tee(mpsc::Receiver<Msg>),
    /// The body of another file of the tier (an entry refreshed by a 304).
    File(Arc<DiskBody>),
}

pub enum Msg {
    Data(Bytes),
    End,
}

/// The sending side of a response being written to disk (see [`super::Tee`]).
pub struct Sink {
    tx: mpsc::Sender<Msg>,
    sent: u64,
    limit: u64,
    expected: Option<u64>,
}

/// One file being written.
struct Job {
    tier: Arc<DiskTier>,
    key: String,
    primary_len: usize,
    entry: Arc<Entry>,
    started: Instant,
    source: Source,
    reserved: u64,
    _permit: OwnedSemaphorePermit,
    _leader: Option<Leader>,
}

/// Why a write ended without a file.
enum Abandoned {
    /// The body did not arrive whole, or exceeded a bound: nothing to report.
    Incomplete,
    Io(std::io::Error),
    /// The source file of a refresh failed its checks.
    Corrupt(ReadError),
}

// === impl DiskTier ===

impl DiskTier {
    /// The tier of policy `policy` under `spec.path`. Files of earlier runs there are removed
    /// in the background.
    pub fn new(policy: &str, spec: &CacheDiskSpec, metrics: &CacheMetrics) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let root = PathBuf::from(&spec.path);
        let run = root.join(format!("{DIR_PREFIX}{}", run_id()));
        let dir = run.join(format!("{policy}.{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        let budget = (2 * spec.object_limit() + (1 << 20)).min(spec.max_bytes / 2);
        let capacity = spec.max_bytes - budget;
        let shards = super::store::shards(capacity, spec.object_limit());
        let options = OptionsBuilder::new()
            .weight_capacity(capacity)
            .estimated_items_capacity(
                usize::try_from(capacity / (64 * 1024))
                    .unwrap_or(1 << 20)
                    .max(64),
            )
            .shards(shards)
            .build()
            .expect("only a missing option is refused, and every one is set");
        blocking(move || remove_earlier_runs(&root, &run));
        Arc::new(Self {
            shared: Arc::new(TierShared {
                dir,
                metrics: metrics.clone(),
                closing: AtomicBool::new(false),
                epoch: Instant::now(),
                down_until: AtomicU64::new(0),
                down: AtomicBool::new(false),
            }),
            index: Cache::with_options(
                options,
                BySize,
                DefaultHashBuilder::default(),
                Default::default(),
            ),
            vary: Cache::new(
                usize::try_from(capacity / (64 * 1024))
                    .unwrap_or(1 << 20)
                    .max(1024),
            ),
            any_vary: AtomicBool::new(false),
            object_limit: spec.object_limit(),
            writing: AtomicU64::new(0),
            budget,
            writers: Arc::new(Semaphore::new(WRITERS)),
            seq: AtomicU64::new(0),
            hasher: DefaultHashBuilder::default(),
            recent: Mutex::new(VecDeque::new()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn entry_count(&self) -> u64 {
        u64::try_from(self.index.len()).unwrap_or(u64::MAX)
    }

    /// The tier's state for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "dir": self.dir(),
            "entries": self.entry_count(),
            "bytes": self.index.weight(),
            "bytes_being_written": self.writing.load(Ordering::Relaxed),
            "max_bytes": self.index.capacity() + self.budget,
            "writes_on": !self.shared.down.load(Ordering::Relaxed),
        })
    }

    /// The variant key a request with these headers looks up under `primary`.
    fn variant(&self, primary: &str, headers: &HeaderMap) -> String {
        let names = match self.any_vary.load(Ordering::Relaxed) {
            true => self.vary.get(primary).filter(|n| !n.is_empty()),
            false => None,
        };
        match names {
            Some(names) => super::key::variant(primary, headers, &names),
            None => primary.to_string(),
        }
    }

    /// The entry stored on disk for this request, its file checked up to its first body
    /// block (read off the runtime's threads). A file that fails a check is a miss, counted
    /// and removed.
    pub async fn lookup(
        self: &Arc<Self>,
        primary: &str,
        headers: &HeaderMap,
    ) -> Option<Arc<Entry>> {
        let key = self.variant(primary, headers);
        let file = self.index.get(&key)?;
        if file.until <= Instant::now() {
            self.index.remove_if(&key, |f| Arc::ptr_eq(f, &file));
            return None;
        }
        let path = self.shared.dir.join(&file.name);
        let (len, k) = (file.bytes, key.clone());
        let opened = tokio::task::spawn_blocking(move || format::open(&path, len, &k))
            .await
            .ok()?;
        match opened {
            Ok(o) => Some(Arc::new(self.entry(key, file, o))),
            Err(e) => {
                self.corrupt(&key, &file, &e);
                None
            }
        }
    }

    fn entry(self: &Arc<Self>, key: String, file: Arc<DiskFile>, o: format::Opened) -> Entry {
        let cc = CacheControl::parse(&o.head.headers);
        Entry {
            status: o.head.status,
            cc,
            headers: super::fields::Fields::of(&o.head.headers),
            body: Bytes::new(),
            lifetime: o.head.lifetime,
            initial_age: o.head.initial_age,
            stored: file.stored,
            fetched: file.fetched,
            resource: file.resource.clone(),
            tags: file.tags.clone(),
            vary: o.head.vary.into(),
            disk: Some(Arc::new(DiskBody::new(
                self.clone(),
                key,
                file,
                o.file,
                o.first,
                o.body_len,
            ))),
        }
    }

    /// A file failed its checks: drop it (from the index, then from the disk), count it.
    fn corrupt(&self, key: &str, file: &Arc<DiskFile>, e: &ReadError) {
        self.shared.metrics.disk_corrupt.inc();
        tracing::warn!(file = %self.shared.dir.join(&file.name).display(), error = %e, "cache file dropped: a miss, refetched from the origin");
        self.index.remove_if(key, |f| Arc::ptr_eq(f, file));
    }

    /// Forget the file under `key`: a newer response for it is in memory.
    pub fn forget(&self, key: &str) {
        self.index.remove(key);
    }

    /// Drop every file `s` selects, and remember the purge for the files being written.
    pub fn purge(&self, s: &Selector) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT_PURGES {
                recent.pop_front();
            }
            recent.push_back((Instant::now(), s.clone()));
        }
        self.index.retain(|_, f| !f.matches(s));
    }

    fn purged_since(&self, started: Instant, f: &DiskFile) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().any(|(at, s)| *at >= started && f.matches(s))
    }

    /// Writes are on (not within the cool-down of a failed one).
    fn available(&self) -> bool {
        let until = self.shared.down_until.load(Ordering::Relaxed);
        until == 0 || self.shared.millis() >= until
    }

    /// A writer, if the tier takes writes now.
    fn permit(&self) -> Option<OwnedSemaphorePermit> {
        if !self.available() {
            return None;
        }
        let p = self.writers.clone().try_acquire_owned().ok();
        if p.is_none() {
            self.shared.metrics.disk_writes_skipped.inc();
        }
        p
    }

    /// Write an entry the memory tier evicted, unless it is about to expire anyway.
    pub fn demote(
        self: &Arc<Self>,
        key: &str,
        primary_len: usize,
        entry: Arc<Entry>,
        until: Instant,
    ) {
        let soon = Instant::now() + Duration::from_secs(1);
        if until <= soon || entry.disk.is_some() || entry.body.len() as u64 > self.object_limit {
            return;
        }
        let Some(permit) = self.permit() else { return };
        let job = Job::new(
            self,
            key.to_string(),
            primary_len,
            entry,
            Instant::now(),
            Source::Memory,
            permit,
            None,
        );
        blocking(move || job.run());
    }

    /// Start writing a response that streams to its client; `None` when the tier takes no
    /// write now. `leader` is released once the file is written (or abandoned).
    #[allow(clippy::too_many_arguments)]
    pub fn tee(
        self: &Arc<Self>,
        key: String,
        primary_len: usize,
        entry: Arc<Entry>,
        started: Instant,
        leader: Option<Leader>,
        expected: Option<u64>,
    ) -> Option<Sink> {
        if expected.is_some_and(|n| n > self.object_limit) {
            return None;
        }
        let permit = self.permit()?;
        let (tx, rx) = mpsc::channel(TEE_QUEUE);
        let job = Job::new(
            self,
            key,
            primary_len,
            entry,
            started,
            Source::Tee(rx),
            permit,
            leader,
        );
        blocking(move || job.run());
        Some(Sink {
            tx,
            sent: 0,
            limit: self.object_limit,
            expected,
        })
    }

    /// Write `entry` (refreshed by a 304, its body still in another file of the tier) under
    /// `key`; the old file answers until the new one replaces it.
    pub fn refresh(self: &Arc<Self>, key: String, primary_len: usize, entry: Arc<Entry>) {
        let Some(body) = entry.disk.clone() else {
            return;
        };
        let Some(permit) = self.permit() else { return };
        let job = Job::new(
            self,
            key,
            primary_len,
            entry,
            Instant::now(),
            Source::File(body),
            permit,
            None,
        );
        blocking(move || job.run());
    }

    /// Index a written file (unless a purge since `started` selects it).
    fn commit(&self, job: &Job, name: String, bytes: u64) {
        let e = &job.entry;
        let file = Arc::new(DiskFile::new(&self.shared, name, bytes, e));
        if self.purged_since(job.started, &file) {
            return;
        }
        if !e.vary.is_empty() {
            self.any_vary.store(true, Ordering::Relaxed);
        }
        let primary = job.key.get(..job.primary_len).unwrap_or(&job.key);
        if !e.vary.is_empty()
            || (self.any_vary.load(Ordering::Relaxed) && self.vary.contains_key(primary))
        {
            self.vary.insert(primary.to_string(), e.vary.clone());
        }
        self.index.insert(job.key.clone(), file);
        self.shared.metrics.disk_writes.inc();
    }

    /// A write failed: count it, and turn writes off for the cool-down (logged once per
    /// outage, with the gauge up until a write succeeds again).
    fn failed(&self, e: &std::io::Error) {
        let m = &self.shared.metrics;
        m.disk_write_failures.inc();
        let until = self.shared.millis() + COOLDOWN.as_millis() as u64;
        self.shared
            .down_until
            .store(until.max(1), Ordering::Relaxed);
        if !self.shared.down.swap(true, Ordering::Relaxed) {
            m.disk_down.inc();
            tracing::warn!(dir = %self.shared.dir.display(), error = %e, cooldown = ?COOLDOWN, "cache disk tier write failed: serving from memory only until a write succeeds again");
        }
    }

    fn succeeded(&self) {
        if self.shared.down.swap(false, Ordering::Relaxed) {
            self.shared.down_until.store(0, Ordering::Relaxed);
            self.shared.metrics.disk_down.dec();
            tracing::info!(dir = %self.shared.dir.display(), "cache disk tier writes again");
        }
    }

    /// Reserve `n` bytes of the in-flight budget.
    fn reserve(&self, n: u64) -> bool {
        let before = self.writing.fetch_add(n, Ordering::Relaxed);
        if before + n > self.budget {
            self.writing.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        // The policy changed or went: its files go with their directory, not one by one.
        self.shared.closing.store(true, Ordering::Relaxed);
        let dir = self.shared.dir.clone();
        blocking(move || {
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}

// === impl TierShared ===

impl TierShared {
    fn millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

// === impl DiskFile ===

impl DiskFile {
    fn new(shared: &Arc<TierShared>, name: String, bytes: u64, e: &Entry) -> Self {
        shared
            .metrics
            .disk_bytes
            .inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        Self {
            name,
            bytes,
            resource: e.resource.clone(),
            tags: e.tags.clone(),
            stored: e.stored,
            fetched: e.fetched,
            until: e.stored + e.keep(),
            shared: shared.clone(),
        }
    }

    fn matches(&self, s: &Selector) -> bool {
        super::store::selects(&self.resource, &self.tags, s)
    }

    fn path(&self) -> PathBuf {
        self.shared.dir.join(&self.name)
    }
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared
            .metrics
            .disk_bytes
            .dec_by(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        if !shared.closing.load(Ordering::Relaxed) {
            let path = self.path();
            blocking(move || {
                let _ = std::fs::remove_file(path);
            });
        }
    }
}

impl Weighter<String, Arc<DiskFile>> for BySize {
    fn weight(&self, _: &String, f: &Arc<DiskFile>) -> u64 {
        f.bytes
    }
}

// === impl Sink ===

impl Sink {
    /// Queue a frame for the file; `false` when the write is lost (too large, or the disk
    /// is behind): the caller drops the sink and the file is abandoned.
    pub fn data(&mut self, chunk: &Bytes) -> bool {
        self.sent += chunk.len() as u64;
        self.sent <= self.limit && self.tx.try_send(Msg::Data(chunk.clone())).is_ok()
    }

    /// The body ended cleanly: complete the file if every announced byte came.
    pub fn finish(self) {
        if self.expected.is_none_or(|n| n == self.sent) {
            let _ = self.tx.try_send(Msg::End);
        }
    }
}

// === impl Job ===

impl Job {
    #[allow(clippy::too_many_arguments)]
    fn new(
        tier: &Arc<DiskTier>,
        key: String,
        primary_len: usize,
        entry: Arc<Entry>,
        started: Instant,
        source: Source,
        permit: OwnedSemaphorePermit,
        leader: Option<Leader>,
    ) -> Self {
        Self {
            tier: tier.clone(),
            key,
            primary_len,
            entry,
            started,
            source,
            reserved: 0,
            _permit: permit,
            _leader: leader,
        }
    }

    /// Write the file, then index it (on a blocking thread).
    fn run(mut self) {
        let tier = self.tier.clone();
        match self.write() {
            Ok((name, bytes)) => {
                tier.succeeded();
                tier.commit(&self, name, bytes);
            }
            Err(Abandoned::Incomplete) => {}
            Err(Abandoned::Io(e)) => tier.failed(&e),
            Err(Abandoned::Corrupt(e)) => {
                if let Source::File(body) = &self.source {
                    tier.corrupt(body.key(), body.file(), &e);
                }
            }
        }
    }

    fn write(&mut self) -> Result<(String, u64), Abandoned> {
        let dir = self.tier.shared.dir.clone();
        std::fs::create_dir_all(&dir).map_err(Abandoned::Io)?;
        let seq = self.tier.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{:016x}.{seq:x}", self.tier.hasher.hash_one(&self.key));
        let head = format::encode_head(&self.key, &self.entry);
        self.reserve(head.len() as u64 + format::PREFIX)?;
        let mut w = format::FileWriter::create(dir.join(format!("tmp.{seq:x}")), &head)
            .map_err(Abandoned::Io)?;
        match std::mem::replace(&mut self.source, Source::Memory) {
            Source::Memory => {
                let body = self.entry.body.clone();
                self.body(&mut w, &body)?;
            }
            Source::Tee(mut rx) => loop {
                match rx.blocking_recv() {
                    Some(Msg::Data(b)) => self.body(&mut w, &b)?,
                    Some(Msg::End) => break,
                    // The response failed, was abandoned, or lost its write.
                    None => return Err(Abandoned::Incomplete),
                }
            },
            Source::File(body) => {
                let copied = self.copy(&mut w, &body);
                self.source = Source::File(body);
                copied?;
            }
        }
        let bytes = w.commit(&dir.join(&name)).map_err(Abandoned::Io)?;
        Ok((name, bytes))
    }

    fn body(&mut self, w: &mut format::FileWriter, b: &[u8]) -> Result<(), Abandoned> {
        if w.body_len() + b.len() as u64 > self.tier.object_limit {
            return Err(Abandoned::Incomplete);
        }
        self.reserve(b.len() as u64 + 4 * (b.len() as u64).div_ceil(format::BLOCK as u64))?;
        w.body(b).map_err(Abandoned::Io)
    }

    /// Copy (and check) another file's body.
    fn copy(&mut self, w: &mut format::FileWriter, body: &DiskBody) -> Result<(), Abandoned> {
        let o =
            format::open(&body.file().path(), body.file().bytes, body.key()).map_err(
                |e| match e {
                    ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Abandoned::Incomplete
                    }
                    e => Abandoned::Corrupt(e),
                },
            )?;
        let (mut file, mut left) = (o.file, o.body_len);
        let mut chunk = o.first;
        loop {
            left -= chunk.len() as u64;
            self.body(w, &chunk)?;
            if left == 0 {
                return Ok(());
            }
            chunk = format::read_blocks(&mut file, left, 16).map_err(Abandoned::Corrupt)?;
        }
    }

    fn reserve(&mut self, n: u64) -> Result<(), Abandoned> {
        if !self.tier.reserve(n) {
            self.tier.shared.metrics.disk_writes_skipped.inc();
            return Err(Abandoned::Incomplete);
        }
        self.reserved += n;
        Ok(())
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.tier
            .writing
            .fetch_sub(self.reserved, Ordering::Relaxed);
    }
}

/// Run `f` on the blocking pool (inline when there is no runtime: tests, shutdown).
fn blocking(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(f);
        }
        Err(_) => f(),
    }
}

/// This process's run: distinguishes its directories from those of earlier runs.
fn run_id() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        format!("{:x}-{:x}", t.as_nanos(), std::process::id())
    })
}

/// Remove the tier directories earlier runs left under `root` (not `ours`): only directories
/// (never through a symbolic link) named `trellis-cache.*`.
fn remove_earlier_runs(root: &Path, ours: &Path) {
    let Ok(list) = std::fs::read_dir(root) else {
        return;
    };
    let mut removed = 0;
    for e in list.flatten() {
        let path = e.path();
        let ours_or_other =
            path == ours || !e.file_name().to_string_lossy().starts_with(DIR_PREFIX);
        if ours_or_other || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed += 1,
            Err(error) => {
                tracing::warn!(dir = %path.display(), %error, "cannot remove an earlier run's cache files")
            }
        }
    }
    if removed > 0 {
        tracing::info!(root = %root.display(), removed, "removed the cache files of earlier runs (the disk tier starts empty)");
    }
}
