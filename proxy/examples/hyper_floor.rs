//! The cheapest HTTP/1.1 reverse proxy that the mandated stack (tokio + hyper 1 + hyper-util)
//! allows: a floor under Trellis's 1-hop cost in `bench/run.sh`.
//!
//! It does nothing a proxy is for (no routing, policy, metrics, spans, logs, limits, header
//! rewriting): it takes each request off a hyper HTTP/1.1 server connection and sends it, as
//! is, to one upstream through a hyper client. Whatever CPU it spends per request is spent by
//! tokio, hyper and the kernel, so it tells how much of Trellis's gap to nginx is Trellis and how
//! much is the stack under it.
//!
//! Two modes, both with upstream connection reuse:
//! - `pooled`: hyper-util's legacy `Client` (a connection pool keyed by authority), which is
//!   what Trellis's inbound listener uses to reach its app;
//! - `paired`: one upstream connection per downstream connection, driven by
//!   `hyper::client::conn::http1` directly (no pool, no dispatch to a pooled connection): the
//!   least work hyper can do per proxied request.
//!
//! ```text
//! cargo build --release --example hyper_floor -p trellis-proxy
//! target/release/examples/hyper_floor 127.0.0.1:8080 127.0.0.1:9000 pooled
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

type Body = BoxBody<Bytes, hyper::Error>;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Pooled,
    Paired,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (listen, upstream, mode) = match args.as_slice() {
        [_, l, u, m] => (
            l.parse::<SocketAddr>()?,
            u.parse::<SocketAddr>()?,
            m.as_str(),
        ),
        _ => return Err("usage: hyper_floor LISTEN UPSTREAM pooled|paired".into()),
    };
    let mode = match mode {
        "pooled" => Mode::Pooled,
        "paired" => Mode::Paired,
        other => return Err(format!("unknown mode {other:?}: pooled or paired").into()),
    };
    let listener = TcpListener::bind(listen).await?;
    let authority = Authority::try_from(upstream.to_string())?;
    let client = Client::builder(TokioExecutor::new()).build_http::<Incoming>();
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            // SIGINT ends the process normally, so that a profile-instrumented build
            // (`-Cprofile-generate`) writes its profile at exit.
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        stream.set_nodelay(true)?;
        let (client, authority) = (client.clone(), authority.clone());
        tokio::spawn(async move {
            let result = match mode {
                Mode::Pooled => serve_pooled(stream, client, authority).await,
                Mode::Paired => serve_paired(stream, upstream).await,
            };
            if let Err(e) = result {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn serve_pooled(
    stream: TcpStream,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Incoming>,
    authority: Authority,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let client = client.clone();
        *req.uri_mut() = upstream_uri(&authority, req.uri());
        async move { Ok::<_, Infallible>(relayed(client.request(req).await)) }
    });
    serve(stream, svc).await
}

async fn serve_paired(
    stream: TcpStream,
    upstream: SocketAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::spawn(conn);
    // hyper's HTTP/1 server handles one request at a time per connection, so this lock is
    // never contended; it only lends the sender to the request in flight.
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let svc = service_fn(move |req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            Ok::<_, Infallible>(relayed(sender.send_request(req).await))
        }
    });
    serve(stream, svc).await
}

/// Serve one client connection with hyper's HTTP/1.1 server.
async fn serve<S>(stream: TcpStream, svc: S) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await?;
    Ok(())
}

/// The upstream's response as is, or 502 when there is none.
fn relayed<E>(result: Result<Response<Incoming>, E>) -> Response<Body> {
    match result {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(_) => bad_gateway(),
    }
}

/// `http://<upstream><path?query>`: the legacy client dials the URI's authority.
fn upstream_uri(authority: &Authority, uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = uri.path_and_query().cloned();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

fn bad_gateway() -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}
