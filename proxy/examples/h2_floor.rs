//! Does driving the `h2` crate directly beat hyper's HTTP/2 client? hyper's client hands every
//! request to its connection task through a channel and spawns a task per response; Pingora
//! drives `h2` itself. This example answers with a measurement instead of a guess: HTTP/1.1
//! in, HTTP/2 (h2c) out to one multiplexed upstream connection, either through
//! `hyper::client::conn::http2` or through `h2::client` with nothing in between. Nothing else
//! differs. On 2026-12-03 CPU time showed no difference beyond this VM's noise; counted in
//! instructions (callgrind, 2,000 sequential GETs, 2026-12-04) hyper's client costs 48,500 per
//! request and `h2` driven directly 37,300, so the mesh's client now drives `h2` itself
//! (`proxy/src/http/mesh_h2/`).
//!
//! ```text
//! cargo build --release --example h2_floor -p trellis-proxy
//! target/release/examples/h2_floor 127.0.0.1:9101 - server         # h2c upstream answering ok
//! target/release/examples/h2_floor 127.0.0.1:9102 127.0.0.1:9101 hyper
//! target/release/examples/h2_floor 127.0.0.1:9103 127.0.0.1:9101 h2
//! ```
//! The script that measured it is `bench/h2_client.sh`.
use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

type Body = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, mode] = args.as_slice() else {
        return Err("usage: h2_floor LISTEN UPSTREAM|- hyper|h2|server".into());
    };
    let listen: SocketAddr = listen.parse()?;
    let listener = TcpListener::bind(listen).await?;
    if mode == "server" {
        loop {
            let (s, _) = listener.accept().await?;
            s.set_nodelay(true)?;
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    }
    let upstream: SocketAddr = upstream.parse()?;
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    if mode == "hyper" {
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(TokioIo::new(up))
            .await?;
        tokio::spawn(conn);
        return accept(listener, move |head| {
            let mut send = send.clone();
            async move {
                let resp = send
                    .send_request(Request::from_parts(head, Empty::new()))
                    .await;
                relayed(resp.map(|r| r.map(|b| b.map_err(Into::into).boxed())))
            }
        })
        .await;
    }
    let (send, conn) = h2::client::handshake(up).await?;
    tokio::spawn(conn);
    accept(listener, move |head| {
        let send = send.clone();
        async move {
            let resp = async {
                let mut send = send.ready().await?;
                let (fut, _) = send.send_request(Request::from_parts(head, ()), true)?;
                fut.await
            };
            relayed(resp.await.map(|r| r.map(|b| Recv(b).boxed())))
        }
    })
    .await
}

/// Serve HTTP/1.1 clients forever, each request's head (made HTTP/2) answered by `relay`.
async fn accept<F, Fut>(listener: TcpListener, relay: F) -> Result<(), Box<dyn std::error::Error>>
where
    F: Fn(http::request::Parts) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let relay = relay.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let fut = relay(h2_head(req.into_parts().0));
                async move { Ok::<_, Infallible>(fut.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
    }
}

/// The upstream's response, or an empty 502.
fn relayed<E>(resp: Result<Response<Body>, E>) -> Response<Body> {
    resp.unwrap_or_else(|_| {
        let mut r = Response::new(Empty::<Bytes>::new().map_err(|n| match n {}).boxed());
        *r.status_mut() = http::StatusCode::BAD_GATEWAY;
        r
    })
}

/// The request head as HTTP/2 wants it: absolute URI (`:scheme`, `:authority`), version 2.
fn h2_head(mut parts: http::request::Parts) -> http::request::Parts {
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(http::uri::Authority::from_static("upstream"));
    uri.path_and_query = parts.uri.path_and_query().cloned();
    if let Ok(u) = http::Uri::from_parts(uri) {
        parts.uri = u;
    }
    parts.version = http::Version::HTTP_2;
    parts
}

/// An `h2` response body as an `http_body::Body`, giving flow-control credit back as it reads.
struct Recv(h2::RecvStream);
impl http_body::Body for Recv {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        if !self.0.is_end_stream() {
            match self.0.poll_data(cx) {
                Poll::Ready(Some(Ok(d))) => {
                    let _ = self.0.flow_control().release_capacity(d.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(d))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.0.poll_trailers(cx) {
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(http_body::Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => Poll::Pending,
        }
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}
