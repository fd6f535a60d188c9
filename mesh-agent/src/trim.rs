//! Give back the executable's startup pages once the sidecar is ready.
//!
//! Most of an idle sidecar's resident memory is not heap but its own executable: `mesh-agent`
//! carries etcd, gRPC, OpenTelemetry, DNS, rustls, the CLI and the web pages in one binary, and
//! starting up (argument parsing, configuration, certificates, the etcd client, the first
//! snapshot) runs code scattered over most of it. The kernel maps up to 16 neighbouring pages at
//! each page fault (fault-around), so startup leaves about 8.5 MB of the 19.5 MB text mapped, and
//! nothing unmaps it while the host has free memory: RSS keeps counting code that will not run
//! again (docs/performance.md, "Memory").
//!
//! Once the sidecar is ready and has settled, [`trim_startup_pages`] unmaps the executable's
//! read-only file pages from this process with `madvise(MADV_DONTNEED)`. The pages stay in the
//! page cache; the code the sidecar keeps running faults back in on its next use (a minor fault,
//! no disk read), so what stays resident is what the sidecar actually runs. Nothing else is
//! touched: not the heap, not writable or relocated mappings, not shared libraries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_proxy::readiness::Ready;

/// How long after readiness the trim waits: the first snapshot's application, the first health
/// probes and the background tasks' first rounds run code that does not run again.
pub const SETTLE: Duration = Duration::from_secs(2);
/// How often readiness is checked before the trim, and for how long at most.
const READY_POLL: Duration = Duration::from_millis(200);
const READY_WAIT: Duration = Duration::from_secs(600);

/// Wait for `ready`, let the sidecar settle, then trim. Logs what it gave back.
pub async fn after_ready(ready: Ready) {
    let mut waited = Duration::ZERO;
    while !ready.is_ready() && waited < READY_WAIT {
        tokio::time::sleep(READY_POLL).await;
        waited += READY_POLL;
    }
    tokio::time::sleep(SETTLE).await;
    match tokio::task::spawn_blocking(trim_startup_pages).await {
        Ok(Ok(t)) => tracing::debug!(
            mappings = t.mappings,
            unmapped_kb = t.resident_kb,
            "executable pages unmapped after startup"
        ),
        Ok(Err(e)) => tracing::debug!(error = %e, "startup pages not trimmed"),
        Err(e) => tracing::debug!(error = %e, "startup page trim did not run"),
    }
}

/// What a trim gave back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Mappings of the executable advised.
    pub mappings: usize,
    /// Their resident size before the advice, in kB.
    pub resident_kb: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("madvise on {start:#x}+{len:#x}: {source}")]
    Advise {
        start: usize,
        len: usize,
        source: std::io::Error,
    },
    #[error("not supported on this platform")]
    Unsupported,
}

/// One mapping of `/proc/self/smaps`, with the fields the trim decides on.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    perms: String,
    path: Option<PathBuf>,
    rss_kb: u64,
    anonymous_kb: u64,
}

// === impl Mapping ===

impl Mapping {
    /// Safe to drop from this process: a private, non-writable mapping of `exe` whose every
    /// page still holds the file's bytes (no copy-on-write page: relocated data such as
    /// `.data.rel.ro` has anonymous pages and is kept). `Private_Dirty` alone does not mean
    /// written by this process: a freshly built binary's page cache pages are dirty until
    /// written back, and count there without being copies.
    fn is_clean_image_of(&self, exe: &Path) -> bool {
        self.path.as_deref() == Some(exe)
            && self.perms.len() == 4
            && self.perms.starts_with('r')
            && !self.perms.contains('w')
            && self.perms.ends_with('p')
            && self.anonymous_kb == 0
            && self.end > self.start
    }
}

/// Parse `/proc/self/smaps`. Unreadable lines are skipped: the kernel writes this file, and a
/// field the parser does not know is simply not used.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(m) = parse_header(line) {
            out.push(m);
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        let mut parts = line.split_whitespace();
        let (Some(key), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let Ok(kb) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Rss:" => current.rss_kb = kb,
            "Anonymous:" => current.anonymous_kb = kb,
            _ => {}
        }
    }
    out
}

/// `start-end perms offset dev inode [path]`; `None` for a field line (`Rss:   12 kB`).
fn parse_header(line: &str) -> Option<Mapping> {
    let mut parts = line.splitn(6, ' ');
    let (range, perms) = (parts.next()?, parts.next()?);
    let (start, end) = range.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    let (_offset, _dev, _inode) = (parts.next()?, parts.next()?, parts.next()?);
    let path = parts
        .next()
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
        .map(PathBuf::from);
    Some(Mapping {
        start,
        end,
        perms: perms.to_string(),
        path,
        rss_kb: 0,
        anonymous_kb: 0,
    })
}

