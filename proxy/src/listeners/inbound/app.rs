//! The local app as the inbound listener reaches it: HTTP/1.1 or h2c as configured, or as
//! found out (`app_protocol: auto`), on pooled connections to the app's one address
//! (HTTP/1.1: [`H1Pool`]; h2c: hyper-util's client, whose one connection multiplexes).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, Uri};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::{Client, Error as ClientError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{AppProtocol, Config};
use crate::error::ProxyError;
use crate::http::client_body::{BodyWatch, ClientBody, ReceivedBody};
use crate::http::client_error::{self, error_chain};
use crate::http::h1_pool::{Checkin, H1Pool, PoolError};
use crate::http::replay::{AttemptBody, Replay};
use crate::http::rewrite;
use crate::listeners::inbound::app_protocol::{AppKnowledge, Proto};

/// Largest read buffer of an HTTP/1.1 connection to the app.
const APP_READ_BUF: usize = 64 * 1024;
/// Idle keep-alive connections to the app are closed after this long (both protocols).
const APP_POOL_IDLE: Duration = crate::http::h1_pool::IDLE_TIMEOUT;

pub(super) struct AppClient {
    addr: SocketAddr,
    protocol: AppProtocol,
    request_timeout: Duration,
    /// The app's address, the authority of requests that name none.
    authority: http::HeaderValue,
    h1: Arc<H1Pool>,
    h2: Client<AppConnector, AttemptBody>,
    /// What the app speaks, for `app_protocol: auto`.
    knowledge: Arc<AppKnowledge>,
}

/// What the request tells about the protocol to use with the app.
#[derive(Clone, Copy, Debug)]
pub(super) struct Call {
    /// The caller spoke HTTP/2 (to its own sidecar, as `trellis-orig-proto` says).
    pub caller_h2: bool,
    /// An HTTP/1.1 upgrade: HTTP/2 cannot carry it.
    pub upgrade: bool,
    /// gRPC: HTTP/2 only.
    pub grpc: bool,
}

/// The protocol of the attempts so far.
struct Tries {
    first: Proto,
    proto: Proto,
    /// `app_protocol: auto`, and a request that may go in either protocol.
    may_fall_back: bool,
    stale_retried: bool,
}

// === impl AppClient ===

impl AppClient {
    pub fn new(config: &Config) -> Self {
        let connector = AppConnector {
            addr: config.inbound.app,
            timeout: config.timeouts.connect,
        };
        // What one response read from the app may hold unsent when its caller is slow:
        // bounded like an HTTP/2 stream's window, not hyper's ~400 KB default.
        let h1 = H1Pool::new(config.inbound.app, config.timeouts.connect, APP_READ_BUF);
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_idle_timeout(APP_POOL_IDLE)
            .pool_timer(TokioTimer::new());
        let h2 = b
            .http2_only(true)
            .timer(TokioTimer::new())
            .http2_initial_stream_window_size(crate::listeners::server::H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(crate::listeners::server::H2_CONN_WINDOW)
            .build(connector);
        Self {
            addr: config.inbound.app,
            protocol: config.inbound.app_protocol,
            request_timeout: config.timeouts.request,
            authority: crate::http::headers::shared_value(
                config.inbound.app.to_string().as_bytes(),
            )
            .unwrap_or_else(|| http::HeaderValue::from_static("localhost")),
            h1,
            h2,
            knowledge: Arc::new(AppKnowledge::new(
                config.inbound.app,
                config.timeouts.connect,
            )),
        }
    }

    pub fn knowledge(&self) -> Arc<AppKnowledge> {
        self.knowledge.clone()
    }

    /// Send `req` (its URI already absolute) within the request timeout. A body the caller
    /// broke is the caller's fault (400/408), not a failing app: the caller's sidecar must
    /// not count it against this endpoint. An HTTP/1.1 response comes with its pooled
    /// connection, to go back when the body has ended.
    pub async fn send(
        &self,
        req: Request<ReceivedBody>,
        call: Call,
    ) -> Result<(Response<Incoming>, Option<Checkin>), ProxyError> {
        let (parts, body) = req.into_parts();
        // An empty body (most requests) needs neither a watch nor a replay slot.
        let (body, watch) = if body.is_end_stream() {
            (Replay::empty(), None)
        } else {
            let (body, watch) = ClientBody::received(body);
            (Replay::new(body), Some(watch))
        };
        let attempts = self.attempts(parts, &body, watch.as_deref(), call);
        let result = match tokio::time::timeout(self.request_timeout, attempts).await {
            Err(_) => Err(client_error::response_timeout(
                self.addr,
                self.request_timeout,
            )),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(Some(e))) => Err(e.into_proxy_error(self.addr)),
            Ok(Err(None)) => Err(ProxyError::Upstream {
                addr: self.addr,
                message: "no request left to send".into(),
            }),
        };
        result.map_err(|e| {
            let timed_out = matches!(e, ProxyError::ResponseTimeout { .. });
            match watch.and_then(|w| w.blame(timed_out)) {
                Some(fault) => ProxyError::Client {
                    fault,
                    message: e.to_string(),
                },
                None => e,
            }
        })
    }

