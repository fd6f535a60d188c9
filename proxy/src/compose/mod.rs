//! API composition at the edge, compiled from HTTPRoute rules: aggregates (one public call
//! answered by several mesh calls, merged) and JSON body transforms (jq, by jaq).
//!
//! Both buffer bodies, so both bound them: a request over the limit is refused before anything
//! is sent (nothing reaches a backend half-made), an upstream answer over it fails the call.
//! Their errors are [`ComposeError`]s, answered as `application/problem+json` and counted by
//! cause like the sidecar's other refusals.

pub mod aggregate;
pub mod body;
pub mod grpc_web;
pub mod transform;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use trellis_policies::compose::JqError;

pub use aggregate::Aggregate;
pub use transform::Transform;

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
    #[error("the path does not fit the aggregate's parameters `{0}`")]
    PathMismatch(String),
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
            Self::BadRequestBody(_) | Self::BadGrpcWeb(_) => StatusCode::BAD_REQUEST,
            Self::UpstreamTooLarge { .. }
            | Self::BadUpstreamBody(_)
            | Self::UpstreamBodyFailed(_) => StatusCode::BAD_GATEWAY,
            Self::PathMismatch(_) => StatusCode::NOT_FOUND,
            Self::CallFailed { status, .. } => *status,
        }
    }

    /// The `trellis-error` token and metrics label.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::RequestTooLarge { .. } => "body-too-large",
            Self::BadRequestBody(_) => "bad-json-body",
            Self::BadGrpcWeb(_) => "bad-grpc-web",
            Self::UpstreamTooLarge { .. } => "upstream-body-too-large",
            Self::BadUpstreamBody(_) => "bad-upstream-json",
            Self::UpstreamBodyFailed(_) => "upstream-failed",
            Self::PathMismatch(_) => "no-route",
            Self::CallFailed { cause, .. } => cause,
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
        if let Self::CallFailed { call, service, .. } = &self {
            doc["call"] = call.as_str().into();
            doc["service"] = service.as_str().into();
        }
        problem(self.status(), self.cause(), &doc)
    }
}

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
