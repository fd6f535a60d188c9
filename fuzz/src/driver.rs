//! A stable-Rust mutational fuzzer: seeds from a corpus, stacked byte-level and
//! dictionary mutations, splicing between inputs, and feedback from what the target says it
//! did (an *outcome* label per input, such as the error a parser returned): an input that
//! yields an outcome not seen before joins the corpus. That is coarser than edge coverage
//! (`src/bin/afl.rs` is the coverage-guided driver) but needs no instrumentation, so it runs
//! in the ordinary test build.
//!
//! Findings: a panic, an input whose peak allocation exceeds the target's bound, and (in the
//! CLI) an execution that outlives the watchdog or a single allocation over
//! [`crate::alloc::MAX_SINGLE_ALLOC`], which end the process after saving the input.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::Target;

/// How one run is bounded and where findings go.
#[derive(Clone, Debug)]
pub struct Config {
    /// Stop after this long (mutation phase; the seeds always run).
    pub duration: Duration,
    /// Stop after this many mutated executions.
    pub iterations: u64,
    pub seed: u64,
    /// Where inputs of findings are written (`<dir>/<target>/<kind>-<hash>`); none: kept in
    /// memory only.
    pub crashes: Option<PathBuf>,
    /// Where inputs that found new outcomes are written, to grow the committed corpus.
    pub corpus_out: Option<PathBuf>,
}

/// What went wrong with one input.
#[derive(Clone, Debug)]
pub struct Finding {
    pub kind: &'static str,
    pub message: String,
    pub input: Vec<u8>,
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub execs: u64,
    pub seeds: usize,
    pub corpus: usize,
    pub outcomes: usize,
    /// Largest peak allocation of one input, and that input's length.
    pub max_alloc: (usize, usize),
    pub elapsed: Duration,
    pub findings: Vec<Finding>,
}

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static IN_TARGET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The input being executed, for [`fatal`].
static CURRENT: Mutex<(String, Vec<u8>)> = Mutex::new((String::new(), Vec::new()));
static CRASH_DIR: OnceLock<PathBuf> = OnceLock::new();
/// Milliseconds since [`EPOCH`] at which the current execution started; 0 when idle.
static EXEC_STARTED: AtomicU64 = AtomicU64::new(0);
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if IN_TARGET.with(|t| t.get()) {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let payload = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{payload} at {location}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// Save the current input and end the process: for failures that cannot be unwound (a
/// hang, an allocation that would abort anyway).
pub fn fatal(why: &str) -> ! {
    let (name, input) = CURRENT
        .try_lock()
        .map(|c| (c.0.clone(), c.1.clone()))
        .unwrap_or_default();
    let saved = CRASH_DIR
        .get()
        .and_then(|dir| save(dir, &name, "fatal", &input).ok());
    let _ = writeln!(
        std::io::stderr(),
        "FATAL in target {name}: {why}; input ({} bytes) saved to {}",
        input.len(),
        saved.map_or("<nowhere: no crash dir>".into(), |p| p
            .display()
            .to_string())
    );
    if std::env::var_os("FUZZ_BACKTRACE").is_some() {
        let _ = writeln!(
            std::io::stderr(),
            "{}",
            std::backtrace::Backtrace::force_capture()
        );
    }
    std::process::abort();
}

/// Abort (through [`fatal`]) when one execution runs longer than `limit`.
pub fn spawn_watchdog(limit: Duration) {
    let epoch = *EPOCH.get_or_init(Instant::now);
    let _ = std::thread::Builder::new()
        .name("fuzz-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(250));
            let started = EXEC_STARTED.load(Ordering::Relaxed);
            if started == 0 {
                continue;
            }
            let now = epoch.elapsed().as_millis() as u64;
            if now.saturating_sub(started) > limit.as_millis() as u64 {
                fatal(&format!("one execution ran longer than {limit:?}"));
            }
        });
}

