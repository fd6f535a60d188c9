//! gRPC-Web at the ingress: browsers cannot read HTTP/2 trailers, so gRPC-Web moves them into
//! the body (a frame flagged `0x80`), and its text variant base64-encodes the whole body. The
//! ingress translates both ways (the protocol: grpc/grpc PROTOCOL-WEB.md), so mesh services
//! speak plain gRPC.
//!
//! A request's body is the same length-prefixed messages as gRPC's (text: base64 of them,
//! decoded whole, bounded, before forwarding); the response's data frames pass as they come,
//! its trailers become the last frame. Text responses are encoded as one base64 stream (three
//! bytes at a time, the remainder carried to the next frame), byte for byte what encoding the
//! whole body at once gives.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::{Either, Full};

use crate::ResponseBody;

/// The largest text (base64) request body decoded: gRPC's default message size limit.
pub const MAX_TEXT_BODY: u64 = 4 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `application/grpc-web[+proto]`
    Binary,
    /// `application/grpc-web-text[+proto]`: bodies in base64.
    Text,
}

/// Marks a text request, whose body the forwarding path decodes.
#[derive(Clone, Copy, Debug)]
pub struct WebText;

/// Make a gRPC-Web request a gRPC one (its content type, `te: trailers`); `None` for any
/// other request, left as it is.
pub fn accept<B>(req: &mut Request<B>) -> Option<Mode> {
    let ct = req.headers().get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = ct.split(';').next()?.trim().to_ascii_lowercase();
    let mode = match essence.as_str() {
        "application/grpc-web" | "application/grpc-web+proto" => Mode::Binary,
        "application/grpc-web-text" | "application/grpc-web-text+proto" => Mode::Text,
        _ => return None,
    };
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    if mode == Mode::Text {
        // Decoded, the body is shorter.
        h.remove(header::CONTENT_LENGTH);
        req.extensions_mut().insert(WebText);
    }
    Some(mode)
}

/// The gRPC response made a gRPC-Web one: its content type, and a body whose trailers come
/// as its last frame (base64 for text).
pub fn respond(resp: Response<ResponseBody>, mode: Mode) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    let grpc = crate::http::grpc::is_grpc(&parts.headers);
    if grpc {
        let ct = match mode {
            Mode::Binary => "application/grpc-web+proto",
            Mode::Text => "application/grpc-web-text+proto",
        };
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = match body {
        Either::Left(streamed) if grpc => Either::Left(streamed.grpc_web(Encoder::new(mode))),
        // A local answer (a trailers-only gRPC error: its status is in the headers, as
        // gRPC-Web allows) or not gRPC at all: as it is, in base64 for text.
        Either::Right(full) if mode == Mode::Text && grpc => {
            Either::Right(Full::new(encode_full(full)))
        }
        other => other,
    };
    Response::from_parts(parts, body)
}

fn encode_full(full: Full<Bytes>) -> Bytes {
    use http_body::Body as _;
    // A `Full` has one data frame, ready at once.
    let mut full = std::pin::pin!(full);
    let waker = futures_util::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut data = Vec::new();
    while let std::task::Poll::Ready(Some(Ok(frame))) = full.as_mut().poll_frame(&mut cx) {
        if let Ok(d) = frame.into_data() {
            data.extend_from_slice(&d);
        }
    }
    Bytes::from(base64::engine::general_purpose::STANDARD.encode(data))
}

/// Rewrites a gRPC response body's frames as gRPC-Web's.
#[derive(Debug)]
pub struct Encoder {
    mode: Mode,
    /// Text: the bytes not encoded yet (fewer than three, unless the body has ended).
    pending: Vec<u8>,
}

// === impl Encoder ===

impl Encoder {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            pending: Vec::new(),
        }
    }

    /// A data frame's bytes as sent; `last`: no frame follows.
    pub fn data(&mut self, data: Bytes, last: bool) -> Bytes {
        match self.mode {
            Mode::Binary => data,
            Mode::Text => self.text(&data, last),
        }
    }

    /// The trailers as gRPC-Web's trailer frame: flag `0x80`, a 4-byte big-endian length,
    /// then `name:value\r\n` lines (names lower-case, as HTTP/2 has them). The last frame.
    pub fn trailers(&mut self, trailers: &HeaderMap) -> Bytes {
        let frame = trailer_frame(trailers);
        match self.mode {
            Mode::Binary => frame,
            Mode::Text => self.text(&frame, true),
        }
    }

    fn text(&mut self, data: &[u8], last: bool) -> Bytes {
        self.pending.extend_from_slice(data);
        let whole = if last {
            self.pending.len()
        } else {
            self.pending.len() - self.pending.len() % 3
        };
        let out = base64::engine::general_purpose::STANDARD.encode(&self.pending[..whole]);
        self.pending.drain(..whole);
        Bytes::from(out)
    }
}

