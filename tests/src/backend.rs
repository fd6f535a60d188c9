//! The test app behind the server sidecar. Routes:
//! `/echo` (request description as JSON), `/reflect` (the body and its content type back),
//! `/flaky/<key>/<n>` (503 n times, then 200; `/flakyjson/...` as JSON), `/upload` (counts a
//! streamed body), `/download/<n>`
//! (streams n bytes), `/slow/<ms>`, `/status/<code>`, `/ws` (WebSocket echo), and gRPC methods
//! `/test.Echo/Unary`, `/test.Echo/Stream` (bidi, echoes each message as it arrives) and
//! `/test.Echo/Fail` (error status in trailers), `/test.Echo/Slow` (answers after 2 s),
//! `/test.Echo/Repeat` (each message three times: a server stream), `/test.Echo/Collect` (one
//! answer after the last message: their concatenation, a client stream). Every gRPC call is
//! logged in [`Backend::grpc_calls`] with how its request stream ended.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use crate::client::{Body, BoxError};

/// Which HTTP versions a backend speaks (plain TCP, no TLS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Speaks {
    /// HTTP/1.1 and HTTP/2 with prior knowledge (h2c), told apart by the connection preface.
    #[default]
    Both,
    /// HTTP/1.1 only: an HTTP/2 preface is a malformed request (the common app framework).
    Http1,
    /// h2c only (a gRPC server): HTTP/1.1 bytes are a protocol error.
    H2c,
}

/// One gRPC call as the service saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrpcCall {
    pub method: String,
    /// Whole messages received.
    pub messages: Vec<Bytes>,
    /// `None`: the request stream ended cleanly; else the error that ended it (a reset).
    pub broken: Option<String>,
}

/// The gRPC calls a backend has seen, in the order their request streams ended.
pub type GrpcLog = Arc<std::sync::Mutex<Vec<GrpcCall>>>;

pub struct Backend {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    pub grpc_calls: GrpcLog,
    /// Whole gRPC messages received so far, by every call, ended or not: what a test waits on
    /// to know the messages it streamed have arrived before it sends what comes next.
    pub grpc_received: Arc<AtomicU64>,
    /// Status `/healthz` answers (200 until a test changes it); health checks do not count in
    /// `requests`.
    pub health: Arc<std::sync::atomic::AtomicU16>,
    /// The accept loop, which owns every connection: aborting it is the app going away.
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Backend {
    /// Stop listening and close every connection, as a process exit would; the port is free
    /// for another backend (an app restarted, maybe speaking another protocol).
    pub async fn stop(&self) {
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            task.abort();
            // Resolves once the task (its listener, its connections) has been dropped.
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("literal")).await
    }

    /// Listen on a given address (tests that need several loopback IPs on one port).
    pub async fn start_on(addr: SocketAddr) -> Self {
        Self::start_speaking(addr, Speaks::Both).await
    }

    /// Listen on `addr`, speaking only the HTTP versions `speaks` allows.
    pub async fn start_speaking(addr: SocketAddr, speaks: Speaks) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        Self::serve(listener, speaks)
    }

    /// Serve on a listener the test bound earlier (so that no other test can take its port
    /// in between).
    pub fn start_from(listener: std::net::TcpListener) -> Self {
        listener.set_nonblocking(true).expect("non-blocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        Self::serve(listener, Speaks::Both)
    }

    fn serve(listener: TcpListener, speaks: Speaks) -> Self {
        let addr = listener.local_addr().expect("backend addr");
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let flaky: Flaky = Arc::default();
        let health = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let health_state = health.clone();
        let grpc_calls: GrpcLog = Arc::default();
        let grpc_received = Arc::new(AtomicU64::new(0));
        let log = GrpcSink {
            log: grpc_calls.clone(),
            received: grpc_received.clone(),
        };
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                while conns.try_join_next().is_some() {}
                let counter = counter.clone();
                let flaky = flaky.clone();
                let health = health_state.clone();
                let log = log.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        // Health checks and `OPTIONS *` (a server-wide probe, not a call of
                        // any route) are not app traffic.
                        if req.uri().path() != "/healthz" && req.uri() != "*" {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        let (flaky, health, log) = (flaky.clone(), health.clone(), log.clone());
                        async move { Ok::<_, Infallible>(route(req, &flaky, &health, log).await) }
                    });
                    let io = TokioIo::new(tcp);
                    // (The auto builder's `http1_only`/`http2_only` do nothing with upgrades.)
                    let _ = match speaks {
                        Speaks::Both => {
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                .serve_connection_with_upgrades(io, svc)
                                .await
                        }
                        Speaks::Http1 => hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await
                            .map_err(Into::into),
                        Speaks::H2c => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                                .map_err(Into::into)
                        }
                    };
                });
            }
        });
        Self {
            addr,
            requests,
            grpc_calls,
            grpc_received,
            health,
            task: std::sync::Mutex::new(Some(task)),
        }
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|e: Infallible| -> BoxError { match e {} })
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// Calls seen per `/flaky/<key>` key.
type Flaky = Arc<std::sync::Mutex<std::collections::HashMap<String, u32>>>;

