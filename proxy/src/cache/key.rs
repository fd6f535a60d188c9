//! Cache keys. The primary key names the resource as the client asked for it: the authority
//! (so one host's entry is never served for another, unlike nginx's default key), the path and
//! the query (whole, or the policy's chosen parameters, sorted), the policy's key headers and,
//! unless the policy is public, the consumer. A response's `Vary` then picks a variant under
//! the primary key.
//!
//! Parts are separated by a byte that cannot occur in any of them (NUL is refused in URIs and
//! header values), so no two different requests build the same key.

use std::cell::RefCell;
use std::ops::Deref;
use std::sync::Arc;

use http::{HeaderMap, Request};
use trellis_policies::CacheKeySpec;

const SEP: char = '\0';

/// The resource part of a key, `authority SEP path?query`: what purges and unsafe-method
/// invalidation match on.
#[cfg(test)]
pub fn resource<B>(req: &Request<B>, spec: &CacheKeySpec) -> String {
    let mut out = String::new();
    push_resource(&mut out, req, spec);
    out
}

fn push_resource<B>(out: &mut String, req: &Request<B>, spec: &CacheKeySpec) {
    let authority = crate::http::headers::request_authority(req).unwrap_or_default();
    let start = out.len();
    out.push_str(authority);
    out[start..].make_ascii_lowercase();
    out.push(SEP);
    out.push_str(req.uri().path());
    let query = req.uri().query().unwrap_or_default();
    match &spec.query {
        None if !query.is_empty() => {
            out.push('?');
            out.push_str(query);
        }
        None => {}
        Some(names) => {
            let mut kept: Vec<&str> = query
                .split('&')
                .filter(|p| names.iter().any(|n| p.split('=').next() == Some(n)))
                .collect();
            kept.sort_unstable();
            if !kept.is_empty() {
                out.push('?');
                out.push_str(&kept.join("&"));
            }
        }
    }
}

thread_local! {
    /// Where keys are built before their one allocation: a key's length is known only once
    /// it is built, and building it in a `String` of its own and then copying that into an
    /// `Arc<str>` allocated twice per request.
    static SCRATCH: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Scratch buffers larger than this are not kept between requests.
const SCRATCH_KEPT: usize = 4096;

/// The primary key, built in one allocation, which the store's key and the entry's
/// [`Resource`] then share; it starts with the resource, whose length is returned with it.
pub fn keys<B>(req: &Request<B>, spec: &CacheKeySpec, consumer: Option<&str>) -> (Arc<str>, usize) {
    SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
        Ok(mut out) => {
            out.clear();
            let len = build(&mut out, req, spec, consumer);
            let key = Arc::from(out.as_str());
            if out.capacity() > SCRATCH_KEPT {
                *out = String::new();
            }
            (key, len)
        }
        // Never reentered; if it were, a buffer of its own.
        Err(_) => {
            let mut out = String::new();
            let len = build(&mut out, req, spec, consumer);
            (Arc::from(out), len)
        }
    })
}

fn build<B>(
    out: &mut String,
    req: &Request<B>,
    spec: &CacheKeySpec,
    consumer: Option<&str>,
) -> usize {
    push_resource(out, req, spec);
    let len = out.len();
    push_primary(out, req.headers(), spec, consumer);
    len
}

/// A resource (`authority SEP path?query`, what purges and invalidations select) kept as the
/// start of its key's text, which an entry shares with the store's key instead of a copy of
/// its own (one allocation and one free less per stored response). Reads as that `str`.
#[derive(Clone, Debug)]
pub struct Resource {
    text: Arc<str>,
    len: usize,
}

// === impl Resource ===

impl Resource {
    /// The first `len` bytes of `text` (all of it when `len` is not a boundary in it).
    pub fn prefix(text: Arc<str>, len: usize) -> Self {
        let len = match text.is_char_boundary(len) {
            true => len,
            false => text.len(),
        };
        Self { text, len }
    }

    /// A resource of its own (tests).
    #[cfg(test)]
    pub fn whole(text: &str) -> Self {
        Self {
            len: text.len(),
            text: Arc::from(text),
        }
    }
}

impl Deref for Resource {
    type Target = str;

    fn deref(&self) -> &str {
        self.text.get(..self.len).unwrap_or(&self.text)
    }
}

/// The primary key: the resource, the policy's key headers and the consumer.
#[cfg(test)]
pub fn primary(
    resource: &str,
    headers: &HeaderMap,
    spec: &CacheKeySpec,
    consumer: Option<&str>,
) -> String {
    let mut out = resource.to_string();
    push_primary(&mut out, headers, spec, consumer);
    out
}

