//! gRPC awareness (`proxy/src/grpc.rs`): the `grpc-timeout` header a client sends
//! (`parse_timeout`), the encoding of the remaining deadline (`encode_timeout`), and the
//! percent-encoding of `grpc-message` in sidecar error responses (`error_response`).
//!
//! Input: a header value; its bytes also serve as a duration (little-endian nanoseconds) and
//! as an error message.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use trellis_proxy::http::grpc::{encode_timeout, error_response, parse_timeout, TIMEOUT_HEADER};

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"H",
    b"M",
    b"S",
    b"m",
    b"u",
    b"n",
    b"+",
    b"-",
    b"99999999",
    b"100000000",
    b"0",
    b" ",
    b"\xc3\xa9",
    b"%",
    b"\x7f",
];

pub fn run(data: &[u8]) -> u64 {
    let mut label = String::new();
    if let Ok(v) = HeaderValue::from_bytes(data) {
        let mut h = HeaderMap::new();
        h.insert(TIMEOUT_HEADER, v);
        match parse_timeout(&h) {
            Some(d) => {
                // The grammar: 1 to 8 ASCII digits, then one unit letter.
                let (digits, unit) = data.split_at(data.len() - 1);
                assert!(
                    (1..=8).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit),
                    "accepted grpc-timeout {:?} is not 1-8 digits and a unit",
                    String::from_utf8_lossy(data)
                );
                assert!(b"HMSmun".contains(&unit[0]));
                label.push_str(if d.is_zero() { "zero " } else { "timeout " });
            }
            None => label.push_str("none "),
        }
    }
    // Round trip: the encoded deadline parses back to at most the deadline, less by under one
    // unit of the chosen precision (never longer: a deadline must not grow on the way).
    let mut n = [0u8; 16];
    let len = data.len().min(16);
    n[..len].copy_from_slice(&data[..len]);
    let d = Duration::from_nanos(u64::from_le_bytes(n[..8].try_into().unwrap_or_default()))
        .saturating_mul(u32::from(n[8]) + 1);
    let mut h = HeaderMap::new();
    h.insert(TIMEOUT_HEADER, encode_timeout(d));
    let back = parse_timeout(&h).unwrap_or_else(|| panic!("encode_timeout({d:?}) does not parse"));
    let cap = Duration::from_secs(99_999_999);
    assert!(
        back <= d.min(cap),
        "encode_timeout({d:?}) parsed back as {back:?}"
    );
    assert!(
        d.min(cap) - back < Duration::from_secs(1),
        "encode_timeout({d:?}) lost {:?}",
        d.min(cap) - back
    );
    // grpc-message: any text, percent-encoded into a valid header that decodes back.
    let message = String::from_utf8_lossy(data);
    let status = StatusCode::from_u16(400 + u16::from(n[9] % 200)).unwrap_or_default();
    let resp = error_response::<()>(status, "fuzz", &message);
    let Some(encoded) = resp.headers().get("grpc-message") else {
        panic!("no grpc-message for {message:?}");
    };
    assert_eq!(
        percent_decode(encoded.as_bytes()),
        message.as_bytes(),
        "grpc-message does not decode to the message"
    );
    label.push_str(resp.headers()["grpc-status"].to_str().unwrap_or_default());
    outcome(&label)
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            let hex = std::str::from_utf8(&s[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}
