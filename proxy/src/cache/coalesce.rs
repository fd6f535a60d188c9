//! Request coalescing: the first miss for a key goes upstream (the leader); identical misses
//! arriving meanwhile wait for it, bounded, then look the cache up again. The leader's guard
//! is released when its response is stored, found not storable, or abandoned, so a waiter
//! never waits for a response that will not come.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Default)]
pub struct Inflight {
    leaders: Mutex<HashMap<String, watch::Receiver<()>>>,
}

pub enum Turn {
    Lead(Leader),
    Wait(watch::Receiver<()>),
}

/// Held by the request that went upstream; dropping it wakes the waiters.
pub struct Leader {
    key: String,
    set: Arc<Inflight>,
    _done: watch::Sender<()>,
}

// === impl Inflight ===

impl Inflight {
    /// Lead the request for `key`, or wait for the one already leading it.
    pub fn join(self: &Arc<Self>, key: &str) -> Turn {
        let mut leaders = self.leaders.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = leaders.get(key) {
            return Turn::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(());
        leaders.insert(key.to_string(), rx);
        Turn::Lead(Leader {
            key: key.to_string(),
            set: self.clone(),
            _done: tx,
        })
    }

    /// Lead only if nobody is (a background revalidation never waits).
    pub fn try_lead(self: &Arc<Self>, key: &str) -> Option<Leader> {
        match self.join(key) {
            Turn::Lead(l) => Some(l),
            Turn::Wait(_) => None,
        }
    }
}

/// Wait for the leader to finish, at most `max`; `false` on timeout.
pub async fn wait(mut rx: watch::Receiver<()>, max: Duration) -> bool {
    // The sender is dropped when the leader is done: `changed` then fails.
    tokio::time::timeout(max, async { while rx.changed().await.is_ok() {} })
        .await
        .is_ok()
}

// === impl Leader ===

impl Drop for Leader {
    fn drop(&mut self) {
        // Removed before the sender drops (fields drop after this): a woken waiter that misses
        // again may lead the next request.
        let mut leaders = self.set.leaders.lock().unwrap_or_else(|p| p.into_inner());
        leaders.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_and_waiters_woken_when_it_is_done() {
        let set = Arc::new(Inflight::default());
        let Turn::Lead(leader) = set.join("k") else {
            panic!("first is the leader")
        };
        let Turn::Wait(rx) = set.join("k") else {
            panic!("second waits")
        };
        assert!(set.try_lead("k").is_none());
        let waiter = tokio::spawn(wait(rx, Duration::from_secs(5)));
        drop(leader);
        assert!(waiter.await.unwrap(), "woken, not timed out");
        assert!(
            matches!(set.join("k"), Turn::Lead(_)),
            "the key is free again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_is_bounded() {
        let set = Arc::new(Inflight::default());
        let _leader = set.join("k");
        let Turn::Wait(rx) = set.join("k") else {
            panic!()
        };
        assert!(!wait(rx, Duration::from_millis(100)).await);
    }
}
