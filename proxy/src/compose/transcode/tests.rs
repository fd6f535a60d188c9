use base64::Engine as _;
use http::StatusCode;
use trellis_policies::compose::GrpcTranscode;

use super::*;

/// The descriptor set of `tests/proto/transcode.proto` (how it is generated is written there).
const DESCRIPTOR_SET: &[u8] = include_bytes!("../../../../tests/proto/transcode.pb");

fn transcoder(format: &str) -> Transcoder {
    let yaml = format!(
        "{{descriptor_set: {}, service: test.Echo, stream: {format}, max_message_bytes: 64}}",
        base64::engine::general_purpose::STANDARD.encode(DESCRIPTOR_SET)
    );
    let spec: GrpcTranscode = serde_norway::from_str(&yaml).unwrap();
    spec.compile().unwrap()
}

fn binding(t: &Transcoder, method: &str, path: &str) -> Arc<Binding> {
    t.find(method, path).unwrap().0.clone()
}

/// The test message `Item{id: 7}` as gRPC frames it.
fn item(id: u8) -> Vec<u8> {
    vec![0, 0, 0, 0, 2, 0x10, id]
}

fn status(code: &str, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("grpc-status", code.parse().unwrap());
    if !message.is_empty() {
        h.insert("grpc-message", message.parse().unwrap());
    }
    h
}

#[tokio::test]
async fn a_json_request_becomes_one_framed_grpc_message() {
    let t = transcoder("array");
    let req = Request::get("/v1/shelves/3/items/7?title=hi")
        .header("host", "api.example.com")
        .header("accept", "application/json")
        .header("authorization", "Bearer x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let (b, vars) = find(&t, &req).unwrap();
    let req = request(&t, &b, vars, req).await.unwrap();
    assert_eq!(b.grpc_path, "/test.Echo/Say");
    assert_eq!(req.method(), Method::POST);
    assert_eq!(req.uri(), "/test.Echo/Say");
    assert_eq!(req.version(), Version::HTTP_2);
    let h = req.headers();
    assert_eq!(h["content-type"], "application/grpc");
    assert_eq!(h["te"], "trailers");
    assert_eq!(h["authorization"], "Bearer x");
    assert!(h.get("accept").is_none());
    // name = "shelves/3" (field 1), id = 7 (field 2), title = "hi" (field 3).
    let msg = b"\x0a\x09shelves/3\x10\x07\x1a\x02hi";
    assert_eq!(&req.body()[..5], [0, 0, 0, 0, msg.len() as u8]);
    assert_eq!(&req.body()[5..], msg);
    assert_eq!(h["content-length"], (5 + msg.len()).to_string());
}

/// The status and cause `request` refuses a request with.
async fn refused(
    t: &Transcoder,
    method: &str,
    uri: &str,
    body: &'static str,
    length: Option<&str>,
) -> (StatusCode, &'static str) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(l) = length {
        b = b.header("content-length", l);
    }
    let req = b
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let found = find(t, &req);
    let sent = match found {
        Ok((b, vars)) => request(t, &b, vars, req).await,
        Err(e) => Err(e),
    };
    match sent {
        Err(e) => (e.status(), e.cause()),
        Ok(_) => panic!("{uri} was not refused"),
    }
}

#[tokio::test]
async fn refusals_come_before_anything_is_sent() {
    let t = transcoder("array");
    assert_eq!(
        refused(&t, "GET", "/v2/nothing", "", None).await,
        (StatusCode::NOT_FOUND, "no-route")
    );
    assert_eq!(
        refused(&t, "POST", "/test.Echo/Plain", "{\"id\": ", None).await,
        (StatusCode::BAD_REQUEST, "bad-json-body")
    );
    assert_eq!(
        refused(&t, "POST", "/test.Echo/Plain", "{\"nope\": 1}", None).await,
        (StatusCode::BAD_REQUEST, "bad-request-message")
    );
    // The declared length is over the 1 MiB default: refused unread.
    assert_eq!(
        refused(&t, "POST", "/test.Echo/Plain", "{}", Some("2000000")).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large")
    );
}

#[test]
fn a_stream_is_one_array_whatever_the_frame_sizes() {
    let t = transcoder("array");
    let b = binding(&t, "GET", "/v1/items/1:stream");
    let whole = [item(1), item(2), item(3)].concat();
    for split in 0..whole.len() {
        let mut s = JsonStream::new(b.clone(), StreamFormat::Array, 64);
        let mut out = s.data(&whole[..split], false).unwrap().to_vec();
        out.extend_from_slice(&s.data(&whole[split..], false).unwrap());
        out.extend_from_slice(&s.trailers(&status("0", "")));
        assert_eq!(s.end(), None, "closed once");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"[{"id":"1"},{"id":"2"},{"id":"3"}]"#,
            "split at {split}"
        );
    }
}

