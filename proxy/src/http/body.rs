//! The response body the outbound side returns from a peer: the upstream's body, streamed, with
//! an idle timeout (a stream that stops moving fails instead of holding a connection forever) and
//! the endpoint's in-flight count held until the body ends, so least-request and peak-EWMA see
//! long streams as load.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::http::h1_pool::Checkin;
use crate::state::balance::InFlight;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// No frame arrived within the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("response stream idle for {0:?}")]
pub struct IdleTimeout(pub Duration);

pub struct Streamed {
    inner: Inner,
    idle: Option<Idle>,
    guard: Option<InFlight>,
    /// Concurrency-limit slots, released when the body ends like `guard`.
    permits: crate::policy::ratelimit::Permits,
    /// The request's span, ended when the body ends.
    span: Option<crate::telemetry::trace::RequestSpan>,
    /// The span around it, ended just after it: at the ingress, the server span of the
    /// request from outside (boxed: no other listener has one).
    outer: Option<Box<crate::telemetry::trace::RequestSpan>>,
    /// The pooled connection the body comes on, back to its pool when the body has ended.
    checkin: Option<Checkin>,
    /// Copies the body into the response cache as it passes (boxed: only cached misses have
    /// one).
    tee: Option<Box<crate::cache::Tee>>,
    /// Rewrites the frames as gRPC-Web's or as JSON, at the ingress (boxed: only browsers'
    /// calls and transcoded streams have one).
    reframe: Option<Box<crate::compose::Reframe>>,
    /// Copies the body for its check against the API's description (audit mode, boxed:
    /// only validated routes have one).
    audit: Option<Box<crate::validate::audit::AuditTap>>,
}

/// Where the frames come from: the upstream (hyper's, or a mesh peer's HTTP/2 stream), or (a
/// disk tier's cache hit) a file.
enum Inner {
    Upstream(Incoming),
    Mesh(crate::http::mesh_h2::MeshBody),
    Disk(crate::cache::DiskStream),
}

impl Body for Inner {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Mesh(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Disk(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Mesh(b) => b.is_end_stream(),
            Inner::Disk(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Mesh(b) => b.size_hint(),
            Inner::Disk(b) => b.size_hint(),
        }
    }
}

impl Streamed {
    pub fn new(inner: Incoming) -> Self {
        Self::with_inner(Inner::Upstream(inner))
    }

    /// A mesh peer's response body.
    pub fn from_mesh(inner: crate::http::mesh_h2::MeshBody) -> Self {
        Self::with_inner(Inner::Mesh(inner))
    }

    /// A cached body streamed from the disk tier.
    pub fn from_disk(stream: crate::cache::DiskStream) -> Self {
        Self::with_inner(Inner::Disk(stream))
    }

    fn with_inner(inner: Inner) -> Self {
        Self {
            inner,
            idle: None,
            guard: None,
            permits: Default::default(),
            span: None,
            outer: None,
            checkin: None,
            tee: None,
            reframe: None,
            audit: None,
        }
    }

    /// Check the body against the API's description as it streams (audit: never altered).
    pub fn audited(mut self, tap: crate::validate::audit::AuditTap) -> Self {
        self.audit = Some(Box::new(tap));
        self
    }

    /// Store the body in the response cache as it streams; stored only if it ends cleanly.
    /// In place: a response (with this body) is several hundred bytes, each move a copy.
    pub fn set_tee(&mut self, tee: Box<crate::cache::Tee>) {
        self.tee = Some(tee);
    }

    /// Give `checkin`'s connection back to its pool when the body has been read to the end.
    pub fn pooled(mut self, checkin: Option<Checkin>) -> Self {
        self.checkin = checkin;
        self
    }