/// Unmap the executable's clean read-only pages from this process (see the module's doc).
pub fn trim_startup_pages() -> Result<Trimmed, TrimError> {
    let exe = std::fs::read_link("/proc/self/exe").map_err(|source| TrimError::Read {
        path: "/proc/self/exe",
        source,
    })?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(|source| TrimError::Read {
        path: "/proc/self/smaps",
        source,
    })?;
    let mut trimmed = Trimmed::default();
    for m in parse_smaps(&smaps)
        .iter()
        .filter(|m| m.is_clean_image_of(&exe))
    {
        advise_dontneed(m.start, m.end - m.start)?;
        trimmed.mappings += 1;
        trimmed.resident_kb += m.rss_kb;
    }
    Ok(trimmed)
}

#[cfg(target_os = "linux")]
fn advise_dontneed(start: usize, len: usize) -> Result<(), TrimError> {
    // SAFETY: `start..start + len` is a whole mapping read from /proc/self/smaps just before:
    // page-aligned, and a private, read-only (not writable) mapping of this process's own
    // executable file with no anonymous (copy-on-write) page (`Mapping::is_clean_image_of`), i.e.
    // every page holds exactly the file's bytes. MADV_DONTNEED on a private file mapping drops
    // this process's page table entries; the next access refills them from the same file,
    // which cannot have changed: the kernel refuses writes to an executable that is running
    // (ETXTBSY) and a replaced binary is a new inode, while this mapping keeps the old one.
    // No Rust reference can observe a difference, since the bytes read back are identical and
    // nothing in these mappings is ever written (they are not writable; this process never
    // mprotects them). Nothing is dereferenced here.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(TrimError::Advise {
            start,
            len,
            source: std::io::Error::last_os_error(),
        })
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_dontneed(_start: usize, _len: usize) -> Result<(), TrimError> {
    Err(TrimError::Unsupported)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0200000 r--p 00000000 fd:01 1234                       /usr/bin/mesh-agent
Rss:                 900 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
55d0a0200000-55d0a1400000 r-xp 00200000 fd:01 1234                       /usr/bin/mesh-agent
Size:              18432 kB
Rss:                8500 kB
Private_Dirty:      8500 kB
Anonymous:             0 kB
55d0a1400000-55d0a1500000 r--p 01400000 fd:01 1234                       /usr/bin/mesh-agent
Rss:                 600 kB
Private_Dirty:       400 kB
Anonymous:           400 kB
55d0a1500000-55d0a1510000 rw-p 01500000 fd:01 1234                       /usr/bin/mesh-agent
Rss:                  64 kB
Anonymous:            64 kB
Private_Dirty:        64 kB
55d0a2000000-55d0a3000000 rw-p 00000000 00:00 0                          [heap]
Rss:                1200 kB
Anonymous:          1200 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:01 99                         /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 800 kB
Anonymous:             0 kB
Private_Dirty:         0 kB
VmFlags: rd ex mr mw me sd
";

    #[test]
    fn only_the_executables_clean_read_only_mappings_are_chosen() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 6);
        let exe = Path::new("/usr/bin/mesh-agent");
        let chosen: Vec<_> = maps
            .iter()
            .filter(|m| m.is_clean_image_of(exe))
            .map(|m| (m.start, m.perms.as_str(), m.rss_kb))
            .collect();
        // The rodata and the text; not the relocated read-only data (anonymous pages), not
        // the writable data, not the heap, not libc.
        assert_eq!(
            chosen,
            vec![
                (0x55d0a0000000, "r--p", 900),
                (0x55d0a0200000, "r-xp", 8500)
            ]
        );
    }

    #[test]
    fn header_lines_and_field_lines_are_told_apart() {
        assert!(parse_header("Rss:                 900 kB").is_none());
        assert!(parse_header("VmFlags: rd ex mr mw me sd").is_none());
        let anon = parse_header("7ffd1000-7ffd2000 rw-p 00000000 00:00 0").expect("header");
        assert_eq!(anon.path, None);
        let stack = parse_header("7ffd1000-7ffd2000 rw-p 00000000 00:00 0   [stack]");
        assert_eq!(stack.expect("header").path, None);
    }

    /// The real thing on this process: the executable's resident text shrinks, and the code
    /// keeps running (this test's own code lives in the pages it just unmapped).
    #[cfg(target_os = "linux")]
    #[test]
    fn trimming_this_process_unmaps_its_text_and_it_keeps_running() {
        let resident = || -> u64 {
            let exe = std::fs::read_link("/proc/self/exe").expect("exe");
            let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
            parse_smaps(&smaps)
                .iter()
                .filter(|m| m.is_clean_image_of(&exe))
                .map(|m| m.rss_kb)
                .sum()
        };
        let before = resident();
        let t = trim_startup_pages().expect("trim");
        assert!(t.mappings >= 1, "{t:?}");
        assert!(t.resident_kb > 0, "{t:?}");
        let after = resident();
        assert!(
            after < before,
            "resident executable pages: {before} kB before, {after} kB after"
        );
        // Code and read-only data still work after being faulted back in.
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(v.iter().sum::<u64>(), 500_500);
        assert!(format!("{t:?}").starts_with("Trimmed"));
    }
}
