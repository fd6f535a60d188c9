//! Errors the sidecar answers itself, each mapped to a precise status and a `trellis-error`
//! cause, following Linkerd's mapping: 502 connect/TLS failure, 503 nothing to route to, 504
//! timeout, 400/431 malformed request.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::http::client_body::ClientFault;
use crate::http::headers::ERROR_HEADER;
use crate::identity::TlsFailure;

/// A request the sidecar could not forward.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// HTTPRoutes name the host (not a mesh service) and none of their rules matches.
    #[error("no route for `{0}` matches the request")]
    NoRoute(String),
    /// Fault injection by an HTTPRoute rule.
    #[error("fault injected by route `{route}`")]
    FaultAbort { route: String, status: StatusCode },
    #[error("request has no Host header or authority: cannot tell which service it is for")]
    MissingAuthority,
    /// The request is malformed in a way hyper lets through but RFC 9110/9112 forbid (two
    /// `Host` fields, `Host` differing from `:authority`).
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    /// `Transfer-Encoding` names a coding other than `chunked` (RFC 9112 section 6.1: 501).
    #[error("transfer coding not implemented: only `chunked` is accepted")]
    UnsupportedTransferCoding,
    /// The ingress's certificate for the TLS connection's SNI name does not cover the
    /// request's host (RFC 9110 section 15.5.20): the client must use another connection.
    #[error(
        "host `{0}` is not served on this TLS connection (its SNI name chose another certificate)"
    )]
    Misdirected(String),
    #[error("unknown service `{0}`: it is not in the mesh")]
    UnknownService(String),
    /// On-demand discovery could not ask the store about a service this sidecar has not
    /// seen yet (the store is unreachable and the service is not in the cached state).
    #[error("cannot learn service `{service}` from the store: {cause}")]
    DiscoveryUnavailable { service: String, cause: String },
    #[error("service `{0}` has no endpoints")]
    NoEndpoints(String),
    #[error(
        "every endpoint of `{0}` is ejected by outlier detection (when_all_ejected: fail_fast)"
    )]
    AllEjected(String),
    #[error("circuit breaker for `{service}` is open: {} limit reached", breaker.label())]
    BreakerOpen {
        service: String,
        breaker: crate::policy::breaker::Breaker,
    },
    #[error("connect to {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("TLS with {addr} failed ({reason}): {message}")]
    Tls {
        addr: SocketAddr,
        reason: TlsFailure,
        message: String,
    },
    #[error("HTTP/2 handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("upstream {addr} failed: {message}")]
    Upstream { addr: SocketAddr, message: String },
    #[error("no response headers from {addr} within {timeout:?}")]
    ResponseTimeout { addr: SocketAddr, timeout: Duration },
    #[error("rate limit `{policy}` exceeded; retry in {retry_after:?}")]
    RateLimited {
        policy: std::sync::Arc<str>,
        retry_after: Duration,
        /// The policy's window in seconds, for the `RateLimit` header.
        window: u32,
        /// `RateLimit-Policy` value, prebuilt by the policy.
        policy_header: HeaderValue,
    },
    #[error("concurrency limit `{policy}` reached: {max} requests in flight")]
    ConcurrencyLimited {
        policy: std::sync::Arc<str>,
        max: u32,
    },
    /// No valid credential. The reason goes to logs and metrics only: the caller learns
    /// nothing that helps guess a key or forge a token.
    #[error("authentication required")]
    Unauthenticated {
        reason: &'static str,
        challenge: HeaderValue,
    },
    #[error("request denied by authorization policy")]
    Denied { policy: std::sync::Arc<str> },
    /// The downstream client broke its own request (a malformed or reset body, or a body it
    /// stopped sending): answered 400 or 408, never counted against the endpoint.
    #[error("the client's request body failed: {message}")]
    Client {
        fault: crate::http::client_body::ClientFault,
        message: String,
    },
    /// An aggregate or a body transform could not answer (docs/composition.md).
    #[error(transparent)]
    Compose(#[from] crate::compose::ComposeError),
}

