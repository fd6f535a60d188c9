//! What a matched rule does to a request or answers instead: header modifiers, path and host
//! rewrites, redirects and direct responses. Compiled once per snapshot (header names and
//! values are parsed then), applied per request.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use trellis_policies::{DirectResponse, HeaderModifier, Redirect, Rewrite};

use crate::ResponseBody;

/// `remove`, then `set`, then `add`.
#[derive(Debug, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

#[derive(Debug)]
pub struct RewriteAction {
    path: Option<PathRewrite>,
    host: Option<HeaderValue>,
}

#[derive(Debug)]
enum PathRewrite {
    Full(String),
    /// The replacement for the matched prefix, without its trailing '/'.
    Prefix(String),
}

#[derive(Debug)]
pub struct RedirectAction {
    scheme: Option<&'static str>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<String>,
    status: StatusCode,
}

#[derive(Debug)]
pub struct DirectAction {
    status: StatusCode,
    body: Bytes,
}

fn name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("`{n}`: {e}"))
}

fn value(v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|e| format!("`{v}`: {e}"))
}

// === impl HeaderOps ===

impl HeaderOps {
    pub fn compile(m: &HeaderModifier) -> Result<Self, String> {
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .map(|(k, v)| Ok((name(k)?, value(v)?)))
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Self {
            set: pairs(&m.set)?,
            add: pairs(&m.add)?,
            remove: m.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
        })
    }

    pub fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

// === impl RewriteAction ===

impl RewriteAction {
    pub fn compile(r: &Rewrite) -> Result<Self, String> {
        let path = match (&r.path, &r.path_prefix) {
            (Some(p), _) => Some(PathRewrite::Full(p.clone())),
            (None, Some(p)) => Some(PathRewrite::Prefix(p.trim_end_matches('/').to_string())),
            (None, None) => None,
        };
        let host = r.host.as_deref().map(value).transpose()?;
        Ok(Self { path, host })
    }

    /// The host the backend sees, if rewritten.
    pub fn host(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }

    /// The new origin-form URI (query kept) for a request whose path matched a prefix of
    /// `matched` bytes; `None` when the path is not rewritten.
    pub fn uri(&self, uri: &Uri, matched: usize) -> Option<Uri> {
        let path = uri.path();
        let new_path = match self.path.as_ref()? {
            PathRewrite::Full(p) => p.clone(),
            PathRewrite::Prefix(p) => {
                let rest = path.get(matched..).unwrap_or("");
                let joined = format!("{p}{rest}");
                if joined.is_empty() {
                    "/".to_string()
                } else {
                    joined
                }
            }
        };
        let pq = match uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        pq.parse().ok()
    }
}

// === impl RedirectAction ===

impl RedirectAction {
    pub fn compile(r: &Redirect) -> Result<Self, String> {
        let scheme = match r.scheme.as_deref() {
            None => None,
            Some("http") => Some("http"),
            Some("https") => Some("https"),
            Some(other) => return Err(format!("scheme `{other}`")),
        };
        Ok(Self {
            scheme,
            host: r.host.clone(),
            port: r.port,
            path: r.path.clone(),
            status: StatusCode::from_u16(r.status).map_err(|e| e.to_string())?,
        })
    }

    /// The redirect for a request that arrived as `scheme` for `host[:port]` (its `Host`).
    /// Like the Gateway API: without a configured port, a changed scheme drops the port (its
    /// well-known port), an unchanged one keeps the request's; well-known ports are not written.
    pub fn response(&self, scheme: &str, authority: &str, uri: &Uri) -> Response<ResponseBody> {
        let (req_host, req_port) = split_authority(authority);
        let scheme_out = self.scheme.unwrap_or(scheme);
        let port = match (self.port, self.scheme) {
            (Some(p), _) => Some(p),
            (None, Some(_)) => None,
            (None, None) => req_port,
        };
        let port = port.filter(|p| !matches!((scheme_out, p), ("http", 80) | ("https", 443)));
        let host = self.host.as_deref().unwrap_or(req_host);
        let path = self.path.as_deref().unwrap_or(uri.path());
        let mut location = if host.contains(':') {
            format!("{scheme_out}://[{host}]")
        } else {
            format!("{scheme_out}://{host}")
        };
        if let Some(p) = port {
            location.push(':');
            location.push_str(&p.to_string());
        }
        location.push_str(path);
        if let Some(q) = uri.query() {
            location.push('?');
            location.push_str(q);
        }
        let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
        *resp.status_mut() = self.status;
        if let Ok(v) = HeaderValue::from_str(&location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }
}

/// `host[:port]` or `[v6]:port`; a port that does not parse is ignored.
fn split_authority(a: &str) -> (&str, Option<u16>) {
    if a.starts_with('[') {
        return match a.rsplit_once("]:") {
            Some((h, p)) => (h.trim_start_matches('['), p.parse().ok()),
            None => (a.trim_start_matches('[').trim_end_matches(']'), None),
        };
    }
    match a.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()),
        None => (a, None),
    }
}

