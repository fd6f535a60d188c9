//! gRPC through the mesh with a real gRPC client (tonic): unary, bidirectional streaming, and
//! an error status carried in trailers. tonic fails a call whose trailers were lost, so these
//! tests also prove trailers survive both hops.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use futures_util::StreamExt;
use http::uri::PathAndQuery;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use trellis_tests::Mesh;

/// Messages are raw bytes: no protobuf code generation needed.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n)))
    }
}

async fn grpc_client(mesh: &Mesh) -> tonic::client::Grpc<tonic::transport::Channel> {
    // Connect to the outbound listener, but address the `echo` service as :authority.
    let channel = Endpoint::from_shared(format!("http://{}", mesh.client.outbound()))
        .unwrap()
        .origin("http://echo".parse().unwrap())
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect to outbound");
    tonic::client::Grpc::new(channel)
}

#[tokio::test]
async fn grpc_unary_and_error_status() {
    let mesh = Mesh::start().await;
    let mut grpc = grpc_client(&mesh).await;
    grpc.ready().await.unwrap();
    let resp = grpc
        .unary(
            tonic::Request::new(Bytes::from_static(b"ping")),
            PathAndQuery::from_static("/test.Echo/Unary"),
            RawCodec,
        )
        .await
        .expect("unary call");
    assert_eq!(resp.get_ref().as_ref(), b"ping");

    grpc.ready().await.unwrap();
    let err = grpc
        .unary(
            tonic::Request::new(Bytes::from_static(b"x")),
            PathAndQuery::from_static("/test.Echo/Fail"),
            RawCodec,
        )
        .await
        .expect_err("the server fails this call");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "no such thing");
}

#[tokio::test]
async fn grpc_bidi_streaming_echoes_each_message_and_keeps_trailers() {
    let mesh = Mesh::start().await;
    let mut grpc = grpc_client(&mesh).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    grpc.ready().await.unwrap();
    let resp = grpc
        .streaming(
            tonic::Request::new(outgoing),
            PathAndQuery::from_static("/test.Echo/Stream"),
            RawCodec,
        )
        .await
        .expect("streaming call");
    let mut incoming = resp.into_inner();
    // Each reply arrives before the next message is sent: the stream is not buffered.
    for i in 0..20 {
        let msg = Bytes::from(format!("message {i}"));
        tx.send(msg.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("echo arrives while the stream is open")
            .expect("stream open")
            .expect("message");
        assert_eq!(echoed, msg);
    }
    drop(tx);
    assert!(
        incoming.next().await.is_none(),
        "stream ends with OK status"
    );
    let trailers = incoming
        .trailers()
        .await
        .expect("trailers")
        .expect("trailers present");
    assert_eq!(trailers.get("x-message-count").unwrap(), "20");
}

#[tokio::test]
async fn grpc_deadline_is_honoured_and_sidecar_errors_are_grpc_statuses() {
    let mesh = Mesh::start().await;
    // tonic enforces deadlines itself, so a plain HTTP/2 client carries the deadline here: only
    // the sidecar can end this call early.
    let h2 = trellis_tests::client::h2c(mesh.client.outbound());
    let req = http::Request::post("http://echo/test.Echo/Slow")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(trellis_tests::client::full(
            trellis_tests::backend::grpc_frame(b"x"),
        ))
        .unwrap();
    let start = std::time::Instant::now();
    let r = trellis_tests::client::send(&h2, req).await.unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "deadline not applied: {:?}",
        start.elapsed()
    );
    assert_eq!(
        r.status, 200,
        "gRPC errors travel as a status, not an HTTP error"
    );
    assert_eq!(r.headers["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert_eq!(r.headers["trellis-error"], "response-timeout");

    // A gRPC call to a service the mesh does not know: UNAVAILABLE, not a bare HTTP 503.
    let channel = Endpoint::from_shared(format!("http://{}", mesh.client.outbound()))
        .unwrap()
        .origin("http://nowhere".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut other = tonic::client::Grpc::new(channel);
    other.ready().await.unwrap();
    let err = other
        .unary(
            tonic::Request::new(Bytes::from_static(b"x")),
            PathAndQuery::from_static("/test.Echo/Unary"),
            RawCodec,
        )
        .await
        .expect_err("unknown service");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        err.metadata().get("trellis-error").unwrap(),
        "unknown-service"
    );
}
