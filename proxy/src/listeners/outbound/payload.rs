//! The request as the attempts see it: buffered when the retry policy may replay it, streamed
//! once otherwise.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use trellis_policies::RetrySpec;

use crate::error::ProxyError;
use crate::http::client_body::{BodyWatch, ClientBody, ClientFault};
use crate::http::headers::{has_name, RETRIED_HEADER};
use crate::policy::retry::idempotent;
use crate::RequestBody;

pub(super) enum Payload {
    /// Small, of known length and allowed to be retried: each attempt sends a copy.
    Buffered {
        parts: http::request::Parts,
        body: Bytes,
    },
    /// Built by the sidecar itself (a composed call, a transformed body) and not allowed to be
    /// retried: sent once, and no client can have broken it.
    Once { req: Option<Request<RequestBody>> },
    /// Sent once. The watch tells, after a failure, whether the client broke its own body.
    Streamed {
        req: Option<Request<RequestBody>>,
        watch: Arc<BodyWatch>,
    },
}

// === impl Payload ===

impl Payload {
    /// Retries replay the body, so only small bodies of known length are buffered (and only
    /// for idempotent methods unless allowed); anything else streams once.
    pub async fn prepare(
        mut req: Request<Incoming>,
        retry: &RetrySpec,
    ) -> Result<Self, ProxyError> {
        if let Some(body) = crate::http::read_ahead::take(&mut req) {
            return Ok(Self::read_ahead(req, body, retry));
        }
        let may_retry = retry.attempts > 0
            && !has_name(req.headers(), &RETRIED_HEADER)
            && (retry.allow_non_idempotent || idempotent(req.method()))
            && (req.body().is_end_stream()
                || req
                    .body()
                    .size_hint()
                    .exact()
                    .is_some_and(|n| n <= retry.max_body_bytes));
        let (parts, body) = req.into_parts();
        if !may_retry {
            let (body, watch) = ClientBody::new(body);
            let req = Some(Request::from_parts(parts, Either::Left(body)));
            return Ok(Self::Streamed { req, watch });
        }
        let body = body
            .collect()
            .await
            .map_err(|e| ProxyError::Client {
                fault: ClientFault::BodyError,
                message: e.to_string(),
            })?
            .to_bytes();
        Ok(Self::Buffered { parts, body })
    }

    /// A body the sidecar built: replayed by retries under the same rules as a client's
    /// buffered body (idempotent methods unless allowed, within the size limit).
    pub fn built(req: Request<Bytes>, retry: &RetrySpec) -> Self {
        let replay = may_replay(&req, req.body().len(), retry);
        let (parts, body) = req.into_parts();
        if replay {
            return Self::Buffered { parts, body };
        }
        let req = Request::from_parts(parts, Either::Right(Full::new(body)));
        Self::Once { req: Some(req) }
    }

    /// A body the sidecar maps from the client's while it streams: sent once, its failures
    /// blamed on the client through `watch`.
    pub fn mapped(req: Request<ClientBody>, watch: Arc<BodyWatch>) -> Self {
        let (parts, body) = req.into_parts();
        let req = Some(Request::from_parts(parts, Either::Left(body)));
        Self::Streamed { req, watch }
    }

    /// A body the edge read already (to validate it): replayed like a buffered one when the
    /// retry policy allows it, else sent once as it is.
    fn read_ahead(req: Request<Incoming>, body: Bytes, retry: &RetrySpec) -> Self {
        let replay = may_replay(&req, body.len(), retry);
        let (parts, _) = req.into_parts();
        if replay {
            return Self::Buffered { parts, body };
        }
        let req = Some(Request::from_parts(parts, Either::Right(Full::new(body))));
        // Read whole before it was sent: whatever fails now is not the client's body.
        let watch = Arc::new(BodyWatch::default());
        Self::Streamed { req, watch }
    }

    /// Whether a failed attempt may be sent again.
    pub fn replayable(&self) -> bool {
        matches!(self, Self::Buffered { .. })
    }

    /// The request of attempt number `attempt`: a fresh copy of a buffered one (retried
    /// attempts carry the mark), or the streamed one, given back `unsent` by a failed attempt
    /// that never sent it.
    pub fn request(
        &mut self,
        unsent: Option<Request<RequestBody>>,
        attempt: u32,
    ) -> Option<Request<RequestBody>> {
        match self {
            Self::Buffered { parts, body } => Some(replay(parts, body, attempt > 0)),
            Self::Streamed { req, .. } | Self::Once { req } => unsent.or_else(|| req.take()),
        }
    }

    /// The client's fault, when `result` failed because of the client's own body (see
    /// [`crate::http::client_body`]).
    pub fn client_fault<B>(&self, result: &Result<Response<B>, ProxyError>) -> Option<ProxyError> {
        let (Err(e), Self::Streamed { watch, .. }) = (result, self) else {
            return None;
        };
        let timed_out = matches!(e, ProxyError::ResponseTimeout { .. });
        watch.blame(timed_out).map(|fault| ProxyError::Client {
            fault,
            message: e.to_string(),
        })
    }
}

/// A fresh copy of a buffered request for one attempt; retried attempts carry the mark.
fn replay(parts: &http::request::Parts, body: &Bytes, retried: bool) -> Request<RequestBody> {
    let mut req = Request::new(Either::Right(Full::new(body.clone())));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    if retried {
        req.headers_mut()
            .insert(RETRIED_HEADER, HeaderValue::from_static("1"));
    }
    req
}

/// Whether a request whose body (`len` bytes) is already in memory may be sent again: under
/// the same rules as a client's buffered body (idempotent methods unless allowed, within the
/// size limit, never one already retried by a sidecar before).
fn may_replay<B>(req: &Request<B>, len: usize, retry: &RetrySpec) -> bool {
    retry.attempts > 0
        && !has_name(req.headers(), &RETRIED_HEADER)
        && (retry.allow_non_idempotent || idempotent(req.method()))
        && len as u64 <= retry.max_body_bytes
}
