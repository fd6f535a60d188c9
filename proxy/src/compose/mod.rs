//! API composition at the edge, compiled from HTTPRoute rules: aggregates (one public call
//! answered by several mesh calls, merged), JSON body transforms (jq, by jaq) and gRPC-JSON
//! transcoding (a gRPC service as REST/JSON); and gRPC-Web, translated to gRPC.
//!
//! Both buffer bodies, so both bound them: a request over the limit is refused before anything
//! is sent (nothing reaches a backend half-made), an upstream answer over it fails the call.
//! Their errors are [`ComposeError`]s, answered as `application/problem+json` and counted by
//! cause like the sidecar's other refusals.

pub mod aggregate;
pub mod body;
pub mod grpc_web;
pub mod transcode;
pub mod transform;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use trellis_policies::compose::{JqError, TranscodeError};

pub use aggregate::Aggregate;
pub use transform::Transform;

/// Rewrites a streamed response body's frames at the ingress: as gRPC-Web's, or as JSON (a
/// transcoded server stream).
#[derive(Debug)]
pub enum Reframe {
    Web(grpc_web::Encoder),
    Json(transcode::JsonStream),
}

// === impl Reframe ===

impl Reframe {
    /// One frame rewritten; `last`: no frame follows.
    pub fn frame(
        &mut self,
        frame: http_body::Frame<Bytes>,
        last: bool,
    ) -> Result<http_body::Frame<Bytes>, crate::http::body::BoxError> {
        let frame = match frame.into_data() {
            Ok(data) => match self {
                Self::Web(w) => w.data(data, last),
                Self::Json(j) => j.data(&data, last)?,
            },
            Err(f) => match f.into_trailers() {
                Ok(t) => match self {
                    Self::Web(w) => w.trailers(&t),
                    Self::Json(j) => j.trailers(&t),
                },
                Err(f) => return Ok(f),
            },
        };
        Ok(http_body::Frame::data(frame))
    }

    /// The body ended: what is still owed (a JSON stream's closing).
    pub fn end(&mut self) -> Option<Bytes> {
        match self {
            Self::Web(_) => None,
            Self::Json(j) => j.end(),
        }
    }
}

/// Why a composed request could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("the request body is larger than {limit} bytes")]
    RequestTooLarge { limit: u64 },
    #[error("the request body cannot be transformed: {0}")]
    BadRequestBody(JqError),
    #[error("the upstream answer is larger than {limit} bytes")]
    UpstreamTooLarge { limit: u64 },
    #[error("the upstream answer cannot be transformed: {0}")]
    BadUpstreamBody(JqError),
    #[error("the upstream answer failed while it was read: {0}")]
    UpstreamBodyFailed(String),
    #[error("the gRPC-Web text body cannot be decoded: {0}")]
    BadGrpcWeb(String),
    /// An aggregate call's body points at a field the public body lacks.
    #[error("call `{call}`: the request body has nothing at `{pointer}`")]
    MissingBodyField { call: String, pointer: String },
    #[error("the path does not fit the aggregate's parameters `{0}`")]
    PathMismatch(String),
    #[error("no HTTP binding of the gRPC service fits `{method} {path}`")]
    NoBinding { method: String, path: String },
    /// A JSON request that does not map to the method's input message (or an answer that is
    /// not its output message).
    #[error("{0}")]
    Transcode(TranscodeError),
    #[error("the upstream's gRPC answer cannot be transcoded: {0}")]
    BadUpstreamGrpc(String),
    /// A transcoded call failed with a gRPC status: answered with its HTTP mapping.
    #[error("the service answered {}: {message}", transcode::code_name(*code))]
    GrpcStatus {
        code: u32,
        message: String,
        cause: &'static str,
    },
    /// A required call of an aggregate failed: answered with the upstream's status and cause.
    #[error("call `{call}` to `{service}` failed ({cause}): {message}")]
    CallFailed {
        call: String,
        service: String,
        status: StatusCode,
        cause: &'static str,
        message: String,
    },
}

// === impl ComposeError ===

