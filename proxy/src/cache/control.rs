//! RFC 9111's rules for a shared cache, as pure functions over header maps and times: what may
//! be stored, for how long it is fresh, how old it is, and what a request accepts.
//!
//! Written here rather than taken from `http-cache-semantics` (which resolves from the
//! registry): that crate implements RFC 7234 without RFC 5861's `stale-while-revalidate` and
//! `stale-if-error`, keeps its freshness lifetime private (so a policy's default and maximum
//! TTL cannot be applied), rewrites `Date` on every hit, and clones both header maps into every
//! entry. The rules below are the few the cache needs, each tested on its own.

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// A `Cache-Control` field, parsed. Unknown directives are ignored (RFC 9111 5.2.3); a
/// malformed delta-seconds makes the directive count as present with value 0, which is the
/// conservative reading for every directive taking one (stale at once, no stale window).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub only_if_cached: bool,
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
}

/// Statuses a cache understands and may store (RFC 9110 15.1 "heuristically cacheable", less
/// 206: range requests are not cached).
const STORABLE: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

// === impl CacheControl ===

impl CacheControl {
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for v in headers.get_all(header::CACHE_CONTROL) {
            cc.add(v);
        }
        cc
    }

    /// One `Cache-Control` field's directives (a field may be sent more than once).
    ///
    /// On bytes, by hand (`,`, `=`, `"` and the spaces are ASCII): `str::split`, `trim` and
    /// `trim_matches` went through the generic pattern searchers and Unicode whitespace, about
    /// 600 instructions for one `max-age=600`. A name is matched by its length first, then
    /// compared ignoring case in place (no lower-case copy), and a delta-seconds is read as
    /// `u64`'s parse reads it (an optional `+`, digits, no overflow).
    pub fn add(&mut self, v: &HeaderValue) {
        // obs-text: the whole field is ignored.
        if v.to_str().is_err() {
            return;
        }
        for d in v.as_bytes().split(|b| *b == b',') {
            match d.iter().position(|b| *b == b'=') {
                Some(i) => self.directive(ows(&d[..i]), Some(trim_quotes(ows(&d[i + 1..])))),
                None => self.directive(ows(d), None),
            }
        }
    }

    fn directive(&mut self, name: &[u8], arg: Option<&[u8]>) {
        let is = |known: &[u8]| name.eq_ignore_ascii_case(known);
        // A malformed or missing value counts as 0 (see the type's doc).
        let secs = || Some(arg.and_then(delta_seconds).unwrap_or(0));
        match name.len() {
            6 if is(b"public") => self.public = true,
            7 if is(b"max-age") => self.max_age = secs(),
            7 if is(b"private") => self.private = true,
            8 if is(b"s-maxage") => self.s_maxage = secs(),
            8 if is(b"no-store") => self.no_store = true,
            8 if is(b"no-cache") => self.no_cache = true,
            // Without a value, any staleness is accepted.
            9 if is(b"max-stale") => {
                self.max_stale = Some(arg.map_or(u64::MAX, |a| delta_seconds(a).unwrap_or(0)));
            }
            9 if is(b"min-fresh") => self.min_fresh = secs(),
            14 if is(b"only-if-cached") => self.only_if_cached = true,
            14 if is(b"stale-if-error") => self.stale_if_error = secs(),
            15 if is(b"must-revalidate") => self.must_revalidate = true,
            16 if is(b"proxy-revalidate") => self.proxy_revalidate = true,
            22 if is(b"stale-while-revalidate") => self.stale_while_revalidate = secs(),
            _ => {}
        }
    }

    /// The origin forbids serving this response stale by any means (RFC 9111 5.2.2.2, 5.2.2.8,
    /// and `no-cache`, which forbids reuse without validation at all).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.no_cache
    }
}

/// `s` without leading and trailing spaces and tabs (RFC 9110 OWS).
fn ows(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|c| *c != b' ' && *c != b'\t')
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|c| *c != b' ' && *c != b'\t')
        .map_or(start, |i| i + 1);
    s.get(start..end).unwrap_or_default()
}

