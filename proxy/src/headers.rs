//! Header handling shared by both directions: hop-by-hop removal per RFC 9110 section 7.6.1,
//! `X-Forwarded-For`/`Forwarded` (RFC 7239), and upgrade detection.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

/// Connection-specific headers that never cross a proxy.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Remove hop-by-hop headers, including every header the `Connection` header names.
/// `TE: trailers` survives, because gRPC over HTTP/2 requires it. When `keep_upgrade`, the
/// `Upgrade` header and `Connection: upgrade` are kept so an upgrade can be forwarded.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(up) = upgrade {
        headers.insert(header::UPGRADE, up);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Append the client's address to `X-Forwarded-For` and a `Forwarded` element.
pub fn append_forwarded(headers: &mut HeaderMap, client: IpAddr, proto: &'static str) {
    let ip = client.to_string();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {ip}"),
        _ => ip.clone(),
    };
    // IP addresses and the existing (already valid) value only contain visible ASCII.
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    let node = match client {
        IpAddr::V4(_) => ip,
        IpAddr::V6(_) => format!("\"[{ip}]\""),
    };
    if let Ok(v) = HeaderValue::from_str(&format!("for={node};proto={proto}")) {
        headers.append(header::FORWARDED, v);
    }
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and friends).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// The host the request is addressed to, without port: the absolute-form or HTTP/2 authority
/// first, then the `Host` header.
pub fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })?;
    let host = strip_port(authority);
    (!host.is_empty()).then_some(host)
}

/// The full authority (`host[:port]`) of the request.
pub fn request_authority<B>(req: &Request<B>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

fn strip_port(authority: &str) -> &str {
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(h, _)| h);
    }
    host.split_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TE, "trailers, deflate".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none() && h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn keeps_upgrade_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        append_forwarded(&mut h, "127.0.0.1".parse().unwrap(), "http");
        append_forwarded(&mut h, "::1".parse().unwrap(), "https");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1, ::1");
        let fwd: Vec<_> = h
            .get_all(header::FORWARDED)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            fwd,
            vec!["for=127.0.0.1;proto=http", "for=\"[::1]\";proto=https"]
        );
    }

    #[test]
    fn host_from_uri_or_header() {
        let r = Request::get("http://orders:8080/x").body(()).unwrap();
        assert_eq!(request_host(&r), Some("orders"));
        let r = Request::get("/x")
            .header("host", "payments")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r), Some("payments"));
        let r = Request::get("/x")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(&r), Some("::1"));
        assert_eq!(request_host(&Request::get("/x").body(()).unwrap()), None);
    }
}
