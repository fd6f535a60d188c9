//! A gRPC answer's frames rewritten as JSON while they stream: each complete message becomes
//! one element of a JSON array (or one line of newline-delimited JSON) as soon as its last
//! byte arrives; the trailers close the array. Headers have gone by then, so a stream that
//! fails after its first message ends with an error element
//! (`{"error": {"code": 5, "status": "NOT_FOUND", "message": "..."}}`) instead of a status.
//!
//! A message over the limit, a compressed one or one that is not the method's output type
//! fail the body (the client sees it cut short), as a broken upstream stream would.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use trellis_policies::compose::{Binding, StreamFormat};

use crate::compose::ComposeError;

/// Rewrites one gRPC response body's frames as JSON.
#[derive(Debug)]
pub struct JsonStream {
    binding: Arc<Binding>,
    format: StreamFormat,
    max_message: u64,
    /// Bytes of a message not complete yet.
    pending: BytesMut,
    /// Messages written.
    sent: usize,
    /// The closing has been written.
    closed: bool,
}

/// Why a stream cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("a gRPC message of {len} bytes is larger than the limit of {limit} bytes")]
    TooLarge { len: u64, limit: u64 },
    #[error("{0}")]
    Bad(String),
}

impl From<StreamError> for ComposeError {
    fn from(e: StreamError) -> Self {
        match e {
            StreamError::TooLarge { limit, .. } => ComposeError::UpstreamTooLarge { limit },
            StreamError::Bad(m) => ComposeError::BadUpstreamGrpc(m),
        }
    }
}

// === impl JsonStream ===

impl JsonStream {
    pub fn new(binding: Arc<Binding>, format: StreamFormat, max_message: u64) -> Self {
        Self {
            binding,
            format,
            max_message,
            pending: BytesMut::new(),
            sent: 0,
            closed: false,
        }
    }

    /// The JSON of the messages `data` completes; `last`: the body ends here (without
    /// trailers, so without a status: the stream is closed with an error element).
    pub fn data(&mut self, data: &[u8], last: bool) -> Result<Bytes, StreamError> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(message) = self.next_message()? {
            self.element(&mut out);
            let json = self
                .binding
                .response(&message)
                .map_err(|e| StreamError::Bad(e.to_string()))?;
            out.extend_from_slice(&json);
            if self.format == StreamFormat::Ndjson {
                out.push(b'\n');
            }
        }
        if last {
            out.extend_from_slice(&self.close(2, "the stream ended without a gRPC status"));
        }
        Ok(Bytes::from(out))
    }

    /// The closing for the trailers: `]`, or the error element then `]` for a failed call.
    pub fn trailers(&mut self, trailers: &HeaderMap) -> Bytes {
        let code = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(2);
        let message = match super::status::failed(code, trailers) {
            ComposeError::GrpcStatus { message, .. } => message,
            _ => String::new(),
        };
        if !self.pending.is_empty() {
            return self.close(13, "the stream ended inside a message");
        }
        self.close(code, &message)
    }

    /// The body ended: the closing, if nothing wrote it yet.
    pub fn end(&mut self) -> Option<Bytes> {
        (!self.closed).then(|| self.close(2, "the stream ended without a gRPC status"))
    }

    /// A unary call's one message as JSON.
    pub fn unary(&mut self, data: &[u8]) -> Result<Bytes, StreamError> {
        self.pending.extend_from_slice(data);
        let message = self
            .next_message()?
            .ok_or_else(|| StreamError::Bad("a unary call answered no whole message".into()))?;
        if !self.pending.is_empty() {
            return Err(StreamError::Bad(
                "a unary call answered more than one message".into(),
            ));
        }
        let json = self
            .binding
            .response(&message)
            .map_err(|e| StreamError::Bad(e.to_string()))?;
        Ok(Bytes::from(json))
    }

    /// The next complete message, checked against the limit as soon as its length is known.
    fn next_message(&mut self) -> Result<Option<Bytes>, StreamError> {
        if self.pending.len() < 5 {
            return Ok(None);
        }
        let p = &self.pending;
        let len = u64::from(u32::from_be_bytes([p[1], p[2], p[3], p[4]]));
        if p[0] & 1 != 0 {
            return Err(StreamError::Bad(
                "a compressed gRPC message (identity was asked for)".into(),
            ));
        }
        if len > self.max_message {
            return Err(StreamError::TooLarge {
                len,
                limit: self.max_message,
            });
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if self.pending.len() - 5 < len {
            return Ok(None);
        }
        self.pending.advance(5);
        Ok(Some(self.pending.split_to(len).freeze()))
    }

    /// Before an element: `[` for the first, `,` between.
    fn element(&mut self, out: &mut Vec<u8>) {
        if self.format == StreamFormat::Array {
            out.push(if self.sent == 0 { b'[' } else { b',' });
        }
        self.sent += 1;
    }

    /// The end of the stream: an error element for a failed call, and `]`.
    fn close(&mut self, code: u32, message: &str) -> Bytes {
        if self.closed {
            return Bytes::new();
        }
        self.closed = true;
        let mut out = Vec::new();
        if code != 0 {
            self.element(&mut out);
            let doc = serde_json::json!({"error": {
                "code": code,
                "status": super::code_name(code),
                "message": message,
            }});
            out.extend_from_slice(doc.to_string().as_bytes());
            if self.format == StreamFormat::Ndjson {
                out.push(b'\n');
            }
        }
        if self.format == StreamFormat::Array {
            if self.sent == 0 {
                out.push(b'[');
            }
            out.push(b']');
        }
        Bytes::from(out)
    }
}
