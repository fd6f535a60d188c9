//! Which HTTP version a connection speaks, found before hyper reads from it, and hyper's server
//! connection for that version alone.
//!
//! Why not hyper-util's `auto` connection, which finds out by reading: it consumes the first
//! bytes into a buffer of its own and replays them through a wrapper on every later read. hyper's
//! HTTP/1 read buffer, handed the request head in two pieces that way, grows from 8 to 16 KB on
//! its second read (`BytesMut::reserve` doubles when unread bytes sit at its front), and every
//! idle keep-alive connection keeps that buffer. Its connection type is also sized for HTTP/2
//! and HTTP/1 at once. A peek (plain TCP) or the ALPN result (TLS) costs none of that: measured
//! with heaptrack on 1,000 idle keep-alive connections, 8 KB less heap per connection.
//!
//! `auto` stays for what cannot be known up front: TLS without ALPN, and a client that has sent
//! part of `PRI ` and stalled.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use crate::config::Limits;
use crate::http::body::BoxError;
use crate::listeners::server::{H2_CONN_WINDOW, H2_MAX_CONCURRENT_STREAMS, H2_STREAM_WINDOW};
use crate::ResponseBody;

/// hyper refuses read buffers smaller than this.
const MIN_H1_BUF: usize = 8192;
pub(crate) const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// What an HTTP/2 client sends first (RFC 9113 section 3.4 reserves the method `PRI` for it).
const H2_PREFACE_START: &[u8] = b"PRI ";
/// How long to wait before peeking again at a client that sent part of [`H2_PREFACE_START`].
const PARTIAL_PREFACE_PAUSE: Duration = Duration::from_millis(2);

/// The HTTP version a connection speaks, as far as it is known before hyper reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
    /// Not known without reading: hyper-util's `auto` connection reads and decides.
    Unknown,
}

/// A connection that can tell its HTTP version without giving up any bytes.
pub trait KnowsVersion {
    /// Waits for the client's first bytes if it must; the caller bounds the wait.
    fn http_version(&self) -> impl Future<Output = HttpVersion> + Send;
}

// === impl KnowsVersion ===

impl KnowsVersion for TcpStream {
    async fn http_version(&self) -> HttpVersion {
        let mut buf = [0u8; H2_PREFACE_START.len()];
        let mut seen = 0;
        loop {
            // An error or the end of the stream: hyper finds it out at its first read.
            let Ok(n) = self.peek(&mut buf).await else {
                return HttpVersion::Http1;
            };
            if n == 0 || buf[..n] != H2_PREFACE_START[..n] {
                return HttpVersion::Http1;
            }
            if n == H2_PREFACE_START.len() {
                return HttpVersion::Http2;
            }
            if n == seen {
                // Part of "PRI " and nothing more yet: wait for the rest rather than spin on a
                // readable socket whose bytes are not consumed.
                tokio::time::sleep(PARTIAL_PREFACE_PAUSE).await;
            }
            seen = n;
        }
    }
}

impl<IO: Sync> KnowsVersion for tokio_rustls::server::TlsStream<IO> {
    async fn http_version(&self) -> HttpVersion {
        match self.get_ref().1.alpn_protocol() {
            Some(b"h2") => HttpVersion::Http2,
            Some(_) => HttpVersion::Http1,
            None => HttpVersion::Unknown,
        }
    }
}

/// hyper's server builders, configured once per listener with its limits.
pub struct HttpBuilders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
    /// The inbound listener's own HTTP/2 server (`h2_server`), with the same settings.
    h2_server: h2::server::Builder,
}