async fn route(
    req: Request<Incoming>,
    flaky: &Flaky,
    health: &std::sync::atomic::AtomicU16,
    log: GrpcSink,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    match (parts.next().unwrap_or(""), parts.next()) {
        ("echo", _) => echo(&req),
        ("healthz", _) => full(
            StatusCode::from_u16(health.load(Ordering::Relaxed)).unwrap_or(StatusCode::OK),
            "",
        ),
        ("upload", _) => {
            let mut body = req.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => n += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(e) => return full(StatusCode::BAD_REQUEST, format!("body error: {e}")),
                }
            }
            full(StatusCode::OK, n.to_string())
        }
        ("download", Some(n)) => {
            let total: u64 = n.parse().unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::unfold(total, move |left| {
                let chunk = chunk.clone();
                async move {
                    if left == 0 {
                        return None;
                    }
                    let take = left.min(chunk.len() as u64);
                    Some((
                        Ok::<_, BoxError>(Frame::data(chunk.slice(..take as usize))),
                        left - take,
                    ))
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        (kind @ ("flaky" | "flakyjson"), Some(rest)) => {
            // /flaky/<key>/<n>: 503 for the first n calls with this key, then 200. `?after=S`
            // adds Retry-After: S to the 503s. `/flakyjson/...` answers its 200 as JSON.
            let (key, n) = rest.rsplit_once('/').unwrap_or((rest, "1"));
            let n: u32 = n.parse().unwrap_or(1);
            let seen = {
                let mut m = flaky.lock().unwrap();
                let c = m.entry(key.to_string()).or_insert(0);
                *c += 1;
                *c
            };
            if seen <= n {
                let mut r = full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("failing call {seen}"),
                );
                if let Some(after) = req.uri().query().and_then(|q| q.strip_prefix("after=")) {
                    r.headers_mut()
                        .insert("retry-after", HeaderValue::from_str(after).unwrap());
                }
                return r;
            }
            let retried = req.headers().get("trellis-retried").is_some();
            if kind == "flakyjson" {
                let v = serde_json::json!({"call": seen, "retried": retried});
                let mut r = full(StatusCode::OK, v.to_string());
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/json"));
                return r;
            }
            full(StatusCode::OK, format!("call {seen}, retried={retried}"))
        }
        ("stall", Some(ms)) => {
            // One chunk, a pause of `ms`, then the last chunk: a stream that goes quiet.
            let pause = Duration::from_millis(ms.parse().unwrap_or(1000));
            let stream = futures_util::stream::unfold(0u8, move |step| async move {
                match step {
                    0 => Some((
                        Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"first "))),
                        1,
                    )),
                    1 => {
                        tokio::time::sleep(pause).await;
                        Some((Ok(Frame::data(Bytes::from_static(b"last"))), 2))
                    }
                    _ => None,
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(stream)))
        }
        ("slowjson", Some(ms)) => {
            // The echo's JSON, after `ms` (an aggregate's slow service).
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
            echo(&req)
        }
        ("reflect", _) => {
            // The request's body and content type back (a body transform's upstream).
            let ct = req.headers().get("content-type").cloned();
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return full(StatusCode::BAD_REQUEST, format!("body error: {e}")),
            };
            let mut r = full(StatusCode::OK, body);
            if let Some(ct) = ct {
                r.headers_mut().insert("content-type", ct);
            }
            r
        }
        ("slow", Some(ms)) => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(1000))).await;
            full(StatusCode::OK, "done")
        }
        ("status", Some(code)) => full(
            StatusCode::from_u16(code.parse().unwrap_or(500))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "",
        ),
        ("ws", _) => websocket(req),
        ("test.Echo", Some(method)) => grpc(method.to_string(), req, log).await,
        _ => full(StatusCode::NOT_FOUND, "no such route"),
    }
}

