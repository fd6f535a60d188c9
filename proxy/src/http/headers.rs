//! The mesh's own header names, and header handling shared by every direction: hop-by-hop removal per RFC 9110 section 7.6.1,
//! `X-Forwarded-For`/`Forwarded` (RFC 7239), and upgrade detection.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

/// Header naming why the sidecar answered with an error instead of the upstream.
pub const ERROR_HEADER: HeaderName = HeaderName::from_static("trellis-error");
/// Header carrying the verified SPIFFE ID of the calling sidecar to the app.
pub const PEER_IDENTITY_HEADER: HeaderName = HeaderName::from_static("trellis-peer-identity");
/// Header carrying the authenticated consumer's name to the app.
pub const CONSUMER_HEADER: HeaderName = HeaderName::from_static("trellis-consumer");
/// Set on retried attempts and passed to the app, so that a later hop that sees it (apps that
/// propagate headers) does not retry again: retries happen at one hop only.
pub const RETRIED_HEADER: HeaderName = HeaderName::from_static("trellis-retried");
/// Internal header: the HTTP version the app used, so the far side can restore it.
pub const ORIG_PROTO_HEADER: HeaderName = HeaderName::from_static("trellis-orig-proto");

// The names are `HeaderName`s, not `&str`: a lookup by `&str` parses and validates the name
// on every call, and these are looked up on every request. The lists are `static`: a `const`
// array is built and dropped again at every use.

/// Connection-specific headers that never cross a proxy.
static HOP_BY_HOP: [HeaderName; 6] = [
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
    // One pass over the names says which are present: most requests carry none, and most
    // HTTP/1.1 responses only `Connection: keep-alive`, so each absent name costs no lookup
    // (a `remove` per listed name was about 1,500 instructions per response).
    let present = hop_by_hop_present(headers);
    if present == 0 {
        return;
    }
    // Nearly every HTTP/1.1 response: `Connection: keep-alive` (or `close`) and no other
    // hop-by-hop header. It names no header to remove with it, so it just goes, in one
    // lookup (the general path below was about 1,200 instructions for it).
    if present == 1 << CONNECTION_BIT {
        if let header::Entry::Occupied(conn) = headers.entry(header::CONNECTION) {
            if conn.iter().all(names_no_header) {
                conn.remove();
                return;
            }
        }
    }
    let has = |name: &HeaderName| {
        HOP_BY_HOP
            .iter()
            .position(|h| h == name)
            .is_some_and(|i| present & (1 << i) != 0)
    };
    if has(&header::CONNECTION) {
        // Every `Connection` field line counts, not only the first.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            // `Connection: keep-alive` / `close` (nearly every HTTP/1.1 response) name no
            // other header: nothing to parse or allocate for them.
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE))
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    let te_trailers = has(&header::TE)
        && headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
    let upgrade = (keep_upgrade && has(&header::UPGRADE))
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(up) = upgrade {
        headers.insert(header::UPGRADE, up);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// `header::CONNECTION`'s position in [`HOP_BY_HOP`].
const CONNECTION_BIT: usize = 0;

/// A `Connection` value of only `keep-alive` and `close` tokens: it names no other header.
fn names_no_header(value: &HeaderValue) -> bool {
    value.as_bytes().split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
    })
}

/// Which of [`HOP_BY_HOP`] `headers` has, one bit each by position.
fn hop_by_hop_present(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0, |m, n| {
        let name = n.as_str();
        // Most names have none of the listed names' lengths (2, 7, 10, 16, 17): one
        // comparison for them instead of six name comparisons (this ran on every request and
        // response, about 250 instructions each).
        if !matches!(name.len(), 2 | 7 | 10 | 16 | 17) {
            return m;
        }
        HOP_BY_HOP
            .iter()
            .position(|h| h.as_str() == name)
            .map_or(m, |i| m | (1 << i))
    })
}

/// Forwarding headers a client at the edge could use to pass for another client or scheme;
/// from an untrusted client they are removed, then `X-Forwarded-For`, `Forwarded` and
/// `X-Forwarded-Proto` are written anew.
static SPOOFABLE_FORWARDING: [HeaderName; 6] = [
    X_FORWARDED_FOR,
    header::FORWARDED,
    X_FORWARDED_PROTO,
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
];