/// The causes a peer sidecar may name in `trellis-error`, as static strings (a header value
/// from the network is matched, never stored).
pub fn known_cause(v: &[u8]) -> Option<&'static str> {
    const CAUSES: &[&str] = &[
        "no-route",
        "fault-abort",
        "missing-authority",
        "bad-request",
        "unsupported-transfer-coding",
        "misdirected-request",
        "unknown-service",
        "discovery-unavailable",
        "no-endpoints",
        "all-endpoints-ejected",
        "breaker-max-requests",
        "breaker-max-pending",
        "connect-failed",
        "connect-timeout",
        "h2-handshake-failed",
        "upstream-failed",
        "response-timeout",
        "rate-limited",
        "concurrency-limited",
        "tls-plaintext",
        "unauthenticated",
        "denied",
        "client-body-error",
        "client-body-timeout",
        // Answered by the response cache (docs/caching.md).
        "cache-revalidation-failed",
        "cache-miss-only-if-cached",
        // Refused by OpenAPI validation at the ingress (docs/api-validation.md).
        "request-invalid",
    ];
    CAUSES
        .iter()
        .chain(crate::compose::CAUSES)
        .copied()
        .find(|c| c.as_bytes() == v)
}

// === impl ProxyError ===

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingAuthority | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            Self::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::FaultAbort { status, .. } => *status,
            Self::UnknownService(_)
            | Self::DiscoveryUnavailable { .. }
            | Self::NoEndpoints(_)
            | Self::AllEjected(_)
            | Self::BreakerOpen { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. }
            | Self::Tls { .. }
            | Self::Handshake { .. }
            | Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::ConnectTimeout { .. } | Self::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            // Like Envoy's and Linkerd's overflow: another instance may have room, so the
            // caller's sidecar may retry it elsewhere.
            Self::ConcurrencyLimited { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Denied { .. } => StatusCode::FORBIDDEN,
            Self::Client {
                fault: ClientFault::BodyError,
                ..
            } => StatusCode::BAD_REQUEST,
            Self::Client {
                fault: ClientFault::BodyStalled,
                ..
            } => StatusCode::REQUEST_TIMEOUT,
            Self::Compose(e) => e.status(),
        }
    }

    /// A refusal a policy asked for (rate or concurrency limit), not a fault.
    pub fn is_policy_decision(&self) -> bool {
        matches!(
            self,
            Self::RateLimited { .. }
                | Self::ConcurrencyLimited { .. }
                | Self::Unauthenticated { .. }
                | Self::Denied { .. }
        )
    }

    /// A short stable token for the `trellis-error` header and the metrics' `cause` label.
    pub fn cause(&self) -> &'static str {
        match self {
            Self::MissingAuthority => "missing-authority",
            Self::BadRequest(_) => "bad-request",
            Self::UnsupportedTransferCoding => "unsupported-transfer-coding",
            Self::Misdirected(_) => "misdirected-request",
            Self::NoRoute(_) => "no-route",
            Self::FaultAbort { .. } => "fault-abort",
            Self::UnknownService(_) => "unknown-service",
            Self::DiscoveryUnavailable { .. } => "discovery-unavailable",
            Self::NoEndpoints(_) => "no-endpoints",
            Self::AllEjected(_) => "all-endpoints-ejected",
            Self::BreakerOpen {
                breaker: crate::policy::breaker::Breaker::MaxRequests,
                ..
            } => "breaker-max-requests",
            Self::BreakerOpen {
                breaker: crate::policy::breaker::Breaker::MaxPending,
                ..
            } => "breaker-max-pending",
            Self::Connect { .. } => "connect-failed",
            Self::ConnectTimeout { .. } => "connect-timeout",
            Self::Tls { reason, .. } => reason.cause(),
            Self::Handshake { .. } => "h2-handshake-failed",
            Self::Upstream { .. } => "upstream-failed",
            Self::ResponseTimeout { .. } => "response-timeout",
            Self::RateLimited { .. } => "rate-limited",
            Self::ConcurrencyLimited { .. } => "concurrency-limited",
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::Denied { .. } => "denied",
            Self::Client {
                fault: ClientFault::BodyError,
                ..
            } => "client-body-error",
            Self::Client {
                fault: ClientFault::BodyStalled,
                ..
            } => "client-body-timeout",
            Self::Compose(e) => e.cause(),
        }
    }

    /// The response sent to the caller: status, cause header, and the message as a text body.
    pub fn into_response<B>(self) -> Response<Either<B, Full<Bytes>>> {
        if let Self::Compose(e) = self {
            return e.into_response();
        }
        let mut resp = error_response(self.status(), self.cause(), &self.to_string());
        self.add_headers(resp.headers_mut());
        resp
    }

    /// Headers some errors carry besides the cause: `Retry-After` and the IETF `RateLimit`
    /// fields (draft-ietf-httpapi-ratelimit-headers) on a 429.
    fn add_headers(&self, h: &mut http::HeaderMap) {
        match self {
            Self::RateLimited {
                policy,
                retry_after,
                window,
                policy_header,
            } => {
                // Whole seconds, rounded up: `Retry-After: 0` would invite an immediate retry.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let secs = secs.clamp(1, u64::from(*window).max(1));
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
                h.insert("ratelimit-policy", policy_header.clone());
                if let Ok(v) = HeaderValue::from_str(&format!("\"{policy}\";r=0;t={secs}")) {
                    h.insert("ratelimit", v);
                }
            }
            Self::ConcurrencyLimited { .. } => {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Unauthenticated { challenge, .. } => {
                h.insert(http::header::WWW_AUTHENTICATE, challenge.clone());
            }
            _ => {}
        }
    }

    /// As [`ProxyError::into_response`], or as a gRPC status for a gRPC caller.
    pub fn into_response_for<B>(self, grpc: bool) -> Response<Either<B, Full<Bytes>>> {
        if grpc {
            let mut resp =
                crate::http::grpc::error_response(self.status(), self.cause(), &self.to_string());
            self.add_headers(resp.headers_mut());
            resp
        } else {
            self.into_response()
        }
    }
}