// === impl DirectAction ===

impl DirectAction {
    pub fn compile(d: &DirectResponse) -> Result<Self, String> {
        Ok(Self {
            status: StatusCode::from_u16(d.status).map_err(|e| e.to_string())?,
            body: Bytes::from(d.body.clone()),
        })
    }

    pub fn response(&self) -> Response<ResponseBody> {
        let mut resp = Response::new(Either::Right(Full::new(self.body.clone())));
        *resp.status_mut() = self.status;
        if !self.body.is_empty() {
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_ops_remove_set_add() {
        let ops = HeaderOps::compile(
            &serde_norway::from_str("{set: {x-a: new}, add: {x-b: two}, remove: [x-c]}").unwrap(),
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-a", "old".parse().unwrap());
        h.insert("x-b", "one".parse().unwrap());
        h.insert("x-c", "gone".parse().unwrap());
        ops.apply(&mut h);
        assert_eq!(h["x-a"], "new");
        let b: Vec<_> = h.get_all("x-b").iter().collect();
        assert_eq!(b, ["one", "two"]);
        assert!(!h.contains_key("x-c"));
    }

    #[test]
    fn rewrites_full_path_and_prefix_keeping_the_query() {
        let rw = |y: &str| RewriteAction::compile(&serde_norway::from_str(y).unwrap()).unwrap();
        let uri: Uri = "/api/v1/users?x=1".parse().unwrap();
        assert_eq!(
            rw("{path: /other}").uri(&uri, 0).unwrap(),
            "/other?x=1".parse::<Uri>().unwrap()
        );
        // Prefix `/api/v1` (7 bytes) replaced.
        assert_eq!(
            rw("{path_prefix: /v2}").uri(&uri, 7).unwrap(),
            "/v2/users?x=1"
        );
        assert_eq!(rw("{path_prefix: /}").uri(&uri, 7).unwrap(), "/users?x=1");
        assert_eq!(
            rw("{path_prefix: /}")
                .uri(&"/api/v1".parse().unwrap(), 7)
                .unwrap(),
            "/"
        );
        assert_eq!(
            rw("{path_prefix: /new/}").uri(&uri, 4).unwrap(),
            "/new/v1/users?x=1"
        );
        let host = rw("{host: orders.internal}");
        assert!(host.uri(&uri, 0).is_none());
        assert_eq!(host.host().unwrap(), "orders.internal");
    }

    #[test]
    fn redirects_follow_the_gateway_api_port_rules() {
        let r = |y: &str| RedirectAction::compile(&serde_norway::from_str(y).unwrap()).unwrap();
        let uri: Uri = "/a/b?q=1".parse().unwrap();
        let loc = |resp: Response<ResponseBody>| {
            (
                resp.status().as_u16(),
                resp.headers()[header::LOCATION]
                    .to_str()
                    .unwrap()
                    .to_string(),
            )
        };
        assert_eq!(
            loc(r("{}").response("http", "orders:8080", &uri)),
            (302, "http://orders:8080/a/b?q=1".into())
        );
        assert_eq!(
            loc(r("{scheme: https, status: 301}").response("http", "orders:8080", &uri)),
            (301, "https://orders/a/b?q=1".into())
        );
        assert_eq!(
            loc(r("{host: example.com, port: 8443, path: /x, status: 308}")
                .response("http", "orders", &uri)),
            (308, "http://example.com:8443/x?q=1".into())
        );
        assert_eq!(
            loc(r("{scheme: https, port: 443}").response("http", "[::1]:80", &uri)),
            (302, "https://[::1]/a/b?q=1".into())
        );
    }

    #[test]
    fn direct_response_has_status_and_body() {
        let d =
            DirectAction::compile(&serde_norway::from_str("{status: 418, body: teapot}").unwrap())
                .unwrap();
        let resp = d.response();
        assert_eq!(resp.status(), 418);
        assert_eq!(
            resp.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }
}
