//! Protocol detection on intercepted connections (`proxy/src/original_dst.rs` `classify`, as
//! `detect` calls it on the first bytes peeked, at most 16), and the header handling of the
//! HTTP pass-through to an original destination (`proxy/src/headers.rs` `strip_hop_by_hop`,
//! `request_host`, `request_authority`).
//!
//! Input: the first bytes a client sends; also read as `name: value` header lines.

use http::{HeaderMap, HeaderName, HeaderValue, Request};
use trellis_proxy::http::headers::{request_authority, request_host, strip_hop_by_hop};
use trellis_proxy::listeners::original_dst::{classify, Protocol};

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PRI * HTTP/2.0",
    b"\x16\x03\x01",
    b"\r\n",
    b"\n",
    b"connection: ",
    b"keep-alive",
    b"upgrade",
    b"te: trailers",
    b"host: ",
    b"[::1]:80",
    b"user@h:1",
    b",",
];

pub fn run(data: &[u8]) -> u64 {
    // `detect` peeks up to 16 bytes: a full buffer must always decide, and a decision must not
    // change as more bytes arrive.
    let buf = &data[..data.len().min(16)];
    let mut decided: Option<Protocol> = None;
    for i in 0..=buf.len() {
        let c = classify(&buf[..i]);
        if let Some(d) = decided {
            assert_eq!(
                c,
                Some(d),
                "classification changed after {i} bytes: {:?}",
                &buf[..i]
            );
        }
        decided = decided.or(c);
    }
    if buf.len() == 16 {
        assert!(decided.is_some(), "16 bytes and still undecided: {buf:?}");
    }
    let mut label = format!("{decided:?} ");
    // The pass-through's header handling.
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) {
            headers.append(n, v);
        }
    }
    let mut req = Request::new(());
    *req.headers_mut() = headers.clone();
    let host = request_host(&req).map(str::to_string);
    let authority = request_authority(&req);
    if let Some(h) = &host {
        assert!(!h.is_empty());
        assert!(authority.is_some_and(|a| a.contains(h.as_str())));
    }
    for keep_upgrade in [false, true] {
        let mut h = headers.clone();
        strip_hop_by_hop(&mut h, keep_upgrade);
        for name in ["keep-alive", "proxy-connection", "transfer-encoding"] {
            assert!(!h.contains_key(name), "{name} survived");
        }
        if !keep_upgrade {
            assert!(!h.contains_key("connection") && !h.contains_key("upgrade"));
        }
    }
    label.push_str(if host.is_some() { "host" } else { "-" });
    outcome(&label)
}