fn push_primary(
    out: &mut String,
    headers: &HeaderMap,
    spec: &CacheKeySpec,
    consumer: Option<&str>,
) {
    out.push(SEP);
    out.push_str(consumer.unwrap_or("-"));
    for name in &spec.headers {
        out.push(SEP);
        push_values(out, headers, name);
    }
}

/// The variant key under `primary` for the request headers the response's `Vary` names:
/// `primary` itself without a `Vary` (no key part contains the separator, so it cannot be
/// the key of a variant).
pub fn variant(primary: &str, headers: &HeaderMap, vary: &[String]) -> String {
    if vary.is_empty() {
        return primary.to_string();
    }
    let mut out = String::with_capacity(primary.len() + 16 * vary.len() + 1);
    out.push_str(primary);
    out.push(SEP);
    for name in vary {
        out.push(SEP);
        push_values(&mut out, headers, name);
    }
    out
}

/// [`variant`] when the request's headers were kept; without them, `primary` for a response
/// without `Vary` and `None` (no key can be built) for one with.
pub fn variant_of(primary: &str, headers: Option<&HeaderMap>, vary: &[String]) -> Option<String> {
    match headers {
        Some(h) => Some(variant(primary, h, vary)),
        None if vary.is_empty() => Some(primary.to_string()),
        None => None,
    }
}

/// A header's values, joined; a missing header differs from an empty one.
fn push_values(out: &mut String, headers: &HeaderMap, name: &str) {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        out.push('\u{1}');
        return;
    }
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
}

/// The path and query of a resource key (for purges by path or prefix).
pub fn path_of(resource: &str) -> &str {
    resource.split_once(SEP).map_or(resource, |(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: &str) -> Request<()> {
        Request::get(uri).header("host", host).body(()).unwrap()
    }

    #[test]
    fn the_authority_is_part_of_the_key() {
        let spec = CacheKeySpec::default();
        assert_ne!(
            resource(&req("/a", "one.example"), &spec),
            resource(&req("/a", "two.example"), &spec)
        );
        assert_eq!(
            resource(&req("/a", "One.Example"), &spec),
            resource(&req("/a", "one.example"), &spec)
        );
        assert_eq!(path_of(&resource(&req("/a?x=1", "h"), &spec)), "/a?x=1");
    }

    #[test]
    fn chosen_query_parameters_are_sorted() {
        let spec = CacheKeySpec {
            query: Some(vec!["a".into(), "b".into()]),
            headers: vec![],
        };
        let k1 = resource(&req("/p?b=2&utm=x&a=1", "h"), &spec);
        let k2 = resource(&req("/p?a=1&b=2", "h"), &spec);
        assert_eq!(k1, k2);
        assert!(k1.ends_with("/p?a=1&b=2"));
        let whole = CacheKeySpec::default();
        assert_ne!(
            resource(&req("/p?b=2&a=1", "h"), &whole),
            resource(&req("/p?a=1&b=2", "h"), &whole)
        );
    }

    #[test]
    fn consumers_headers_and_variants_separate_entries() {
        let spec = CacheKeySpec {
            query: None,
            headers: vec!["x-tenant".into()],
        };
        let mut h = HeaderMap::new();
        let a = primary("r", &h, &spec, Some("acme"));
        let b = primary("r", &h, &spec, Some("globex"));
        assert_ne!(a, b);
        let missing = primary("r", &h, &spec, None);
        h.insert("x-tenant", "".parse().unwrap());
        assert_ne!(
            missing,
            primary("r", &h, &spec, None),
            "missing differs from empty"
        );
        let vary = vec!["accept-encoding".to_string()];
        let plain = variant(&a, &HeaderMap::new(), &vary);
        let mut gz = HeaderMap::new();
        gz.insert("accept-encoding", "gzip".parse().unwrap());
        assert_ne!(plain, variant(&a, &gz, &vary));
        let r = Request::get("/a?q").header("host", "H").body(()).unwrap();
        let (p, len) = keys(&r, &spec, Some("acme"));
        assert_eq!(&p[..len], resource(&r, &spec));
        assert_eq!(
            &*p,
            primary(&resource(&r, &spec), r.headers(), &spec, Some("acme"))
        );
        assert_eq!(&*Resource::prefix(p.clone(), len), resource(&r, &spec));
        assert_eq!(&*Resource::prefix(p.clone(), p.len() + 1), &*p);
        // The scratch buffer is reused: a second, shorter key is not the first's tail.
        let short = Request::get("/").header("host", "h").body(()).unwrap();
        let (q, _) = keys(&short, &spec, None);
        assert_eq!(
            &*q,
            primary(&resource(&short, &spec), short.headers(), &spec, None)
        );
    }
}
