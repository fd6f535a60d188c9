//! A body read from an HTTP/2 stream driven with `h2`: a mesh peer's response (the client
//! side), or a peer's request (the inbound listener's server side).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body::{Body, Frame, SizeHint};

/// The body of a mesh peer's response or request, streamed; each chunk's flow-control credit
/// is given back as it is handed on, so the peer keeps sending at the pace the reader reads
/// (and a reader that stops holds at most a stream window of it). hyper's `Incoming` reads an
/// HTTP/2 stream by the same rules.
pub struct MeshBody {
    recv: h2::RecvStream,
    data_done: bool,
    /// What `content-length` announced, less what has arrived (a size hint only: h2 itself
    /// checks the stream against it).
    remaining: Option<u64>,
}

impl std::fmt::Debug for MeshBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshBody")
            .field("data_done", &self.data_done)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

// === impl MeshBody ===

impl MeshBody {
    pub(crate) fn new(recv: h2::RecvStream, headers: &HeaderMap) -> Self {
        let remaining = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        Self {
            recv,
            data_done: false,
            remaining,
        }
    }
}

impl Body for MeshBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = this.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RFC 9113 8.1: a reset with NO_ERROR after a complete response only tells the
                // client to stop sending its request; the response stands.
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None)
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            return SizeHint::with_exact(0);
        }
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
