//! The portal's pages: one HTML page whose script draws each view (catalog, reference,
//! changelog, sign-up, sign-in, keys, usage) from the JSON the portal serves. Embedded in the
//! binary (no node build, nothing fetched from elsewhere), under a strict Content Security
//! Policy: scripts and styles only from the portal itself, no inline script, no framing.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};

const INDEX: &str = include_str!("assets/index.html");
const JS: &str = include_str!("assets/portal.js");
const CSS: &str = include_str!("assets/portal.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub fn serve(method: &Method, path: &str) -> Response<Bytes> {
    if method != Method::GET && method != Method::HEAD {
        return super::error(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
    }
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/assets/portal.js" => (JS, "text/javascript; charset=utf-8"),
        "/assets/portal.css" => (CSS, "text/css; charset=utf-8"),
        _ => return super::error(StatusCode::NOT_FOUND, "no such page"),
    };
    let mut resp = Response::new(Bytes::from_static(body.as_bytes()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}
