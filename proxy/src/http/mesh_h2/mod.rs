//! The client side of the mesh's HTTP/2 connections (sidecar to sidecar, over mTLS), driving
//! the `h2` crate directly.
//!
//! Why not hyper's HTTP/2 client: it hands every request to the connection's task through a
//! channel, spawns a task per request to wait for the response and sends it back through a
//! oneshot. Here the request's own future opens the stream and awaits the response; a task is
//! spawned only to stream a request body that is not ready at once. Measured in instructions
//! (callgrind, `proxy/examples/h2_floor.rs`): 48,500 -> 37,300 per proxied request for the same
//! HTTP/1.1-in, HTTP/2-out relay (docs/performance.md). Pingora drives `h2` the same way.
//!
//! What hyper's client did that this module keeps: its settings (windows, header list size,
//! send buffer, no server push, a bound on locally reset streams), the `content-length` of a
//! body of known size, the early-response and reset rules of the request body pipe, and the
//! cancellation of an unfinished upload when the caller gives up. The pings are now sent on
//! idle connections too, which is what the pool needs them for (a dead peer found before a
//! request is sent on its connection, not after).

mod body;
mod driver;
mod pipe;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite};

pub use body::MeshBody;
/// Shared with the inbound listener's HTTP/2 server (`listeners::h2_server`).
pub(crate) use driver::watch as watch_pings;
pub(crate) use pipe::stream_body;

use crate::RequestBody;

/// hyper's defaults for its HTTP/2 client, kept.
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER_SIZE: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// A handle to send requests on one connection; cheap to clone.
#[derive(Clone)]
pub struct Sender {
    send: h2::client::SendRequest<Bytes>,
    /// Set by the connection's task when the connection has ended.
    closed: Arc<AtomicBool>,
}

/// What the connection's windows and pings are.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub stream_window: u32,
    pub conn_window: u32,
    pub keepalive: driver::Keepalive,
}

pub use driver::Keepalive;

/// A request that failed to go out.
pub enum SendError {
    /// The connection was closed or closing before any of it was written: it can go out on
    /// another connection as it is.
    NotSent(Box<Request<RequestBody>>),
    /// Opening the stream or waiting for the response failed.
    Failed(h2::Error),
}

// === impl Sender ===

impl Sender {
    /// HTTP/2 handshake on `io` (its TLS already done); the connection runs in its own task.
    pub async fn handshake<T>(
        io: T,
        settings: Settings,
        peer: std::net::SocketAddr,
    ) -> Result<Self, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.conn_window)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER_SIZE)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        driver::spawn(conn, settings.keepalive, peer, closed.clone());
        Ok(Self { send, closed })
    }

    /// The connection has ended (new requests would fail at once).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Send `req` (its head already made for HTTP/2: absolute URI, no connection-specific
    /// headers) and wait for the response head.
    pub async fn send(self, req: Request<RequestBody>) -> Result<Response<MeshBody>, SendError> {
        let send = match self.send.ready().await {
            Ok(send) => send,
            Err(_) => return Err(SendError::NotSent(Box::new(req))),
        };
        let (head, body) = req.into_parts();
        let mut head = Request::from_parts(head, ());
        let eos = body.is_end_stream();
        set_content_length(&mut head, &body);
        let (response, stream) = send_request(send, head, eos)?;
        // Cancels an upload still running if this future is dropped before the response.
        let mut upload = (!eos).then(|| pipe::start(body, stream));
        let resp = response.await.map_err(SendError::Failed)?;
        if let Some(upload) = upload.as_mut() {
            upload.keep_going();
        }
        let (parts, recv) = resp.into_parts();
        let body = MeshBody::new(recv, &parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

fn send_request(
    mut send: h2::client::SendRequest<Bytes>,
    head: Request<()>,
    eos: bool,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), SendError> {
    send.send_request(head, eos).map_err(SendError::Failed)
}

/// hyper's rule: a body of known length says so, unless it is empty on a method that does not
/// define a body (`GET`, `HEAD`, `DELETE`, `CONNECT`).
fn set_content_length(head: &mut Request<()>, body: &RequestBody) {
    let Some(len) = body.size_hint().exact() else {
        return;
    };
    let defines_body = !matches!(
        *head.method(),
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    );
    if len != 0 || defines_body {
        head.headers_mut()
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
    }
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent(_) => f.write_str("NotSent(..)"),
            Self::Failed(e) => f.debug_tuple("Failed").field(e).finish(),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent(_) => f.write_str("connection closed before the request was sent"),
            // The detail is the source (`client_error::error_chain` joins them).
            Self::Failed(_) => f.write_str("HTTP/2 request to the peer failed"),
        }
    }
}

impl std::error::Error for SendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::NotSent(_) => None,
            Self::Failed(e) => Some(e),
        }
    }
}

#[cfg(test)]
mod tests;
