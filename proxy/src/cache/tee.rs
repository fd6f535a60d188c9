//! Storing a response while it streams to the client: the body's frames are copied as they
//! pass (the client is never made to wait for the whole body), and the entry is inserted only
//! when the body has ended cleanly with every byte its `Content-Length` announced. A body that
//! fails, is abandoned by the client, or grows past the object limit is dropped: nothing
//! half-written is ever served.
//!
//! With a disk tier, a body too large for memory goes to disk instead: from its first frame
//! when its `Content-Length` says so, or from the frame that overflows the memory limit (the
//! frames buffered so far are written first). The frames are then queued to the file's
//! writer, never buffered whole.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

use super::coalesce::Leader;
use super::disk::Sink;
use super::store::{Entry, Store};

pub struct Tee {
    buf: BytesMut,
    limit: usize,
    /// The announced length, checked at the end.
    expected: Option<usize>,
    overflowed: bool,
    pending: Option<Pending>,
    /// Writing to the disk tier (boxed: only large bodies have one).
    disk: Option<Box<Sink>>,
}

/// What the entry is made of once the body is complete.
pub(super) struct Pending {
    pub store: Arc<Store>,
    pub primary: Arc<str>,
    /// Its hash ([`Store::hash`]).
    pub hash: u64,
    /// Kept only when the store has seen a `Vary` (see `Fetch::headers`).
    pub req_headers: Option<HeaderMap>,
    /// Headers, freshness and times: everything but the body (set in place when it has
    /// arrived: nothing else holds this `Arc` until it is stored).
    pub entry: Arc<Entry>,
    /// Purged since the request started: do not store (the purge must win).
    pub purged: super::PurgeCheck,
    /// When the request was sent (the disk tier's purge check).
    pub started: Instant,
    pub _leader: Option<Leader>,
}

// === impl Tee ===

impl Tee {
    /// Boxed from the start: a tee (with the entry in it) is large, and the response body
    /// keeps it boxed; built on the stack it was copied at every move on the way there.
    /// `room` is the body's buffer when one was made with the entry's header values
    /// ([`super::entry::Built::body`]); without one, it is allocated here.
    pub(super) fn new(
        pending: Pending,
        limit: usize,
        expected: Option<usize>,
        room: BytesMut,
    ) -> Box<Self> {
        let buf = match room.capacity() {
            0 => BytesMut::with_capacity(expected.unwrap_or(8 * 1024).min(limit)),
            _ => room,
        };
        Box::new(Self {
            buf,
            limit,
            expected,
            overflowed: false,
            pending: Some(pending),
            disk: None,
        })
    }

    /// A tee writing straight to the disk tier (the body is too large for memory).
    pub(super) fn to_disk(sink: Sink) -> Box<Self> {
        Box::new(Self {
            buf: BytesMut::new(),
            limit: 0,
            expected: None,
            overflowed: false,
            pending: None,
            disk: Some(Box::new(sink)),
        })
    }

    /// A data frame passed to the client.
    pub fn data(&mut self, chunk: &Bytes) {
        if self.overflowed {
            return;
        }
        if let Some(sink) = &mut self.disk {
            if !sink.data(chunk) {
                self.abandon();
            }
            return;
        }
        if self.buf.len() + chunk.len() > self.limit {
            // Over the memory tier's limit: to disk, or the rest streams through unstored.
            match self.spill() {
                Some(sink) => {
                    self.disk = Some(Box::new(sink));
                    self.data(chunk);
                }
                None => self.abandon(),
            }
            return;
        }
        self.buf.extend_from_slice(chunk);
    }

    fn abandon(&mut self) {
        self.overflowed = true;
        self.buf = BytesMut::new();
        self.pending = None;
        self.disk = None;
    }

    /// Move the body so far to a disk write, if the policy has a disk tier that takes it.
    fn spill(&mut self) -> Option<Sink> {
        let disk = self.pending.as_ref()?.store.disk()?.clone();
        let p = self.pending.take()?;
        let key = super::key::variant_of(&p.primary, p.req_headers.as_ref(), &p.entry.vary)?;
        let expected = self.expected.map(|n| n as u64);
        let mut sink = disk.tee(
            key,
            p.primary.len(),
            p.entry,
            p.started,
            p._leader,
            expected,
        )?;
        let so_far = std::mem::take(&mut self.buf).freeze();
        sink.data(&so_far).then_some(sink)
    }

    /// The body ended cleanly: store the entry if it is whole.
    pub fn finish(mut self) {
        if let Some(sink) = self.disk.take() {
            sink.finish();
            return;
        }
        let Some(p) = self.pending.take() else { return };
        if self.overflowed || self.expected.is_some_and(|n| n != self.buf.len()) {
            return;
        }
        let mut entry = p.entry;
        let Some(e) = Arc::get_mut(&mut entry) else {
            // Never shared before it is stored; if it were, it is not stored.
            return;
        };
        e.body = std::mem::take(&mut self.buf).freeze();
        if p.purged.selects(&entry) {
            return;
        }
        p.store
            .insert_hashed(p.primary, p.hash, p.req_headers.as_ref(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::super::metrics::CacheMetrics;
    use super::*;
    use std::time::{Duration, Instant};

    fn pending(store: &Arc<Store>) -> Pending {
        Pending {
            store: store.clone(),
            primary: "p".into(),
            hash: store.hash("p"),
            req_headers: None,
            entry: Arc::new(Entry {
                status: http::StatusCode::OK,
                headers: Default::default(),
                body: Bytes::new(),
                cc: Default::default(),
                lifetime: Duration::from_secs(60),
                initial_age: Duration::ZERO,
                stored: Instant::now(),
                fetched: Instant::now(),
                resource: crate::cache::key::Resource::whole("h\0/a"),
                tags: vec![],
                vary: Arc::from([]),
                disk: None,
            }),
            purged: super::super::PurgeCheck::never(),
            started: Instant::now(),
            _leader: None,
        }
    }

    #[test]
    fn only_whole_bodies_within_the_limit_are_stored() {
        let m = CacheMetrics::default();
        let store = Arc::new(Store::new(1 << 20, 1 << 18, &m));
        let key = |s: &Store| s.lookup("p", &HeaderMap::new());

        // Announced 10 bytes, 5 arrived (the upstream closed mid-body): not stored.
        let mut t = Tee::new(pending(&store), 100, Some(10), BytesMut::new());
        t.data(&Bytes::from_static(b"hello"));
        t.finish();
        assert!(key(&store).is_none());

        // Past the limit: streamed through, not stored.
        let mut t = Tee::new(pending(&store), 4, None, BytesMut::new());
        t.data(&Bytes::from_static(b"hello"));
        t.finish();
        assert!(key(&store).is_none());

        // Abandoned (dropped without finish): not stored.
        let mut t = Tee::new(pending(&store), 100, None, BytesMut::new());
        t.data(&Bytes::from_static(b"hel"));
        drop(t);
        assert!(key(&store).is_none());

        // In the room made with the header values (what fits allocates nothing).
        let mut t = Tee::new(pending(&store), 100, Some(10), BytesMut::with_capacity(10));
        t.data(&Bytes::from_static(b"hello"));
        t.data(&Bytes::from_static(b"world"));
        t.finish();
        assert_eq!(key(&store).unwrap().body, "helloworld");
    }
}