/// The builders of an HTTP/1.1 + HTTP/2 (h2c prior knowledge or ALPN h2) server with our limits.
///
/// hyper's own `header_read_timeout` is off: it also runs while a keep-alive connection is
/// idle, which would close apps' pooled connections after a few seconds. The header timeout is
/// enforced by `serve_connection` instead, only while a request head is pending.
/// The HTTP/1 settings, for hyper's builder and hyper-util's (same methods, different types).
///
/// `max_headers` is handed to hyper only when it differs from hyper's own bound (100, which is
/// also ours by default). Left unset, hyper parses into a fixed array on the stack, left
/// uninitialised; once the setting is given, even at 100, hyper builds its header index with
/// `smallvec![..; n]` at every message it parses, writing all `n` slots: about 700
/// instructions per request head, 3 % of the 1-hop path (bench/hop_callgrind.sh).
macro_rules! h1_settings {
    ($b:expr, $limits:expr) => {{
        let b = $b
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size($limits.max_header_bytes.max(MIN_H1_BUF));
        if $limits.max_headers != HYPER_MAX_HEADERS {
            b.max_headers($limits.max_headers);
        }
    }};
}

/// hyper's default bound on the headers of an HTTP/1 message (`DEFAULT_MAX_HEADERS` in
/// hyper's `proto::h1::role`, not exported).
const HYPER_MAX_HEADERS: usize = 100;

/// The HTTP/2 settings, for hyper's builder or hyper-util's.
macro_rules! h2_settings {
    ($b:expr, $limits:expr) => {
        $b.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from($limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
    };
}

pub fn http_builders(limits: &Limits) -> HttpBuilders {
    let mut h1 = http1::Builder::new();
    h1_settings!(h1, limits);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2_settings!(h2, limits);
    let mut auto = auto::Builder::new(TokioExecutor::new());
    let mut auto_h1 = auto.http1();
    h1_settings!(auto_h1, limits);
    h2_settings!(auto.http2(), limits);
    let h2_server = crate::listeners::h2_server::builder(limits);
    HttpBuilders {
        h1,
        h2,
        auto,
        h2_server,
    }
}

// === impl HttpBuilders ===

impl HttpBuilders {
    /// The settings of HTTP/2 connections served with `h2` directly.
    pub fn h2_server(&self) -> &h2::server::Builder {
        &self.h2_server
    }

    /// hyper's connection serving `io` with `service`, for `version`.
    pub fn serve<I, S>(&self, version: HttpVersion, io: I, service: S) -> Serving<'_, I, S>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: Service<Request<Incoming>, Response = Response<ResponseBody>> + Send,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        match version {
            HttpVersion::Http1 => Serving::H1(Box::pin(
                self.h1.serve_connection(io, service).with_upgrades(),
            )),
            HttpVersion::Http2 => Serving::H2(Box::pin(self.h2.serve_connection(io, service))),
            HttpVersion::Unknown => Serving::Auto(Box::pin(
                self.auto.serve_connection_with_upgrades(io, service),
            )),
        }
    }
}

/// One connection being served, by hyper's connection for its version.
///
/// Each is boxed so that a connection's task holds only the one it uses.
pub enum Serving<'a, I, S>
where
    S: Service<Request<Incoming>, Response = Response<ResponseBody>>,
    S::Error: Into<BoxError>,
{
    H1(Pin<Box<http1::UpgradeableConnection<I, S>>>),
    H2(Pin<Box<http2::Connection<I, S, TokioExecutor>>>),
    Auto(Pin<Box<auto::UpgradeableConnection<'a, I, S, TokioExecutor>>>),
}

// === impl Serving ===

impl<I, S> Serving<'_, I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ResponseBody>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    /// HTTP/2: GOAWAY, then finish the open streams. HTTP/1: finish the response in flight,
    /// then close.
    pub fn graceful_shutdown(&mut self) {
        match self {
            Serving::H1(c) => c.as_mut().graceful_shutdown(),
            Serving::H2(c) => c.as_mut().graceful_shutdown(),
            Serving::Auto(c) => c.as_mut().graceful_shutdown(),
        }
    }
}

