//! How a request's head is rewritten as it leaves the sidecar: hop-by-hop headers, `Host`,
//! the request target and the HTTP version.
//!
//! Every exit goes through here (a peer sidecar over the mesh's HTTP/2, a service outside the
//! mesh, the pass-through to an original destination, an upgrade, the local app), so that
//! they agree on what crosses a hop: the rules of RFC 9110 section 7.6.1 are written once.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::thread::LocalKey;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Request, Uri, Version};

use crate::error::ProxyError;
use crate::http::headers::ORIG_PROTO_HEADER;
use crate::http::headers::{any_internal, request_authority, strip_hop_by_hop};

/// The `Host` of a request to an origin over HTTP/1.1.
#[derive(Clone, Copy, Debug)]
pub enum Host<'a> {
    /// This host (a value that is no valid header leaves `Host` as it was).
    Set(&'a str),
    /// The authority the request names (absolute form first, then `Host`).
    Requested,
    /// `Host` as the app sent it, or the absolute form's authority when it sent none.
    AsSent,
}

/// Where an HTTP/1.1 request to an origin is addressed.
#[derive(Clone, Copy, Debug)]
pub enum RequestTarget {
    /// Absolute form, `http://{addr}{path}`: the pooled client connects by the URI.
    Addr(SocketAddr),
    /// Origin form, `{path}`: the connection is already made (an upgrade's own).
    Origin,
}

/// `scheme://authority` with `uri`'s path and query (`/` when it has none).
pub fn absolute_uri(scheme: Scheme, authority: &str, uri: &Uri) -> Result<Uri, ProxyError> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme);
    parts.authority = Some(shared_authority(authority)?);
    // The path is reused, not re-parsed: hyper's parsed path shares the connection's read
    // buffer, so this costs no allocation now and none when a retry copies the request.
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).map_err(|_| ProxyError::MissingAuthority)
}

thread_local! {
    /// The authority parsed last on this thread: a sidecar's calls name the same few services
    /// over and over, and a parsed one is shared (a reference count) instead of parsed and
    /// copied again for every request.
    static LAST_AUTHORITY: RefCell<Option<Authority>> = const { RefCell::new(None) };
    /// The `Host` value made last on this thread, for the same reason.
    static LAST_HOST: RefCell<Option<HeaderValue>> = const { RefCell::new(None) };
}

/// `authority` parsed, or the same one parsed last on this thread.
fn shared_authority(authority: &str) -> Result<Authority, ProxyError> {
    made_last(
        &LAST_AUTHORITY,
        authority,
        |a| a.as_str().as_bytes(),
        |t| Authority::try_from(t).ok(),
    )
    .ok_or(ProxyError::MissingAuthority)
}

/// A `Host` value of `authority`, or the same one made last on this thread.
fn shared_host(authority: &str) -> Result<HeaderValue, ProxyError> {
    made_last(&LAST_HOST, authority, HeaderValue::as_bytes, |t| {
        crate::http::headers::shared_value(t.as_bytes())
    })
    .ok_or(ProxyError::MissingAuthority)
}

/// `make(text)`, or the value in `last` when it was made from the very same text (`text_of`
/// gives it back); a value made anew replaces it. `None`: `text` makes no value.
fn made_last<T: Clone + 'static>(
    last: &'static LocalKey<RefCell<Option<T>>>,
    text: &str,
    text_of: fn(&T) -> &[u8],
    make: fn(&str) -> Option<T>,
) -> Option<T> {
    last.with(|last| {
        // Never reentered (`make` does not come back here); if it were, no reuse, no panic.
        let Ok(mut last) = last.try_borrow_mut() else {
            return make(text);
        };
        if let Some(v) = last.as_ref().filter(|v| text_of(v) == text.as_bytes()) {
            return Some(v.clone());
        }
        let value = make(text)?;
        *last = Some(value.clone());
        Some(value)
    })
}

/// To a peer sidecar over the mesh's HTTP/2: the `https` URI names the request's authority
/// (`:authority` replaces `Host`), and the app's HTTP version travels in
/// `trellis-orig-proto` so that the far side can answer an HTTP/1 app in kind.
pub fn to_mesh_h2<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    // `Host` goes either way: taken out once, and read if the target does not name the
    // authority (as `request_authority` reads it).
    let host = req.headers_mut().remove(header::HOST);
    let authority = match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => host.as_ref().and_then(|h| h.to_str().ok()),
    }
    .ok_or(ProxyError::MissingAuthority)?;
    let uri = absolute_uri(Scheme::HTTPS, authority, req.uri())?;
    let orig = req.version();
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, false);
    if orig != Version::HTTP_2 {
        let v = if orig == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        };
        headers.insert(ORIG_PROTO_HEADER, HeaderValue::from_static(v));
    }
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_2;
    Ok(())
}

