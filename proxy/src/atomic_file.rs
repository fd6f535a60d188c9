//! Replacing a file atomically and durably, with its final permissions from the first byte.
//!
//! Private keys (`mesh-agent cert`) and the fail-static cache are written here. The file is
//! created under a unique temporary name in the target's directory with `O_CREAT | O_EXCL` and
//! its final mode (so a private key is never readable by others, not even for the moment
//! between a default-mode `create` and a `chmod`), written, fsynced, renamed over the target,
//! and the directory is fsynced so the rename itself survives a power loss.
//!
//! - The temporary name holds the pid, a per-process counter and a random suffix: two writers
//!   (two processes, or two threads) never share one, and a temporary file left by a crash
//!   never blocks the next write (a fixed `<name>.tmp`, as before, did when it was left
//!   read-only or owned by another user).
//! - A failure at any step leaves the previous file untouched and removes the temporary file.
//! - Readers see the old content or the new one, never a mix (`rename` is atomic within a
//!   file system, which is why the temporary file lives next to the target).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The mode of private files: owner read/write only.
pub const PRIVATE_MODE: u32 = 0o600;

/// How often a fresh temporary name is tried when one is taken (only a leftover with the same
/// pid, counter and 64 random bits can collide, so one retry is already improbable).
const NAME_ATTEMPTS: u32 = 8;

#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    #[error("cannot write {path}: it has no file name")]
    NoFileName { path: PathBuf },
    #[error("cannot create a temporary file next to {path} ({temp}): {source}")]
    Create {
        path: PathBuf,
        temp: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot write {path} (temporary file {temp}; the previous file is unchanged): {source}"
    )]
    Write {
        path: PathBuf,
        temp: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot flush {path} to disk (temporary file {temp}; the previous file is unchanged): {source}")]
    Sync {
        path: PathBuf,
        temp: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot rename {temp} over {path} (the previous file is unchanged): {source}")]
    Rename {
        path: PathBuf,
        temp: PathBuf,
        source: std::io::Error,
    },
    /// The new content is in place but the rename may not survive a crash.
    #[error("wrote {path} but cannot flush its directory {dir} to disk: {source}")]
    SyncDir {
        path: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// Replace `path` with `contents`, created with mode 0600 (owner only).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), AtomicWriteError> {
    write_atomic(path, contents, PRIVATE_MODE)
}

/// Replace `path` with `contents`, the new file created with `mode` (less what the umask
/// removes: a umask can only make it stricter).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), AtomicWriteError> {
    write_atomic_with(path, mode, |f| f.write_all(contents))
}

/// [`write_atomic`] with the content produced by `fill` (which may fail: then nothing is
/// replaced).
pub fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<(), AtomicWriteError> {
    let (temp, mut file) = create_temp(path, mode)?;
    // From here on, every failure removes the temporary file: the target is untouched.
    let cleanup = |e: AtomicWriteError| {
        let _ = std::fs::remove_file(&temp);
        e
    };
    fill(&mut file)
        .and_then(|()| file.flush())
        .map_err(|source| {
            cleanup(AtomicWriteError::Write {
                path: path.to_path_buf(),
                temp: temp.clone(),
                source,
            })
        })?;
    file.sync_all().map_err(|source| {
        cleanup(AtomicWriteError::Sync {
            path: path.to_path_buf(),
            temp: temp.clone(),
            source,
        })
    })?;
    drop(file);
    std::fs::rename(&temp, path).map_err(|source| {
        cleanup(AtomicWriteError::Rename {
            path: path.to_path_buf(),
            temp: temp.clone(),
            source,
        })
    })?;
    let dir = directory_of(path);
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| AtomicWriteError::SyncDir {
            path: path.to_path_buf(),
            dir,
            source,
        })
}