fn save(dir: &Path, target: &str, kind: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{kind}-{:016x}", fnv(input)));
    std::fs::write(&path, input)?;
    Ok(path)
}

/// FNV-1a, for outcome labels and file names.
pub fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Run `target` once on `input`: its outcome label, or a finding.
pub fn execute(target: &Target, input: &[u8]) -> Result<u64, Finding> {
    install_panic_hook();
    if let Ok(mut c) = CURRENT.lock() {
        if c.0 != target.name {
            c.0 = target.name.to_string();
        }
        c.1.clear();
        c.1.extend_from_slice(input);
    }
    let epoch = EPOCH.get_or_init(Instant::now);
    EXEC_STARTED.store(
        (epoch.elapsed().as_millis() as u64).max(1),
        Ordering::Relaxed,
    );
    IN_TARGET.with(|t| t.set(true));
    let base = crate::alloc::start();
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let peak = crate::alloc::stop(base);
    IN_TARGET.with(|t| t.set(false));
    EXEC_STARTED.store(0, Ordering::Relaxed);
    match result {
        Err(_) => Err(Finding {
            kind: "panic",
            message: LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| "panic".into()),
            input: input.to_vec(),
        }),
        Ok(_) if crate::alloc::installed() && peak > target.alloc_bound(input.len()) => {
            Err(Finding {
                kind: "alloc",
                message: format!(
                    "peak allocation {peak} bytes for a {}-byte input (bound {})",
                    input.len(),
                    target.alloc_bound(input.len())
                ),
                input: input.to_vec(),
            })
        }
        Ok(outcome) => Ok(outcome),
    }
}

/// The peak allocation of one execution (0 without the counting allocator).
pub fn peak_alloc(target: &Target, input: &[u8]) -> usize {
    let base = crate::alloc::start();
    let _ = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    crate::alloc::stop(base)
}

/// Fuzz `target` from `seeds` within `cfg`'s bounds.
pub fn fuzz(target: &Target, seeds: Vec<Vec<u8>>, cfg: &Config) -> Report {
    if let Some(dir) = &cfg.crashes {
        let _ = CRASH_DIR.set(dir.clone());
    }
    let start = Instant::now();
    let mut report = Report {
        seeds: seeds.len(),
        ..Report::default()
    };
    let mut rng = Rng(cfg.seed | 1);
    let mut seen_outcomes = HashSet::new();
    let mut seen_findings = HashSet::new();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    let mut record = |report: &mut Report, input: &[u8], finding: Finding| {
        // One finding per panic location or kind, not one per input.
        let key = finding
            .message
            .split(" at ")
            .last()
            .unwrap_or_default()
            .to_string()
            + finding.kind;
        if seen_findings.insert(key) {
            if let Some(dir) = &cfg.crashes {
                let _ = save(dir, target.name, finding.kind, input);
            }
            report.findings.push(finding);
        }
    };
    for seed in seeds {
        let seed: Vec<u8> = seed.into_iter().take(target.max_len).collect();
        report.execs += 1;
        let peak = peak_if_installed(target, &seed);
        if peak > report.max_alloc.0 {
            report.max_alloc = (peak, seed.len());
        }
        match execute(target, &seed) {
            Ok(o) => {
                seen_outcomes.insert(o);
            }
            Err(f) => record(&mut report, &seed, f),
        }
        corpus.push(seed);
    }
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut n: u64 = 0;
    while n < cfg.iterations && start.elapsed() < cfg.duration {
        n += 1;
        let parent = &corpus[rng.below(corpus.len())];
        let other = &corpus[rng.below(corpus.len())];
        let input = mutate(&mut rng, parent, other, target);
        report.execs += 1;
        match execute(target, &input) {
            Ok(o) => {
                if seen_outcomes.insert(o) && corpus.len() < MAX_CORPUS {
                    if let Some(dir) = &cfg.corpus_out {
                        let _ = save(dir, target.name, "new", &input);
                    }
                    corpus.push(input);
                }
            }
            Err(f) => record(&mut report, &input, f),
        }
    }
    report.corpus = corpus.len();
    report.outcomes = seen_outcomes.len();
    report.elapsed = start.elapsed();
    report
}