/// To an origin over HTTP/1.1 (a service outside the mesh, an original destination, the peer
/// of an upgrade). `upgrade` keeps `Upgrade` and `Connection: upgrade`.
pub fn to_origin_h1<B>(
    req: &mut Request<B>,
    target: RequestTarget,
    host: Host<'_>,
    upgrade: bool,
) -> Result<(), ProxyError> {
    let uri = match target {
        RequestTarget::Addr(addr) => absolute_uri(Scheme::HTTP, &addr.to_string(), req.uri())?,
        RequestTarget::Origin => req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .parse::<Uri>()
            .map_err(|_| ProxyError::MissingAuthority)?,
    };
    let value = match host {
        Host::Set(h) => HeaderValue::from_str(h).ok(),
        Host::Requested => request_authority(req).and_then(|a| HeaderValue::from_str(a).ok()),
        Host::AsSent => req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let keep = matches!(host, Host::AsSent) && req.headers().contains_key(header::HOST);
    if let Some(h) = value.filter(|_| !keep) {
        req.headers_mut().insert(header::HOST, h);
    }
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    Ok(())
}

/// To the local app: hop-by-hop headers and the mesh's protocol marker go (the marker is
/// returned: the caller's HTTP version). The target and `Host` are set per attempt by
/// [`app_version`], since the protocol may change between attempts.
pub fn to_app<B>(req: &mut Request<B>, upgrade: bool) -> Option<HeaderValue> {
    let headers = req.headers_mut();
    let orig = any_internal(headers)
        .then(|| headers.remove(ORIG_PROTO_HEADER))
        .flatten();
    strip_hop_by_hop(req.headers_mut(), upgrade);
    orig
}

/// One attempt to the local app in HTTP/2 (an absolute URI carries the authority, `Host`
/// goes) or HTTP/1.1 (`Host` carries it, the target is in origin form: a connection to the
/// app is no proxy). The authority is the request's (absolute form first, then `Host`), or
/// `fallback` (the app's address) when it names none; one that is no valid authority is
/// refused.
pub fn app_version(
    parts: &mut http::request::Parts,
    h2: bool,
    fallback: &HeaderValue,
) -> Result<(), ProxyError> {
    if h2 {
        let authority = match parts.uri.authority() {
            Some(a) => a.as_str(),
            None => parts
                .headers
                .get(header::HOST)
                .unwrap_or(fallback)
                .to_str()
                .map_err(|_| ProxyError::MissingAuthority)?,
        };
        parts.uri = absolute_uri(Scheme::HTTP, authority, &parts.uri)?;
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
        return Ok(());
    }
    parts.version = Version::HTTP_11;
    match parts.uri.authority() {
        Some(a) => {
            // Usually the very `Host` the caller sent: kept as it is, without a copy.
            let same = parts
                .headers
                .get(header::HOST)
                .is_some_and(|h| h.as_bytes() == a.as_str().as_bytes());
            if !same {
                parts.headers.insert(header::HOST, shared_host(a.as_str())?);
            }
        }
        None => match parts.headers.get(header::HOST) {
            Some(h) if !is_authority(h.as_bytes()) => return Err(ProxyError::MissingAuthority),
            Some(_) => {}
            None => {
                parts.headers.insert(header::HOST, fallback.clone());
            }
        },
    }
    let origin = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    parts.uri = Uri::from(origin);
    Ok(())
}

/// Whether `b` can be a URI authority (RFC 3986 section 3.2: userinfo, host, port), checked
/// without building one.
fn is_authority(b: &[u8]) -> bool {
    !b.is_empty()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@[]%".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    /// The per-thread authority is reused only for the very same text: alternating, differing
    /// in case, or refused, each request gets its own.
    #[test]
    fn absolute_uris_name_their_own_authority() {
        let path: Uri = "/p?q=1".parse().unwrap();
        for (authority, want) in [
            ("orders", Some("https://orders/p?q=1")),
            ("orders", Some("https://orders/p?q=1")),
            ("Orders:8443", Some("https://Orders:8443/p?q=1")),
            ("bad authority", None),
            ("orders", Some("https://orders/p?q=1")),
            ("", None),
            ("payments.default", Some("https://payments.default/p?q=1")),
        ] {
            let got = absolute_uri(Scheme::HTTPS, authority, &path).ok();
            assert_eq!(got.map(|u| u.to_string()).as_deref(), want, "{authority:?}");
        }
        let root = absolute_uri(Scheme::HTTP, "a:1", &Uri::from_static("example.com:443")).unwrap();
        assert_eq!(root, "http://a:1/");
    }

    #[test]
    fn to_the_app_over_http1_the_callers_host_stays_and_the_target_is_origin_form() {
        let fallback = HeaderValue::from_static("127.0.0.1:8080");
        // An HTTP/1.1 caller: origin form and Host.
        let mut p = parts(
            Request::get("/a?b=1")
                .header("host", "orders")
                .body(())
                .unwrap(),
        );
        app_version(&mut p, false, &fallback).unwrap();
        assert_eq!(p.uri, "/a?b=1");
        assert_eq!(p.headers["host"], "orders");
        // A mesh (h2) caller: the authority was in the URI.
        let mut p = parts(Request::get("https://orders:81/x").body(()).unwrap());
        app_version(&mut p, false, &fallback).unwrap();
        assert_eq!(p.uri, "/x");
        assert_eq!(p.headers["host"], "orders:81");
        assert_eq!(p.version, Version::HTTP_11);
        // Absolute form wins over a different Host (RFC 9112 section 3.2.2).
        let mut p = parts(
            Request::get("http://real/x")
                .header("host", "other")
                .body(())
                .unwrap(),
        );
        app_version(&mut p, false, &fallback).unwrap();
        assert_eq!(p.headers["host"], "real");
        // No authority at all (HTTP/1.0): the app's address.
        let mut p = parts(Request::get("/").body(()).unwrap());
        app_version(&mut p, false, &fallback).unwrap();
        assert_eq!(p.headers["host"], "127.0.0.1:8080");
        // A Host that is no authority is refused, as before.
        let mut p = parts(Request::get("/").header("host", "a b").body(()).unwrap());
        assert!(matches!(
            app_version(&mut p, false, &fallback),
            Err(ProxyError::MissingAuthority)
        ));
    }

    #[test]
    fn to_the_app_over_h2c_the_authority_moves_to_the_uri() {
        let fallback = HeaderValue::from_static("127.0.0.1:8080");
        let mut p = parts(
            Request::get("/a")
                .header("host", "orders")
                .body(())
                .unwrap(),
        );
        app_version(&mut p, true, &fallback).unwrap();
        assert_eq!(p.uri, "http://orders/a");
        assert!(p.headers.get("host").is_none());
        assert_eq!(p.version, Version::HTTP_2);
        let mut p = parts(Request::get("/").body(()).unwrap());
        app_version(&mut p, true, &fallback).unwrap();
        assert_eq!(p.uri, "http://127.0.0.1:8080/");
    }

    #[test]
    fn mesh_h2_moves_host_to_the_uri_and_marks_the_app_version() {
        let mut req = Request::get("/a?b=1")
            .header("host", "orders:8080")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .body(())
            .unwrap();
        to_mesh_h2(&mut req).unwrap();
        assert_eq!(req.uri(), "https://orders:8080/a?b=1");
        assert_eq!(req.version(), Version::HTTP_2);
        assert_eq!(req.headers()[ORIG_PROTO_HEADER], "HTTP/1.1");
        assert!(!req.headers().contains_key("host") && !req.headers().contains_key("x-hop"));
    }

    #[test]
    fn origin_h1_addresses_the_destination_and_sets_host() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut req = Request::get("http://example.com/x").body(()).unwrap();
        to_origin_h1(&mut req, RequestTarget::Addr(addr), Host::AsSent, false).unwrap();
        assert_eq!(req.uri(), "http://10.0.0.1:80/x");
        assert_eq!(req.headers()["host"], "example.com");
        let mut req = Request::get("/ws")
            .header("host", "chat:8080")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        to_origin_h1(&mut req, RequestTarget::Origin, Host::Requested, true).unwrap();
        assert_eq!(req.uri(), "/ws");
        assert_eq!(req.headers()["upgrade"], "websocket");
        assert_eq!(req.headers()["host"], "chat:8080");
    }
}
