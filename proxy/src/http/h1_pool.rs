//! Keep-alive HTTP/1.1 connections to one address (the local app), each carrying one request
//! at a time and going back to the pool when its response has been read to the end.
//!
//! Why not hyper-util's pooled client, which the inbound side used before (and still uses for
//! h2c): it serves any number of hosts, so every request paid for a pool key (a URI clone), a
//! keyed lookup, a boxed response future, connection metadata in the request's extensions and
//! an idle list allocated again at every check-in: eight allocations and about 7 % of the
//! inbound path's CPU, to reach the one address a sidecar's app has. A stack of idle senders
//! behind one uncontended mutex is all that takes.
//!
//! A connection goes back only when it can carry the next request: its response ended
//! cleanly (a body dropped half-read closes the connection, since the rest of it would be read
//! as the next response) and it was not an upgrade. Idle connections are closed after
//! [`IDLE_TIMEOUT`], like hyper-util's pool did, and a connection the app closed is dropped
//! when it is next looked at.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::http::replay::AttemptBody;

/// Idle connections are closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// At most this many idle connections are kept (more are closed when their response ends).
const MAX_IDLE: usize = 1024;

/// Why a request to the app failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection: refused, unreachable, or not within the connect timeout.
    #[error("connect to app {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The connection was made, then the HTTP/1.1 exchange failed.
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl PoolError {
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }

    /// hyper's error, for everything after the connection was made.
    pub fn hyper(&self) -> Option<&hyper::Error> {
        match self {
            Self::Http(e) => Some(e),
            Self::Connect { .. } => None,
        }
    }
}

/// HTTP/1.1 connections to one address.
pub struct H1Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    builder: Builder,
    /// Most recently used last: checked out from the end (a warm connection), expired ones
    /// leave from the front.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<AttemptBody>,
    since: Instant,
}

/// A connection lent to one request: handed back by [`Checkin::give_back`] once its
/// response has ended; dropped otherwise, which closes it.
pub struct Checkin {
    pool: Arc<H1Pool>,
    sender: SendRequest<AttemptBody>,
}

// === impl H1Pool ===

impl H1Pool {
    /// `max_buf`: the largest read buffer of a connection (what one response may hold unsent
    /// while its caller is slow).
    pub fn new(addr: SocketAddr, connect_timeout: Duration, max_buf: usize) -> Arc<Self> {
        let mut builder = Builder::new();
        builder.max_buf_size(max_buf);
        Arc::new(Self {
            addr,
            connect_timeout,
            builder,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Send `req` (origin-form URI, `Host` set) on an idle connection, or a new one. A
    /// request a pooled connection gave back unsent (it was closing) goes again on the next
    /// one; a new connection's failure is final. The response comes with the connection,
    /// unless it is already back in the pool (a response without a body) or must not go
    /// back (an upgrade).
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<AttemptBody>,
    ) -> Result<(Response<Incoming>, Option<Checkin>), PoolError> {
        loop {
            let (mut sender, pooled) = match self.checkout() {
                Some(sender) => (sender, true),
                // Boxed: a new connection's state (connect, handshake) is not carried by
                // every request's future, most of which find a pooled connection.
                None => (Box::pin(self.connect()).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.lend(resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(PoolError::Http(e.into_error())),
                },
            }
        }
    }

    /// The response, and its connection unless it is already back or must not come back.
    fn lend(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<AttemptBody>,
    ) -> (Response<Incoming>, Option<Checkin>) {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // The connection now belongs to the upgrade.
            return (resp, None);
        }
        let checkin = Checkin {
            pool: self.clone(),
            sender,
        };
        if resp.body().is_end_stream() {
            checkin.give_back();
            return (resp, None);
        }
        (resp, Some(checkin))
    }

    /// Drop every idle connection: one turned out stale (the app restarted, say), and the
    /// others were opened to the same process.
    pub fn clear_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// The most recently used idle connection that can take a request now.
    fn checkout(&self) -> Option<SendRequest<AttemptBody>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(c) = idle.pop() {
            if c.since.elapsed() >= IDLE_TIMEOUT {
                // Expired, and every connection below it is older.
                idle.clear();
                return None;
            }
            if c.sender.is_ready() {
                return Some(c.sender);
            }
            // Closed by the app, or (rarely) not done with its last exchange yet: dropping
            // it closes it once that ends.
        }
        None
    }

    fn put(&self, sender: SendRequest<AttemptBody>) {
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        let now = Instant::now();
        let expired = idle
            .iter()
            .take_while(|c| now.duration_since(c.since) >= IDLE_TIMEOUT)
            .count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: now });
        }
    }

    async fn connect(&self) -> Result<SendRequest<AttemptBody>, PoolError> {
        let addr = self.addr;
        let connect_error = |source| PoolError::Connect { addr, source };
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                connect_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("timed out after {:?}", self.connect_timeout),
                ))
            })?
            .map_err(connect_error)?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = self.builder.handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(app = %addr, error = %e, "connection to the app ended");
            }
        });
        Ok(sender)
    }

    /// Idle connections now (what the tests check reuse by).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }
}

