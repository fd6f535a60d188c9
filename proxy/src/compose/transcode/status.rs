//! gRPC status codes as HTTP statuses: the google.rpc mapping (`google/rpc/code.proto`, as
//! Envoy's transcoder and grpc-gateway apply it).

use http::{HeaderMap, StatusCode};

use crate::compose::ComposeError;
use crate::error::known_cause;
use crate::http::headers::ERROR_HEADER;

/// The HTTP status for a gRPC status code.
pub fn http_status(code: u32) -> StatusCode {
    let s = match code {
        0 => 200,
        1 => 499, // CANCELLED: the client closed the request
        3 | 9 | 11 => 400,
        4 => 504,
        5 => 404,
        6 | 10 => 409,
        7 => 403,
        8 => 429,
        12 => 501,
        14 => 503,
        16 => 401,
        _ => 500, // UNKNOWN, INTERNAL, DATA_LOSS and codes gRPC does not define
    };
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The code's name in `google/rpc/code.proto`.
pub fn code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("UNKNOWN")
}

/// The error for a call that failed with `code`, its message from `grpc-message`
/// (percent-decoded) and the cause the far sidecar named, if any.
pub fn failed(code: u32, h: &HeaderMap) -> ComposeError {
    let message = h
        .get("grpc-message")
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let cause = h
        .get(ERROR_HEADER)
        .and_then(|v| known_cause(v.as_bytes()))
        .unwrap_or("upstream-status");
    ComposeError::GrpcStatus {
        code,
        message,
        cause,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_google_rpc_mapping() {
        for (code, name, http) in [
            (0, "OK", 200),
            (1, "CANCELLED", 499),
            (2, "UNKNOWN", 500),
            (3, "INVALID_ARGUMENT", 400),
            (4, "DEADLINE_EXCEEDED", 504),
            (5, "NOT_FOUND", 404),
            (6, "ALREADY_EXISTS", 409),
            (7, "PERMISSION_DENIED", 403),
            (8, "RESOURCE_EXHAUSTED", 429),
            (9, "FAILED_PRECONDITION", 400),
            (10, "ABORTED", 409),
            (11, "OUT_OF_RANGE", 400),
            (12, "UNIMPLEMENTED", 501),
            (13, "INTERNAL", 500),
            (14, "UNAVAILABLE", 503),
            (15, "DATA_LOSS", 500),
            (16, "UNAUTHENTICATED", 401),
            (17, "UNKNOWN", 500),
        ] {
            assert_eq!(code_name(code), name);
            assert_eq!(http_status(code).as_u16(), http, "{name}");
        }
    }

    #[test]
    fn the_message_is_percent_decoded_and_a_known_cause_kept() {
        let mut h = HeaderMap::new();
        h.insert("grpc-message", "no%20such%20th%C3%ADng".parse().unwrap());
        h.insert(ERROR_HEADER, "no-endpoints".parse().unwrap());
        match failed(14, &h) {
            ComposeError::GrpcStatus {
                code,
                message,
                cause,
            } => {
                assert_eq!(
                    (code, message.as_str(), cause),
                    (14, "no such thíng", "no-endpoints")
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