    /// The body has ended cleanly: its connection can carry the next request.
    fn ended(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.give_back();
        }
        if let Some(tee) = self.tee.take() {
            tee.finish();
        }
        if let Some(audit) = self.audit.take() {
            audit.finish();
        }
    }

    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle = Some(Idle {
            after: d,
            sleep: None,
            moved: false,
        });
        self
    }

    pub fn in_flight(mut self, guard: InFlight) -> Self {
        self.guard = Some(guard);
        self
    }

    pub fn hold(mut self, permits: crate::policy::ratelimit::Permits) -> Self {
        self.permits = permits;
        self
    }

    /// End `span` with the body; a second span is the one around the first (ended after it).
    /// Send the frames as gRPC-Web's: trailers as the last data frame, base64 for text.
    pub fn grpc_web(mut self, encoder: crate::compose::grpc_web::Encoder) -> Self {
        self.reframe = Some(Box::new(crate::compose::Reframe::Web(encoder)));
        self
    }

    /// Send a transcoded gRPC server stream's messages as JSON as they come.
    pub fn grpc_json(mut self, stream: crate::compose::transcode::JsonStream) -> Self {
        self.reframe = Some(Box::new(crate::compose::Reframe::Json(stream)));
        self
    }

    pub fn traced(mut self, span: crate::telemetry::trace::RequestSpan) -> Self {
        if self.span.is_none() {
            self.span = Some(span);
        } else {
            self.outer = Some(Box::new(span));
        }
        self
    }

    fn release(&mut self) {
        self.guard = None;
        self.permits = Default::default();
        self.span = None;
        self.outer = None;
        // Not read to the end: the connection cannot carry another request.
        self.checkin = None;
        // Nor can the cache keep a body that did not end.
        self.tee = None;
        self.audit = None;
    }
}

/// The idle timeout of a body, armed only while the body waits for the upstream: a response
/// that is complete by the time it is read (most small ones) never touches the clock or the
/// timer wheel, and a frame costs no clock read (the deadline moves at the next wait).
struct Idle {
    after: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// A frame arrived since the deadline was last set.
    moved: bool,
}

// === impl Idle ===

impl Idle {
    /// Ready once the body has waited `after` since it last moved.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let after = self.after;
        let sleep = match &mut self.sleep {
            Some(sleep) if self.moved => {
                sleep.as_mut().reset(Instant::now() + after);
                sleep
            }
            Some(sleep) => sleep,
            None => self.sleep.insert(Box::pin(tokio::time::sleep(after))),
        };
        self.moved = false;
        sleep.as_mut().poll(cx)
    }
}

impl Body for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                match &frame {
                    None => {
                        this.ended();
                        this.release();
                    }
                    Some(Err(_)) => this.release(),
                    Some(Ok(f)) => {
                        if let Some(idle) = &mut this.idle {
                            idle.moved = true;
                        }
                        // One branch when nothing is being cached.
                        if let Some(tee) = &mut this.tee {
                            if let Some(data) = f.data_ref() {
                                tee.data(data);
                            }
                        }
                        if let Some(audit) = &mut this.audit {
                            if let Some(data) = f.data_ref() {
                                audit.data(data);
                            }
                        }
                        // A reader that knows the length stops here, without asking for the
                        // end.
                        if this.inner.is_end_stream() {
                            this.ended();
                        }
                    }
                }
                // `frame` already carries the boxed error.
                let Some(reframe) = this.reframe.as_deref_mut() else {
                    return Poll::Ready(frame);
                };
                let last = this.inner.is_end_stream();
                Poll::Ready(match frame {
                    Some(r) => Some(r.and_then(|f| reframe.frame(f, last))),
                    None => reframe.end().map(|tail| Ok(Frame::data(tail))),
                })
            }
            Poll::Pending => {
                let expired = match &mut this.idle {
                    Some(idle) => idle.poll_waiting(cx).is_ready().then_some(idle.after),
                    None => None,
                };
                match expired {
                    Some(d) => {
                        this.release();
                        Poll::Ready(Some(Err(Box::new(IdleTimeout(d)))))
                    }
                    None => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.reframe.is_some() {
            // Trailers become data, text grows by a third, JSON is not protobuf: the length
            // is not the upstream's.
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Poll `idle` once, as a body that is waiting does.
    async fn waits(idle: &mut Idle) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(idle.poll_waiting(cx).is_pending())).await
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timeout_counts_from_the_last_frame_while_the_body_waits() {
        let after = Duration::from_secs(10);
        let mut idle = Idle {
            after,
            sleep: None,
            moved: false,
        };
        // Armed at the first wait, not before.
        assert!(idle.sleep.is_none());
        assert!(waits(&mut idle).await);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(waits(&mut idle).await, "9 s of 10");
        // A frame moves the deadline at the next wait.
        idle.moved = true;
        assert!(waits(&mut idle).await);
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(waits(&mut idle).await, "9 s since the frame");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!waits(&mut idle).await, "11 s without a frame: expired");
    }
}
