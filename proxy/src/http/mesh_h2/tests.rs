//! The client against real HTTP/2 servers on loopback sockets (plaintext: TLS is the pool's
//! business, this module only needs a byte stream).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const SETTINGS: Settings = Settings {
    stream_window: 65_535,
    conn_window: 1 << 20,
    keepalive: Keepalive {
        interval: Duration::from_secs(20),
        timeout: Duration::from_secs(10),
    },
};

/// An HTTP/2 server answering every request with its method, its body's length and the
/// `content-length` it was sent with.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let method = req.method().clone();
                let length = req
                    .headers()
                    .get(http::header::CONTENT_LENGTH)
                    .map(|v| v.to_str().unwrap_or("?").to_string())
                    .unwrap_or_else(|| "none".into());
                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                let text = format!("{method} {} {length}", body.map_or(0, |b| b.len()));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

async fn connect(addr: std::net::SocketAddr, settings: Settings) -> Sender {
    let tcp = TcpStream::connect(addr).await.unwrap();
    Sender::handshake(tcp, settings, addr).await.unwrap()
}

fn request(method: &str, body: &'static [u8]) -> Request<RequestBody> {
    let mut req = Request::new(Either::Right(Full::new(Bytes::from_static(body))));
    *req.method_mut() = method.parse().unwrap();
    *req.uri_mut() = "https://orders/items".parse().unwrap();
    *req.version_mut() = http::Version::HTTP_2;
    req
}

async fn text(resp: Response<MeshBody>) -> String {
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test]
async fn requests_and_bodies_go_through_with_their_length() {
    let send = connect(echo_server().await, SETTINGS).await;
    let resp = send.clone().send(request("GET", b"")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // hyper's server sets the length of a full body; the hint follows it.
    assert_eq!(resp.body().size_hint().exact(), Some(10));
    assert_eq!(text(resp).await, "GET 0 none");
    // A body of known length says so; an empty one too on a method that defines a body.
    let resp = send.clone().send(request("POST", b"hello")).await.unwrap();
    assert_eq!(text(resp).await, "POST 5 5");
    let resp = send.clone().send(request("PUT", b"")).await.unwrap();
    assert_eq!(text(resp).await, "PUT 0 0");
    // Many at once on the one connection.
    let all = (0..50).map(|_| send.clone().send(request("POST", b"abc")));
    for resp in futures_util::future::join_all(all).await {
        assert_eq!(text(resp.unwrap()).await, "POST 3 3");
    }
    assert!(!send.is_closed());
}

#[tokio::test]
async fn a_closed_connection_hands_the_request_back_unsent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // Handshake, then close the connection at once.
        let conn = h2::server::handshake(tcp).await.unwrap();
        drop(conn);
    });
    let send = connect(addr, SETTINGS).await;
    server.await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !send.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the pool learns that the connection closed");
    match send.send(request("POST", b"keep me")).await {
        Err(SendError::NotSent(req)) => {
            assert_eq!(req.uri(), "https://orders/items");
            let body = req.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                &body[..],
                b"keep me",
                "the body is intact for another connection"
            );
        }
        Err(e) => panic!("expected the request back, got {e}"),
        Ok(resp) => panic!("expected the request back, got {}", resp.status()),
    }
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hold, held) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        // Handshake, then never read again: pings go unanswered, the socket stays open.
        let conn = h2::server::handshake(tcp).await.unwrap();
        let _ = hold.send(conn);
    });
    let settings = Settings {
        keepalive: Keepalive {
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(200),
        },
        ..SETTINGS
    };
    let send = connect(addr, settings).await;
    let _server_conn = held.await.unwrap();
    assert!(!send.is_closed());
    tokio::time::timeout(Duration::from_secs(5), async {
        while !send.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("an unanswered ping closes the connection");
}

#[tokio::test]
async fn a_peer_that_answers_pings_is_kept() {
    let settings = Settings {
        keepalive: Keepalive {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(500),
        },
        ..SETTINGS
    };
    let send = connect(echo_server().await, settings).await;
    // Several ping rounds, idle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!send.is_closed());
    let resp = send.send(request("GET", b"")).await.unwrap();
    assert_eq!(text(resp).await, "GET 0 none");
}

#[test]
fn a_failed_body_resets_with_the_reason_it_carries() {
    use h2::Reason;
    let cancel: Box<dyn std::error::Error + Send + Sync> =
        Box::new(h2::Error::from(Reason::CANCEL));
    assert_eq!(pipe::reset_reason(&*cancel), Reason::CANCEL);
    let other: Box<dyn std::error::Error + Send + Sync> = "client went away".into();
    assert_eq!(pipe::reset_reason(&*other), Reason::INTERNAL_ERROR);
}

#[test]
fn a_failed_request_names_the_http2_cause_once() {
    let e = SendError::Failed(h2::Error::from(h2::Reason::REFUSED_STREAM));
    let chain = crate::http::client_error::error_chain(&e);
    assert!(
        chain.starts_with("HTTP/2 request to the peer failed: "),
        "{chain}"
    );
    assert_eq!(chain.matches("refused").count(), 1, "{chain}");
}
