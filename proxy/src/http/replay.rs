//! A request body that several attempts may be offered but at most one may send: what lets
//! the inbound side repeat a request in another protocol, or on a fresh connection, without
//! ever sending a body twice.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::http::client_body::ClientBody;

/// A request body that at most one attempt may take. Each attempt gets an [`AttemptBody`];
/// the first one polled takes the client's body out of the shared slot, so a later attempt
/// can tell whether it may still be sent (nothing taken) or the request must fail.
///
/// An empty body (most requests: GET, HEAD, DELETE) has no slot at all, so it costs no
/// allocation and every attempt may send it.
#[derive(Debug)]
pub struct Replay {
    slot: Option<Arc<Mutex<Option<ClientBody>>>>,
    hint: SizeHint,
}

// === impl Replay ===

impl Replay {
    pub fn new(body: ClientBody) -> Self {
        if body.is_end_stream() {
            return Self::empty();
        }
        let hint = body.size_hint();
        Self {
            slot: Some(Arc::new(Mutex::new(Some(body)))),
            hint,
        }
    }

    /// A body with nothing in it.
    pub fn empty() -> Self {
        Self {
            slot: None,
            hint: SizeHint::with_exact(0),
        }
    }

    /// Whether another attempt can still send the whole body: it is empty, or no attempt has
    /// taken it yet.
    pub fn replayable(&self) -> bool {
        match &self.slot {
            None => true,
            Some(slot) => slot.lock().map(|s| s.is_some()).unwrap_or(false),
        }
    }

    /// The body for one attempt.
    pub fn attempt(&self) -> AttemptBody {
        AttemptBody {
            slot: self.slot.clone(),
            taken: None,
            hint: self.hint,
        }
    }
}

/// One attempt's view of a [`Replay`] body.
#[derive(Debug)]
pub struct AttemptBody {
    slot: Option<Arc<Mutex<Option<ClientBody>>>>,
    taken: Option<ClientBody>,
    hint: SizeHint,
}

// === impl AttemptBody ===

impl Body for AttemptBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.taken.is_none() {
            let taken = self
                .slot
                .as_ref()
                .and_then(|slot| slot.lock().ok().and_then(|mut s| s.take()));
            match taken {
                Some(b) => self.taken = Some(b),
                // An empty body, or one another attempt took: only an empty body is ever
                // given to a second attempt.
                None => return Poll::Ready(None),
            }
        }
        match self.taken.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.taken {
            Some(b) => b.is_end_stream(),
            None => self.slot.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.taken {
            Some(b) => b.size_hint(),
            None => self.hint,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_body_is_replayable_by_every_attempt_and_ends_at_once() {
        let body = Replay::empty();
        let first = body.attempt();
        assert!(first.is_end_stream());
        assert_eq!(first.size_hint().exact(), Some(0));
        drop(first);
        assert!(body.replayable());
        assert!(body.attempt().is_end_stream());
    }
}
