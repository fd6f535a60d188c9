//! Several key ranges watched over one gRPC watch stream (etcd multiplexes watch IDs on a
//! stream): a scoped sidecar watches the policies and each service it holds, and adding or
//! dropping a service costs one message on the stream, not a new stream.

use std::collections::{HashMap, HashSet, VecDeque};

use etcd_client::{WatchOptions, WatchStream};

use super::{Etcd, EtcdError};

pub struct Watches {
    pub stream: WatchStream,
    /// Prefixes whose `created` answer has not arrived yet, in request order (etcd answers
    /// the creations on one stream in the order they were asked).
    pending: VecDeque<String>,
    by_id: HashMap<i64, String>,
    /// Watches cancelled on purpose: their `canceled` answer is expected.
    cancelled: HashSet<i64>,
}

fn options(from_revision: i64) -> WatchOptions {
    WatchOptions::new()
        .with_prefix()
        .with_start_revision(from_revision)
        .with_progress_notify()
}

// === impl Watches ===

impl Watches {
    /// Open one stream watching every `(prefix, from_revision)`; at least one is needed.
    pub async fn open(etcd: &Etcd, ranges: &[(String, i64)]) -> Result<Self, EtcdError> {
        let Some(((first, from), rest)) = ranges.split_first() else {
            return Err(etcd.err(etcd_client::Error::WatchError("nothing to watch".into())));
        };
        let mut client = etcd.client.clone();
        let stream = etcd
            .call(client.watch(first.as_str(), Some(options(*from))))
            .await?;
        let mut this = Self {
            stream,
            pending: VecDeque::from([first.clone()]),
            by_id: HashMap::new(),
            cancelled: HashSet::new(),
        };
        for (prefix, from) in rest {
            this.add(etcd, prefix, *from).await?;
        }
        Ok(this)
    }

    /// Watch one more prefix on the stream, from `from_revision`.
    pub async fn add(
        &mut self,
        etcd: &Etcd,
        prefix: &str,
        from_revision: i64,
    ) -> Result<(), EtcdError> {
        etcd.call(self.stream.watch(prefix, Some(options(from_revision))))
            .await?;
        self.pending.push_back(prefix.to_string());
        Ok(())
    }

    /// Stop watching `prefix` (its `canceled` answer will be ignored).
    pub async fn cancel(&mut self, etcd: &Etcd, prefix: &str) -> Result<(), EtcdError> {
        let Some(id) = self
            .by_id
            .iter()
            .find(|(_, p)| p.as_str() == prefix)
            .map(|(id, _)| *id)
        else {
            // Not created yet: forget it when its creation arrives.
            if let Some(i) = self.pending.iter().position(|p| p == prefix) {
                self.pending[i] = String::new();
            }
            return Ok(());
        };
        self.by_id.remove(&id);
        self.cancelled.insert(id);
        etcd.call(self.stream.cancel(id)).await
    }

    /// A `created` answer: the oldest pending prefix now has this ID.
    pub fn created(&mut self, id: i64) -> Option<&str> {
        let prefix = self.pending.pop_front()?;
        if prefix.is_empty() {
            // Cancelled before it was created.
            self.cancelled.insert(id);
            return None;
        }
        self.by_id.insert(id, prefix);
        self.by_id.get(&id).map(String::as_str)
    }

    /// Whether a `canceled` answer is for a watch we cancelled ourselves.
    pub fn expected_cancel(&mut self, id: i64) -> bool {
        self.cancelled.remove(&id)
    }

    /// The prefix a watch ID follows.
    pub fn prefix(&self, id: i64) -> Option<&str> {
        self.by_id.get(&id).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.by_id.len() + self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
