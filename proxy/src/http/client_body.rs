//! The downstream client's request body, watched on its way upstream so that a failure the
//! client caused is blamed on the client.
//!
//! When a request fails while its body is being streamed, the error hyper reports looks the
//! same whoever broke it: a malformed chunked body from the client, a client that reset or
//! stopped sending, or an upstream that reset the stream. Counting the first three against
//! the endpoint lets any client eject healthy backends (six malformed bodies were enough), so
//! the body records what it last saw from the client and the proxy asks it before blaming
//! the endpoint ([`BodyWatch::blame`]): client faults answer 400 or 408 and never feed outlier
//! detection, breakers or retries.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::http::mesh_h2::MeshBody;

/// Still reading, and the last poll of the client's body produced data (or nothing yet).
const FLOWING: u8 = 0;
/// The last poll of the client's body found nothing ready: the client is the one we wait for.
const WAITING_ON_CLIENT: u8 = 1;
const ENDED: u8 = 2;
const FAILED: u8 = 3;

/// What the proxy learns from the body after a failed request.
#[derive(Debug, Default)]
pub struct BodyWatch(AtomicU8);

/// Why a failed request is the client's doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientFault {
    /// The body could not be read: malformed framing, a reset, a connection closed early.
    BodyError,
    /// The body was incomplete and we were waiting for the client when time ran out.
    BodyStalled,
}

/// An [`Incoming`] body (or one the sidecar maps from it) that reports to a [`BodyWatch`].
#[derive(Debug)]
pub struct ClientBody {
    inner: Source,
    watch: Arc<BodyWatch>,
}

/// A request body the sidecar rewrites while it streams (a client-streaming call's JSON array
/// becoming gRPC messages): its errors are the client's body's.
pub type MappedBody = std::pin::Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send + Sync>>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

enum Source {
    Incoming(Incoming),
    /// A stream of an HTTP/2 connection the listener serves with `h2` itself.
    H2(MeshBody),
    Mapped(MappedBody),
}

/// A request body as a listener received it: read by one of hyper's server connections, or
/// from a stream of an HTTP/2 connection the listener drives with `h2` itself (the inbound
/// listener's mesh connections, `listeners::h2_server`). hyper's `Incoming` cannot be built
/// outside hyper, so a handler serving both takes this.
#[derive(Debug)]
pub enum ReceivedBody {
    Hyper(Incoming),
    H2(MeshBody),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Incoming(b) => b.fmt(f),
            Self::H2(b) => b.fmt(f),
            Self::Mapped(_) => f.write_str("Mapped"),
        }
    }
}

// === impl BodyWatch ===

impl BodyWatch {
    /// Whether a failure of the request now is the client's: its body failed, or time ran
    /// out (`timed_out`) while the body was incomplete and we were waiting on the client.
    /// `None` blames the upstream as before (an upstream that resets while we wait for the
    /// client's next bytes is still the upstream's fault).
    pub fn blame(&self, timed_out: bool) -> Option<ClientFault> {
        match self.0.load(Ordering::Acquire) {
            FAILED => Some(ClientFault::BodyError),
            WAITING_ON_CLIENT if timed_out => Some(ClientFault::BodyStalled),
            _ => None,
        }
    }
}

// === impl ClientBody ===

impl ClientBody {
    /// Wrap `inner`; the returned watch outlives the body (which the HTTP client consumes).
    pub fn new(inner: Incoming) -> (Self, Arc<BodyWatch>) {
        let ended = inner.is_end_stream();
        Self::wrap(Source::Incoming(inner), ended)
    }

    /// Wrap a body as a listener received it.
    pub fn received(inner: ReceivedBody) -> (Self, Arc<BodyWatch>) {
        let ended = inner.is_end_stream();
        let source = match inner {
            ReceivedBody::Hyper(b) => Source::Incoming(b),
            ReceivedBody::H2(b) => Source::H2(b),
        };
        Self::wrap(source, ended)
    }

    /// Wrap a body the sidecar maps from the client's as it streams.
    pub fn mapped(inner: MappedBody) -> (Self, Arc<BodyWatch>) {
        let ended = inner.is_end_stream();
        Self::wrap(Source::Mapped(inner), ended)
    }

    fn wrap(inner: Source, ended: bool) -> (Self, Arc<BodyWatch>) {
        let watch = Arc::new(BodyWatch::default());
        if ended {
            watch.0.store(ENDED, Ordering::Release);
        }
        let body = Self {
            inner,
            watch: watch.clone(),
        };
        (body, watch)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = match &mut self.inner {
            Source::Incoming(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Source::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            Source::Mapped(b) => b.as_mut().poll_frame(cx),
        };
        let state = match &polled {
            Poll::Pending => WAITING_ON_CLIENT,
            Poll::Ready(None) => ENDED,
            Poll::Ready(Some(Err(_))) => FAILED,
            Poll::Ready(Some(Ok(_))) if self.is_end_stream() => ENDED,
            Poll::Ready(Some(Ok(_))) => FLOWING,
        };
        self.watch.0.store(state, Ordering::Release);
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Incoming(b) => b.is_end_stream(),
            Source::H2(b) => b.is_end_stream(),
            Source::Mapped(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Incoming(b) => b.size_hint(),
            Source::H2(b) => b.size_hint(),
            Source::Mapped(b) => b.size_hint(),
        }
    }
}

// === impl ReceivedBody ===

impl Body for ReceivedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failed_or_waiting_bodies_are_blamed_on_the_client() {
        let w = BodyWatch::default();
        assert_eq!(w.blame(true), None);
        for (state, timed_out, blame) in [
            (FLOWING, true, None),
            (ENDED, true, None),
            (WAITING_ON_CLIENT, false, None),
            (WAITING_ON_CLIENT, true, Some(ClientFault::BodyStalled)),
            (FAILED, false, Some(ClientFault::BodyError)),
            (FAILED, true, Some(ClientFault::BodyError)),
        ] {
            w.0.store(state, Ordering::Release);
            assert_eq!(
                w.blame(timed_out),
                blame,
                "state {state} timed out {timed_out}"
            );
        }
    }
}
