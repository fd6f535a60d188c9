//! Bounded buffering of bodies that composition must read whole.

use bytes::Bytes;
use http::HeaderMap;
use http_body::Body;
use http_body_util::{BodyExt, Limited};

/// Why a body could not be buffered.
#[derive(Debug)]
pub enum Collect {
    /// Larger than the limit (by its `Content-Length`, or once read that far).
    TooLarge,
    /// The body failed (reset, timed out, malformed framing).
    Failed(String),
}

/// A request body that could not be buffered: 413 over the limit, else the client's fault.
pub fn refused_request(e: Collect, limit: u64) -> crate::error::ProxyError {
    match e {
        Collect::TooLarge => super::ComposeError::RequestTooLarge { limit }.into(),
        Collect::Failed(message) => crate::error::ProxyError::Client {
            fault: crate::http::client_body::ClientFault::BodyError,
            message,
        },
    }
}

/// The declared length, when it is a number.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A request's body: the bytes the edge already read to validate it (its `Incoming` is then
/// empty), or `body` read now, at most `limit` bytes either way.
pub async fn request_body<B>(
    parts: &mut http::request::Parts,
    body: B,
    limit: u64,
) -> Result<Bytes, Collect>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match parts
        .extensions
        .remove::<crate::http::read_ahead::ReadAhead>()
    {
        Some(ahead) if ahead.0.len() as u64 > limit => Err(Collect::TooLarge),
        Some(ahead) => Ok(ahead.0),
        None => collect(&parts.headers, body, limit).await,
    }
}

/// Read `body` whole, at most `limit` bytes; a declared length over it is refused before
/// anything is read.
pub async fn collect<B>(headers: &HeaderMap, body: B, limit: u64) -> Result<Bytes, Collect>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if declared_length(headers).is_some_and(|n| n > limit) {
        return Err(Collect::TooLarge);
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Collect::TooLarge),
        Err(e) => Err(Collect::Failed(e.to_string())),
    }
}