fn echo(req: &Request<Incoming>) -> Response<Body> {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .keys()
        .map(|k| {
            let vals: Vec<_> = req
                .headers()
                .get_all(k)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            (k.to_string(), serde_json::Value::String(vals.join(" | ")))
        })
        .collect();
    let body = serde_json::json!({
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "version": format!("{:?}", req.version()),
        "authority": req.uri().authority().map(|a| a.as_str()),
        "headers": headers,
    });
    let mut r = full(StatusCode::OK, body.to_string());
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

fn websocket(mut req: Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(StatusCode::BAD_REQUEST, "not a websocket request");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(
        Empty::new()
            .map_err(|e: Infallible| -> BoxError { match e {} })
            .boxed(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("connection", HeaderValue::from_static("upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    r
}

/// Split complete length-prefixed gRPC messages off the front of `buf`.
pub fn grpc_messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    b.freeze()
}

fn grpc_trailers(status: u32, message: &str, count: usize) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    if !message.is_empty() {
        t.insert(
            "grpc-message",
            HeaderValue::from_str(message).expect("ascii message"),
        );
    }
    t.insert("x-message-count", HeaderValue::from(count as u64));
    t
}

/// Where [`grpc`] reports: the log of ended calls and the count of messages received.
#[derive(Clone)]
struct GrpcSink {
    log: GrpcLog,
    received: Arc<AtomicU64>,
}

async fn grpc(method: String, req: Request<Incoming>, sink: GrpcSink) -> Response<Body> {
    if req
        .headers()
        .get("content-type")
        .is_none_or(|v| !v.as_bytes().starts_with(b"application/grpc"))
    {
        return full(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not grpc");
    }
    if method == "Slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut call = GrpcCall {
            method: method.clone(),
            messages: Vec::new(),
            broken: None,
        };
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    // With its causes: hyper's own message does not say why the stream ended.
                    let mut text = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    while let Some(s) = source {
                        text.push_str(&format!(": {s}"));
                        source = s.source();
                    }
                    call.broken = Some(text);
                    break;
                }
            };
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                for msg in grpc_messages(&mut buf) {
                    call.messages.push(msg.clone());
                    sink.received.fetch_add(1, Ordering::SeqCst);
                    // `Repeat` (server streaming) answers each message three times; `Collect`
                    // (client streaming) once at the end.
                    let copies = match method.as_str() {
                        "Fail" | "Collect" => 0,
                        "Repeat" => 3,
                        _ => 1,
                    };
                    for _ in 0..copies {
                        if tx.send(Ok(Frame::data(grpc_frame(&msg)))).await.is_err() {
                            sink.log.lock().unwrap().push(call);
                            return;
                        }
                    }
                }
            }
        }
        let count = call.messages.len();
        let broken = call.broken.is_some();
        if method == "Collect" && !broken {
            let all: Vec<u8> = call.messages.iter().flat_map(|m| m.to_vec()).collect();
            let _ = tx.send(Ok(Frame::data(grpc_frame(&all)))).await;
        }
        sink.log.lock().unwrap().push(call);
        if broken {
            return;
        }
        let trailers = match method.as_str() {
            "Fail" => grpc_trailers(5, "no such thing", count),
            _ => grpc_trailers(0, "", count),
        };
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    r
}
