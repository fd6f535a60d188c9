//! Building entries from responses and responses from entries: what is stored (end-to-end
//! headers, never `Age` or hop-by-hop fields), what a 304 changes (RFC 9111 4.3.4: its
//! headers replace the stored ones), and the conditional requests that revalidate them.

use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{Either, Full};
use trellis_policies::CachePolicySpec;

use super::control::{self, Asked, CacheControl, Facts, NotStored};
use super::fields::Fields;
use super::store::Entry;
use crate::ResponseBody;

/// Never stored: per-hop, computed per hit, or this sidecar's own ([`control::not_stored`]
/// by name; this list removes them from a background revalidation's request).
static NOT_STORED: [HeaderName; 8] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::AGE,
    super::CACHE_STATUS,
];

fn not_stored(k: &HeaderName) -> bool {
    control::not_stored(k.as_str())
}

/// A 304 does not change these (RFC 9111 3.2: the stored body's framing stays).
static KEPT_ON_304: [HeaderName; 3] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
];

/// The request side of a fetch, taken before the request goes upstream.
pub struct Fetch {
    pub requested: SystemTime,
    pub started: Instant,
    pub method: http::Method,
    /// The request's headers, for the variant key of a response with `Vary`: copied only when
    /// the store has seen a `Vary` ([`super::store::Store::keeps_request_headers`]).
    pub headers: Option<HeaderMap>,
    asked: Asked,
}

// === impl Fetch ===

impl Fetch {
    /// `cc` is the request's `Cache-Control`, parsed once per request; `authorization`
    /// whether it has an `Authorization` (known from planning).
    pub fn start<B>(
        req: &Request<B>,
        cc: &CacheControl,
        keep_headers: bool,
        authorization: bool,
    ) -> Self {
        Self {
            requested: SystemTime::now(),
            started: Instant::now(),
            method: req.method().clone(),
            headers: keep_headers.then(|| req.headers().clone()),
            asked: Asked {
                no_store: cc.no_store,
                authorization,
            },
        }
    }

