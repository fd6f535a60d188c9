//! A real file system that fills up, for the tests of what a full disk does: a small tmpfs
//! mounted over a temporary directory (needs root, as the interception test's namespaces do;
//! without it the test says why on stderr and passes).

/// A small tmpfs mounted over a temporary directory for one test, unmounted on drop: a real
/// file system that fills up.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (and why, on stderr) where a file system cannot be mounted: not root, no `mount`.
    pub fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self { dir }),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fill the file system with `name` until a write fails for want of space.
    pub fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join(name)).expect("filler");
        let chunk = [0u8; 4096];
        // Bounded: the file system is small; 64 MiB is far past any size given to `mount`.
        for _ in 0..16_384 {
            if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_all()) {
                assert_eq!(e.raw_os_error(), Some(28), "ENOSPC expected: {e}");
                return;
            }
        }
        panic!("the file system never filled");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
