//! A body streamed into its HTTP/2 stream: a request's to a mesh peer (the client side), a
//! response's to a peer (the inbound listener's server side).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use h2::{Reason, SendStream};
use http_body::Body;
use tokio::sync::oneshot;

use crate::RequestBody;

/// The upload of one request body. Dropped before [`Upload::keep_going`] (the caller gave up
/// before the response came), it resets the stream with `CANCEL` so the peer stops too.
pub(super) struct Upload {
    cancel: Option<oneshot::Sender<()>>,
}

/// Why the pipe stopped early.
enum Stop {
    /// Tell the peer with this reset.
    Reset(Reason),
    /// The stream is already over (reset by the peer, or the connection is gone).
    Gone,
}

/// Start streaming `body` into `stream`. A body already in memory (a buffered payload that
/// fits the peer's window) goes out at once; otherwise a task carries on with it, so the
/// response can be awaited (and returned) while the upload continues, as gRPC streams need.
pub(super) fn start(body: RequestBody, stream: SendStream<Bytes>) -> Upload {
    let (cancel, cancelled) = oneshot::channel();
    let mut upload = Box::pin(run(body, stream, cancelled));
    // A no-op waker: if the upload is not finished, the task it moves to polls it again
    // at once and registers its own.
    let mut cx = Context::from_waker(Waker::noop());
    if upload.as_mut().poll(&mut cx).is_pending() {
        tokio::spawn(upload);
    }
    Upload {
        cancel: Some(cancel),
    }
}

// === impl Upload ===

impl Upload {
    /// The response has come: the upload goes on on its own (a bidirectional stream), and
    /// dropping this no longer cancels it.
    pub(super) fn keep_going(&mut self) {
        self.cancel = None;
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(cancel) = self.cancel.take() {
            let _ = cancel.send(());
        }
    }
}

async fn run(
    mut body: RequestBody,
    mut stream: SendStream<Bytes>,
    cancelled: oneshot::Receiver<()>,
) {
    let stop = tokio::select! {
        biased;
        // An `Err` (the sender dropped without a word) disables this branch: keep going.
        Ok(()) = cancelled => Err(Stop::Reset(Reason::CANCEL)),
        done = pump(&mut body, &mut stream) => done,
    };
    if let Err(Stop::Reset(reason)) = stop {
        stream.send_reset(reason);
    }
}

/// Stream `body` into `stream` to its end, as hyper's server pipes a response body; a body
/// that fails resets the stream with the reason it carries, a peer's reset stops it.
pub(crate) async fn stream_body<B>(mut body: B, mut stream: SendStream<Bytes>)
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    if let Err(Stop::Reset(reason)) = pump(&mut body, &mut stream).await {
        stream.send_reset(reason);
    }
}

/// hyper's rules: wait for room for at least one byte before reading more of the client (a
/// slow peer holds the upload back instead of letting it pile up here), stop when the peer
/// resets the stream, end with an empty `END_STREAM` frame when the body ends without saying
/// so on its last chunk.
async fn pump<B>(body: &mut B, stream: &mut SendStream<Bytes>) -> Result<(), Stop>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    loop {
        stream.reserve_capacity(1);
        while stream.capacity() == 0 {
            match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(Stop::Gone),
            }
        }
        let frame = poll_fn(|cx| next_frame(body, stream, cx)).await?;
        let Some(frame) = frame else {
            return stream.send_data(Bytes::new(), true).map_err(|_| Stop::Gone);
        };
        let frame = frame.map_err(|e| {
            tracing::debug!(error = %e, "request body failed while streaming to the peer");
            Stop::Reset(reset_reason(&*e))
        })?;
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                stream.send_data(data, eos).map_err(|_| Stop::Gone)?;
                if eos {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    return stream.send_trailers(trailers).map_err(|_| Stop::Gone);
                }
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BodyFrame = Option<Result<http_body::Frame<Bytes>, BoxError>>;

/// The body's next frame, unless the peer resets the stream first.
fn next_frame<B>(
    body: &mut B,
    stream: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<BodyFrame, Stop>>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    if stream.poll_reset(cx).is_ready() {
        return Poll::Ready(Err(Stop::Gone));
    }
    Pin::new(body).poll_frame(cx).map(Ok)
}

/// hyper's rule for a body that fails: reset with the HTTP/2 reason found in the error's
/// chain (a transcoded client stream fails with `CANCEL`, which a gRPC server reads as a
/// cancelled call), `INTERNAL_ERROR` otherwise.
pub(super) fn reset_reason(e: &(dyn std::error::Error + 'static)) -> Reason {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(reason) = err.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        cur = err.source();
    }
    Reason::INTERNAL_ERROR
}