    /// Upgrades need HTTP/1.1 (HTTP/2 cannot carry them); gRPC needs HTTP/2. A probe of the
    /// app (`auto`, before its protocol is known) is boxed: it runs for the first requests
    /// only, and inline its state would be carried, and copied, by every request's future.
    async fn first_protocol(&self, call: Call, body: &Replay) -> Proto {
        match self.protocol {
            _ if call.upgrade => Proto::Http1,
            AppProtocol::Http1 => Proto::Http1,
            AppProtocol::H2c => Proto::H2c,
            AppProtocol::Auto if call.grpc => Proto::H2c,
            AppProtocol::Auto => {
                let replayable = body.replayable();
                match self.knowledge.known_choice(call.caller_h2, replayable) {
                    Some(p) => p,
                    None => Box::pin(self.knowledge.choose(call.caller_h2, replayable)).await,
                }
            }
        }
    }

    /// Attempts in the protocol the app is known or guessed to speak, then in the other one
    /// if it turns out not to, or once more on a fresh connection if a pooled one was stale.
    async fn attempts(
        &self,
        parts: http::request::Parts,
        body: &Replay,
        watch: Option<&BodyWatch>,
        call: Call,
    ) -> Result<(Response<Incoming>, Option<Checkin>), Option<AttemptError>> {
        let first = self.first_protocol(call, body).await;
        let may_fall_back = self.protocol == AppProtocol::Auto && !call.upgrade && !call.grpc;
        let mut tries = Tries {
            first,
            proto: first,
            may_fall_back,
            stale_retried: false,
        };
        let mut parts = Some(parts);
        loop {
            let mut p = match parts.take() {
                Some(p) if may_fall_back => {
                    parts = Some(clone_parts(&p));
                    p
                }
                Some(p) => p,
                None => return Err(None),
            };
            let h2 = tries.proto == Proto::H2c;
            if let Err(e) = rewrite::app_version(&mut p, h2, &self.authority) {
                return Err(Some(AttemptError::Request(e)));
            }
            let result = self
                .attempt(Request::from_parts(p, body.attempt()), h2)
                .await;
            let e = match result {
                Ok(resp) => {
                    if self.protocol == AppProtocol::Auto && !call.upgrade {
                        self.knowledge.learn(tries.proto);
                    }
                    return Ok(resp);
                }
                Err(e) => e,
            };
            // Boxed: failures are rare, and their probes' state would otherwise be carried
            // by every request's future.
            if !Box::pin(self.try_again(&mut tries, &e, watch, body)).await {
                return Err(Some(e));
            }
        }
    }

    /// One attempt in one protocol.
    async fn attempt(
        &self,
        req: Request<AttemptBody>,
        h2: bool,
    ) -> Result<(Response<Incoming>, Option<Checkin>), AttemptError> {
        if h2 {
            let resp = self.h2.request(req).await.map_err(AttemptError::H2c)?;
            return Ok((resp, None));
        }
        self.h1.send(req).await.map_err(AttemptError::Http1)
    }

    /// Whether a failed attempt goes again: in the other protocol when the app does not
    /// speak the one tried, or once on a fresh connection when a pooled connection that was
    /// closing (or sent something while idle) never carried this request.
    async fn try_again(
        &self,
        tries: &mut Tries,
        e: &AttemptError,
        watch: Option<&BodyWatch>,
        body: &Replay,
    ) -> bool {
        let proto = tries.proto;
        let client_fault = watch.is_some_and(|w| w.blame(false).is_some());
        let next = if tries.may_fall_back
            && proto == tries.first
            && !e.is_connect()
            && !client_fault
            && body.replayable()
            && protocol_mismatch(proto, e)
        {
            self.knowledge.fallback(proto, answered_otherwise(e)).await
        } else {
            None
        };
        if let Some(other) = next {
            tracing::info!(app = %self.addr, from = ?proto, to = ?other, error = %e.chain(), "the app does not speak the protocol tried: repeating the request in the one it speaks");
            tries.proto = other;
            return true;
        }
        if !tries.stale_retried && tries.may_fall_back && body.replayable() && stale_connection(e) {
            tries.stale_retried = true;
            // "On a new one": the other idle connections went stale with this one (an app
            // restart ends them all), and the pool would hand out the next of them.
            self.h1.clear_idle();
            tracing::debug!(app = %self.addr, error = %e.chain(), "pooled connection to the app was stale; sending again on a new one");
            return true;
        }
        false
    }
}