impl<I, S> Future for Serving<'_, I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ResponseBody>> + Send,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Serving::H1(c) => c.as_mut().poll(cx).map_err(Into::into),
            Serving::H2(c) => c.as_mut().poll(cx).map_err(Into::into),
            Serving::Auto(c) => c.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair: (client side, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (client, server)
    }

    /// The version `http_version` finds while the client sends `sent`, piece by piece.
    async fn version_after(sent: &'static [&'static [u8]]) -> HttpVersion {
        let (mut client, server) = pair().await;
        let writer = tokio::spawn(async move {
            for part in sent {
                tokio::time::sleep(Duration::from_millis(20)).await;
                client.write_all(part).await.expect("write");
            }
            client
        });
        let version = tokio::time::timeout(Duration::from_secs(5), server.http_version())
            .await
            .expect("decided in time");
        let _client = writer.await.expect("writer");
        // Nothing was consumed: hyper reads the request from its first byte.
        let mut buf = [0u8; 64];
        let n = server.peek(&mut buf).await.expect("peek");
        assert!(sent.concat().starts_with(&buf[..n]) && n > 0);
        version
    }

    #[tokio::test]
    async fn the_first_bytes_decide_without_being_consumed() {
        assert_eq!(
            version_after(&[b"GET / HTTP/1.1\r\n"]).await,
            HttpVersion::Http1
        );
        assert_eq!(
            version_after(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).await,
            HttpVersion::Http2
        );
        // A method that starts like the preface and then differs.
        assert_eq!(version_after(&[b"PRX"]).await, HttpVersion::Http1);
        // One byte at a time: it waits for the fourth.
        assert_eq!(
            version_after(&[b"P", b"R", b"I", b" "]).await,
            HttpVersion::Http2
        );
    }

    /// The status line hyper answers a request with `n` headers (plus `host` and
    /// `connection`), served by `version`'s connection built from `limits`.
    async fn status_with_headers(limits: &Limits, version: HttpVersion, n: usize) -> String {
        let builders = http_builders(limits);
        let (mut client, server) = pair().await;
        let service = hyper::service::service_fn(|_req: Request<Incoming>| async {
            let body: ResponseBody = http_body_util::Either::Right(http_body_util::Full::new(
                bytes::Bytes::from_static(b"ok"),
            ));
            Ok::<_, std::convert::Infallible>(Response::new(body))
        });
        let io = hyper_util::rt::TokioIo::new(server);
        let serving = tokio::spawn(async move {
            let _ = builders.serve(version, io, service).await;
        });
        let headers: String = (0..n).map(|i| format!("x-h{i}: v\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\nhost: a\r\n{headers}connection: close\r\n\r\n");
        client.write_all(req.as_bytes()).await.expect("write");
        let mut resp = Vec::new();
        let read = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut resp);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("answered")
            .expect("read");
        serving.abort();
        String::from_utf8_lossy(&resp)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    /// hyper's default bound (100) is left to hyper, any other is handed to it: both hold, on
    /// the HTTP/1 connection and on the version-sniffing one.
    #[tokio::test]
    async fn the_header_count_bound_holds_at_hypers_default_and_at_another_value() {
        let default = Limits::default();
        let custom = Limits {
            max_headers: 20,
            ..Limits::default()
        };
        for version in [HttpVersion::Http1, HttpVersion::Unknown] {
            // 98 + host + connection = 100 headers: at the bound.
            let at = status_with_headers(&default, version, 98).await;
            assert!(at.starts_with("HTTP/1.1 200"), "{version:?}: {at}");
            let over = status_with_headers(&default, version, 120).await;
            assert!(over.starts_with("HTTP/1.1 431"), "{version:?}: {over}");
            let ok = status_with_headers(&custom, version, 18).await;
            assert!(ok.starts_with("HTTP/1.1 200"), "{version:?}: {ok}");
            let over = status_with_headers(&custom, version, 30).await;
            assert!(over.starts_with("HTTP/1.1 431"), "{version:?}: {over}");
        }
    }

    #[tokio::test]
    async fn a_closed_connection_is_left_to_hyper() {
        let (client, server) = pair().await;
        drop(client);
        let version = tokio::time::timeout(Duration::from_secs(5), server.http_version()).await;
        assert_eq!(version.expect("decided"), HttpVersion::Http1);
    }

    #[tokio::test]
    async fn a_silent_client_keeps_it_waiting() {
        let (_client, server) = pair().await;
        let waited = tokio::time::timeout(Duration::from_millis(200), server.http_version()).await;
        assert!(
            waited.is_err(),
            "no bytes, no decision: the caller's timeout ends it"
        );
    }
}
