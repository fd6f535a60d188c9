//! What every listener shares: a bounded accept loop, and serving one HTTP connection with the
//! configured limits, an idle timeout and graceful shutdown on drain.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::drain;
use crate::listeners::protocol::{HttpBuilders, KnowsVersion};
use crate::telemetry::metrics::ByteCounters;

/// Streams one HTTP/2 client may have open at once.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Flow-control credit per HTTP/2 stream: the most one stream may have buffered unread at
/// the receiver. A reader that stops reading holds at most this much of its connection.
pub const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// Credit per HTTP/2 connection: enough for every stream it may carry to be stalled at once
/// (hyper's default, 5 MB, is exhausted by three stalled 2 MB streams, and then every other
/// stream on the connection waits). Credit is not memory: memory is what stalled streams
/// actually hold, at most [`H2_STREAM_WINDOW`] each.
pub const H2_CONN_WINDOW: u32 = H2_MAX_CONCURRENT_STREAMS * H2_STREAM_WINDOW;

/// Accept connections until drain starts, never holding more than `max_connections` at once:
/// past the limit, new connections wait in the kernel's backlog instead of being accepted.
/// A failed `accept` (out of file descriptors or memory) is counted in `errors` and logged
/// once per [`ACCEPT_ERROR_LOG_EVERY`] at most: it repeats every 20 ms for as long as it lasts,
/// and a warning each time would flood the log (and the disk under it).
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    drain: drain::Watcher,
    name: &'static str,
    errors: Counter,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, drain::Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut log = AcceptErrorLog::default();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = drain.signaled() => break,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    errors.inc();
                    log.failed(name, &e);
                    // EMFILE and friends: back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = drain.signaled() => break,
        };
        log.accepted(name);
        let _ = tcp.set_nodelay(true);
        let fut = handle(tcp, addr, drain.clone());
        tokio::spawn(async move {
            fut.await;
            drop(permit);
        });
    }
    tracing::info!(listener = name, "stopped accepting connections");
}

/// How often a listener's failing `accept` is logged at most.
pub const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(5);

/// A listener's `accept` failures, logged when they start, then at most once per
/// [`ACCEPT_ERROR_LOG_EVERY`] with the number since, and once when a connection is accepted
/// again.
#[derive(Default)]
struct AcceptErrorLog {
    last: Option<Instant>,
    /// Failures since the last line.
    since: u64,
    /// Whether the last `accept` failed.
    failing: bool,
}

// === impl AcceptErrorLog ===

impl AcceptErrorLog {
    fn failed(&mut self, listener: &'static str, e: &std::io::Error) {
        self.failing = true;
        self.since += 1;
        if self
            .last
            .is_some_and(|t| t.elapsed() < ACCEPT_ERROR_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(listener, error = %e, failures = self.since, "accept failed: new connections wait in the kernel's backlog (counted in trellis_accept_errors_total)");
        self.last = Some(Instant::now());
        self.since = 0;
    }

    fn accepted(&mut self, listener: &'static str) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(
                listener,
                failures = self.since,
                "accepting connections again"
            );
            self.since = 0;
            self.last = None;
        }
    }
}

/// Request activity on one connection, for the idle and header timeouts.
pub struct Activity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last request start or finish.
    last_ms: AtomicU64,
    /// 1 + milliseconds since `epoch` at which bytes of a not-yet-complete HTTP/1 request head
    /// started arriving; 0 when no head is pending. A new connection starts pending: it must
    /// send a request head in time.
    head_since: AtomicU64,
    /// HTTP/2 multiplexes requests and pings on one connection; only HTTP/1 has request heads to
    /// time out.
    h2: AtomicBool,
    saw_bytes: AtomicBool,
    /// Where the connection's bytes are counted (unregistered counters for the admin port).
    bytes: ByteCounters,
}

/// Marks a request in flight until dropped.
pub struct ActivityGuard(Arc<Activity>);

// === impl Activity ===

impl Activity {
    pub fn new() -> Arc<Self> {
        Self::counted(ByteCounters::default())
    }

