//! The fail-static cache: the last applied mesh state and its etcd revision, written atomically
//! and durably (a unique 0600 temp file, fsync, rename, fsync of the directory:
//! [`trellis_proxy::atomic_file`]) after every change, read at startup when etcd may be down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    /// The key prefix the entries were read under; a cache from another mesh is ignored.
    prefix: String,
    revision: i64,
    saved_at_unix: u64,
    /// Raw values by key (JSON text), re-validated on load like anything read from etcd.
    entries: BTreeMap<String, String>,
}

/// The same file, written from borrowed values (no copy of the state to write it).
#[derive(Serialize)]
struct CacheFileOut<'a> {
    format: u32,
    prefix: &'a str,
    revision: i64,
    saved_at_unix: u64,
    entries: BTreeMap<&'a str, std::borrow::Cow<'a, str>>,
}

/// What a cache file held.
pub struct Cached {
    pub revision: i64,
    pub saved_at_unix: u64,
    pub entries: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {message}")]
    Io { path: PathBuf, message: String },
}

#[derive(Clone)]
pub struct Cache {
    path: PathBuf,
    prefix: String,
}

// === impl Cache ===

impl Cache {
    pub fn new(path: PathBuf, prefix: &str) -> Self {
        Self {
            path,
            prefix: prefix.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Read the cache; `Ok(None)` when there is none (or it belongs to another prefix).
    pub fn load(&self) -> Result<Option<Cached>, CacheError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(e.to_string())),
        };
        let file: CacheFile =
            serde_json::from_str(&text).map_err(|e| self.err(format!("unreadable: {e}")))?;
        if file.format != FORMAT || file.prefix != self.prefix {
            return Ok(None);
        }
        Ok(Some(Cached {
            revision: file.revision,
            saved_at_unix: file.saved_at_unix,
            entries: file
                .entries
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect(),
        }))
    }

    /// Write the state atomically.
    pub fn save<'a>(
        &self,
        revision: i64,
        entries: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> Result<(), CacheError> {
        let file = CacheFileOut {
            format: FORMAT,
            prefix: &self.prefix,
            revision,
            saved_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            entries: entries
                .map(|(k, v)| (k, String::from_utf8_lossy(v)))
                .collect(),
        };
        let json = serde_json::to_vec(&file).map_err(|e| self.err(e.to_string()))?;
        if let Some(dir) = self.path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| self.err(e.to_string()))?;
            }
        }
        // 0600: the cache holds the whole mesh state (addresses, policies, API key digests),
        // which only this sidecar needs to read.
        trellis_proxy::atomic_file::write_private(&self.path, &json)
            .map_err(|e| self.err(e.to_string()))
    }

    fn err(&self, message: String) -> CacheError {
        CacheError::Io {
            path: self.path.clone(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_and_prefix_mismatch_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/cache.json");
        let cache = Cache::new(path.clone(), "/a");
        assert!(cache.load().unwrap().is_none());
        cache
            .save(42, [("/a/v1/mesh/k", b"{}".as_slice())].into_iter())
            .unwrap();
        let c = cache.load().unwrap().unwrap();
        assert_eq!(c.revision, 42);
        assert_eq!(
            c.entries,
            vec![("/a/v1/mesh/k".to_string(), b"{}".to_vec())]
        );
        assert!(Cache::new(path.clone(), "/b").load().unwrap().is_none());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "the cache is private");
        }
        std::fs::write(&path, "garbage").unwrap();
        assert!(cache.load().is_err());
    }
}