impl ComposeError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::RequestTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            // jaq broke or could not run: the gateway's fault, whatever the body.
            Self::BadRequestBody(JqError::Panic(_) | JqError::Unavailable(_)) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            // A body that makes the program run past its budget is refused like any body the
            // program cannot take: 400, the client's to change (a 5xx would invite retries of
            // the same costly body).
            Self::BadRequestBody(_) | Self::BadGrpcWeb(_) | Self::MissingBodyField { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::UpstreamTooLarge { .. }
            | Self::BadUpstreamBody(_)
            | Self::UpstreamBodyFailed(_) => StatusCode::BAD_GATEWAY,
            Self::PathMismatch(_) | Self::NoBinding { .. } => StatusCode::NOT_FOUND,
            Self::CallFailed { status, .. } => *status,
            Self::Transcode(TranscodeError::BadUpstream { .. }) | Self::BadUpstreamGrpc(_) => {
                StatusCode::BAD_GATEWAY
            }
            Self::Transcode(_) => StatusCode::BAD_REQUEST,
            Self::GrpcStatus { code, .. } => transcode::http_status(*code),
        }
    }

    /// The `trellis-error` token and metrics label.
    pub fn cause(&self) -> &'static str {
        if let Self::BadRequestBody(e) | Self::BadUpstreamBody(e) = self {
            if let Some(cause) = transform_cause(e) {
                return cause;
            }
        }
        match self {
            Self::RequestTooLarge { .. } => "body-too-large",
            Self::BadRequestBody(_) | Self::MissingBodyField { .. } => "bad-json-body",
            Self::BadGrpcWeb(_) => "bad-grpc-web",
            Self::UpstreamTooLarge { .. } => "upstream-body-too-large",
            Self::BadUpstreamBody(_) => "bad-upstream-json",
            Self::UpstreamBodyFailed(_) => "upstream-failed",
            Self::PathMismatch(_) | Self::NoBinding { .. } => "no-route",
            Self::CallFailed { cause, .. } | Self::GrpcStatus { cause, .. } => cause,
            Self::Transcode(e) if e.is_bad_json() => "bad-json-body",
            Self::Transcode(TranscodeError::BadUpstream { .. }) | Self::BadUpstreamGrpc(_) => {
                "bad-upstream-grpc"
            }
            Self::Transcode(_) => "bad-request-message",
        }
    }

    /// An RFC 9457 problem document naming the cause (and the failed call).
    pub fn into_response<B>(self) -> Response<Either<B, Full<Bytes>>> {
        let mut doc = serde_json::json!({
            "type": format!("urn:trellis:error:{}", self.cause()),
            "title": self.cause(),
            "status": self.status().as_u16(),
            "detail": self.to_string(),
        });
        match &self {
            Self::CallFailed { call, service, .. } => {
                doc["call"] = call.as_str().into();
                doc["service"] = service.as_str().into();
            }
            Self::MissingBodyField { call, pointer } => {
                doc["call"] = call.as_str().into();
                doc["pointer"] = pointer.as_str().into();
            }
            Self::Transcode(e) => {
                if let Some(f) = e.field() {
                    doc["field"] = f.into();
                }
                if let Some(i) = e.element() {
                    doc["element"] = i.into();
                }
            }
            // google.rpc.Status's JSON fields too, which gRPC-JSON clients read.
            Self::GrpcStatus { code, message, .. } => {
                doc["code"] = (*code).into();
                doc["grpc_status"] = transcode::code_name(*code).into();
                doc["message"] = message.as_str().into();
            }
            _ => {}
        }
        problem(self.status(), self.cause(), &doc)
    }
}

/// The cause of a transform that failed for its bounds or inside jaq, rather than for the
/// body's JSON or the program's own error.
fn transform_cause(e: &JqError) -> Option<&'static str> {
    match e {
        JqError::Limit(_) => Some("transform-budget"),
        JqError::Panic(_) | JqError::Unavailable(_) => Some("transform-failed"),
        _ => None,
    }
}

/// Headers of a public request that a call the gateway builds from it does not carry: its
/// framing, content negotiation and conditions (the gateway asks for whole, plain answers).
pub const NOT_CARRIED: [header::HeaderName; 12] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// The causes composition names in `trellis-error` (besides the upstream's own).
pub const CAUSES: &[&str] = &[
    "body-too-large",
    "bad-json-body",
    "bad-grpc-web",
    "upstream-body-too-large",
    "bad-upstream-json",
    "upstream-status",
    "aggregate-dependency-failed",
    "aggregate-missing-field",
    "bad-request-message",
    "bad-upstream-grpc",
    "transform-budget",
    "transform-failed",
];

/// A `application/problem+json` response with `trellis-error: cause`.
pub fn problem<B>(
    status: StatusCode,
    cause: &'static str,
    doc: &serde_json::Value,
) -> Response<Either<B, Full<Bytes>>> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(doc.to_string()))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        crate::http::headers::ERROR_HEADER,
        HeaderValue::from_static(cause),
    );
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}