    /// The entry for `resp` (body still empty: set when it has arrived, while the `Arc` is
    /// still the only one), or why it is not stored. In its `Arc` from the start: an entry is
    /// a few hundred bytes, copied at every move on its way to the store.
    pub fn entry<B>(
        &self,
        resp: &Response<B>,
        spec: &CachePolicySpec,
        resource: super::key::Resource,
    ) -> Result<Built, NotStored> {
        let h = resp.headers();
        // One walk learns what storability, freshness and the copy need.
        let facts = Facts::of(h.iter());
        control::storable(
            &self.method,
            self.asked,
            resp.status(),
            &facts,
            spec.default_ttl.is_some(),
        )?;
        if !facts.vary.is_empty() && self.headers.is_none() {
            return Err(NotStored::VaryUnseen);
        }
        let response_time = SystemTime::now();
        let kept = h.iter().filter(|(k, _)| Facts::keeps(k));
        // A body announced small enough for memory gets its buffer with the values'.
        let room = facts
            .length
            .filter(|n| *n <= spec.max_object_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        let (headers, body) = Fields::copied_with_room(kept, facts.kept, facts.kept_len, room);
        let entry = Arc::new(Entry {
            status: resp.status(),
            lifetime: control::lifetime(&facts, spec.default_ttl, spec.max_ttl, response_time),
            initial_age: control::initial_age(&facts, self.requested, response_time),
            stored: Instant::now(),
            fetched: self.started,
            resource,
            vary: match facts.vary.is_empty() {
                true => no_vary(),
                false => facts.vary.into(),
            },
            tags: facts.tags,
            cc: facts.cc,
            headers,
            body: Bytes::new(),
            disk: None,
        });
        Ok(Built {
            entry,
            expected: facts.length,
            body,
        })
    }
}

/// A stored response's entry before its body, from [`Fetch::entry`].
pub struct Built {
    pub entry: Arc<Entry>,
    /// The body's announced length (`Content-Length`).
    pub expected: Option<u64>,
    /// Room for the body, in the allocation of the header values when it was announced small
    /// enough for memory (empty otherwise: the tee allocates its own).
    pub body: BytesMut,
}

/// The `Vary` names of a response without one: one shared empty list (an `Arc` of an empty
/// slice is still an allocation).
pub fn no_vary() -> Arc<[String]> {
    static NONE: OnceLock<Arc<[String]>> = OnceLock::new();
    NONE.get_or_init(|| Arc::from([])).clone()
}

// === impl Entry ===

impl Entry {
    /// The stored response as a hit, with its current `Age` (RFC 9111 5.1: a cache sends it).
    /// A body on disk streams from its file.
    pub fn response(&self, head: bool, now: Instant) -> Response<ResponseBody> {
        let body = match &self.disk {
            Some(d) if !head => Either::Left(crate::http::body::Streamed::from_disk(d.stream())),
            _ if head => Either::Right(Full::new(Bytes::new())),
            _ => Either::Right(Full::new(self.body.clone())),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        // Room for `Age` and the cache status: added without growing the map.
        *resp.headers_mut() = self.headers.to_map(2);
        resp.headers_mut()
            .insert(header::AGE, HeaderValue::from(self.age(now).as_secs()));
        resp
    }

    /// This entry updated by a 304: its headers replace the stored ones (but not the body's
    /// framing), and freshness restarts from the 304.
    pub fn refreshed(
        &self,
        not_modified: &HeaderMap,
        requested: SystemTime,
        spec: &CachePolicySpec,
    ) -> Entry {
        let replaced = |k: &HeaderName| !KEPT_ON_304.contains(k) && !not_stored(k);
        let kept = self
            .headers
            .iter()
            .filter(|(k, _)| !(replaced(k) && not_modified.contains_key(*k)));
        let merged = || {
            kept.clone()
                .chain(not_modified.iter().filter(|(k, _)| replaced(k)))
        };
        let len = merged().map(|(_, v)| v.len()).sum();
        let headers = Fields::copied(merged(), merged().count(), len);
        let facts = Facts::of(headers.iter());
        let response_time = SystemTime::now();
        let lifetime = control::lifetime(&facts, spec.default_ttl, spec.max_ttl, response_time);
        let initial_age =
            control::initial_age(&Facts::of(not_modified.iter()), requested, response_time);
        let (cc, tags) = (facts.cc, facts.tags);
        Entry {
            status: self.status,
            lifetime,
            initial_age,
            stored: Instant::now(),
            fetched: self.fetched,
            resource: self.resource.clone(),
            tags,
            vary: self.vary.clone(),
            cc,
            headers,
            body: self.body.clone(),
            disk: self.disk.clone(),
        }
    }
}

/// Make `h` a conditional request on `stored`'s validators, unless the client sent its own
/// conditions (its 304 is then its own, passed through). `true` when validators were added.
pub fn add_validators(h: &mut HeaderMap, stored: &Entry) -> bool {
    if h.contains_key(header::IF_NONE_MATCH) || h.contains_key(header::IF_MODIFIED_SINCE) {
        return false;
    }
    let mut added = false;
    if let Some(etag) = stored.headers.get(&header::ETAG) {
        h.insert(header::IF_NONE_MATCH, etag.clone());
        added = true;
    }
    if let Some(lm) = stored.headers.get(&header::LAST_MODIFIED) {
        h.insert(header::IF_MODIFIED_SINCE, lm.clone());
        added = true;
    }
    added
}

/// A client's `If-None-Match` names the stored ETag: a fresh hit answers 304.
pub fn not_modified(h: &HeaderMap, stored: &Entry) -> bool {
    let (Some(inm), Some(etag)) = (
        h.get(header::IF_NONE_MATCH),
        stored.headers.get(&header::ETAG),
    ) else {
        return false;
    };
    let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let etag = etag.to_str().map(weak).unwrap_or_default();
    inm.to_str()
        .is_ok_and(|v| v.trim() == "*" || v.split(',').any(|t| weak(t) == etag))
}

/// The GET a background revalidation sends: the client's request headers (without this
/// sidecar's identity header, which only the inbound listener sets) and the validators.
pub fn revalidation_request<B>(
    req: &Request<B>,
    stored: &Entry,
) -> Request<http_body_util::Empty<Bytes>> {
    let mut out = Request::new(http_body_util::Empty::new());
    *out.uri_mut() = req.uri().clone();
    let h = out.headers_mut();
    *h = req.headers().clone();
    h.remove(crate::http::headers::PEER_IDENTITY_HEADER);
    for name in &NOT_STORED {
        h.remove(name);
    }
    h.remove(header::IF_NONE_MATCH);
    h.remove(header::IF_MODIFIED_SINCE);
    if let Some(host) = crate::http::headers::request_authority(req) {
        if let Ok(v) = HeaderValue::from_str(host) {
            h.insert(header::HOST, v);
        }
    }
    add_validators(h, stored);
    out
}

/// The resource a same-origin `Location` or `Content-Location` names (RFC 9111 4.4).
pub fn same_origin(resource: &str, v: Option<&HeaderValue>) -> Option<Arc<str>> {
    let v = v?.to_str().ok()?;
    let (authority, _) = resource.split_once('\0')?;
    let path = match v.parse::<http::Uri>().ok()? {
        u if u.authority().is_none() && v.starts_with('/') => v.to_string(),
        u if u
            .authority()
            .is_some_and(|a| a.as_str().eq_ignore_ascii_case(authority)) =>
        {
            u.path_and_query()
                .map_or("/".to_string(), |p| p.to_string())
        }
        _ => return None,
    };
    Some(format!("{authority}\0{path}").into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(headers: &[(&str, &str)]) -> Entry {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        Entry {
            status: http::StatusCode::OK,
            cc: CacheControl::parse(&h),
            headers: Fields::of(&h),
            body: Bytes::from_static(b"body"),
            lifetime: Duration::from_secs(10),
            initial_age: Duration::from_secs(3),
            stored: Instant::now(),
            fetched: Instant::now(),
            resource: crate::cache::key::Resource::whole("h\0/a"),
            tags: vec![],
            vary: Arc::from([]),
            disk: None,
        }
    }

    /// Header values sliced out of a connection's read buffer, as hyper and h2 parse them.
    fn sliced(buf: &Bytes, headers: &[(&'static str, std::ops::Range<usize>)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, r) in headers {
            let v = HeaderValue::from_maybe_shared(buf.slice(r.clone())).unwrap();
            h.append(HeaderName::from_static(k), v);
        }
        h
    }

    fn within(v: &HeaderValue, buf: &Bytes) -> bool {
        let (p, range) = (v.as_bytes().as_ptr() as usize, buf.as_ptr_range());
        (range.start as usize..range.end as usize).contains(&p)
    }

    #[test]
    fn stored_headers_do_not_keep_the_read_buffer_alive() {
        let mut raw = vec![b'x'; 8192];
        raw[..12].copy_from_slice(b"max-age=60\"v");
        let buf = Bytes::from(raw);
        let h = sliced(
            &buf,
            &[("cache-control", 0..10), ("etag", 10..12), ("age", 0..2)],
        );
        let resp = {
            let mut r = Response::new(());
            *r.headers_mut() = h;
            r
        };
        let req = Request::get("/a").body(()).unwrap();
        let spec: CachePolicySpec =
            serde_json::from_value(serde_json::json!({"service": "s"})).unwrap();
        let e = Fetch::start(&req, &CacheControl::default(), false, false)
            .entry(&resp, &spec, crate::cache::key::Resource::whole("h\0/a"))
            .unwrap()
            .entry;
        let stored = e.headers.to_map(0);
        assert_eq!(stored.get("cache-control").unwrap(), "max-age=60");
        assert_eq!(stored.get("etag").unwrap(), "\"v");
        assert!(stored.get("age").is_none(), "never stored");
        assert!(stored.values().all(|v| !within(v, &buf)));

        // A 304's values are sliced from its own buffer too.
        let buf304 = Bytes::from(vec![b'y'; 8192]);
        let refreshed = e.refreshed(
            &sliced(&buf304, &[("x-new", 0..4)]),
            SystemTime::now(),
            &spec,
        );
        let stored = refreshed.headers.to_map(0);
        assert_eq!(stored.get("x-new").unwrap(), "yyyy");
        assert_eq!(stored.get("etag").unwrap(), "\"v");
        assert!(stored.values().all(|v| !within(v, &buf304)));
    }

    #[test]
    fn hop_by_hop_and_own_headers_are_never_stored() {
        assert!(NOT_STORED.iter().all(not_stored));
        let kept = [header::CONTENT_TYPE, header::ETAG, header::CACHE_CONTROL];
        assert!(!kept.iter().any(not_stored));
        assert!(!not_stored(&HeaderName::from_static("x-connection")));
    }

    #[test]
    fn a_hit_carries_its_age_including_the_origins() {
        let e = entry(&[("cache-control", "max-age=10")]);
        let resp = e.response(false, e.stored + Duration::from_secs(2));
        assert_eq!(resp.headers()["age"], "5");
        let head = e.response(true, Instant::now());
        assert!(
            matches!(head.body(), Either::Right(b) if http_body::Body::size_hint(b).exact() == Some(0))
        );
    }

    #[test]
    fn a_304_replaces_the_stored_headers_but_not_the_framing() {
        let e = entry(&[
            ("cache-control", "max-age=10"),
            ("etag", "\"v1\""),
            ("x-version", "1"),
            ("content-length", "4"),
        ]);
        let mut nm = HeaderMap::new();
        nm.insert("cache-control", "max-age=60".parse().unwrap());
        nm.insert("x-version", "2".parse().unwrap());
        nm.insert("content-length", "0".parse().unwrap());
        let spec: CachePolicySpec =
            serde_json::from_value(serde_json::json!({"service": "a"})).unwrap();
        let r = e.refreshed(&nm, SystemTime::now(), &spec);
        let h = r.headers.to_map(0);
        assert_eq!(h["x-version"], "2");
        assert_eq!(h["content-length"], "4");
        assert_eq!(h["etag"], "\"v1\"");
        assert_eq!(r.lifetime, Duration::from_secs(60));
        assert_eq!(r.body, "body");
    }

    #[test]
    fn validators_and_conditional_hits() {
        let e = entry(&[
            ("etag", "W/\"v1\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        let mut h = HeaderMap::new();
        assert!(add_validators(&mut h, &e));
        assert_eq!(h["if-none-match"], "W/\"v1\"");
        let mut own = HeaderMap::new();
        own.insert("if-none-match", "\"x\"".parse().unwrap());
        assert!(
            !add_validators(&mut own, &e),
            "the client's own conditions stand"
        );
        let mut c = HeaderMap::new();
        c.insert("if-none-match", "\"a\", \"v1\"".parse().unwrap());
        assert!(not_modified(&c, &e));
        c.insert("if-none-match", "\"b\"".parse().unwrap());
        assert!(!not_modified(&c, &e));
    }

    #[test]
    fn same_origin_locations_only() {
        let r = "api.example\0/items";
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            same_origin(r, Some(&v("/items/7"))).as_deref(),
            Some("api.example\0/items/7")
        );
        assert_eq!(
            same_origin(r, Some(&v("http://api.example/x?y=1"))).as_deref(),
            Some("api.example\0/x?y=1")
        );
        assert_eq!(same_origin(r, Some(&v("http://evil.example/x"))), None);
        assert_eq!(same_origin(r, None), None);
    }
}