/// The proxies in front of an ingress whose forwarding headers are believed (as nginx's
/// `set_real_ip_from` with `real_ip_recursive on`, or Envoy's trusted hops by address).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

// === impl TrustedProxies ===

impl TrustedProxies {
    /// Parse CIDRs (`10.0.0.0/8`) or single addresses; the error names the bad entry.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        entries
            .iter()
            .map(|e| {
                let e = e.as_ref().trim();
                e.parse::<ipnet::IpNet>()
                    .or_else(|_| e.parse::<IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("`{e}` is not an IP address or CIDR"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The address the request came from as far as it can be believed: the TCP peer, unless
    /// it is a trusted proxy; then, walking `X-Forwarded-For` from the right, the first
    /// address that is not a trusted proxy (a client can write anything to the left of
    /// what its first trusted proxy appended, so nothing further left is read).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        for value in headers.get_all(X_FORWARDED_FOR).iter().rev() {
            let Ok(list) = value.to_str() else {
                return client;
            };
            for hop in list.rsplit(',') {
                let Ok(ip) = hop.trim().parse::<IpAddr>() else {
                    // Garbage where a proxy should have written an address: stop at the
                    // last address we could vouch for.
                    return client;
                };
                client = ip;
                if !self.contains(ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 peers) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Write the forwarding headers of a request entering the mesh at the edge from `peer`: from a
/// trusted proxy they are kept and the hop appended; from anyone else every forwarding
/// header is dropped and replaced by what this connection shows, so the app never sees an
/// address or scheme the client made up.
pub fn edge_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted: &TrustedProxies,
    proto: &'static str,
) {
    edge_scrub(headers, peer, trusted, proto);
    append_forwarded(headers, canonical(peer), proto);
}

/// The first half of [`edge_forwarded`]: a stranger's forwarding headers dropped, the scheme
/// written.
fn edge_scrub(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted: &TrustedProxies,
    proto: &'static str,
) {
    let proto = HeaderValue::from_static(proto);
    if !trusted.contains(peer) {
        if headers.keys().any(|n| SPOOFABLE_FORWARDING.contains(n)) {
            for name in &SPOOFABLE_FORWARDING {
                headers.remove(name);
            }
        }
        headers.insert(X_FORWARDED_PROTO, proto);
    } else if !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, proto);
    }
}

/// Remove every `trellis-*` header: the mesh's internal headers (peer identity, consumer,
/// retried marker, original protocol) are only ever set by sidecars, never by a client at the
/// edge. Allocates only when a client sent one.
pub fn strip_internal(headers: &mut HeaderMap) {
    if !any_internal(headers) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| is_internal(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// The mesh's own headers: what sidecars tell each other, never taken from an app or a client.
const INTERNAL_PREFIX: &str = "trellis-";

fn is_internal(name: &HeaderName) -> bool {
    name.as_str().starts_with(INTERNAL_PREFIX)
}

/// Whether `headers` has any `trellis-*` field. One pass over the names costs less than one
/// lookup of a custom name, which `http` hashes byte by byte (about 150 instructions for an
/// absent `trellis-*` name), and a request from an app or a client nearly never has one: the
/// lookups and removals of the mesh's internal headers on the request path are skipped when
/// this says none is there.
pub fn any_internal(headers: &HeaderMap) -> bool {
    any_named_with(headers, INTERNAL_PREFIX)
}

/// Whether `headers` has a field whose name starts with `prefix` (lowercase: names are), by
/// one pass over the names ([`any_internal`] says why).
pub fn any_named_with(headers: &HeaderMap, prefix: &str) -> bool {
    headers.keys().any(|n| n.as_str().starts_with(prefix))
}

/// `headers` has a field named `name`, found by comparing the names rather than by hashing
/// `name`: for a custom name (which `http` hashes byte by byte) in a request's or response's
/// handful of fields, the cheaper way to learn that it is absent, as it nearly always is.
pub fn has_name(headers: &HeaderMap, name: &HeaderName) -> bool {
    headers.keys().any(|n| n == name)
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Append the client's address to `X-Forwarded-For` and a `Forwarded` element.
///
/// This runs on every proxied request, so both values are formatted on the stack into one
/// buffer that becomes one shared allocation, which the two header values slice (one
/// allocation for both instead of a `String` per step, or one per value).
pub fn append_forwarded(headers: &mut HeaderMap, client: IpAddr, proto: &'static str) {
    let prev = headers
        .get(&X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .filter(|p| !p.is_empty());
    let mut both = Inline::<{ 2 * INLINE }>::new();
    // An IPv4 address is written byte by byte: `fmt`'s machinery costs about 700
    // instructions per request here (docs/performance.md).
    let xff = match (prev, client) {
        (Some(prev), _) => both.push(format_args!("{prev}, {client}")),
        (None, IpAddr::V4(ip)) => both.extend(|b| b.put_ipv4(ip)),
        (None, IpAddr::V6(_)) => both.push(format_args!("{client}")),
    };
    let forwarded = match client {
        IpAddr::V4(ip) => both.extend(|b| {
            b.put(b"for=")?;
            b.put_ipv4(ip)?;
            b.put(b";proto=")?;
            b.put(proto.as_bytes())
        }),
        IpAddr::V6(ip) => both.push(format_args!("for=\"[{ip}]\";proto={proto}")),
    };
    let (xff, forwarded) = match (xff, forwarded) {
        (Some(x), Some(f)) => {
            let shared = bytes::Bytes::from_owner(both);
            let value = |r| HeaderValue::from_maybe_shared(shared.slice(r)).ok();
            (value(x), value(f))
        }
        // A long `X-Forwarded-For` chain: each value on its own.
        _ => {
            let xff = match prev {
                Some(prev) => HeaderValue::from_str(&format!("{prev}, {client}")).ok(),
                None => HeaderValue::from_str(&client.to_string()).ok(),
            };
            let forwarded = match client {
                IpAddr::V4(ip) => stack_value(format_args!("for={ip};proto={proto}")),
                IpAddr::V6(ip) => stack_value(format_args!("for=\"[{ip}]\";proto={proto}")),
            };
            (xff, forwarded)
        }
    };
    // IP addresses and the existing (already valid) value only contain visible ASCII.
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if let Some(v) = forwarded {
        headers.append(header::FORWARDED, v);
    }
}

/// The forwarding values naming one connection's client, formatted once per connection:
/// every request on it names the same address, and nearly all of them bring no
/// `X-Forwarded-For` of their own, so they get these values shared (a reference count each)
/// instead of formatted and allocated again per request. A request with a chain of its own
/// has it appended to as [`append_forwarded`] does.
#[derive(Clone, Debug)]
pub struct ClientHop {
    /// The connection's peer, as the trusted-proxy rule checks it.
    peer: IpAddr,
    /// The address the values name.
    client: IpAddr,
    proto: &'static str,
    /// `X-Forwarded-For` and the `Forwarded` element of a request without a chain.
    alone: Option<(HeaderValue, HeaderValue)>,
}

// === impl ClientHop ===

impl ClientHop {
    /// A mesh caller at `client`, named as it is ([`append_forwarded`]).
    pub fn new(client: IpAddr, proto: &'static str) -> Self {
        Self::naming(client, client, proto)
    }

    /// A client reaching the edge from `peer`, named as [`edge_forwarded`] names it (an
    /// IPv4-mapped address as IPv4).
    pub fn at_edge(peer: IpAddr, proto: &'static str) -> Self {
        Self::naming(peer, canonical(peer), proto)
    }

    fn naming(peer: IpAddr, client: IpAddr, proto: &'static str) -> Self {
        let mut h = HeaderMap::new();
        append_forwarded(&mut h, client, proto);
        let alone = match (h.remove(X_FORWARDED_FOR), h.remove(header::FORWARDED)) {
            (Some(xff), Some(forwarded)) => Some((xff, forwarded)),
            _ => None,
        };
        Self {
            peer,
            client,
            proto,
            alone,
        }
    }

    /// [`append_forwarded`] for this client.
    pub fn append(&self, headers: &mut HeaderMap) {
        let chained = has_name(headers, &X_FORWARDED_FOR)
            && headers
                .get(&X_FORWARDED_FOR)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|p| !p.is_empty());
        match &self.alone {
            Some((xff, forwarded)) if !chained => {
                headers.insert(X_FORWARDED_FOR, xff.clone());
                headers.append(header::FORWARDED, forwarded.clone());
            }
            _ => append_forwarded(headers, self.client, self.proto),
        }
    }

    /// [`edge_forwarded`] for this client's connection.
    pub fn rewrite_at_edge(&self, headers: &mut HeaderMap, trusted: &TrustedProxies) {
        edge_scrub(headers, self.peer, trusted, self.proto);
        self.append(headers);
    }
}

/// A header value formatted without a heap `String` when it fits in [`INLINE`] bytes (the
/// forwarding values nearly always do); longer ones fall back to `format!`.
fn stack_value(args: std::fmt::Arguments<'_>) -> Option<HeaderValue> {
    let mut inline = Inline::<INLINE>::new();
    if inline.push(args).is_some() {
        return inline.into_value();
    }
    HeaderValue::from_str(&std::fmt::format(args)).ok()
}

/// A header value whose bytes are reference-counted from the start. Why: a value made with
/// `HeaderValue::from_bytes` owns a plain buffer that `bytes` turns into a shared one (one more
/// allocation) the first time it is cloned, and the outbound side clones the headers of every
/// request its retry policy may replay. Values over [`INLINE`] bytes are made the plain way.
pub fn shared_value(bytes: &[u8]) -> Option<HeaderValue> {
    if bytes.len() > INLINE {
        return HeaderValue::from_bytes(bytes).ok();
    }
    let mut inline = Inline::<INLINE>::new();
    inline.buf[..bytes.len()].copy_from_slice(bytes);
    inline.len = bytes.len();
    inline.into_value()
}

const INLINE: usize = 128;

/// Header bytes held inline, so that the shared buffer is one allocation, like a plain one.
struct Inline<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> AsRef<[u8]> for Inline<N> {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<const N: usize> Inline<N> {
    fn new() -> Self {
        Self {
            buf: [0u8; N],
            len: 0,
        }
    }

    /// Format `args` after what is there; the range it took, or `None` when it did not fit.
    fn push(&mut self, args: std::fmt::Arguments<'_>) -> Option<std::ops::Range<usize>> {
        use std::io::Write;
        let start = self.len;
        let mut rest = &mut self.buf[start..];
        let room = rest.len();
        rest.write_fmt(args).ok()?;
        self.len = start + room - rest.len();
        Some(start..self.len)
    }

    /// Run `write` after what is there; the range it wrote, or `None` (and nothing kept)
    /// when it did not fit.
    fn extend(
        &mut self,
        write: impl FnOnce(&mut Self) -> Option<()>,
    ) -> Option<std::ops::Range<usize>> {
        let start = self.len;
        if write(self).is_none() {
            self.len = start;
            return None;
        }
        Some(start..self.len)
    }

    /// Append `bytes`, or `None` when they do not fit.
    fn put(&mut self, bytes: &[u8]) -> Option<()> {
        let end = self.len.checked_add(bytes.len())?;
        self.buf.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        Some(())
    }

    /// Append `ip` in dotted decimal, as its `Display` writes it.
    fn put_ipv4(&mut self, ip: std::net::Ipv4Addr) -> Option<()> {
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                self.put(b".")?;
            }
            let mut digits = [0u8; 3];
            let (mut n, mut at) = (octet, digits.len());
            loop {
                at -= 1;
                digits[at] = b'0' + n % 10;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            self.put(&digits[at..])?;
        }
        Some(())
    }

    fn into_value(self) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(self)).ok()
    }
}

/// Framing rules of RFC 9110/9112 that hyper lets through, checked before anything reads the
/// request: a single `Host` field (RFC 9112 section 3.2: 400), an HTTP/2 `Host` equal to
/// `:authority` (RFC 9113 section 8.3.1), and `Transfer-Encoding` naming only `chunked`
/// (RFC 9112 section 6.1: a server that does not implement a coding answers 501). Proxies
/// that disagree on framing are how requests get smuggled.
pub fn check_framing<B>(req: &Request<B>) -> Result<(), crate::error::ProxyError> {
    use crate::error::ProxyError;
    let headers = req.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    if let Some(host) = hosts.next() {
        if hosts.next().is_some() {
            return Err(ProxyError::BadRequest("more than one Host field"));
        }
        let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
        if req.version() == Version::HTTP_2
            && authority.is_some_and(|a| !a.eq_ignore_ascii_case(host.as_bytes()))
        {
            return Err(ProxyError::BadRequest("Host differs from :authority"));
        }
    }
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let codings = value
            .to_str()
            .map_err(|_| ProxyError::UnsupportedTransferCoding)?;
        if codings
            .split(',')
            .any(|c| !c.trim().eq_ignore_ascii_case("chunked"))
        {
            return Err(ProxyError::UnsupportedTransferCoding);
        }
    }
    Ok(())
}

/// Remove every `name=...` pair from the query (credentials read from the query must not
/// reach the app). The URI is left as is if nothing matches.
pub fn remove_query_param(uri: &mut http::Uri, name: &str) {
    let Some(query) = uri.query() else {
        return;
    };
    let is_param = |pair: &str| pair.split_once('=').map_or(pair, |(k, _)| k) == name;
    if !query.split('&').any(is_param) {
        return;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !is_param(p)).collect();
    let pq = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    // Built from a valid path and a subset of a valid query: always valid.
    if let Ok(pq) = http::uri::PathAndQuery::try_from(pq) {
        parts.path_and_query = Some(pq);
        if let Ok(u) = http::Uri::from_parts(parts) {
            *uri = u;
        }
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
    let host = strip_port(request_authority(req)?);
    (!host.is_empty()).then_some(host)
}

/// The full authority (`host[:port]`) the request names: the absolute-form or HTTP/2
/// authority first, then the `Host` header. Borrowed: read on every request, it must not
/// allocate.
pub fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri().authority().map(|a| a.as_str()).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
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

    /// The IPv4 values written byte by byte are exactly what `Display` writes.
    #[test]
    fn ipv4_forwarding_values_match_display() {
        let octets = [0u8, 1, 9, 10, 42, 99, 100, 127, 199, 200, 255];
        for (i, &a) in octets.iter().enumerate() {
            for &b in &octets[i..] {
                let ip = std::net::Ipv4Addr::new(a, b, 255 - a, b / 3);
                let mut h = HeaderMap::new();
                append_forwarded(&mut h, IpAddr::V4(ip), "https");
                assert_eq!(h[&X_FORWARDED_FOR], ip.to_string().as_str());
                assert_eq!(
                    h[header::FORWARDED],
                    format!("for={ip};proto=https").as_str()
                );
            }
        }
    }

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
    fn each_hop_by_hop_header_alone_is_removed_and_others_kept() {
        // `hop_by_hop_present` skips names by length: every listed name must have one of its.
        for name in &HOP_BY_HOP {
            assert!(
                matches!(name.as_str().len(), 2 | 7 | 10 | 16 | 17),
                "{name}"
            );
        }
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert("x-before", "1".parse().unwrap());
            h.append(name.clone(), "close".parse().unwrap());
            h.append(name.clone(), "x".parse().unwrap());
            h.insert("x-after", "2".parse().unwrap());
            strip_hop_by_hop(&mut h, false);
            assert!(h.get(name).is_none(), "{name} kept");
            assert_eq!(
                (h["x-before"].as_bytes(), h["x-after"].as_bytes()),
                (&b"1"[..], &b"2"[..])
            );
            assert_eq!(h.len(), 2, "{name}: {h:?}");
        }
        // None present: untouched.
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "a".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.remove(header::TE);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }

    /// The usual response's `Connection` (keep-alive or close tokens only) goes in one
    /// lookup; anything it names sends it down the general path.
    #[test]
    fn a_connection_naming_no_header_goes_alone() {
        for (value, keep_upgrade) in [
            ("keep-alive", false),
            ("Keep-Alive", true),
            ("close", false),
            (" keep-alive ,CLOSE", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
            h.append(header::CONNECTION, value.parse().unwrap());
            h.append(header::CONNECTION, "close".parse().unwrap());
            h.insert(header::CONTENT_LENGTH, "3".parse().unwrap());
            strip_hop_by_hop(&mut h, keep_upgrade);
            assert!(h.get(header::CONNECTION).is_none(), "{value:?} kept");
            assert_eq!(h.len(), 2, "{value:?}: {h:?}");
        }
        // A named header goes with it, and so does one named in a second `Connection` field.
        for values in [["keep-alive, x-secret", "close"], ["close", "x-secret"]] {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONNECTION, v.parse().unwrap());
            }
            h.insert("x-secret", "1".parse().unwrap());
            h.insert("x-keep", "1".parse().unwrap());
            strip_hop_by_hop(&mut h, false);
            assert!(h.get("x-secret").is_none() && h.get(header::CONNECTION).is_none());
            assert_eq!(h.len(), 1, "{values:?}: {h:?}");
        }
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

    /// A connection's `ClientHop` writes exactly what the per-request functions write, for
    /// every shape of incoming forwarding headers, and shares its values between requests.
    #[test]
    fn a_connection_s_hop_writes_what_the_functions_write() {
        let long = vec!["10.0.0.1"; 30].join(", ");
        let incoming: Vec<Vec<(&str, HeaderValue)>> = vec![
            vec![],
            vec![("x-forwarded-for", HeaderValue::from_static("10.0.0.1"))],
            vec![("x-forwarded-for", HeaderValue::from_static(""))],
            vec![("x-forwarded-for", HeaderValue::from_bytes(b"\xff").unwrap())],
            vec![("x-forwarded-for", HeaderValue::from_str(&long).unwrap())],
            vec![
                ("forwarded", HeaderValue::from_static("for=1.2.3.4")),
                ("x-real-ip", HeaderValue::from_static("1.2.3.4")),
                ("x-forwarded-proto", HeaderValue::from_static("https")),
            ],
        ];
        let trusted = TrustedProxies::parse(&["10.0.0.0/8", "::ffff:192.0.2.0/120"]).unwrap();
        let none = TrustedProxies::default();
        let peers = [
            "192.0.2.7",
            "10.1.1.1",
            "2001:db8::1",
            "::ffff:192.0.2.9",
            "::1",
        ];
        let build = |fields: &[(&str, HeaderValue)]| {
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(HeaderName::from_bytes(n.as_bytes()).unwrap(), v.clone());
            }
            h
        };
        for peer in peers {
            let peer: IpAddr = peer.parse().unwrap();
            for proto in ["http", "https"] {
                let mesh = ClientHop::new(peer, proto);
                let edge = ClientHop::at_edge(peer, proto);
                for fields in &incoming {
                    let (mut want, mut got) = (build(fields), build(fields));
                    append_forwarded(&mut want, peer, proto);
                    mesh.append(&mut got);
                    assert_eq!(got, want, "mesh hop {peer} {proto} {fields:?}");
                    for t in [&trusted, &none] {
                        let (mut want, mut got) = (build(fields), build(fields));
                        edge_forwarded(&mut want, peer, t, proto);
                        edge.rewrite_at_edge(&mut got, t);
                        assert_eq!(got, want, "edge hop {peer} {proto} {fields:?}");
                    }
                }
                // Two requests without a chain get the same bytes, not two copies.
                let (mut one, mut two) = (HeaderMap::new(), HeaderMap::new());
                mesh.append(&mut one);
                mesh.append(&mut two);
                for name in [X_FORWARDED_FOR, header::FORWARDED] {
                    let at = |h: &HeaderMap| h[&name].as_bytes().as_ptr();
                    assert_eq!(at(&one), at(&two), "{name} copied per request");
                }
            }
        }
    }

    #[test]
    fn a_long_forwarding_chain_is_appended_past_the_stack_buffer() {
        let prev = vec!["10.0.0.1"; 30].join(", ");
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", prev.parse().unwrap());
        append_forwarded(&mut h, "192.0.2.7".parse().unwrap(), "http");
        assert_eq!(h["x-forwarded-for"], format!("{prev}, 192.0.2.7").as_str());
        assert_eq!(h[header::FORWARDED], "for=192.0.2.7;proto=http");
    }

    #[test]
    fn an_untrusted_edge_client_cannot_supply_forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4".parse().unwrap());
        h.insert(
            header::FORWARDED,
            "for=1.2.3.4;proto=https".parse().unwrap(),
        );
        h.insert("x-real-ip", "1.2.3.4".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        let none = TrustedProxies::default();
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(none.client(peer, &h), peer);
        edge_forwarded(&mut h, peer, &none, "http");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(h.get("x-real-ip").is_none());
        let fwd: Vec<_> = h.get_all(header::FORWARDED).iter().collect();
        assert_eq!(fwd, vec!["for=203.0.113.9;proto=http"]);
    }

    #[test]
    fn a_trusted_proxy_s_chain_is_kept_and_read_from_the_right() {
        let trusted = TrustedProxies::parse(&["10.0.0.0/8", "192.0.2.1"]).unwrap();
        let peer: IpAddr = "10.1.1.1".parse().unwrap();
        let mut h = HeaderMap::new();
        // A client wrote 6.6.6.6; the load balancer 10.2.2.2 appended the real client.
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 198.51.100.7, 10.2.2.2".parse().unwrap(),
        );
        h.insert(header::FORWARDED, "for=198.51.100.7".parse().unwrap());
        assert_eq!(
            trusted.client(peer, &h),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        edge_forwarded(&mut h, peer, &trusted, "https");
        assert_eq!(
            h["x-forwarded-for"],
            "6.6.6.6, 198.51.100.7, 10.2.2.2, 10.1.1.1"
        );
        assert_eq!(h.get_all(header::FORWARDED).iter().count(), 2);
        // Garbage in the chain stops the walk at the last believable hop.
        h.insert("x-forwarded-for", "1.1.1.1, nonsense".parse().unwrap());
        assert_eq!(trusted.client(peer, &h), peer);
        // Mapped IPv4 peers match IPv4 ranges.
        assert!(trusted.contains("::ffff:10.9.9.9".parse().unwrap()));
        assert!(TrustedProxies::parse(&["10.0.0.0/33"]).is_err());
        assert!(TrustedProxies::parse(&["example.com"]).is_err());
    }

    #[test]
    fn query_params_are_removed() {
        let mut u: http::Uri = "/a/b?key=s3cret&x=1&key=again&keyx=2".parse().unwrap();
        remove_query_param(&mut u, "key");
        assert_eq!(u.to_string(), "/a/b?x=1&keyx=2");
        let mut u: http::Uri = "https://h/p?key=1".parse().unwrap();
        remove_query_param(&mut u, "key");
        assert_eq!(u.to_string(), "https://h/p");
        let mut u: http::Uri = "/p?y=1".parse().unwrap();
        remove_query_param(&mut u, "key");
        assert_eq!(u.to_string(), "/p?y=1");
    }

    #[test]
    fn framing_rules() {
        use crate::error::ProxyError;
        let ok = Request::get("/x")
            .header("host", "orders")
            .header("transfer-encoding", "chunked")
            .body(())
            .unwrap();
        assert!(check_framing(&ok).is_ok());
        let two_hosts = Request::get("/x")
            .header("host", "orders")
            .header("host", "payments")
            .body(())
            .unwrap();
        assert!(matches!(
            check_framing(&two_hosts),
            Err(ProxyError::BadRequest(_))
        ));
        for te in ["identity, chunked", "gzip, chunked", "chunked, chunked, x"] {
            let r = Request::post("/x")
                .header("host", "orders")
                .header("transfer-encoding", te)
                .body(())
                .unwrap();
            assert!(
                matches!(
                    check_framing(&r),
                    Err(ProxyError::UnsupportedTransferCoding)
                ),
                "{te}"
            );
        }
        let h2 = Request::get("https://orders/x")
            .version(Version::HTTP_2)
            .header("host", "payments")
            .body(())
            .unwrap();
        assert!(matches!(check_framing(&h2), Err(ProxyError::BadRequest(_))));
        let h2 = Request::get("https://orders/x")
            .version(Version::HTTP_2)
            .header("host", "Orders")
            .body(())
            .unwrap();
        assert!(check_framing(&h2).is_ok());
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
