//! The inbound listener's HTTP/2 connections (peer sidecars over mTLS with ALPN `h2`, h2c with
//! prior knowledge in permissive mode), served by driving the `h2` crate directly.
//!
//! Why not hyper's HTTP/2 server: for every stream it converts the request (a body type of its
//! own, a ping recorder, connection headers stripped again although `h2` already refused
//! them), boxes the service's future and spawns a task around it, and its response path
//! strips the connection headers once more with a `remove` per name. Here each stream is one
//! task holding the handler's (boxed) future and then its response body; the request body is
//! `h2`'s stream itself. The client side of mesh HTTP/2 made the same change
//! (`http::mesh_h2`); docs/performance.md has the figures of both.
//!
//! What hyper's server did that this module keeps: its settings (windows, concurrent streams,
//! header list size, send buffer, the bound on locally reset streams), a `date` header on
//! responses that lack one, `content-length` for a response body of known length, the body
//! pipe's rules (shared with the client side: room for a byte before reading more, stop on the
//! peer's reset, a failed body resets with the reason it carries), the handler's future
//! dropped (the app's request cancelled) when the peer resets the stream before the response,
//! keepalive pings (every 30 s, 20 s to answer, idle connections too), and GOAWAY on a graceful
//! shutdown with the open streams left to finish.
//!
//! A CONNECT request is handled like any other request (hyper turned it into an upgrade
//! nobody on the inbound path claimed; extended CONNECT was never enabled).

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::Limits;
use crate::http::body::BoxError;
use crate::http::client_body::ReceivedBody;
use crate::http::mesh_h2::{self, Keepalive, MeshBody};
use crate::listeners::protocol::H2_KEEPALIVE_INTERVAL;
use crate::listeners::server::{H2_CONN_WINDOW, H2_MAX_CONCURRENT_STREAMS, H2_STREAM_WINDOW};

/// hyper's HTTP/2 server defaults, kept.
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER_SIZE: usize = 400 * 1024;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// The listeners' keepalive interval, and hyper's default time to answer.
const KEEPALIVE: Keepalive = Keepalive {
    interval: H2_KEEPALIVE_INTERVAL,
    timeout: Duration::from_secs(20),
};

/// What serves one request: the listener's handler, called once per stream. Its future is
/// `Result<_, Infallible>` so that the same closure serves hyper's connections too.
pub trait Handler: Send + Unpin + 'static {
    /// The listeners' is [`crate::ResponseBody`]; tests stream bodies of their own.
    type Body: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static;
    type Future: Future<Output = Result<Response<Self::Body>, Infallible>> + Send + 'static;
    fn call(&self, req: Request<ReceivedBody>) -> Self::Future;
}

impl<F, Fut, B> Handler for F
where
    F: Fn(Request<ReceivedBody>) -> Fut + Send + Unpin + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes, Error = BoxError> + Send + Unpin + 'static,
{
    type Body = B;
    type Future = Fut;
    // Inlined, so that the handler's future (several KB) is written where the caller puts it
    // (a box) rather than returned through one more frame and copied.
    #[inline(always)]
    fn call(&self, req: Request<ReceivedBody>) -> Fut {
        self(req)
    }
}

/// The `h2` server's settings, as hyper's HTTP/2 server had them with the listeners' limits.
pub fn builder(limits: &Limits) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS));
    b
}

/// One HTTP/2 connection being served: a future that ends with the connection.
pub struct H2Serving<I, H> {
    state: State<I>,
    handler: H,
    /// A graceful shutdown asked for during the handshake.
    close_pending: bool,
}

// The handshake turns into the connection in the same place: boxing the larger variant would
// only add an allocation per connection.
#[allow(clippy::large_enum_variant)]
enum State<I> {
    Handshaking(Pin<Box<h2::server::Handshake<I, Bytes>>>),
    Serving {
        conn: h2::server::Connection<I, Bytes>,
        /// Ends when a ping goes unanswered (`None` once it has).
        pings: Option<PingWatch>,
    },
}

/// Pings the peer; ends, saying what went wrong, when a ping goes unanswered.
type PingWatch = Pin<Box<dyn Future<Output = String> + Send>>;

// === impl H2Serving ===

impl<I, H> H2Serving<I, H>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    pub fn new(builder: &h2::server::Builder, io: I, handler: H) -> Self {
        Self {
            state: State::Handshaking(Box::pin(builder.handshake(io))),
            handler,
            close_pending: false,
        }
    }

    /// GOAWAY, then finish the open streams.
    pub fn graceful_shutdown(&mut self) {
        match &mut self.state {
            State::Handshaking(_) => self.close_pending = true,
            State::Serving { conn, .. } => conn.graceful_shutdown(),
        }
    }
}