/// `s` without any leading and trailing `"`.
fn trim_quotes(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|x| *x != b'"').unwrap_or(s.len());
    let end = s.iter().rposition(|x| *x != b'"').map_or(start, |i| i + 1);
    s.get(start..end).unwrap_or_default()
}

/// A delta-seconds as `u64::from_str` reads it: an optional `+`, then at least one digit and
/// nothing else; `None` when malformed or too large.
fn delta_seconds(s: &[u8]) -> Option<u64> {
    let digits = s.strip_prefix(b"+").unwrap_or(s);
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, c| {
        let d = c.wrapping_sub(b'0');
        (d <= 9).then_some(())?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// Why a response is not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStored {
    Method,
    Status,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    NoFreshness,
    /// The response has a `Vary`, and the request's headers were not kept to build its
    /// variant key: they are copied only once the store has seen a `Vary` (most stores never
    /// do, and the copy is a large share of a miss), so the first such response is not stored.
    VaryUnseen,
    /// Its key was asked for fewer than the policy's `min_uses` times (and nobody waits for
    /// it).
    TooFewUses,
}

/// What storability needs of the request, taken before it goes upstream (its headers are not
/// kept for this).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Asked {
    /// `Cache-Control: no-store`.
    pub no_store: bool,
    pub authorization: bool,
}

impl Asked {
    /// `cc` is the request's `Cache-Control`, already parsed.
    pub fn of(req: &HeaderMap, cc: &CacheControl) -> Self {
        Self {
            no_store: cc.no_store,
            authorization: req.contains_key(header::AUTHORIZATION),
        }
    }
}

/// What planning needs of a request's header fields, in one walk over them (a request has a
/// handful; each lookup by name hashed it and probed the map, five per miss).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// `Range` or `Upgrade`: passed straight through.
    pub range_or_upgrade: bool,
    /// Some `Cache-Control` (parsed only then).
    pub cache_control: bool,
    pub authorization: bool,
}

impl RequestFacts {
    pub fn of(h: &HeaderMap) -> Self {
        let mut f = Self::default();
        for name in h.keys() {
            match name.as_str() {
                "range" | "upgrade" => f.range_or_upgrade = true,
                "cache-control" => f.cache_control = true,
                "authorization" => f.authorization = true,
                _ => {}
            }
        }
        f
    }
}

/// `Surrogate-Key`: space-separated tags a purge can name.
const SURROGATE_KEY: &str = "surrogate-key";
/// Most tags kept per entry.
const MAX_TAGS: usize = 32;

/// What the cache needs of a response's header fields, learnt in one walk over them: its
/// `Cache-Control`, the fields storability and freshness look at, its `Vary` names and tags,
/// and the size of the fields an entry would store. One walk with a match on each name
/// replaced a dozen lookups in the response's map and more in the entry's copy (hashing the
/// name and probing each time).
#[derive(Debug, Default)]
pub struct Facts<'a> {
    pub cc: CacheControl,
    /// The lower-case names of `Vary`, in order.
    pub vary: Vec<String>,
    /// `Surrogate-Key` tags.
    pub tags: Vec<String>,
    pub set_cookie: bool,
    /// An `ETag` or a `Last-Modified`, which a revalidation can send back.
    pub validators: bool,
    /// The first value of each (what a map's `get` returns).
    pub expires: Option<&'a HeaderValue>,
    pub date: Option<&'a HeaderValue>,
    pub age: Option<&'a HeaderValue>,
    /// `Content-Length` (the first; `None` when it does not parse).
    pub length: Option<u64>,
    /// The fields an entry stores (all but [`not_stored`] ones): how many, and their values'
    /// bytes.
    pub kept: usize,
    pub kept_len: usize,
}

