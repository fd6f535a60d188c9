//! Request coalescing: the first miss for a key goes upstream (the leader); identical misses
//! arriving meanwhile wait for it, bounded, then look the cache up again. The leader's guard
//! is released when its response is stored, found not storable, or abandoned, so a waiter
//! never waits for a response that will not come.
//!
//! Most misses are never joined, so a miss costs one short lock and a map slot keyed by the
//! key's hash (no copy of the key, no channel): the channel that wakes waiters is made by the
//! first waiter. Two keys with the same 64-bit hash share a slot: a waiter then finds nothing
//! stored for its key when woken and goes upstream itself, as after a timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::store::Prehashed;

/// Independent locks: concurrent misses for different keys rarely meet.
const SHARDS: usize = 16;

/// Keyed by the hash the store computed for the key (once per request: the plan carries it).
pub struct Inflight {
    shards: [Mutex<HashMap<u64, Slot, Prehashed>>; SHARDS],
}

/// A key being fetched; the sender exists once someone waits.
#[derive(Default)]
struct Slot {
    done: Option<watch::Sender<()>>,
}

pub enum Turn {
    Lead(Leader),
    Wait(watch::Receiver<()>),
}

/// Held by the request that went upstream; dropping it wakes the waiters.
pub struct Leader {
    hash: u64,
    set: Arc<Inflight>,
    /// Still holds its slot (`false` once released by [`Leader::release_if_alone`]).
    held: bool,
}

// === impl Inflight ===

impl Default for Inflight {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| Mutex::default()),
        }
    }
}

impl Inflight {
    /// Lead the request for the key of this hash, or wait for the one already leading it.
    pub fn join(self: &Arc<Self>, hash: u64) -> Turn {
        let mut slots = self.shard(hash);
        if let Some(slot) = slots.get_mut(&hash) {
            let done = slot.done.get_or_insert_with(|| watch::channel(()).0);
            return Turn::Wait(done.subscribe());
        }
        slots.insert(hash, Slot::default());
        Turn::Lead(Leader {
            hash,
            set: self.clone(),
            held: true,
        })
    }

    /// Lead only if nobody is (a background revalidation never waits).
    pub fn try_lead(self: &Arc<Self>, hash: u64) -> Option<Leader> {
        let mut slots = self.shard(hash);
        if slots.contains_key(&hash) {
            return None;
        }
        slots.insert(hash, Slot::default());
        Some(Leader {
            hash,
            set: self.clone(),
            held: true,
        })
    }

    fn shard(&self, hash: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Slot, Prehashed>> {
        // Middle bits: the map (whose hash is the key itself) uses the low and the top ones.
        let i = (hash >> 32) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
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

impl Leader {
    /// Give the slot up now unless someone waits on it (`Err(self)`: keep leading). Checked and
    /// removed under one lock: a request arriving afterwards leads a fetch of its own, none is
    /// left waiting for a response that will not be stored (`min_uses`).
    pub fn release_if_alone(mut self) -> Result<(), Leader> {
        let mut slots = self.set.shard(self.hash);
        if slots.get(&self.hash).is_some_and(|s| s.done.is_some()) {
            drop(slots);
            return Err(self);
        }
        slots.remove(&self.hash);
        drop(slots);
        self.held = false;
        Ok(())
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        // Removed under the lock, then the sender dropped: a waiter subscribed under the same
        // lock, so none misses the wake-up, and one that misses again may lead the next
        // request.
        let slot = self.set.shard(self.hash).remove(&self.hash);
        drop(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 0x1234_5678_9abc_def0;
    const A: u64 = 7;

    #[tokio::test]
    async fn one_leader_and_waiters_woken_when_it_is_done() {
        let set = Arc::new(Inflight::default());
        let Turn::Lead(leader) = set.join(K) else {
            panic!("first is the leader")
        };
        let Turn::Wait(rx) = set.join(K) else {
            panic!("second waits")
        };
        assert!(set.try_lead(K).is_none());
        let waiter = tokio::spawn(wait(rx, Duration::from_secs(5)));
        drop(leader);
        assert!(waiter.await.unwrap(), "woken, not timed out");
        assert!(
            matches!(set.join(K), Turn::Lead(_)),
            "the key is free again"
        );
    }

    #[test]
    fn a_leader_alone_releases_its_slot_but_not_one_waited_for() {
        let set = Arc::new(Inflight::default());
        let Turn::Lead(alone) = set.join(A) else {
            panic!()
        };
        assert!(alone.release_if_alone().is_ok());
        let Turn::Lead(next) = set.join(A) else {
            panic!("released: the next request leads")
        };
        let Turn::Wait(_rx) = set.join(A) else {
            panic!()
        };
        let next = next
            .release_if_alone()
            .expect_err("someone waits: keeps leading");
        assert!(set.try_lead(A).is_none());
        drop(next);
        assert!(set.try_lead(A).is_some(), "dropped: released");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_is_bounded() {
        let set = Arc::new(Inflight::default());
        let _leader = set.join(K);
        let Turn::Wait(rx) = set.join(K) else {
            panic!()
        };
        assert!(!wait(rx, Duration::from_millis(100)).await);
    }
}