fn peak_if_installed(target: &Target, input: &[u8]) -> usize {
    if crate::alloc::installed() {
        IN_TARGET.with(|t| t.set(true));
        let p = peak_alloc(target, input);
        IN_TARGET.with(|t| t.set(false));
        p
    } else {
        0
    }
}

/// Most inputs kept in memory; past it, new outcomes are still counted but not kept.
const MAX_CORPUS: usize = 4096;

/// xorshift64*: deterministic for a given seed, so a short pass is reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

const INTERESTING_BYTES: &[u8] = b"\x00\xff\x7f\x80\"{}[].,:/\\\n\r\t -0129%*#&=?@~!'";
const INTERESTING_NUMBERS: &[&[u8]] = &[
    b"0",
    b"-1",
    b"1",
    b"255",
    b"256",
    b"65535",
    b"65536",
    b"2147483648",
    b"4294967296",
    b"9223372036854775807",
    b"18446744073709551615",
    b"18446744073709551616",
    b"99999999999999999999999999",
    b"1e400",
    b"-1e400",
    b"0.0000001",
    b"NaN",
    b"1.5",
];

/// One to eight stacked mutations of `parent`, sometimes spliced with `other`.
pub fn mutate(rng: &mut Rng, parent: &[u8], other: &[u8], target: &Target) -> Vec<u8> {
    let mut v = parent.to_vec();
    let rounds = 1 + rng.below(8);
    for _ in 0..rounds {
        match rng.below(11) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(8);
                for _ in 0..n {
                    v.insert(i, rng.next_u64() as u8);
                }
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(32));
                v.drain(i..i + n);
            }
            4 if !v.is_empty() => {
                // Copy a chunk elsewhere: repetition and nesting.
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(64));
                let chunk = v[i..i + n].to_vec();
                let at = rng.below(v.len() + 1);
                v.splice(at..at, chunk);
            }
            5 | 6 if !target.dict.is_empty() => {
                let token = target.dict[rng.below(target.dict.len())];
                let at = rng.below(v.len() + 1);
                if rng.below(2) == 0 || v.is_empty() {
                    v.splice(at..at, token.iter().copied());
                } else {
                    let end = (at + token.len()).min(v.len());
                    v.splice(at..end, token.iter().copied());
                }
            }
            7 if !other.is_empty() => {
                // Crossover: a prefix of one input and a suffix of the other.
                let a = rng.below(v.len() + 1);
                let b = rng.below(other.len());
                v.truncate(a);
                v.extend_from_slice(&other[b..]);
            }
            8 => {
                // Replace a run of digits (or insert) with an interesting number.
                let number = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
                let digits: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_ascii_digit()).collect();
                if digits.is_empty() {
                    let at = rng.below(v.len() + 1);
                    v.splice(at..at, number.iter().copied());
                } else {
                    let start = digits[rng.below(digits.len())];
                    let mut end = start;
                    while end < v.len() && v[end].is_ascii_digit() {
                        end += 1;
                    }
                    v.splice(start..end, number.iter().copied());
                }
            }
            9 if !v.is_empty() => {
                v.truncate(rng.below(v.len()));
            }
            10 if !v.is_empty() => {
                // Repeat a chunk many times: deep nesting, long runs.
                let i = rng.below(v.len());
                let n = 1 + rng.below((v.len() - i).min(8));
                let chunk = v[i..i + n].to_vec();
                for _ in 0..rng.below(64) {
                    v.splice(i..i, chunk.iter().copied());
                }
            }
            _ => {}
        }
        if v.len() > target.max_len {
            v.truncate(target.max_len);
        }
    }
    v
}

/// The files of a corpus directory, in name order.
pub fn load_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.is_file())
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}