impl<'a> Facts<'a> {
    pub fn of(fields: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>) -> Self {
        let mut f = Self::default();
        for (name, v) in fields {
            // The name's string: a table lookup for a standard name, then a switch on its
            // length and one comparison.
            let stored = match name.as_str() {
                "cache-control" => {
                    f.cc.add(v);
                    true
                }
                "set-cookie" => {
                    f.set_cookie = true;
                    true
                }
                "etag" | "last-modified" => {
                    f.validators = true;
                    true
                }
                "expires" => {
                    f.expires.get_or_insert(v);
                    true
                }
                "date" => {
                    f.date.get_or_insert(v);
                    true
                }
                "content-length" => {
                    if f.length.is_none() {
                        f.length = v.to_str().ok().and_then(|s| s.trim().parse().ok());
                    }
                    true
                }
                "vary" => {
                    push_vary(&mut f.vary, v);
                    true
                }
                SURROGATE_KEY => {
                    push_tags(&mut f.tags, v);
                    true
                }
                "age" => {
                    f.age.get_or_insert(v);
                    false
                }
                n => !not_stored(n),
            };
            if stored {
                f.kept += 1;
                f.kept_len += v.len();
            }
        }
        f
    }

    /// Whether an entry stores this field (see [`not_stored`]).
    pub fn keeps(name: &HeaderName) -> bool {
        !not_stored(name.as_str())
    }
}

/// Never stored: per-hop, computed per hit, or this sidecar's own. A match on the name's
/// string is a length switch and one comparison, where comparing `HeaderName`s one by one
/// cost about 180 instructions per header, three times per stored response.
pub fn not_stored(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-authenticate"
            | "age"
            | "x-cache-status"
    )
}

fn push_vary(out: &mut Vec<String>, v: &HeaderValue) {
    let Ok(v) = v.to_str() else { return };
    let names = v.split(',').map(|n| n.trim().to_ascii_lowercase());
    out.extend(names.filter(|n| !n.is_empty()));
}

fn push_tags(out: &mut Vec<String>, v: &HeaderValue) {
    let Ok(v) = v.to_str() else { return };
    let room = MAX_TAGS.saturating_sub(out.len());
    out.extend(v.split_ascii_whitespace().take(room).map(str::to_string));
}

/// RFC 9111 section 3 for a shared cache, a little stricter: a `Set-Cookie` response is never
/// shared, and a response without explicit freshness is stored only when the policy gives a
/// default TTL (no heuristic freshness from `Last-Modified`).
pub fn storable(
    method: &Method,
    req: Asked,
    status: StatusCode,
    resp: &Facts<'_>,
    has_default_ttl: bool,
) -> Result<(), NotStored> {
    let cc = &resp.cc;
    if method != Method::GET {
        return Err(NotStored::Method);
    }
    if !STORABLE.contains(&status.as_u16()) {
        return Err(NotStored::Status);
    }
    if cc.no_store || req.no_store {
        return Err(NotStored::NoStore);
    }
    if cc.private {
        return Err(NotStored::Private);
    }
    // RFC 9111 3.5: only these directives let a shared cache reuse an authorized response.
    if req.authorization && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NotStored::Authorization);
    }
    if resp.set_cookie {
        return Err(NotStored::SetCookie);
    }
    if resp.vary.iter().any(|n| n == "*") {
        return Err(NotStored::VaryStar);
    }
    let explicit = cc.max_age.is_some() || cc.s_maxage.is_some() || resp.expires.is_some();
    let validated = cc.no_cache && resp.validators;
    if !(explicit || has_default_ttl || validated) {
        return Err(NotStored::NoFreshness);
    }
    Ok(())
}

