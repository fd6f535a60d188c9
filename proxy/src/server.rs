//! What every listener shares: a bounded accept loop, and serving one HTTP connection with the
//! configured limits, an idle timeout and graceful shutdown on drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::config::Limits;
use crate::drain;

/// hyper refuses read buffers smaller than this.
const MIN_H1_BUF: usize = 8192;
/// Streams one HTTP/2 client may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 1000;
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// An HTTP/1.1 + HTTP/2 (h2c prior knowledge or ALPN h2) server builder with our limits.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_H1_BUF))
        .max_headers(limits.max_headers);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(H2_KEEPALIVE_INTERVAL);
    b
}

/// Accept connections until drain starts, never holding more than `max_connections` at once:
/// past the limit, new connections wait in the kernel's backlog instead of being accepted.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    max_connections: usize,
    drain: drain::Watcher,
    name: &'static str,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr, drain::Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = drain.signaled() => break,
        };
        let (tcp, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = drain.signaled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let fut = handle(tcp, addr, drain.clone());
        tokio::spawn(async move {
            fut.await;
            drop(permit);
        });
    }
    tracing::info!(listener = name, "stopped accepting connections");
}

/// Request activity on one connection, for the idle timeout.
#[derive(Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    /// Milliseconds since `epoch` of the last request start or finish.
    last_ms: AtomicU64,
    epoch: Option<Instant>,
}

/// Marks a request in flight until dropped.
pub struct ActivityGuard(Arc<Activity>);

// === impl Activity ===

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Some(Instant::now()),
            ..Default::default()
        })
    }

    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        ActivityGuard(self.clone())
    }

    fn touch(&self) {
        let ms = self.epoch.map_or(0, |e| e.elapsed().as_millis() as u64);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let now = self.epoch.map_or(0, |e| e.elapsed().as_millis() as u64);
        Some(Duration::from_millis(
            now.saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        ))
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// Serve one connection until it ends. On drain, or after `idle_timeout` without requests, the
/// connection is shut down gracefully: HTTP/2 sends GOAWAY and finishes open streams, HTTP/1
/// finishes the current response and closes.
pub async fn serve_connection<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    drain: &drain::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<crate::ResponseBody>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let check_every = (idle_timeout / 4).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drained = drain.signaled();
    tokio::pin!(drained);
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with error");
                }
                return;
            }
            _ = &mut drained, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick(), if !closing => {
                if activity.idle_for().is_some_and(|d| d >= idle_timeout) {
                    tracing::debug!("closing idle connection");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
