//! Reading a request body to validate it: never more than the route's bound (a declared
//! length over it is refused unread, 413; a stream that grows past it is cut off there), and
//! never longer than the request timeout (408), so a client that trickles or floods a body
//! holds one bounded buffer and its own connection only.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::problem::Problem;

/// The body, read whole; `declared` is its `Content-Length`, if any.
pub async fn read(
    body: &mut Incoming,
    declared: Option<u64>,
    max: u64,
    timeout: Duration,
) -> Result<Bytes, Problem> {
    if let Some(n) = declared.filter(|n| *n > max) {
        return Err(too_large(max).detail(format!(
            "the body is {n} bytes; this API accepts at most {max}"
        )));
    }
    let cap = declared.unwrap_or(0).min(max);
    let mut buf = BytesMut::with_capacity(usize::try_from(cap).unwrap_or(0));
    let reading = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Problem::new(
                    StatusCode::BAD_REQUEST,
                    "body_unreadable",
                    "The request body could not be read",
                )
                .detail(e.to_string())
            })?;
            if let Some(data) = frame.data_ref() {
                if (buf.len() + data.len()) as u64 > max {
                    return Err(too_large(max).detail(format!(
                        "the body is over {max} bytes, the most this API accepts"
                    )));
                }
                buf.extend_from_slice(data);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok(Ok(())) => Ok(buf.freeze()),
        Ok(Err(p)) => Err(p),
        Err(_) => Err(Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            "The request body did not arrive in time",
        )
        .detail(format!("the body was not complete after {timeout:?}"))),
    }
}

fn too_large(_max: u64) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "The request body is too large to be checked",
    )
}