/// RFC 9111 4.2.1 for a shared cache: `s-maxage`, else `max-age`, else `Expires - Date`
/// (an invalid `Expires` means already expired), else the policy's default; capped at
/// `max_ttl`. `no-cache` makes every reuse a revalidation.
pub fn lifetime(
    resp: &Facts<'_>,
    default_ttl: Option<Duration>,
    max_ttl: Duration,
    response_time: SystemTime,
) -> Duration {
    let cc = &resp.cc;
    if cc.no_cache {
        return Duration::ZERO;
    }
    let explicit = cc
        .s_maxage
        .or(cc.max_age)
        .map(Duration::from_secs)
        .or_else(|| {
            let expires = resp.expires?;
            let Some(expires) = http_date(expires) else {
                return Some(Duration::ZERO);
            };
            let date = resp.date.and_then(http_date).unwrap_or(response_time);
            Some(expires.duration_since(date).unwrap_or_default())
        });
    explicit.or(default_ttl).unwrap_or_default().min(max_ttl)
}

/// RFC 9111 4.2.3's `corrected_initial_age`: the origin's (and upstream caches') `Age`, plus
/// the time the response took to arrive, or the apparent age from `Date` when larger.
pub fn initial_age(
    resp: &Facts<'_>,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let age_value = resp
        .age
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs);
    // `Date` has a resolution of one second: the fraction it truncates is not age (counted,
    // it would make every response up to a second old on arrival).
    let apparent = resp
        .date
        .and_then(http_date)
        .and_then(|d| response_time.duration_since(d).ok())
        .unwrap_or_default()
        .saturating_sub(Duration::from_secs(1));
    let delay = response_time
        .duration_since(request_time)
        .unwrap_or_default();
    apparent.max(age_value + delay)
}

/// An HTTP-date. The last IMF-fixdate parsed on this thread is remembered: an origin's `Date`
/// changes once a second, and parsing it took 640 instructions, 3 % of a miss.
pub fn http_date(v: &http::HeaderValue) -> Option<SystemTime> {
    thread_local! {
        static LAST: std::cell::Cell<Option<([u8; 29], SystemTime)>> = const { std::cell::Cell::new(None) };
    }
    let bytes = v.as_bytes();
    let fixed: Option<[u8; 29]> = bytes.try_into().ok();
    if let (Some(f), Some((last, t))) = (fixed, LAST.get()) {
        if f == last {
            return Some(t);
        }
    }
    let t = httpdate::parse_http_date(v.to_str().ok()?).ok()?;
    if let Some(f) = fixed {
        LAST.set(Some((f, t)));
    }
    Some(t)
}

/// How a stored response may answer a request, given its age and the request's own
/// directives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// Fresh, and the request accepts it.
    Fresh,
    /// Stale, within the origin's `stale-while-revalidate` window (or the client's
    /// `max-stale`): serve it and revalidate in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first.
    Revalidate,
}

/// RFC 9111 4.2 and 5.2.1, RFC 5861 section 3.
pub fn usable(age: Duration, lifetime: Duration, stored: &CacheControl, req: &CacheControl) -> Use {
    let secs = |s: u64| Duration::from_secs(s);
    if req.no_cache || req.max_age.is_some_and(|m| age > secs(m)) {
        return Use::Revalidate;
    }
    let left = lifetime.saturating_sub(age);
    if age < lifetime && req.min_fresh.is_none_or(|m| left >= secs(m)) {
        return Use::Fresh;
    }
    if stored.forbids_stale() {
        return Use::Revalidate;
    }
    let stale_for = age.saturating_sub(lifetime);
    if req.max_stale.is_some_and(|m| stale_for <= secs(m)) {
        return Use::Fresh;
    }
    if stored
        .stale_while_revalidate
        .is_some_and(|w| stale_for <= secs(w))
    {
        return Use::StaleWhileRevalidate;
    }
    Use::Revalidate
}

