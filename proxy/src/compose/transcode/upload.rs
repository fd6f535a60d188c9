//! The request body of a transcoded client-streaming (or bidirectional) call: the client's
//! JSON array, rewritten as gRPC messages while it streams. Each element is mapped to the
//! method's input message and framed as soon as its last byte arrives (Envoy's transcoder
//! streams the same way), so a long upload is neither held whole nor delayed.
//!
//! Nothing half-made reaches the service: only complete messages are sent. When an element
//! does not map, is not JSON, or the body grows past its limit, the body fails with an HTTP/2
//! `CANCEL`, so the gRPC service sees a cancelled call (the messages before it arrived, but
//! the call never completes), and the cause waits in the [`Failed`] slot for the gateway to
//! answer the client with it (400 or 413, as for a unary body).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use trellis_policies::compose::{ArraySplitter, Binding};

use crate::compose::ComposeError;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why the gateway failed a streamed request body: the answer the client gets.
#[derive(Clone, Debug, Default)]
pub struct Failed(Arc<Mutex<Option<ComposeError>>>);

/// The client's JSON array as a stream of gRPC messages.
pub struct Upload {
    body: Incoming,
    splitter: ArraySplitter,
    binding: Arc<Binding>,
    vars: Vec<String>,
    query: Option<String>,
    ignore_unknown_query: bool,
    /// The largest body, in bytes, and what has been read.
    limit: u64,
    read: u64,
    failed: Failed,
    done: bool,
}

// === impl Failed ===

impl Failed {
    /// The cause, once (the body failed for it).
    pub fn take(&self) -> Option<ComposeError> {
        self.0.lock().ok()?.take()
    }

    fn set(&self, e: ComposeError) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert(e);
        }
    }
}

// === impl Upload ===

impl Upload {
    pub fn new(
        body: Incoming,
        binding: Arc<Binding>,
        vars: Vec<String>,
        query: Option<String>,
        ignore_unknown_query: bool,
        limit: u64,
    ) -> (Self, Failed) {
        let failed = Failed::default();
        let upload = Self {
            body,
            splitter: ArraySplitter::default(),
            binding,
            vars,
            query,
            ignore_unknown_query,
            limit,
            read: 0,
            failed: failed.clone(),
            done: false,
        };
        (upload, failed)
    }

    /// The messages `data` completes, framed.
    fn map(&mut self, data: &[u8]) -> Result<Bytes, ComposeError> {
        self.read = self.read.saturating_add(data.len() as u64);
        if self.read > self.limit {
            return Err(ComposeError::RequestTooLarge { limit: self.limit });
        }
        let mut out = BytesMut::new();
        let (b, vars, query) = (&self.binding, &self.vars, self.query.as_deref());
        let ignore = self.ignore_unknown_query;
        self.splitter
            .feed(data, |i, element| {
                let message = b.stream_message(i, element, vars, query, ignore)?;
                put_frame(&mut out, &message);
                Ok(())
            })
            .map_err(ComposeError::Transcode)?;
        Ok(out.freeze())
    }

    /// Fail the body: the cause kept for the answer, the stream cancelled.
    fn fail(&mut self, e: ComposeError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.done = true;
        self.failed.set(e);
        Poll::Ready(Some(Err(cancel())))
    }
}

/// The error the body fails with: hyper resets the HTTP/2 stream with the reason it finds in
/// it, and `CANCEL` is what a gRPC server reads as a cancelled call.
fn cancel() -> BoxError {
    Box::new(h2::Error::from(h2::Reason::CANCEL))
}

/// One uncompressed gRPC message: flag 0, a 4-byte big-endian length, the message.
pub(super) fn put_frame(out: &mut BytesMut, message: &[u8]) {
    out.reserve(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).unwrap_or(u32::MAX));
    out.put_slice(message);
}

/// The whole array at once (a body the edge read ahead to validate it), framed.
pub fn whole(
    binding: &Binding,
    body: &[u8],
    vars: &[String],
    query: Option<&str>,
    ignore_unknown_query: bool,
) -> Result<Bytes, ComposeError> {
    let mut splitter = ArraySplitter::default();
    let mut out = BytesMut::new();
    splitter
        .feed(body, |i, element| {
            let message = binding.stream_message(i, element, vars, query, ignore_unknown_query)?;
            put_frame(&mut out, &message);
            Ok(())
        })
        .and_then(|()| splitter.finish())
        .map_err(ComposeError::Transcode)?;
    Ok(out.freeze())
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    if let Err(e) = self.splitter.finish() {
                        return self.fail(ComposeError::Transcode(e));
                    }
                    self.done = true;
                    return Poll::Ready(None);
                }
                // The client broke its own body: the watch blames it; the service sees the
                // call cancelled, as for a bad element.
                Poll::Ready(Some(Err(_))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(cancel())));
                }
                Poll::Ready(Some(Ok(f))) => f,
            };
            // Trailers of the client's body have no place in the gRPC request.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            match self.map(&data) {
                Ok(out) if out.is_empty() => continue,
                Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                Err(e) => return self.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
