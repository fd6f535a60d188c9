//! The server against `h2`'s client on loopback sockets: what hyper's server did for the
//! inbound listener, this one must do too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::*;

type TestBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A server on a loopback port serving one connection with `handler`; its `Shutdown` asks for
/// a graceful shutdown, its `JoinHandle` ends with the connection.
async fn serve<H: Handler>(
    handler: H,
) -> (
    std::net::SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut conn = H2Serving::new(&builder(&Limits::default()), tcp, handler);
        tokio::select! {
            _ = &mut conn => return,
            Ok(()) = shutdown_rx => conn.graceful_shutdown(),
        }
        let _ = conn.await;
    });
    (addr, shutdown, task)
}

/// A client connection (its task spawned) to `addr`.
async fn client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    send
}

fn get(path: &str) -> Request<()> {
    Request::builder()
        .method(Method::GET)
        .uri(format!("http://peer{path}"))
        .body(())
        .unwrap()
}

fn full(data: &'static [u8]) -> TestBody {
    http_body_util::Full::new(Bytes::from_static(data))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn ok(body: TestBody) -> Result<Response<TestBody>, Infallible> {
    Ok(Response::new(body))
}

/// The whole body and trailers of a response.
async fn read_all(resp: Response<h2::RecvStream>) -> (Bytes, Option<HeaderMap>) {
    let mut recv = resp.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.unwrap();
    (Bytes::from(data), trailers)
}

/// Echoes the request's body and trailers, and says what `content-length` it was sent with.
async fn echo(req: Request<ReceivedBody>) -> Result<Response<TestBody>, Infallible> {
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    let hint = req.body().size_hint().exact();
    let collected = req.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let mut frames = vec![Ok(Frame::data(data))];
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let mut resp = Response::new(body.boxed_unsync());
    resp.headers_mut().insert(
        "x-length",
        HeaderValue::from_str(&format!("{length} {hint:?}")).unwrap(),
    );
    Ok(resp)
}

#[tokio::test]
async fn bodies_and_trailers_go_both_ways() {
    let (addr, _shutdown, _task) = serve(echo).await;
    let mut send = client(addr).await;

    // An empty request: its body is known empty; a full response body gets its length.
    let (resp, _) = send.send_request(get("/"), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-length"], "none Some(0)");
    assert!(
        resp.headers().contains_key(header::DATE),
        "hyper's server added a date"
    );
    let (data, trailers) = read_all(resp).await;
    assert!(data.is_empty() && trailers.is_none());

    // A streamed body with trailers, echoed with its trailers.
    let mut req = get("/up");
    *req.method_mut() = Method::POST;
    let (resp, mut stream) = send.send_request(req, false).unwrap();
    stream
        .send_data(Bytes::from_static(b"hello "), false)
        .unwrap();
    stream
        .send_data(Bytes::from_static(b"world"), false)
        .unwrap();
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    stream.send_trailers(t).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.headers()["x-length"], "none None");
    let (data, trailers) = read_all(resp).await;
    assert_eq!(&data[..], b"hello world");
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
}

#[tokio::test]
async fn a_body_of_known_length_says_so() {
    let handler = |_req: Request<ReceivedBody>| async { ok(full(b"twelve bytes")) };
    let (addr, _shutdown, _task) = serve(handler).await;
    let mut send = client(addr).await;
    let (resp, _) = send.send_request(get("/"), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "12");
    assert_eq!(&read_all(resp).await.0[..], b"twelve bytes");
}

/// Connection-specific headers are not allowed in HTTP/2: they are dropped, not the response.
#[tokio::test]
async fn connection_headers_are_stripped_from_responses() {
    let handler = |_req: Request<ReceivedBody>| async {
        let mut resp = Response::new(full(b"ok"));
        let h = resp.headers_mut();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        Ok(resp)
    };
    let (addr, _shutdown, _task) = serve(handler).await;
    let mut send = client(addr).await;
    let (resp, _) = send.send_request(get("/"), true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert!(!h.contains_key(header::CONNECTION) && !h.contains_key("x-hop"));
    assert!(!h.contains_key(header::TRANSFER_ENCODING));
    assert_eq!(h["x-kept"], "1");
}

/// Sets its flag when dropped: the handler's future was dropped.
struct DropFlag(Option<oneshot::Sender<()>>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn a_reset_before_the_response_cancels_the_handler() {
    let (started_tx, started) = oneshot::channel();
    let (dropped_tx, dropped) = oneshot::channel();
    let slots = std::sync::Mutex::new(Some((started_tx, dropped_tx)));
    let handler = move |_req: Request<ReceivedBody>| {
        let slot = slots.lock().unwrap().take();
        async move {
            let (started_tx, dropped_tx) = slot.unwrap();
            let _flag = DropFlag(Some(dropped_tx));
            let _ = started_tx.send(());
            // The app never answers.
            std::future::pending::<()>().await;
            ok(full(b""))
        }
    };
    let (addr, _shutdown, _task) = serve(handler).await;
    let mut send = client(addr).await;
    let (resp, mut stream) = send.send_request(get("/slow"), false).unwrap();
    started.await.unwrap();
    stream.send_reset(h2::Reason::CANCEL);
    drop(resp);
    tokio::time::timeout(Duration::from_secs(5), dropped)
        .await
        .expect("the handler's future is dropped when the peer resets")
        .unwrap();
}

/// A body that never ends, counting what it has produced.
struct Endless {
    produced: Arc<AtomicUsize>,
}

impl Body for Endless {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        const CHUNK: usize = 16 * 1024;
        self.produced.fetch_add(CHUNK, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'x'; CHUNK])))))
    }
}

