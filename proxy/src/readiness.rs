//! Readiness as guards: each startup task takes a [`BlockReady`] and the sidecar is ready when
//! every guard has been dropped. A task that fails keeps its guard, so `/ready` says exactly
//! what is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Ready(
    Arc<Mutex<BTreeSet<&'static str>>>,
    /// Notes by topic: they explain a state without blocking readiness.
    Arc<Mutex<BTreeMap<&'static str, String>>>,
);

/// Blocks readiness until dropped.
pub struct BlockReady {
    ready: Ready,
    name: &'static str,
}

// === impl Ready ===

impl Ready {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn block(&self, name: &'static str) -> BlockReady {
        self.lock().insert(name);
        BlockReady {
            ready: self.clone(),
            name,
        }
    }

    /// Names of the tasks still pending; empty means ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock().iter().copied().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    /// A note shown with the readiness state, e.g. "serving from cache at revision 42".
    pub fn set_detail(&self, detail: Option<String>) {
        self.set_note("store", detail);
    }

    /// A note under `topic` (replacing its previous one; `None` clears it), e.g. an etcd
    /// alarm: shown with `/ready` without making the sidecar unready.
    pub fn set_note(&self, topic: &'static str, note: Option<String>) {
        let mut notes = self.1.lock().unwrap_or_else(|p| p.into_inner());
        match note {
            Some(n) => notes.insert(topic, n),
            None => notes.remove(topic),
        };
    }

    /// Every note, joined.
    pub fn detail(&self) -> Option<String> {
        let notes = self.1.lock().unwrap_or_else(|p| p.into_inner());
        (!notes.is_empty()).then(|| notes.values().cloned().collect::<Vec<_>>().join("; "))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<&'static str>> {
        // A poisoned set is still a valid set of names.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.ready.lock().remove(self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_when_all_guards_drop() {
        let r = Ready::new();
        let a = r.block("certificates");
        let b = r.block("snapshot");
        assert_eq!(r.pending(), vec!["certificates", "snapshot"]);
        drop(a);
        assert!(!r.is_ready());
        drop(b);
        assert!(r.is_ready());
    }
}
