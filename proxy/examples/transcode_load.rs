//! The gRPC-JSON transcoding A/B under load (`bench/transcode.sh`, docs/composition.md): a gRPC
//! echo service, and a bounded HTTP/2 load client that sends one of three requests for the
//! same method of `tests/proto/transcode.proto` to the ingress:
//!
//! - `grpc`: `POST /test.Echo/Create`, `application/grpc`, the 1 kB `Item` as a protobuf
//!   message (the bytes the ingress passes through without parsing them);
//! - `post`: `POST /v1/shelves/s1/items`, the same `Item` as JSON (transcoded to that very
//!   message, and its answer back to JSON);
//! - `get`: `GET /v1/shelves/s1/items/42?title=...&tags=a&tags=b` (path variables and query
//!   parameters, transcoded to a small message of `Say`).
//!
//! Why our own client: `oha` speaks HTTP but not gRPC (no trailers), and `ghz`/`h2load` are not
//! on the machine. Every request rides on `CONNS` HTTP/2 connections opened once (connection
//! reuse, as a gRPC client does); every answer is checked (HTTP 200, and `grpc-status: 0` in
//! a gRPC answer's trailers), so a run that measured errors fails instead of reporting them as
//! speed. Bounded: a fixed number of requests, each with a 10 s timeout.
//!
//! ```text
//! cargo build --release -p trellis-proxy --example transcode_load
//! transcode_load echo 127.0.0.1:9000                          # the service (h2c)
//! transcode_load load 127.0.0.1:8080 api.bench.local grpc 2 32 20000      # closed loop
//! transcode_load load 127.0.0.1:8080 api.bench.local post 2 32 5000 1000  # 1000 req/s
//! ```
//! The load mode prints one JSON line: requests, seconds, rps, p50_ms, p99_ms, conns; `sizes`
//! prints the three request bodies' sizes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use trellis_policies::compose::GrpcTranscode;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const DESCRIPTOR_SET: &[u8] = include_bytes!("../../tests/proto/transcode.pb");
const PER_REQUEST: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [_, "echo", listen] => echo(listen.parse()?).await,
        [_, "sizes"] => {
            for kind in ["grpc", "post", "get"] {
                println!("{kind}: {} request body bytes", shape(kind)?.body.len());
            }
            Ok(())
        }
        [_, "load", addr, host, kind, conns, conc, n, rate @ ..] if rate.len() <= 1 => {
            let rate: f64 = match rate.first() {
                Some(r) => r.parse()?,
                None => 0.0,
            };
            load(
                addr.parse()?,
                host,
                kind,
                conns.parse()?,
                conc.parse()?,
                n.parse()?,
                rate,
            )
            .await
        }
        _ => Err(
            "usage: transcode_load echo LISTEN | sizes | load ADDR HOST grpc|post|get \
             CONNS CONCURRENCY REQUESTS [RATE]"
                .into(),
        ),
    }
}

// === the service ===