impl<I, H> Future for H2Serving<I, H>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let State::Handshaking(hs) = &mut this.state {
            let mut conn = ready!(hs.as_mut().poll(cx))?;
            let pings = conn
                .ping_pong()
                .map(|p| Box::pin(mesh_h2::watch_pings(p, KEEPALIVE)) as PingWatch);
            if this.close_pending {
                conn.graceful_shutdown();
            }
            this.state = State::Serving { conn, pings };
        }
        let State::Serving { conn, pings } = &mut this.state else {
            unreachable!("the handshake is done")
        };
        if let Some(dead) = pings.as_mut().and_then(|p| match p.as_mut().poll(cx) {
            Poll::Ready(dead) => Some(dead),
            Poll::Pending => None,
        }) {
            tracing::debug!(error = %dead, "closing connection");
            *pings = None;
            conn.abrupt_shutdown(h2::Reason::NO_ERROR);
        }
        loop {
            match ready!(conn.poll_accept(cx)) {
                Some(Ok((req, respond))) => spawn_stream(&this.handler, req, respond),
                Some(Err(e)) => return Poll::Ready(Err(e.into())),
                None => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Run the handler on one stream's request, in a task of its own (streams on one connection
/// are served concurrently, on any worker).
fn spawn_stream<H: Handler>(
    handler: &H,
    req: Request<h2::RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
) {
    let (parts, recv) = req.into_parts();
    let body = MeshBody::new(recv, &parts.headers);
    let req = Request::from_parts(parts, ReceivedBody::H2(body));
    // Allocated first, then written (see `server::Boxed`): the handler's future is several KB,
    // built straight into its heap slot, and the task holds a pointer to it.
    let slot = Box::<H::Future>::new_uninit();
    let fut = Box::into_pin(Box::write(slot, handler.call(req)));
    tokio::spawn(serve_stream(fut, respond));
}

/// Await the response unless the peer resets the stream first (then the handler's future is
/// dropped: the app's request is cancelled), then send it. The head is sent from inside the
/// poll (no response value is moved through the task's state), and the handler's state is
/// freed before the body streams, however long that takes.
async fn serve_stream<F, B>(mut fut: Pin<Box<F>>, mut respond: h2::server::SendResponse<Bytes>)
where
    F: Future<Output = Result<Response<B>, Infallible>>,
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let started = poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(Ok(resp)) => Poll::Ready(send_head(&mut respond, resp)),
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => match respond.poll_reset(cx) {
            Poll::Ready(reason) => {
                tracing::debug!(?reason, "stream reset by the peer before the response");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        },
    })
    .await;
    drop(fut);
    if let Some((body, stream)) = started {
        mesh_h2::stream_body(body, stream).await;
    }
}

/// The response head (without connection-specific headers, which HTTP/2 forbids, and with a
/// `date`); the body and its stream if there is more to send.
fn send_head<B>(
    respond: &mut h2::server::SendResponse<Bytes>,
    resp: Response<B>,
) -> Option<(B, h2::SendStream<Bytes>)>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let (mut head, body) = resp.into_parts();
    crate::http::headers::strip_hop_by_hop(&mut head.headers, false);
    if !head.headers.contains_key(header::DATE) {
        if let Some(date) = date_now() {
            head.headers.insert(header::DATE, date);
        }
    }
    let eos = body.is_end_stream();
    if !eos {
        if let Some(len) = body.size_hint().exact() {
            head.headers
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(len));
        }
    }
    match respond.send_response(Response::from_parts(head, ()), eos) {
        Ok(stream) => (!eos).then_some((body, stream)),
        Err(e) => {
            tracing::debug!(error = %e, "sending the response head failed");
            respond.send_reset(h2::Reason::INTERNAL_ERROR);
            None
        }
    }
}

thread_local! {
    /// The `date` header value of the current second, formatted once per second per thread.
    static DATE: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
}

/// hyper's server adds a `date` to every response that lacks one (RFC 9110 6.6.1).
fn date_now() -> Option<HeaderValue> {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|cached| {
        if let Some((_, value)) = cached.as_ref().filter(|(at, _)| *at == secs) {
            return Some(value.clone());
        }
        let value = HeaderValue::from_maybe_shared(Bytes::from(httpdate::fmt_http_date(now)));
        let value = value.ok()?;
        *cached = Some((secs, value.clone()));
        Some(value)
    })
}

#[cfg(test)]
mod tests;