    /// Activity of a connection whose bytes count towards `bytes`.
    pub fn counted(bytes: ByteCounters) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            head_since: AtomicU64::new(1),
            h2: AtomicBool::new(false),
            saw_bytes: AtomicBool::new(false),
            bytes,
        })
    }

    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        self.touch();
        ActivityGuard(self.clone())
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes arrived from the client.
    fn on_read(&self, data: &[u8]) {
        self.bytes.read.inc_by(data.len() as u64);
        if !self.saw_bytes.swap(true, Ordering::Relaxed) && data.starts_with(b"PRI ") {
            self.h2.store(true, Ordering::Relaxed);
        }
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let idle = self
            .now_ms()
            .saturating_sub(self.last_ms.load(Ordering::Relaxed));
        Some(Duration::from_millis(idle))
    }

    /// How long an HTTP/1 request head has been pending, if one is.
    fn head_pending_for(&self) -> Option<Duration> {
        let since = self.head_since.load(Ordering::Relaxed);
        if since == 0
            || self.h2.load(Ordering::Relaxed)
            || self.in_flight.load(Ordering::Relaxed) > 0
        {
            return None;
        }
        Some(Duration::from_millis(
            self.now_ms().saturating_sub(since - 1),
        ))
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Reports reads to an [`Activity`]; everything else passes through.
struct Watched<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = &buf.filled()[before..];
            if !new.is_empty() {
                self.activity.on_read(new);
            }
        }
        res
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            self.activity.bytes.written.inc_by(n as u64);
        }
        res
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            self.activity.bytes.written.inc_by(n as u64);
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// When to close a connection on its own.
#[derive(Clone, Copy, Debug)]
pub struct ConnTimeouts {
    /// No request in flight for this long.
    pub idle: Duration,
    /// An HTTP/1 request head (or a new connection's first one) not complete within this.
    pub header_read: Duration,
}

impl From<&Limits> for ConnTimeouts {
    fn from(l: &Limits) -> Self {
        Self {
            idle: l.idle_timeout,
            header_read: l.header_read_timeout,
        }
    }
}

/// A service whose request futures are boxed.
///
/// Why: hyper's HTTP/1 connection reserves a slot of the service future's size for the whole
/// life of the connection, and moves each request's future into it. Our request futures are
/// large (every step of routing, policy and forwarding is inlined into one state machine), so
/// an idle keep-alive connection would hold that much memory, and every request would copy it.
/// Boxed, the slot is one pointer and the future is written once, on the heap. (Measured: the
/// outbound request future is about 10 KB and the inbound one 6.5 KB; boxing them took the RSS
/// of a sidecar holding 1,000 idle client connections from 51 to 42 MB.)
#[derive(Clone)]
struct Boxed<S>(S);

type BoxedFuture<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B> Service<Request<B>> for Boxed<S>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxedFuture<S::Response, S::Error>;

    fn call(&self, req: Request<B>) -> Self::Future {
        // Allocated first, then written: the future is built straight into the heap slot
        // instead of on the stack and copied there (`Box::pin(f)` evaluates `f` before it
        // allocates, and that copy of several KB was 1 % of the inbound path's CPU).
        let slot = Box::<S::Future>::new_uninit();
        let boxed: Box<S::Future> = Box::write(slot, self.0.call(req));
        Box::into_pin(boxed)
    }
}

/// Serve one connection until it ends. On drain, after `timeouts.idle` without requests, or
/// when an HTTP/1 request head takes longer than `timeouts.header_read`, the connection is shut
/// down gracefully: HTTP/2 sends GOAWAY and finishes open streams, HTTP/1 finishes the current
/// response and closes.
pub async fn serve_connection<I, S>(
    builders: &HttpBuilders,
    io: I,
    service: S,
    activity: Arc<Activity>,
    timeouts: ConnTimeouts,
    drain: &drain::Watcher,
) where
    I: AsyncRead + AsyncWrite + KnowsVersion + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<crate::ResponseBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Bounded like the request head it is the start of.
    let version = tokio::select! {
        v = io.http_version() => v,
        _ = tokio::time::sleep(timeouts.header_read) => {
            tracing::debug!("closing connection: no request within the header timeout");
            return;
        }
        _ = drain.signaled() => return,
    };
    let io = Watched {
        inner: io,
        activity: activity.clone(),
    };
    let mut conn = builders.serve(version, TokioIo::new(io), Boxed(service));
    let check_every = (timeouts.idle.min(timeouts.header_read) / 4).max(Duration::from_millis(25));
    let mut tick = tokio::time::interval(check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drained = drain.signaled();
    tokio::pin!(drained);
    let mut closing = false;
    loop {
        tokio::select! {
            res = &mut conn => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with error");
                }
                return;
            }
            _ = &mut drained, if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            _ = tick.tick(), if !closing => {
                if activity.head_pending_for().is_some_and(|d| d >= timeouts.header_read) {
                    // Nothing is in flight, and a graceful shutdown would keep waiting for the
                    // head: drop the connection.
                    tracing::debug!("closing connection: request head not received in time");
                    return;
                } else if activity.idle_for().is_some_and(|d| d >= timeouts.idle) {
                    tracing::debug!("closing idle connection");
                    closing = true;
                    conn.graceful_shutdown();
                }
            }
        }
    }
}