/// A locally generated error response.
pub fn error_response<B>(
    status: StatusCode,
    cause: &'static str,
    message: &str,
) -> Response<Either<B, Full<Bytes>>> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "{message}\n"
    )))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(cause));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_documented_mapping() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let cases: Vec<(ProxyError, u16, &str)> = vec![
            (ProxyError::MissingAuthority, 400, "missing-authority"),
            (
                ProxyError::BadRequest("two Host fields"),
                400,
                "bad-request",
            ),
            (
                ProxyError::UnsupportedTransferCoding,
                501,
                "unsupported-transfer-coding",
            ),
            (
                ProxyError::Misdirected("orders".into()),
                421,
                "misdirected-request",
            ),
            (ProxyError::NoRoute("orders".into()), 404, "no-route"),
            (
                ProxyError::Client {
                    fault: ClientFault::BodyError,
                    message: "invalid chunk size".into(),
                },
                400,
                "client-body-error",
            ),
            (
                ProxyError::Client {
                    fault: ClientFault::BodyStalled,
                    message: String::new(),
                },
                408,
                "client-body-timeout",
            ),
            (ProxyError::NoEndpoints("a".into()), 503, "no-endpoints"),
            (
                ProxyError::DiscoveryUnavailable {
                    service: "a".into(),
                    cause: "etcd unreachable".into(),
                },
                503,
                "discovery-unavailable",
            ),
            (
                ProxyError::UnknownService("a".into()),
                503,
                "unknown-service",
            ),
            (
                ProxyError::Connect {
                    addr,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                },
                502,
                "connect-failed",
            ),
            (
                ProxyError::ConnectTimeout {
                    addr,
                    timeout: Duration::from_secs(1),
                },
                504,
                "connect-timeout",
            ),
            (
                ProxyError::Tls {
                    addr,
                    reason: TlsFailure::WrongIdentity,
                    message: String::new(),
                },
                502,
                "tls-wrong-identity",
            ),
            (
                ProxyError::ResponseTimeout {
                    addr,
                    timeout: Duration::from_secs(1),
                },
                504,
                "response-timeout",
            ),
        ];
        for (err, status, cause) in cases {
            let resp = err.into_response::<Full<Bytes>>();
            assert_eq!(resp.status().as_u16(), status);
            assert_eq!(resp.headers()[ERROR_HEADER], cause);
        }
    }
}