/// gRPC-Web's trailer frame for `trailers`.
pub fn trailer_frame(trailers: &HeaderMap) -> Bytes {
    let mut block = Vec::new();
    for (name, value) in trailers {
        block.extend_from_slice(name.as_str().as_bytes());
        block.push(b':');
        block.extend_from_slice(value.as_bytes());
        block.extend_from_slice(b"\r\n");
    }
    let mut frame = BytesMut::with_capacity(5 + block.len());
    frame.put_u8(0x80);
    frame.put_u32(u32::try_from(block.len()).unwrap_or(u32::MAX));
    frame.put_slice(&block);
    frame.freeze()
}

/// A text request body decoded: base64, possibly several padded pieces one after the other
/// (as clients that encode message by message send it); whitespace is not allowed.
pub fn decode_text(body: &[u8]) -> Result<Bytes, String> {
    // `is_multiple_of` is newer than the workspace's MSRV (1.85).
    #[allow(clippy::manual_is_multiple_of)]
    if body.len() % 4 != 0 {
        return Err(format!(
            "a gRPC-Web text body is base64 in groups of 4 characters, got {} bytes",
            body.len()
        ));
    }
    let mut out = Vec::with_capacity(body.len() / 4 * 3);
    for (i, group) in body.chunks(4).enumerate() {
        base64::engine::general_purpose::STANDARD
            .decode_vec(group, &mut out)
            .map_err(|e| format!("base64 group {i}: {e}"))?;
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte-exact vectors: a message `0x0a 0x03 "abc"` (protobuf field 1 = "abc") framed by
    /// gRPC, then the trailers `grpc-status: 0`, `grpc-message: ok` (32 bytes). The base64 was
    /// computed apart, with Python's `base64.b64encode`.
    const MESSAGE: &[u8] = b"\x00\x00\x00\x00\x05\x0a\x03abc";
    const TRAILER: &[u8] = b"\x80\x00\x00\x00\x20grpc-status:0\r\ngrpc-message:ok\r\n";

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("0"));
        t.insert("grpc-message", HeaderValue::from_static("ok"));
        t
    }

    #[test]
    fn binary_frames_pass_and_trailers_become_the_last_frame() {
        let mut e = Encoder::new(Mode::Binary);
        assert_eq!(&e.data(Bytes::from_static(MESSAGE), false)[..], MESSAGE);
        assert_eq!(&e.trailers(&trailers())[..], TRAILER);
    }

    #[test]
    fn text_is_one_base64_stream_whatever_the_frame_sizes() {
        let whole = [MESSAGE, TRAILER].concat();
        let expected = base64::engine::general_purpose::STANDARD.encode(&whole);
        assert_eq!(
            expected,
            "AAAAAAUKA2FiY4AAAAAgZ3JwYy1zdGF0dXM6MA0KZ3JwYy1tZXNzYWdlOm9rDQo="
        );
        for split in 0..MESSAGE.len() {
            let mut e = Encoder::new(Mode::Text);
            let mut out = Vec::new();
            out.extend_from_slice(&e.data(Bytes::copy_from_slice(&MESSAGE[..split]), false));
            out.extend_from_slice(&e.data(Bytes::copy_from_slice(&MESSAGE[split..]), false));
            out.extend_from_slice(&e.trailers(&trailers()));
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "split at {split}"
            );
        }
        // A body that ends without trailers flushes with its last frame.
        let mut e = Encoder::new(Mode::Text);
        assert_eq!(&e.data(Bytes::from_static(b"ab"), true)[..], b"YWI=");
    }

    #[test]
    fn text_requests_decode_one_stream_or_padded_pieces() {
        assert_eq!(&decode_text(b"AAAAAAUKA2FiYw==").unwrap()[..], MESSAGE);
        // Two messages encoded one by one: padding in the middle.
        let two = b"AAAAAAUKA2FiYw==AAAAAAUKA2FiYw==";
        assert_eq!(&decode_text(two).unwrap()[..], [MESSAGE, MESSAGE].concat());
        assert!(decode_text(b"AAAAAAUKA2FiYw=").is_err());
        assert!(decode_text(b"AAAA AAA").is_err());
        assert!(decode_text(b"!!!!").is_err());
    }

    #[test]
    fn requests_become_grpc_and_others_are_left_alone() {
        let mut req = Request::post("/test.Echo/Say")
            .header("content-type", "application/grpc-web-text+proto")
            .header("content-length", "16")
            .body(())
            .unwrap();
        assert_eq!(accept(&mut req), Some(Mode::Text));
        assert_eq!(req.headers()["content-type"], "application/grpc");
        assert_eq!(req.headers()["te"], "trailers");
        assert!(req.headers().get("content-length").is_none());
        assert!(req.extensions().get::<WebText>().is_some());
        let mut req = Request::post("/x")
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        assert_eq!(accept(&mut req), None);
        assert_eq!(req.headers()["content-type"], "application/grpc");
    }
}