#[test]
fn a_failed_stream_ends_with_an_error_element() {
    let t = transcoder("ndjson");
    let b = binding(&t, "GET", "/v1/items/1:stream");
    let mut s = JsonStream::new(b.clone(), StreamFormat::Ndjson, 64);
    let mut out = s.data(&item(4), false).unwrap().to_vec();
    out.extend_from_slice(&s.trailers(&status("5", "gone%21")));
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"id\":\"4\"}\n{\"error\":{\"code\":5,\"message\":\"gone!\",\"status\":\"NOT_FOUND\"}}\n"
    );
    // An array without a message; a body that ends without a status.
    let mut s = JsonStream::new(b.clone(), StreamFormat::Array, 64);
    assert_eq!(&s.trailers(&status("0", ""))[..], b"[]");
    let mut s = JsonStream::new(b.clone(), StreamFormat::Array, 64);
    let out = s.data(&item(5), true).unwrap();
    assert!(
        out.starts_with(br#"[{"id":"5"},{"error":{"code":2,"#) && out.ends_with(b"}]"),
        "{out:?}"
    );
}

#[test]
fn oversized_compressed_and_foreign_messages_fail_the_stream() {
    let t = transcoder("array");
    let b = binding(&t, "GET", "/v1/items/1:stream");
    let mut s = JsonStream::new(b.clone(), StreamFormat::Array, 64);
    // The length alone is enough to refuse: the message is not waited for.
    let e = s.data(&[0, 0, 0, 0, 65], false).unwrap_err();
    assert!(
        e.to_string()
            .contains("65 bytes is larger than the limit of 64"),
        "{e}"
    );
    let mut s = JsonStream::new(b.clone(), StreamFormat::Array, 64);
    assert!(s.data(&[1, 0, 0, 0, 1, 0], false).is_err(), "compressed");
    let mut s = JsonStream::new(b, StreamFormat::Array, 64);
    let e = s.data(&[0, 0, 0, 0, 2, 0xff, 0xff], false).unwrap_err();
    assert!(e.to_string().contains("test.Item"), "{e}");
}

#[tokio::test]
async fn a_trailers_only_error_answers_its_http_status() {
    let t = transcoder("array");
    let b = binding(&t, "GET", "/v1/items/1");
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    *resp.headers_mut() = status("5", "no such thing");
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    let Err(e) = response(&t, b, resp).await else {
        panic!("a NOT_FOUND answer was not refused");
    };
    assert_eq!(
        (e.status(), e.cause()),
        (StatusCode::NOT_FOUND, "upstream-status")
    );
    let resp: Response<ResponseBody> = e.into_response_for(false);
    let body = resp.into_body().collect().await.unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&body.to_bytes()).unwrap();
    assert_eq!(doc["code"], 5);
    assert_eq!(doc["grpc_status"], "NOT_FOUND");
    assert_eq!(doc["message"], "no such thing");
    assert_eq!(doc["status"], 404);
}

#[tokio::test]
async fn a_client_stream_read_whole_becomes_all_its_messages() {
    let t = transcoder("array");
    let req = Request::post("/v1/shelves/3/items:collect")
        .body(Full::new(Bytes::from_static(
            br#"[{"id": 1}, {"title": "a"}]"#,
        )))
        .unwrap();
    let (b, vars) = find(&t, &req).unwrap();
    assert!(b.client_streaming);
    let req = request(&t, &b, vars, req).await.unwrap();
    assert_eq!(req.uri(), "/test.Echo/Collect");
    // Two framed messages, each with the path's name woven in.
    let one = b"\x0a\x09shelves/3\x10\x01";
    let two = b"\x0a\x09shelves/3\x1a\x01a";
    let mut want = vec![0, 0, 0, 0, one.len() as u8];
    want.extend_from_slice(one);
    want.extend_from_slice(&[0, 0, 0, 0, two.len() as u8]);
    want.extend_from_slice(two);
    assert_eq!(&req.body()[..], &want[..]);
    for (body, cause) in [
        ("[{\"id\": 1},]", "bad-json-body"),
        ("{}", "bad-json-body"),
        ("[{\"nope\": 1}]", "bad-request-message"),
    ] {
        let got = refused(&t, "POST", "/v1/shelves/3/items:collect", body, None).await;
        assert_eq!(got, (StatusCode::BAD_REQUEST, cause), "{body}");
    }
}