/// An h2c gRPC service answering every call with its request's messages and `grpc-status: 0`
/// (the answer of `Create` and `Say` is their `Item`, as the e2e tests' backend answers).
async fn echo(listen: SocketAddr) -> Result<(), BoxError> {
    let listener = TcpListener::bind(listen).await?;
    loop {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        tokio::spawn(async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let mut trailers = HeaderMap::new();
                let frames: Vec<Result<Frame<Bytes>, Infallible>> = match body {
                    Ok(b) => {
                        trailers.insert("grpc-status", HeaderValue::from_static("0"));
                        vec![Ok(Frame::data(b)), Ok(Frame::trailers(trailers))]
                    }
                    Err(_) => {
                        trailers.insert("grpc-status", HeaderValue::from_static("13"));
                        vec![Ok(Frame::trailers(trailers))]
                    }
                };
                let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, Infallible>(r)
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

// === the requests ===

/// An `Item` of about 1 kB as JSON: the one `policies/benches/transcode.rs` maps.
fn item() -> Result<Vec<u8>, BoxError> {
    let tags: Vec<String> = (0..20).map(|i| format!("tag-number-{i:03}")).collect();
    let v = serde_json::json!({
        "title": "The Analytical Engine: notes by the translator, with an appendix of tables ".repeat(4),
        "created": "2026-12-03T10:00:00.250Z", "ttl": "3600s", "count": 12, "kind": "BOOK",
        "data": base64::engine::general_purpose::STANDARD.encode([7u8; 96]),
        "tags": tags, "meta": {"author": "Ada Lovelace", "pages": 320},
        "draft": false, "big": "9007199254740993", "price": 29.5,
    });
    Ok(serde_json::to_vec(&v)?)
}

/// What one request of KIND is: method, path, content type, body.
struct Shape {
    method: http::Method,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Bytes,
    grpc: bool,
}

const POST_PATH: &str = "/v1/shelves/s1/items";
const GET_PATH: &str = "/v1/shelves/s1/items/42?title=hello&tags=a&tags=b&draft=true";

fn shape(kind: &str) -> Result<Shape, BoxError> {
    let json = item()?;
    Ok(match kind {
        "grpc" => {
            // The message the ingress makes of the JSON POST: the A/B sends the same bytes.
            let set = base64::engine::general_purpose::STANDARD.encode(DESCRIPTOR_SET);
            let spec: GrpcTranscode =
                serde_norway::from_str(&format!("{{descriptor_set: {set}, service: test.Echo}}"))?;
            let t = spec.compile()?;
            let (b, vars) = t.find("POST", POST_PATH).ok_or("no binding")?;
            let msg = b.request(&json, vars?, None, false)?;
            let mut framed = Vec::with_capacity(5 + msg.len());
            framed.push(0);
            framed.extend_from_slice(&u32::try_from(msg.len())?.to_be_bytes());
            framed.extend_from_slice(&msg);
            Shape {
                method: http::Method::POST,
                path: "/test.Echo/Create",
                content_type: Some("application/grpc"),
                body: framed.into(),
                grpc: true,
            }
        }
        "post" => Shape {
            method: http::Method::POST,
            path: POST_PATH,
            content_type: Some("application/json"),
            body: json.into(),
            grpc: false,
        },
        "get" => Shape {
            method: http::Method::GET,
            path: GET_PATH,
            content_type: None,
            body: Bytes::new(),
            grpc: false,
        },
        _ => return Err(format!("unknown kind {kind}: grpc, post or get").into()),
    })
}

/// One request and its whole answer; an error unless 200 (and `grpc-status: 0` for gRPC).
async fn once(mut send: SendRequest<Full<Bytes>>, host: &str, s: &Shape) -> Result<(), BoxError> {
    let mut req = Request::builder()
        .method(s.method.clone())
        .uri(format!("http://{host}{}", s.path));
    if let Some(ct) = s.content_type {
        req = req.header("content-type", ct);
    }
    if s.grpc {
        req = req.header("te", "trailers");
    }
    let req = req.body(Full::new(s.body.clone()))?;
    send.ready().await?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?;
    if status != 200 {
        return Err(format!("status {status}: {:?}", body.to_bytes()).into());
    }
    if s.grpc {
        let code = body
            .trailers()
            .and_then(|t| t.get("grpc-status"))
            .map(|v| v.as_bytes().to_vec());
        if code.as_deref() != Some(b"0") {
            return Err(format!("grpc-status {code:?}").into());
        }
    }
    Ok(())
}

// === the load ===

/// `n` requests over `conns` connections: closed loop with `conc` in flight (`rate` 0), or
/// open loop at `rate` per second, latency counted from each request's scheduled start.
async fn load(
    addr: SocketAddr,
    host: &str,
    kind: &str,
    conns: usize,
    conc: usize,
    n: usize,
    rate: f64,
) -> Result<(), BoxError> {
    let shape = Arc::new(shape(kind)?);
    let host: Arc<str> = host.into();
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns.max(1) {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await?;
        tokio::spawn(conn);
        senders.push(send);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..conc.max(1) {
        let send = senders[t % senders.len()].clone();
        let (shape, host) = (shape.clone(), host.clone());
        // Requests t, t + conc, t + 2 conc...: in the open loop, the schedule interleaves.
        let mine: Vec<usize> = (t..n).step_by(conc.max(1)).collect();
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(mine.len());
            for i in mine {
                let due = if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    due
                } else {
                    Instant::now()
                };
                tokio::time::timeout(PER_REQUEST, once(send.clone(), &host, &shape))
                    .await
                    .map_err(|_| "timed out")??;
                lat.push(due.elapsed());
            }
            Ok::<_, BoxError>(lat)
        });
    }
    let mut lat = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        lat.extend(r??);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"requests\": {}, \"seconds\": {secs:.3}, \"rps\": {:.1}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"conns\": {}}}",
        lat.len(),
        lat.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        senders.len()
    );
    Ok(())
}
