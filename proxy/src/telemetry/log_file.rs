//! The access log's file: appended to by one writer thread, reopened when it is rotated away,
//! and careful on a full disk.
//!
//! Why it follows the path: with logrotate's default (`create`: rename the file, make a new
//! one), a writer that keeps its descriptor writes on into the renamed file, and once that
//! is deleted, into a file no directory names: the disk fills with a log nobody can read or
//! remove, and only a restart frees it. So every second, at a write, the path is checked
//! against the open file (device and inode, as `tail -F` does) and reopened when it names
//! another file or none. `copytruncate` works as well: the file is opened with `O_APPEND`.
//!
//! Why it tracks failed writes: on a full disk every batch fails. Each would log a warning (a
//! flood, on a disk that is already full); the lines are lost uncounted; and a batch cut off
//! mid-line leaves a fragment that the next line would be glued to, so one bad write would
//! spoil the first line after recovery as well. Instead: one warning when writes start failing
//! and one line when they work again, lost lines counted
//! (`trellis_access_log_lost_lines_total`), and a fragment closed with a newline before the
//! next write, so every line after it is whole.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

/// How often the path is compared with the open file (and a file that could not be opened
/// is tried again).
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// An access log file appended to by one writer.
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    /// Device and inode of the open file.
    id: Option<(u64, u64)>,
    checked: Instant,
    /// The file may end in the middle of a line (a write failed part way).
    partial: bool,
    /// Lines lost since writes started failing (0 while they work).
    failing: Option<u64>,
    lost: Counter,
}

// === impl LogFile ===

impl LogFile {
    /// Open (or create) `path` for appending; on failure, say so and try again at each write
    /// (once a second at most). `lost` counts the lines that could not be written.
    pub fn open(path: PathBuf, lost: Counter) -> Self {
        let mut f = Self {
            path,
            file: None,
            id: None,
            checked: Instant::now(),
            partial: false,
            failing: None,
            lost,
        };
        if let Err(e) = f.reopen() {
            tracing::error!(path = %f.path.display(), error = %e, "cannot open the access log: lines are lost until it can be opened");
        }
        f
    }

    /// Append `buf`: `lines` whole lines, each ending with `\n`.
    pub fn append(&mut self, buf: &[u8], lines: u64) {
        self.follow_path();
        let Some(file) = self.file.as_mut() else {
            self.lose(lines, "the file is not open");
            return;
        };
        if self.partial {
            match write_some(file, b"\n") {
                Ok(()) => self.partial = false,
                Err((_, e)) => {
                    self.lose(lines, &e.to_string());
                    return;
                }
            }
        }
        match write_some(file, buf) {
            Ok(()) => {
                if let Some(lost) = self.failing.take() {
                    tracing::info!(path = %self.path.display(), lost, "access log writes succeed again");
                }
            }
            Err((written, e)) => {
                self.partial = written > 0;
                // The lines whose newline did not make it.
                let unwritten = buf[written..].iter().filter(|&&b| b == b'\n').count() as u64;
                self.lose(unwritten, &e.to_string());
            }
        }
    }

    /// Count lost lines; warn when writes start failing, not at every failure.
    fn lose(&mut self, lines: u64, error: &str) {
        self.lost.inc_by(lines);
        match &mut self.failing {
            Some(lost) => *lost += lines,
            None => {
                self.failing = Some(lines);
                tracing::warn!(path = %self.path.display(), error, "access log write failed: lines are lost (counted in trellis_access_log_lost_lines_total) until writes succeed again");
            }
        }
    }

    /// Reopen when the path names another file than the open one, or none (rotated, removed),
    /// or when no file is open; once a second at most.
    fn follow_path(&mut self) {
        if self.checked.elapsed() < CHECK_EVERY {
            return;
        }
        self.checked = Instant::now();
        let current = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if self.file.is_some() && current.is_some() && current == self.id {
            return;
        }
        match self.reopen() {
            Ok(()) => {
                tracing::info!(path = %self.path.display(), "access log reopened (rotated, removed or not open before)")
            }
            // Keep writing to the old file, if any, rather than lose lines.
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "cannot reopen the access log")
            }
        }
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let meta = file.metadata()?;
        self.id = Some((meta.dev(), meta.ino()));
        self.file = Some(file);
        // A new file starts at a line boundary.
        self.partial = false;
        Ok(())
    }
}

/// Write all of `buf`; on failure, how much was written and why.
fn write_some(file: &mut File, buf: &[u8]) -> Result<(), (usize, std::io::Error)> {
    let mut written = 0;
    while written < buf.len() {
        match file.write(&buf[written..]) {
            Ok(0) => return Err((written, ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &std::path::Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// logrotate's `create`: the file is renamed and a new one made, or just removed; the next
    /// write after the check goes to the path's file.
    #[test]
    fn follows_the_path_when_the_file_is_renamed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut log = LogFile::open(path.clone(), Counter::default());
        log.append(b"one\n", 1);
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        log.append(b"two\n", 1); // before the check: still the open (renamed) file
        log.checked -= CHECK_EVERY;
        log.append(b"three\n", 1);
        assert_eq!(read(&dir.path().join("access.log.1")), "one\ntwo\n");
        assert_eq!(read(&path), "three\n");
        std::fs::remove_file(&path).unwrap();
        log.checked -= CHECK_EVERY;
        log.append(b"four\n", 1);
        assert_eq!(read(&path), "four\n");
        // copytruncate: the same file, emptied; O_APPEND writes at its new end.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        log.checked -= CHECK_EVERY;
        log.append(b"five\n", 1);
        assert_eq!(read(&path), "five\n");
    }

    /// `/dev/full` fails every write with ENOSPC, as a full disk does: each line is counted as
    /// lost.
    #[test]
    fn lines_that_cannot_be_written_are_counted() {
        let lost = Counter::default();
        let mut log = LogFile::open(PathBuf::from("/dev/full"), lost.clone());
        log.append(b"a\nb\n", 2);
        log.append(b"c\n", 1);
        assert_eq!(lost.get(), 3);
        assert_eq!(log.failing, Some(3));
    }

    /// A file that cannot be opened loses lines (counted) and is tried again a second later.
    #[test]
    fn a_file_that_cannot_be_opened_is_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/access.log");
        let lost = Counter::default();
        let mut log = LogFile::open(path.clone(), lost.clone());
        log.append(b"lost\n", 1);
        assert_eq!(lost.get(), 1);
        std::fs::create_dir(dir.path().join("logs")).unwrap();
        log.checked -= CHECK_EVERY;
        log.append(b"kept\n", 1);
        assert_eq!(read(&path), "kept\n");
        assert_eq!(log.failing, None, "recovered");
    }
}