// === impl Checkin ===

impl Checkin {
    /// The response has ended: the connection may carry the next request. hyper marks it
    /// ready as soon as its own task has seen the end, which has nearly always happened by
    /// the time the body's reader sees it; if not, a small task waits for it.
    pub fn give_back(self) {
        let Self { pool, mut sender } = self;
        if sender.is_ready() {
            pool.put(sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                let ready = tokio::time::timeout(IDLE_TIMEOUT, sender.ready()).await;
                if matches!(ready, Ok(Ok(()))) {
                    pool.put(sender);
                }
            });
        }
    }
}

impl std::fmt::Debug for Checkin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkin")
            .field("addr", &self.pool.addr)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::replay::Replay;
    use http_body_util::BodyExt;
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// How the test app answers each request on a connection.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `200` with a 2-byte body, keep-alive.
        Ok,
        /// `200` with `Connection: close`, then closes.
        Close,
        /// `200` with a 100 KB body, keep-alive.
        Large,
        /// `200`, then closes the connection without saying so (an idle timeout that raced).
        CloseSilently,
    }

    /// An app on a std thread; returns its address and how many connections it accepted.
    fn app(answer: Answer) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || serve(stream, answer));
            }
        });
        (addr, accepted)
    }

    fn serve(stream: std::net::TcpStream, answer: Answer) {
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut out = stream;
        loop {
            // Read one request head (the tests send no bodies).
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let (head, body): (&str, Vec<u8>) = match answer {
                Answer::Ok | Answer::CloseSilently => ("", b"ok".to_vec()),
                Answer::Close => ("connection: close\r\n", b"ok".to_vec()),
                Answer::Large => ("", vec![b'x'; 100_000]),
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\n{head}content-length: {}\r\n\r\n",
                body.len()
            );
            if out.write_all(resp.as_bytes()).is_err() || out.write_all(&body).is_err() {
                return;
            }
            if matches!(answer, Answer::Close | Answer::CloseSilently) {
                return;
            }
        }
    }

    fn get() -> Request<AttemptBody> {
        Request::get("/")
            .header(http::header::HOST, "app")
            .body(Replay::empty().attempt())
            .expect("request")
    }

    /// Send one request and read its body to the end, giving the connection back.
    async fn round_trip(pool: &Arc<H1Pool>) -> usize {
        let (resp, checkin) = pool.send(get()).await.expect("response");
        let body = crate::http::body::Streamed::new(resp.into_body()).pooled(checkin);
        body.collect().await.expect("body").to_bytes().len()
    }

    fn pool(addr: SocketAddr) -> Arc<H1Pool> {
        H1Pool::new(addr, Duration::from_secs(2), 64 * 1024)
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (addr, accepted) = app(Answer::Ok);
        let pool = pool(addr);
        for _ in 0..20 {
            assert_eq!(round_trip(&pool).await, 2);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_all_come_back() {
        let (addr, accepted) = app(Answer::Large);
        let pool = pool(addr);
        let rounds = (0..8).map(|_| round_trip(&pool));
        let sizes = futures_util::future::join_all(rounds).await;
        assert!(sizes.iter().all(|n| *n == 100_000), "{sizes:?}");
        let opened = accepted.load(Ordering::SeqCst);
        assert!((1..=8).contains(&opened), "opened {opened}");
        assert_eq!(pool.idle(), opened);
        // And they are reused: no new connection for the next round.
        for _ in 0..8 {
            round_trip(&pool).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), opened);
    }

    #[tokio::test]
    async fn a_body_dropped_half_read_closes_its_connection() {
        let (addr, accepted) = app(Answer::Large);
        let pool = pool(addr);
        let (resp, checkin) = pool.send(get()).await.expect("response");
        let mut body = crate::http::body::Streamed::new(resp.into_body()).pooled(checkin);
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.data_ref().is_some_and(|d| d.len() < 100_000));
        drop(body);
        assert_eq!(pool.idle(), 0, "a half-read connection must not go back");
        assert_eq!(round_trip(&pool).await, 100_000);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_app_closes_are_not_reused() {
        for answer in [Answer::Close, Answer::CloseSilently] {
            let (addr, accepted) = app(answer);
            let pool = pool(addr);
            for _ in 0..5 {
                assert_eq!(round_trip(&pool).await, 2);
                // Let the connection's task see the close (the race itself is covered by
                // the unsent-request retry).
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 5);
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let e = pool(addr).send(get()).await.expect_err("nothing listens");
        assert!(e.is_connect(), "{e}");
    }
}