/// A client that stops reading holds back the body: what the server reads of it is bounded
/// by the client's window and the send buffer, not by the body's size.
#[tokio::test]
async fn a_client_that_stops_reading_holds_the_body_back() {
    let produced = Arc::new(AtomicUsize::new(0));
    let counter = produced.clone();
    let handler = move |_req: Request<ReceivedBody>| {
        let produced = counter.clone();
        async move { ok(Endless { produced }.boxed_unsync()) }
    };
    let (addr, _shutdown, _task) = serve(handler).await;
    let mut send = client(addr).await;
    let (resp, _) = send.send_request(get("/big"), true).unwrap();
    let mut recv = resp.await.unwrap().into_body();
    // Read one chunk, release nothing, then stop.
    let first = recv.data().await.unwrap().unwrap();
    assert!(!first.is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = produced.load(Ordering::Relaxed);
    // The client's default window (64 KB) + the send buffer (400 KB) + a chunk or two.
    assert!(held <= 520 * 1024, "{held} bytes read from the body");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        produced.load(Ordering::Relaxed),
        held,
        "nothing more while stalled"
    );
    // Reading on lets it go on.
    let mut read = first.len();
    while read < 2 * 1024 * 1024 {
        let chunk = recv.data().await.unwrap().unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        read += chunk.len();
    }
    assert!(produced.load(Ordering::Relaxed) >= 2 * 1024 * 1024);
}

