//! A disk hit's body, streamed from its file: each block is read (from the page cache on the
//! runtime thread when it holds it, else on the blocking pool) and checked before it is
//! handed on (a few blocks per read, one read ahead of the client at
//! most), so neither a whole body nor a blocking thread is held for a slow client.

use std::fs::File;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;

use super::format::{self, ReadError};
use super::{DiskFile, DiskTier};
use crate::http::body::BoxError;

/// Blocks read per trip to the blocking pool (256 KiB).
const BLOCKS_PER_READ: usize = 4;

/// The body of an entry loaded from disk: its file, opened and checked up to the first block
/// when the entry was looked up.
pub struct DiskBody {
    tier: Arc<DiskTier>,
    key: String,
    /// Holding it keeps the file on disk while the body streams, even if it is evicted.
    file: Arc<DiskFile>,
    opened: Mutex<Option<(File, Bytes)>>,
    body_len: u64,
}

impl std::fmt::Debug for DiskBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskBody")
            .field("file", &self.file.name)
            .field("body_len", &self.body_len)
            .finish()
    }
}

type Read = JoinHandle<Result<(File, Bytes), ReadError>>;

pub struct DiskStream {
    body: Arc<DiskBody>,
    file: Option<File>,
    ready: Option<Bytes>,
    sent: u64,
    reading: Option<Read>,
}

// === impl DiskBody ===

impl DiskBody {
    pub(super) fn new(
        tier: Arc<DiskTier>,
        key: String,
        file: Arc<DiskFile>,
        opened: File,
        first: Bytes,
        body_len: u64,
    ) -> Self {
        Self {
            tier,
            key,
            file,
            opened: Mutex::new(Some((opened, first))),
            body_len,
        }
    }

    pub(super) fn key(&self) -> &str {
        &self.key
    }

    pub(super) fn file(&self) -> &Arc<DiskFile> {
        &self.file
    }

    /// The body as a stream: from the file opened at lookup, or (a second response from the
    /// same lookup) from the file opened again.
    pub fn stream(self: &Arc<Self>) -> DiskStream {
        let taken = self.opened.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (file, ready, reading) = match taken {
            Some((f, first)) => (Some(f), Some(first), None),
            None => {
                let (path, len, key) = (self.file.path(), self.file.bytes, self.key.clone());
                let read: Read = tokio::task::spawn_blocking(move || {
                    format::open(&path, len, &key).map(|o| (o.file, o.first))
                });
                (None, None, Some(read))
            }
        };
        DiskStream {
            body: self.clone(),
            file,
            ready,
            sent: 0,
            reading,
        }
    }
}

// === impl DiskStream ===

impl DiskStream {
    fn fail(&mut self, e: ReadError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let b = &self.body;
        b.tier.corrupt(&b.key, &b.file, &e);
        // Ends the response short: the client sees a cut body, never a wrong byte.
        self.sent = b.body_len;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl Body for DiskStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(b) = this.ready.take().filter(|b| !b.is_empty()) {
                this.sent += b.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if this.sent >= this.body.body_len {
                return Poll::Ready(None);
            }
            if let Some(reading) = &mut this.reading {
                let done = match Pin::new(reading).poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                this.reading = None;
                match done {
                    Ok(Ok((file, b))) => {
                        this.file = Some(file);
                        this.ready = Some(b);
                        continue;
                    }
                    Ok(Err(e)) => return this.fail(e),
                    Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
                }
            }
            let Some(mut file) = this.file.take() else {
                return Poll::Ready(None);
            };
            let left = this.body.body_len - this.sent;
            // What the page cache holds is read here, without a trip to the blocking pool;
            // the rest there, as a disk read may block.
            match format::read_blocks_cached(&mut file, left, BLOCKS_PER_READ) {
                Ok(Some(b)) => {
                    this.file = Some(file);
                    this.ready = Some(b);
                    continue;
                }
                Ok(None) => {}
                Err(e) => return this.fail(e),
            }
            this.reading = Some(tokio::task::spawn_blocking(move || {
                format::read_blocks(&mut file, left, BLOCKS_PER_READ).map(|b| (file, b))
            }));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.body.body_len && self.ready.as_ref().is_none_or(|b| b.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.body.body_len - self.sent)
    }
}

impl Drop for DiskStream {
    fn drop(&mut self) {
        if let Some(r) = self.reading.take() {
            r.abort();
        }
    }
}
