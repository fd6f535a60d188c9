//! gRPC awareness: `grpc-timeout` (parsed, honoured as a deadline and propagated with the time
//! remaining) and sidecar errors reported as gRPC statuses, which gRPC clients surface properly.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::http::headers::ERROR_HEADER;

pub const TIMEOUT_HEADER: &str = "grpc-timeout";

/// Whether a request is gRPC (`content-type: application/grpc[+proto|...]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Parse `grpc-timeout` (at most 8 digits and a unit: H M S m u n).
pub fn parse_timeout(headers: &HeaderMap) -> Option<Duration> {
    // Every outbound request asks: one pass over the names costs less than looking up an
    // absent custom name (`http` hashes it byte by byte), and few requests carry `grpc-*`.
    if !crate::http::headers::any_named_with(headers, "grpc-") {
        return None;
    }
    let v = headers.get(TIMEOUT_HEADER)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    // Digits only: `u64::from_str` would also take a sign (`+5m`, found by fuzzing).
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encode a deadline for the next hop, in the finest unit that fits in 8 digits.
pub fn encode_timeout(d: Duration) -> HeaderValue {
    let us = d.as_micros();
    let s = if us < 100_000_000 {
        format!("{us}u")
    } else if d.as_millis() < 100_000_000 {
        format!("{}m", d.as_millis())
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("1S"))
}

/// The gRPC status for an HTTP status the sidecar would have answered with.
pub fn code_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 | 431 => 13, // INTERNAL: the request could not be proxied
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 | 501 => 12, // UNIMPLEMENTED: no such route / transfer coding (gRPC's HTTP mapping)
        // RESOURCE_EXHAUSTED (413: a message over the size limit, as gRPC servers answer).
        413 | 429 => 8,
        // UNAVAILABLE; 421: the client should retry on a connection for that host.
        421 | 502 | 503 => 14,
        504 => 4, // DEADLINE_EXCEEDED
        _ => 2,   // UNKNOWN
    }
}

/// A trailers-only gRPC error response: HTTP 200, `grpc-status`, `grpc-message`, and the same
/// `trellis-error` cause header as the HTTP form.
pub fn error_response<B>(
    status: StatusCode,
    cause: &'static str,
    message: &str,
) -> Response<Either<B, Full<Bytes>>> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code_for(status)));
    // grpc-message is percent-encoded; keep printable ASCII and escape the rest.
    let msg: String = message
        .bytes()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&msg) {
        h.insert("grpc-message", v);
    }
    h.insert(ERROR_HEADER, HeaderValue::from_static(cause));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_and_encode() {
        let mut h = HeaderMap::new();
        for (v, d) in [
            ("100m", Duration::from_millis(100)),
            ("2S", Duration::from_secs(2)),
            ("1H", Duration::from_secs(3600)),
            ("5000u", Duration::from_micros(5000)),
            ("7n", Duration::from_nanos(7)),
        ] {
            h.insert(TIMEOUT_HEADER, v.parse().unwrap());
            assert_eq!(parse_timeout(&h), Some(d), "{v}");
        }
        for bad in ["", "m", "12x", "123456789m", "-1S", "+5m", "+1S"] {
            h.insert(TIMEOUT_HEADER, HeaderValue::from_str(bad).unwrap());
            assert_eq!(parse_timeout(&h), None, "{bad}");
        }
        h.insert(TIMEOUT_HEADER, encode_timeout(Duration::from_millis(1500)));
        assert_eq!(parse_timeout(&h), Some(Duration::from_millis(1500)));
        h.insert(
            TIMEOUT_HEADER,
            encode_timeout(Duration::from_secs(86_400 * 3)),
        );
        assert_eq!(parse_timeout(&h), Some(Duration::from_secs(86_400 * 3)));
    }

    #[test]
    fn errors_map_to_grpc_statuses() {
        let r = error_response::<()>(
            StatusCode::GATEWAY_TIMEOUT,
            "response-timeout",
            "no response in 1s",
        );
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(r.headers()["trellis-error"], "response-timeout");
        assert_eq!(code_for(StatusCode::SERVICE_UNAVAILABLE), 14);
        assert_eq!(code_for(StatusCode::MISDIRECTED_REQUEST), 14);
        assert_eq!(code_for(StatusCode::NOT_FOUND), 12);
        assert_eq!(code_for(StatusCode::NOT_IMPLEMENTED), 12);
        let r = error_response::<()>(StatusCode::BAD_GATEWAY, "x", "100% broken\n");
        assert_eq!(r.headers()["grpc-message"], "100%25 broken%0A");
    }
}
