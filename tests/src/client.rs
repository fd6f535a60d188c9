//! Clients used by the tests: HTTP/1.1 and h2c (prior knowledge) pointed at a fixed address,
//! raw TCP for malformed requests, and small helpers.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::listeners::inbound::AppConnector;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<AppConnector, Body>;

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// HTTP/1.1 client that connects every request to `addr` (URIs name the service).
pub fn h1(addr: SocketAddr) -> HttpClient {
    Client::builder(TokioExecutor::new()).build(AppConnector::new(addr, Duration::from_secs(5)))
}

/// HTTP/2 prior-knowledge (h2c) client that connects every request to `addr`.
pub fn h2c(addr: SocketAddr) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(AppConnector::new(addr, Duration::from_secs(5)))
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn cause(&self) -> &str {
        self.headers
            .get("trellis-error")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Send `req` with a 20 s bound and collect the reply.
pub async fn send(client: &HttpClient, req: Request<Body>) -> Result<Reply, String> {
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| format!("request: {e:?}"))?;
        let (parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    };
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .map_err(|_| "timed out".to_string())?
}

pub async fn get(client: &HttpClient, uri: &str) -> Reply {
    let req = Request::get(uri).body(empty()).expect("request");
    send(client, req)
        .await
        .unwrap_or_else(|e| panic!("GET {uri}: {e}"))
}

/// Write raw bytes to `addr` and read until the server closes or 5 s pass.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Fetch an admin endpoint as text.
pub async fn admin(addr: SocketAddr, path: &str) -> Reply {
    get(&h1(addr), &format!("http://{addr}{path}")).await
}

/// Value of a metric line (exact name with labels) in Prometheus text, or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}