/// A failed attempt, in either protocol's client.
#[derive(Debug)]
enum AttemptError {
    /// The request cannot be sent as it is (no valid authority).
    Request(ProxyError),
    Http1(PoolError),
    H2c(ClientError),
}

// === impl AttemptError ===

impl AttemptError {
    fn is_connect(&self) -> bool {
        match self {
            Self::Request(_) => false,
            Self::Http1(e) => e.is_connect(),
            Self::H2c(e) => e.is_connect(),
        }
    }

    /// The first hyper error in the chain.
    fn hyper(&self) -> Option<&hyper::Error> {
        match self {
            Self::Request(_) => None,
            Self::Http1(e) => e.hyper(),
            Self::H2c(e) => hyper_source(e),
        }
    }

    fn chain(&self) -> String {
        match self {
            Self::Request(e) => e.to_string(),
            Self::Http1(e) => error_chain(e),
            Self::H2c(e) => error_chain(e),
        }
    }

    /// Connect failures apart from everything after (one mapping for every exit).
    fn into_proxy_error(self, addr: SocketAddr) -> ProxyError {
        match self {
            Self::Request(e) => e,
            Self::H2c(e) => client_error::from_pooled(addr, &e),
            Self::Http1(PoolError::Connect { source, .. }) => ProxyError::Connect { addr, source },
            Self::Http1(PoolError::Http(e)) => client_error::upstream(addr, &e),
        }
    }
}

/// What a repeated attempt needs of a request's head (extensions stay with the first).
fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = p.method.clone();
    *req.uri_mut() = p.uri.clone();
    *req.version_mut() = p.version;
    *req.headers_mut() = p.headers.clone();
    req.into_parts().0
}

/// hyper gave the request back unsent: the pooled connection was closing or had received
/// bytes while idle.
fn stale_connection(e: &AttemptError) -> bool {
    e.hyper().is_some_and(|h| h.is_canceled())
}

/// Whether a failed attempt in `proto` may be the app speaking another protocol, the only
/// failures worth a probe. For HTTP/1.1: an answer that is no HTTP/1.1 (an h2c server's
/// SETTINGS frame) or a connection closed before any answer, since probing an app that fails
/// otherwise would send it an `OPTIONS *` per failure. For h2c: any failure, since the h2c
/// probe sends the app no request and it alone decides (an app that speaks h2c keeps the
/// failure).
fn protocol_mismatch(proto: Proto, e: &AttemptError) -> bool {
    if proto == Proto::H2c {
        return true;
    }
    e.hyper()
        .is_some_and(|h| h.is_parse() || h.is_incomplete_message() || spoke_first(h))
}

/// hyper's "received unexpected message from connection": the app sent bytes before the
/// request was written. The words are the error's cause, not its `Display`, which says only
/// "operation was canceled" (so a check of `to_string()` never matched, and an h2c app whose
/// SETTINGS frame arrived first failed the request instead of the fallback taking it).
fn spoke_first(h: &hyper::Error) -> bool {
    crate::http::client_error::error_chain(h).contains("unexpected message")
}

/// A failed HTTP/1.1 attempt was answered, but not in HTTP/1.1: hyper could not parse the
/// answer, or the app spoke before the request was written (an HTTP/1.1 server never does; an
/// h2c server sends its SETTINGS frame first).
fn answered_otherwise(e: &AttemptError) -> bool {
    e.hyper().is_some_and(|h| h.is_parse() || spoke_first(h))
}

/// The first hyper error among `e`'s sources.
fn hyper_source(e: &ClientError) -> Option<&hyper::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            return Some(h);
        }
        source = s.source();
    }
    None
}

/// Connects every request to the local app, whatever the URI's authority says, so that the
/// original `Host`/`:authority` reaches the app unchanged.
#[derive(Clone)]
pub struct AppConnector {
    addr: SocketAddr,
    timeout: Duration,
}

// === impl AppConnector ===

impl AppConnector {
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self { addr, timeout }
    }
}

impl tower_service::Service<Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (addr, timeout) = (self.addr, self.timeout);
        Box::pin(async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("connect to app {addr} timed out"),
                    )
                })??;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(tcp))
        })
    }
}