/// A request body the handler does not read is held back by the server's stream window.
#[tokio::test]
async fn a_handler_that_stops_reading_holds_the_upload_back() {
    let (got_tx, got) = oneshot::channel();
    let slot = std::sync::Mutex::new(Some(got_tx));
    let handler = move |req: Request<ReceivedBody>| {
        let got_tx = slot.lock().unwrap().take();
        async move {
            let _ = got_tx.unwrap().send(req);
            std::future::pending::<()>().await;
            ok(full(b""))
        }
    };
    let (addr, _shutdown, _task) = serve(handler).await;
    let mut send = client(addr).await;
    let mut req = get("/up");
    *req.method_mut() = Method::POST;
    let (_resp, mut stream) = send.send_request(req, false).unwrap();
    let _req = got.await.unwrap();
    // Offer 4 MB; the server's window for the stream is 256 KB.
    stream.reserve_capacity(4 * 1024 * 1024);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let window = stream.capacity();
    assert!(
        window <= H2_STREAM_WINDOW as usize,
        "{window} bytes of credit"
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_open_streams_finish() {
    let (release_tx, release) = oneshot::channel::<()>();
    let (started_tx, started) = oneshot::channel();
    let slots = std::sync::Mutex::new(Some((started_tx, release)));
    let handler = move |req: Request<ReceivedBody>| {
        let slot = (req.uri().path() == "/slow")
            .then(|| slots.lock().unwrap().take())
            .flatten();
        async move {
            if let Some((started_tx, release)) = slot {
                let _ = started_tx.send(());
                let _ = release.await;
            }
            ok(full(b"done"))
        }
    };
    let (addr, shutdown, task) = serve(handler).await;
    let mut send = client(addr).await;
    let (slow, _) = send.send_request(get("/slow"), true).unwrap();
    started.await.unwrap();
    shutdown.send(()).unwrap();
    // GOAWAY reaches the client: a new request is not taken.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let Ok(mut s) = send.clone().ready().await else {
                return;
            };
            match s.send_request(get("/late"), true) {
                Err(_) => return,
                Ok((resp, _)) => match resp.await {
                    Err(_) => return,
                    Ok(_) => continue,
                },
            }
        }
    });
    refused.await.expect("new streams are refused after GOAWAY");
    assert!(!task.is_finished(), "the open stream keeps the connection");
    release_tx.send(()).unwrap();
    let resp = slow.await.expect("the open stream is answered");
    assert_eq!(&read_all(resp).await.0[..], b"done");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the connection ends once its streams have")
        .unwrap();
}

#[tokio::test]
async fn concurrent_streams_are_bounded() {
    let open = Arc::new(AtomicUsize::new(0));
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let counter = open.clone();
    let handler = move |_req: Request<ReceivedBody>| {
        let open = counter.clone();
        let mut release = release.clone();
        async move {
            open.fetch_add(1, Ordering::Relaxed);
            let _ = release.wait_for(|r| *r).await;
            ok(full(b""))
        }
    };
    let (addr, _shutdown, _task) = serve(handler).await;
    let send = client(addr).await;
    let max = H2_MAX_CONCURRENT_STREAMS as usize;
    let mut pending = Vec::new();
    for _ in 0..max + 5 {
        let send = send.clone();
        pending.push(tokio::spawn(async move {
            let mut send = send.ready().await.unwrap();
            let (resp, _) = send.send_request(get("/"), true).unwrap();
            resp.await.map(|r| r.status())
        }));
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while open.load(Ordering::Relaxed) < max {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the bound's worth of streams are served at once");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(open.load(Ordering::Relaxed), max, "no more than the bound");
    release_tx.send(true).unwrap();
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(open.load(Ordering::Relaxed), max + 5);
}

#[tokio::test]
async fn an_oversized_header_list_is_refused() {
    let (addr, _shutdown, _task) = serve(echo).await;
    let mut send = client(addr).await;
    let mut req = get("/");
    let big = "x".repeat(Limits::default().max_header_bytes + 1);
    req.headers_mut()
        .insert("x-big", HeaderValue::from_str(&big).unwrap());
    let (resp, _) = send.send_request(req, true).unwrap();
    match resp.await {
        Ok(resp) => assert_eq!(resp.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        Err(e) => assert!(e.is_reset() || e.is_go_away(), "{e}"),
    }
}

#[test]
fn the_date_is_formatted_once_a_second() {
    let a = date_now().unwrap();
    let b = date_now().unwrap();
    assert!(httpdate::parse_http_date(a.to_str().unwrap()).is_ok());
    // The same second (or the next): both valid, and the same bytes when cached.
    if a != b {
        assert!(httpdate::parse_http_date(b.to_str().unwrap()).is_ok());
    }
}