/// The directory holding `path` (`.` for a bare file name).
fn directory_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Create a new, empty temporary file next to `path` with `mode`, under a name no other writer
/// uses: `.<file name>.<pid>.<counter>.<16 random hex digits>.tmp` (hidden, so globs such as
/// `*.pem` do not pick it up).
fn create_temp(path: &Path, mode: u32) -> Result<(PathBuf, File), AtomicWriteError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| AtomicWriteError::NoFileName {
            path: path.to_path_buf(),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = directory_of(path);
    let mut attempt = 0;
    loop {
        let temp = dir.join(format!(
            ".{name}.{}.{}.{:016x}.tmp",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random_u64()
        ));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        #[cfg(not(unix))]
        let _ = mode;
        match options.open(&temp) {
            Ok(f) => return Ok((temp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < NAME_ATTEMPTS => {
                attempt += 1;
            }
            Err(source) => {
                return Err(AtomicWriteError::Create {
                    path: path.to_path_buf(),
                    temp,
                    source,
                })
            }
        }
    }
}

/// 64 random bits from the system's generator. Should it ever fail, the time's nanoseconds
/// stand in: uniqueness still rests on pid + counter, the random part only guards against a
/// leftover from an earlier process that had the same pid.
fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    match ring::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        names.sort();
        names
    }

    #[cfg(unix)]
    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key.pem");
        write_private(&path, b"one").expect("first write");
        write_private(&path, b"two").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");
        assert!(temp_files(dir.path()).is_empty());
        #[cfg(unix)]
        assert_eq!(mode_of(&path), 0o600);
    }

    /// The mode is 0600 from creation even under umask 000. The umask is per process, so the
    /// test runs itself again in a child started by `sh -c 'umask 000; exec ...'`, which writes
    /// the file; the parent checks the result.
    #[cfg(unix)]
    #[test]
    fn private_files_are_0600_even_with_a_permissive_umask() {
        const CHILD: &str = "TRELLIS_ATOMIC_FILE_UMASK_CHILD";
        if let Some(target) = std::env::var_os(CHILD) {
            write_private(Path::new(&target), b"secret").expect("write in the child");
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key.pem");
        let exe = std::env::current_exe().expect("test binary");
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg("umask 000 && exec \"$0\" \"$@\"")
            .arg(exe)
            .args([
                "--exact",
                "atomic_file::tests::private_files_are_0600_even_with_a_permissive_umask",
                "--nocapture",
            ])
            .env(CHILD, &path)
            .status()
            .expect("run the child");
        assert!(status.success(), "child: {status}");
        assert_eq!(
            std::fs::read(&path).expect("written by the child"),
            b"secret"
        );
        assert_eq!(mode_of(&path), 0o600);
        // The same umask gives a plain file its full requested mode: the umask really was 000.
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg("umask 000 && : > \"$0\"")
            .arg(dir.path().join("plain"))
            .status()
            .expect("sh");
        assert!(status.success());
        assert_eq!(mode_of(&dir.path().join("plain")), 0o666);
    }

    #[test]
    fn a_leftover_temporary_file_from_a_crash_does_not_block_the_next_write() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("key.pem");
        // A crash between create and rename leaves a temporary file behind...
        let (leftover, mut f) = create_temp(&path, PRIVATE_MODE).expect("temp");
        f.write_all(b"half").expect("write");
        drop(f);
        // ...and so did the old fixed-name scheme, here made unwritable.
        let old_fixed = dir.path().join("key.tmp");
        std::fs::create_dir(&old_fixed).expect("dir in the way");
        write_private(&path, b"whole").expect("write despite the leftovers");
        assert_eq!(std::fs::read(&path).expect("read"), b"whole");
        assert_eq!(
            std::fs::read(&leftover).expect("leftover untouched"),
            b"half"
        );
    }

    #[test]
    fn a_failed_write_leaves_the_previous_file_intact() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cache.json");
        write_private(&path, b"previous").expect("first write");
        let err = write_atomic_with(&path, PRIVATE_MODE, |f| {
            f.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .expect_err("the fill fails");
        assert!(matches!(err, AtomicWriteError::Write { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("disk full") && msg.contains("previous file is unchanged"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), b"previous");
        assert!(temp_files(dir.path()).is_empty(), "temporary file removed");

        // A rename that fails (the target is a non-empty directory) also changes nothing.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).expect("dir");
        std::fs::write(blocked.join("inside"), b"x").expect("file");
        let err = write_private(&blocked, b"new").expect_err("rename over a directory");
        assert!(matches!(err, AtomicWriteError::Rename { .. }), "{err}");
        assert!(blocked.join("inside").exists());
        assert!(temp_files(dir.path()).is_empty(), "temporary file removed");
    }

    #[test]
    fn a_missing_directory_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("absent/key.pem");
        let err = write_private(&path, b"x").expect_err("no directory");
        assert!(matches!(err, AtomicWriteError::Create { .. }), "{err}");
        assert!(err.to_string().contains("absent/key.pem"), "{err}");
    }
}