/// A stale response may answer an origin error only within the origin's `stale-if-error`
/// window (RFC 5861 section 4), never when it forbids stale use.
pub fn stale_if_error(age: Duration, lifetime: Duration, stored: &CacheControl) -> bool {
    !stored.forbids_stale()
        && stored
            .stale_if_error
            .is_some_and(|w| age.saturating_sub(lifetime) <= Duration::from_secs(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    fn cc(v: &str) -> CacheControl {
        CacheControl::parse(&h(&[("cache-control", v)]))
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn parses_directives_case_insensitively_and_malformed_values_conservatively() {
        let c = cc("Max-Age=60, s-maxage=\"30\", must-revalidate, stale-while-revalidate=x");
        assert_eq!(c.max_age, Some(60));
        assert_eq!(c.s_maxage, Some(30));
        assert!(c.must_revalidate);
        assert_eq!(c.stale_while_revalidate, Some(0));
        assert_eq!(cc("max-age=-1").max_age, Some(0));
        assert_eq!(cc("max-stale").max_stale, Some(u64::MAX));
        assert_eq!(cc(",,;;garbage=,").max_age, None);
        // Spaces and tabs around names, values and quotes; repeated quotes; an unknown long
        // directive; a name longer than any known one ignored, the rest still read.
        let c =
            cc(" \tS-MAXAGE = \"\"7\"\" ,\tprivate\t, x-a-very-long-unknown-directive=1, no-store");
        assert_eq!((c.s_maxage, c.private, c.no_store), (Some(7), true, true));
        assert_eq!(cc("max-age=+5").max_age, Some(5), "as u64's parse");
        assert_eq!(cc("max-age=").max_age, Some(0));
        assert_eq!(cc("max-age").max_age, Some(0));
        assert!(cc("=5, public").public);
        assert_eq!(cc("max-age=99999999999999999999999").max_age, Some(0));
        assert_eq!(cc("max-age=18446744073709551615").max_age, Some(u64::MAX));
        assert_eq!(cc("max-age=18446744073709551616").max_age, Some(0));
        assert_eq!(cc("max-age=+").max_age, Some(0));
        assert_eq!(cc("max-age=1 2").max_age, Some(0));
        assert_eq!(cc("max-stale=oops").max_stale, Some(0));
        assert_eq!(cc("MAX-STALE").max_stale, Some(u64::MAX));
        // Same length as known names, not one of them.
        let c = cc("max-agf=1, privatf, s-maxagf=1, only-if-cachee");
        assert_eq!(c, CacheControl::default());
        let c = cc("Only-If-Cached, STALE-IF-ERROR=9, Proxy-Revalidate, min-fresh=3");
        assert!(c.only_if_cached && c.proxy_revalidate);
        assert_eq!((c.stale_if_error, c.min_fresh), (Some(9), Some(3)));
        let mut several = CacheControl::default();
        several.add(&http::HeaderValue::from_static("max-age=1"));
        several.add(&http::HeaderValue::from_static("must-revalidate"));
        assert_eq!((several.max_age, several.must_revalidate), (Some(1), true));
        // obs-text: the whole field is ignored, as before.
        let mut odd = CacheControl::default();
        odd.add(&http::HeaderValue::from_bytes(b"max-age=5, \xe9").unwrap());
        assert_eq!(odd.max_age, None);
    }

    #[test]
    fn s_maxage_beats_max_age_beats_expires_capped_by_max_ttl() {
        let now = SystemTime::UNIX_EPOCH + S(1_000_000);
        let r = h(&[("cache-control", "max-age=60, s-maxage=10")]);
        assert_eq!(lifetime(&Facts::of(r.iter()), None, S(3600), now), S(10));
        let r = h(&[("cache-control", "max-age=7200")]);
        assert_eq!(lifetime(&Facts::of(r.iter()), None, S(3600), now), S(3600));
        let date = httpdate::fmt_http_date(now);
        let exp = httpdate::fmt_http_date(now + S(120));
        let r = h(&[("date", &date), ("expires", &exp)]);
        assert_eq!(lifetime(&Facts::of(r.iter()), None, S(3600), now), S(120));
        let r = h(&[("expires", "0")]);
        assert_eq!(
            lifetime(&Facts::of(r.iter()), Some(S(50)), S(3600), now),
            S(0)
        );
        assert_eq!(
            lifetime(&Facts::default(), Some(S(50)), S(3600), now),
            S(50)
        );
        let r = h(&[("cache-control", "no-cache, max-age=60")]);
        assert_eq!(lifetime(&Facts::of(r.iter()), None, S(3600), now), S(0));
    }

    #[test]
    fn the_origins_age_counts() {
        let t0 = SystemTime::UNIX_EPOCH + S(1_000_000);
        let r = h(&[("age", "100")]);
        assert_eq!(initial_age(&Facts::of(r.iter()), t0, t0 + S(2)), S(102));
        let r = h(&[("date", &httpdate::fmt_http_date(t0 - S(30)))]);
        assert_eq!(
            initial_age(&Facts::of(r.iter()), t0, t0),
            S(29),
            "less Date's one-second resolution"
        );
        let r = h(&[("date", &httpdate::fmt_http_date(t0))]);
        assert_eq!(
            initial_age(&Facts::of(r.iter()), t0, t0 + Duration::from_millis(999)),
            Duration::from_millis(999)
        );
    }

    #[test]
    fn http_dates_parse_the_same_when_remembered() {
        let v = |s: &str| http::HeaderValue::from_str(s).unwrap();
        let a = v("Tue, 01 Dec 2026 10:00:00 GMT");
        let b = v("Tue, 01 Dec 2026 10:00:01 GMT");
        let ta = http_date(&a).unwrap();
        for _ in 0..2 {
            assert_eq!(http_date(&a), Some(ta));
            assert_eq!(http_date(&b), Some(ta + Duration::from_secs(1)));
        }
        // Same length as a remembered date, but malformed: never taken for it.
        assert_eq!(http_date(&v("Tue, 01 Dec 2026 10:00:0x GMT")), None);
        assert!(http_date(&v("Sunday, 06-Nov-94 08:49:37 GMT")).is_some());
    }

    #[test]
    fn one_walk_learns_what_storing_needs() {
        let r = h(&[
            ("cache-control", "max-age=5"),
            ("cache-control", "Public"),
            ("vary", "Accept-Encoding, , X-Tenant"),
            ("surrogate-key", "a  b"),
            ("etag", "\"v\""),
            ("date", "Tue, 01 Dec 2026 10:00:00 GMT"),
            ("date", "Tue, 01 Dec 2026 10:00:09 GMT"),
            ("age", "7"),
            ("connection", "close"),
            ("x-cache-status", "HIT"),
            ("content-type", "text/plain"),
        ]);
        let f = Facts::of(r.iter());
        assert_eq!((f.cc.max_age, f.cc.public), (Some(5), true));
        assert_eq!(f.vary, ["accept-encoding", "x-tenant"]);
        assert_eq!(f.tags, ["a", "b"]);
        assert!(f.validators && !f.set_cookie && f.expires.is_none());
        assert_eq!(
            f.date.unwrap(),
            "Tue, 01 Dec 2026 10:00:00 GMT",
            "the first, as get"
        );
        assert_eq!(f.age.unwrap(), "7");
        // Age, Connection and our own status are not stored.
        assert_eq!(f.kept, 8);
        let len: usize = r
            .iter()
            .filter(|(n, _)| Facts::keeps(n))
            .map(|(_, v)| v.len())
            .sum();
        assert_eq!(f.kept_len, len);
        // At most 32 tags, however many fields carry them.
        let many: Vec<String> = (0..40).map(|i| format!("t{i}")).collect();
        let r = h(&[
            ("surrogate-key", &many[..20].join(" ")),
            ("surrogate-key", &many[20..].join(" ")),
        ]);
        assert_eq!(Facts::of(r.iter()).tags, many[..32]);
    }

    #[test]
    fn shared_cache_storability() {
        let get = Method::GET;
        let ok = StatusCode::OK;
        let st = |req: &[(&str, &str)], resp: &[(&str, &str)]| {
            let (q, r) = (h(req), h(resp));
            let asked = Asked::of(&q, &CacheControl::parse(&q));
            storable(&get, asked, ok, &Facts::of(r.iter()), false)
        };
        assert_eq!(st(&[], &[("cache-control", "max-age=5")]), Ok(()));
        assert_eq!(
            st(&[], &[("cache-control", "private, max-age=5")]),
            Err(NotStored::Private)
        );
        assert_eq!(
            st(&[], &[("cache-control", "no-store, max-age=5")]),
            Err(NotStored::NoStore)
        );
        assert_eq!(
            st(
                &[("cache-control", "no-store")],
                &[("cache-control", "max-age=5")]
            ),
            Err(NotStored::NoStore)
        );
        let auth = [("authorization", "Bearer x")];
        assert_eq!(
            st(&auth, &[("cache-control", "max-age=5")]),
            Err(NotStored::Authorization)
        );
        assert_eq!(st(&auth, &[("cache-control", "public, max-age=5")]), Ok(()));
        assert_eq!(st(&auth, &[("cache-control", "s-maxage=5")]), Ok(()));
        assert_eq!(
            st(&[], &[("cache-control", "max-age=5"), ("vary", "*")]),
            Err(NotStored::VaryStar)
        );
        assert_eq!(
            st(
                &[],
                &[("cache-control", "max-age=5"), ("set-cookie", "a=b")]
            ),
            Err(NotStored::SetCookie)
        );
        assert_eq!(st(&[], &[]), Err(NotStored::NoFreshness));
        assert_eq!(
            st(&[], &[("cache-control", "no-cache"), ("etag", "\"a\"")]),
            Ok(())
        );
        let r = h(&[("cache-control", "max-age=5")]);
        let r = Facts::of(r.iter());
        assert_eq!(
            storable(&Method::POST, Asked::default(), ok, &r, true),
            Err(NotStored::Method)
        );
        assert_eq!(
            storable(
                &get,
                Asked::default(),
                StatusCode::INTERNAL_SERVER_ERROR,
                &r,
                true
            ),
            Err(NotStored::Status)
        );
        assert_eq!(
            storable(&get, Asked::default(), ok, &Facts::default(), true),
            Ok(())
        );
    }

    #[test]
    fn fresh_then_stale_within_the_origins_windows_only() {
        let none = CacheControl::default();
        let swr = cc("max-age=10, stale-while-revalidate=5, stale-if-error=20");
        assert_eq!(usable(S(9), S(10), &swr, &none), Use::Fresh);
        assert_eq!(usable(S(14), S(10), &swr, &none), Use::StaleWhileRevalidate);
        assert_eq!(usable(S(16), S(10), &swr, &none), Use::Revalidate);
        assert!(stale_if_error(S(29), S(10), &swr));
        assert!(!stale_if_error(S(31), S(10), &swr));
        // No permission from the origin: never stale.
        assert_eq!(usable(S(11), S(10), &none, &none), Use::Revalidate);
        assert!(!stale_if_error(S(11), S(10), &none));
        // must-revalidate overrides the stale windows.
        let mr = cc("max-age=10, must-revalidate, stale-while-revalidate=5, stale-if-error=20");
        assert_eq!(usable(S(11), S(10), &mr, &none), Use::Revalidate);
        assert!(!stale_if_error(S(11), S(10), &mr));
    }

    #[test]
    fn request_directives() {
        let stored = cc("max-age=100");
        assert_eq!(
            usable(S(5), S(100), &stored, &cc("no-cache")),
            Use::Revalidate
        );
        assert_eq!(
            usable(S(50), S(100), &stored, &cc("max-age=10")),
            Use::Revalidate
        );
        assert_eq!(
            usable(S(50), S(100), &stored, &cc("min-fresh=60")),
            Use::Revalidate
        );
        assert_eq!(
            usable(S(105), S(100), &stored, &cc("max-stale=10")),
            Use::Fresh
        );
        assert_eq!(
            usable(S(105), S(100), &stored, &cc("max-stale=1")),
            Use::Revalidate
        );
    }
}
