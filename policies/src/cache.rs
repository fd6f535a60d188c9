//! Response caching on a service's inbound side (its sidecars, or its ingress listeners when the
//! service is an ingress gateway), and the purge record that empties it mesh-wide.
//!
//! A `CachePolicy` only enables caching and bounds it: what may be stored and for how long is
//! decided by the origin's response headers under RFC 9111's rules for a shared cache (see
//! `docs/caching.md`). The policy's `default_ttl` applies only to responses that carry no
//! freshness information at all, and `max_ttl` caps whatever the origin asked for.
//!
//! A `CachePurge` is not written by operators as a document: `mesh-agent cache purge` writes one
//! per service (the latest purge replaces the previous record), and every sidecar of the service
//! applies it from its watch.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::RouteMatch;

/// Longest `max_ttl` (and `default_ttl`): one year, RFC 9111's advice for "never expires".
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Smallest and largest memory bound of one policy's store.
pub const MIN_CACHE_BYTES: u64 = 64 * 1024;
pub const MAX_CACHE_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// Most query parameters and headers a key may name.
pub const MAX_KEY_PARTS: usize = 16;
/// Longest wait of a request for another's identical miss.
pub const MAX_COALESCE_WAIT: Duration = Duration::from_secs(60);
/// Largest `min_uses`: uses are counted in 4-bit counters (TinyLFU's), which saturate at 15.
pub const MAX_CACHE_MIN_USES: u32 = 15;
/// Longest purge selector (prefix, key or tag).
pub const MAX_PURGE_SELECTOR: usize = 1024;
/// Smallest and largest bound of one policy's disk tier.
pub const MIN_CACHE_DISK_BYTES: u64 = 1024 * 1024;
pub const MAX_CACHE_DISK_BYTES: u64 = 16 * 1024 * 1024 * 1024 * 1024;
/// Largest object the disk tier takes when the policy names no limit (a quarter of the
/// tier's bound when that is smaller, see [`CacheDiskSpec::object_limit`]).
pub const DEFAULT_CACHE_DISK_OBJECT: u64 = 64 * 1024 * 1024;
/// Longest disk tier path.
pub const MAX_CACHE_DISK_PATH: usize = 1024;

/// `CachePolicy`: cache the responses a service's sidecars receive from their app (or its
/// ingress receives from the mesh).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePolicySpec {
    /// The service whose sidecars (or ingress listeners) cache their inbound responses.
    pub service: String,
    /// `false` keeps the policy but stores and serves nothing (a switch without losing it).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Only requests matching this route are cached; all requests of `methods` when absent.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteMatch>,
    /// Only requests an ingress gateway routes by this HTTPRoute (and rule). Absent: every
    /// request of the service. A policy naming a route takes precedence over one that does
    /// not (see [`CachePolicySpec::precedence`]); on a sidecar's inbound side, where no
    /// HTTPRoute decides, it caches nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<CacheRouteRef>,
    /// Cached methods: `GET` and/or `HEAD` (the only methods whose responses are reused).
    #[serde(default = "get_head")]
    pub methods: Vec<String>,
    /// Freshness of a response that carries none (no `max-age`, `s-maxage` or `Expires`).
    /// Absent: such responses are not stored.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub default_ttl: Option<Duration>,
    /// Cap on any response's freshness lifetime.
    #[serde(default = "one_day", with = "humantime_serde")]
    pub max_ttl: Duration,
    /// What distinguishes two entries besides method, authority and path.
    #[serde(default)]
    pub key: CacheKeySpec,
    /// Entries are shared between consumers. Off (the default), each authenticated consumer
    /// has its own entries, so one consumer never receives a response made for another.
    #[serde(default)]
    pub public: bool,
    /// Memory bound of the store, in bytes (per sidecar; headers and bodies counted).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Larger responses are streamed through without being stored.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// How long a request waits for an identical request already on its way upstream before
    /// going upstream itself.
    #[serde(default = "default_coalesce_wait", with = "humantime_serde")]
    pub coalesce_wait: Duration,
    /// A response is stored only at the `min_uses`-th request for its key (nginx's
    /// `proxy_cache_min_uses`, "cache on second hit"): keys asked for once neither take an
    /// entry nor evict a popular one. 1 (the default) stores at the first request. Uses are
    /// counted in a bounded sketch, so a key asked for rarely may be forgotten first.
    #[serde(default = "one_use", skip_serializing_if = "is_one_use")]
    pub min_uses: u32,
    /// A second tier on local disk, for responses too large for memory and entries the
    /// memory bound evicts. Absent: memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<CacheDiskSpec>,
}

/// The disk tier of a `CachePolicy` (per sidecar, like the memory bound).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheDiskSpec {
    /// An absolute directory the sidecar may write (an `emptyDir` of its own): the sidecar
    /// keeps its files in a subdirectory named `trellis-cache.<run>` and removes only such
    /// subdirectories left by earlier runs, never anything else there.
    pub path: String,
    /// Bound of the tier's files, in bytes (headers, bodies, checksums, and the files being
    /// written).
    pub max_bytes: u64,
    /// Larger responses are not written to disk. Absent: 64 MiB, or a quarter of
    /// `max_bytes` when that is smaller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_object_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheKeySpec {
    /// Only these query parameters are part of the key (sorted, so `?a=1&b=2` and `?b=2&a=1`
    /// share an entry). Absent: the whole query string as sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Vec<String>>,
    /// Request headers (lower-case names) that are part of the key, on top of the origin's
    /// `Vary`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// The HTTPRoute (and optionally one of its rules) whose requests a policy caches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRouteRef {
    /// The HTTPRoute's `metadata.name`.
    pub name: String,
    /// One rule by the name its metrics carry (`rules[].name`, or `<route>-<index>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// `CachePurge`: drop a service's cached responses on every one of its sidecars.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CachePurgeSpec {
    pub service: String,
    /// Distinguishes one purge from the next one of the same selector (the CLI writes the
    /// time in nanoseconds); a sidecar applies each id once.
    pub id: u64,
    /// Exactly one of `prefix`, `key` and `tag`; none purges everything of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// A path with its query (`/a?b=1`): every entry for it (any authority, method, variant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Entries whose response named this tag in `Surrogate-Key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The id of the record this one replaced (the CLI reads it before writing). Only the
    /// latest record of a service is kept, so a sidecar that last applied another one (it was
    /// disconnected, or two purges landed within one snapshot) missed at least one purge
    /// whose selector it cannot know: it purges everything of the service instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<u64>,
}

fn yes() -> bool {
    true
}

fn get_head() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}

fn one_day() -> Duration {
    Duration::from_secs(24 * 3600)
}

fn default_max_bytes() -> u64 {
    64 * 1024 * 1024
}

fn default_max_object_bytes() -> u64 {
    1024 * 1024
}

fn one_use() -> u32 {
    1
}

fn is_one_use(n: &u32) -> bool {
    *n == 1
}

fn default_coalesce_wait() -> Duration {
    Duration::from_secs(5)
}

// === impl CachePolicySpec ===

impl CachePolicySpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        if let Some(r) = &self.route {
            r.validate().map_err(|m| format!("match.{m}"))?;
        }
        if let Some(r) = &self.http_route {
            r.validate().map_err(|m| format!("http_route.{m}"))?;
        }
        if self.methods.is_empty() {
            return Err("methods: name GET and/or HEAD".into());
        }
        if let Some(m) = self
            .methods
            .iter()
            .find(|m| !matches!(m.as_str(), "GET" | "HEAD"))
        {
            return Err(format!(
                "methods: `{m}` is not cacheable; only GET and HEAD responses are reused"
            ));
        }
        self.validate_ttls()?;
        if !(MIN_CACHE_BYTES..=MAX_CACHE_BYTES).contains(&self.max_bytes) {
            return Err(format!(
                "max_bytes: must be between {MIN_CACHE_BYTES} and {MAX_CACHE_BYTES}"
            ));
        }
        if self.max_object_bytes == 0 || self.max_object_bytes > self.max_bytes / 4 {
            return Err(
                "max_object_bytes: must be between 1 and a quarter of max_bytes (a larger object would evict most of the store)".into(),
            );
        }
        if self.coalesce_wait > MAX_COALESCE_WAIT {
            return Err(format!(
                "coalesce_wait: must be at most {}s",
                MAX_COALESCE_WAIT.as_secs()
            ));
        }
        if !(1..=MAX_CACHE_MIN_USES).contains(&self.min_uses) {
            return Err(format!(
                "min_uses: must be between 1 (store at the first request) and {MAX_CACHE_MIN_USES} (uses are counted up to {MAX_CACHE_MIN_USES})"
            ));
        }
        if let Some(d) = &self.disk {
            d.validate().map_err(|m| format!("disk.{m}"))?;
        }
        self.key.validate().map_err(|m| format!("key.{m}"))
    }

    fn validate_ttls(&self) -> Result<(), String> {
        if self.max_ttl.is_zero() || self.max_ttl > MAX_CACHE_TTL {
            return Err("max_ttl: must be between 1s and 365d".into());
        }
        match self.default_ttl {
            Some(d) if d.is_zero() => {
                Err("default_ttl: must be greater than zero (omit it to store only responses with explicit freshness)".into())
            }
            Some(d) if d > self.max_ttl => Err("default_ttl: must be at most max_ttl".into()),
            _ => Ok(()),
        }
    }

    /// Does this policy cache a request with this method and path, routed (at an ingress) by
    /// `route`: the HTTPRoute's name and its rule's?
    pub fn applies(&self, method: &str, path: &str, route: Option<(&str, &str)>) -> bool {
        self.enabled
            && self.methods.iter().any(|m| m == method)
            && self.route.as_ref().is_none_or(|r| r.matches(method, path))
            && self.http_route.as_ref().is_none_or(|r| r.selects(route))
    }

    /// Which of a service's policies decides first when several apply to a request: one
    /// naming a rule of an HTTPRoute (0), then one naming an HTTPRoute (1), then one for the
    /// whole service (2); policy names order the rest.
    pub fn precedence(&self) -> u8 {
        match &self.http_route {
            Some(CacheRouteRef { rule: Some(_), .. }) => 0,
            Some(_) => 1,
            None => 2,
        }
    }
}

// === impl CacheDiskSpec ===

impl CacheDiskSpec {
    fn validate(&self) -> Result<(), String> {
        let p = std::path::Path::new(&self.path);
        if !p.is_absolute()
            || self.path.len() > MAX_CACHE_DISK_PATH
            || self.path.contains('\0')
            || p.parent().is_none()
        {
            return Err(format!(
                "path: `{}` must be an absolute directory other than `/`, at most {MAX_CACHE_DISK_PATH} bytes",
                self.path
            ));
        }
        // `a/../b` would name another directory than it reads as (checked on the text:
        // `Path::components` drops inner `.`s).
        if self.path.split('/').any(|c| c == "." || c == "..") {
            return Err(format!(
                "path: `{}` must not contain `.` or `..` components",
                self.path
            ));
        }
        if !(MIN_CACHE_DISK_BYTES..=MAX_CACHE_DISK_BYTES).contains(&self.max_bytes) {
            return Err(format!(
                "max_bytes: must be between {MIN_CACHE_DISK_BYTES} and {MAX_CACHE_DISK_BYTES}"
            ));
        }
        match self.max_object_bytes {
            Some(n) if n == 0 || n > self.max_bytes / 4 => Err(
                "max_object_bytes: must be between 1 and a quarter of max_bytes (the files being written count against the bound too)".into(),
            ),
            _ => Ok(()),
        }
    }

    /// The largest object the tier takes.
    pub fn object_limit(&self) -> u64 {
        self.max_object_bytes
            .unwrap_or_else(|| DEFAULT_CACHE_DISK_OBJECT.min(self.max_bytes / 4))
    }
}

// === impl CacheRouteRef ===

impl CacheRouteRef {
    fn validate(&self) -> Result<(), String> {
        crate::document::validate_name(&self.name).map_err(|m| format!("name: {m}"))?;
        if let Some(r) = &self.rule {
            crate::http_route::check_rule_name(r).map_err(|m| format!("rule: {m}"))?;
        }
        Ok(())
    }

    /// Whether a request routed by `route` (HTTPRoute name, rule name) is this one's.
    pub fn selects(&self, route: Option<(&str, &str)>) -> bool {
        route.is_some_and(|(name, rule)| {
            name == self.name && self.rule.as_deref().is_none_or(|r| r == rule)
        })
    }
}

// === impl CacheKeySpec ===

impl CacheKeySpec {
    fn validate(&self) -> Result<(), String> {
        let query = self.query.as_deref().unwrap_or_default();
        if query.len() > MAX_KEY_PARTS || self.headers.len() > MAX_KEY_PARTS {
            return Err(format!(
                "at most {MAX_KEY_PARTS} query parameters and headers"
            ));
        }
        if let Some(q) = query
            .iter()
            .find(|q| q.is_empty() || q.contains(['&', '=', '#', ' ']))
        {
            return Err(format!("query: `{q}` is not a query parameter name"));
        }
        for h in &self.headers {
            if !crate::limits::is_lower_header_name(h) {
                return Err(format!("headers: `{h}` is not a lower-case header name"));
            }
        }
        Ok(())
    }
}

// === impl CachePurgeSpec ===

impl CachePurgeSpec {
    pub fn validate(&self) -> Result<(), String> {
        crate::validate_service_name(&self.service).map_err(|m| format!("service: {m}"))?;
        let set = [&self.prefix, &self.key, &self.tag];
        if set.iter().filter(|s| s.is_some()).count() > 1 {
            return Err("set at most one of `prefix`, `key` and `tag`".into());
        }
        for (field, v) in [("prefix", &self.prefix), ("key", &self.key)] {
            if let Some(v) = v {
                if !v.starts_with('/')
                    || v.len() > MAX_PURGE_SELECTOR
                    || v.contains(char::is_whitespace)
                {
                    return Err(format!(
                        "{field}: `{v}` must be a path starting with '/', without spaces, at most {MAX_PURGE_SELECTOR} bytes"
                    ));
                }
            }
        }
        if let Some(t) = &self.tag {
            if t.is_empty()
                || t.len() > MAX_PURGE_SELECTOR
                || !t.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!("tag: `{t}` must be visible ASCII without spaces"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Result<CachePolicySpec, String> {
        let s: CachePolicySpec = serde_json::from_value(json).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn defaults_are_get_and_head_one_day_64_mib() {
        let s = spec(serde_json::json!({"service": "catalog"})).unwrap();
        assert!(s.enabled && !s.public);
        assert_eq!(s.methods, ["GET", "HEAD"]);
        assert_eq!(s.max_ttl, Duration::from_secs(86400));
        assert_eq!(s.default_ttl, None);
        assert_eq!(s.max_bytes, 64 << 20);
        assert_eq!(s.min_uses, 1, "stored at the first request");
        assert!(
            s.applies("GET", "/x", None)
                && s.applies("HEAD", "/", None)
                && !s.applies("POST", "/x", None)
        );
    }

    #[test]
    fn a_route_match_narrows_what_is_cached() {
        let s = spec(serde_json::json!({"service": "catalog", "match": {"path": {"prefix": "/api"}}, "methods": ["GET"]})).unwrap();
        assert!(s.applies("GET", "/api/items", None));
        assert!(!s.applies("GET", "/apix", None) && !s.applies("HEAD", "/api", None));
        let off = spec(serde_json::json!({"service": "catalog", "enabled": false})).unwrap();
        assert!(!off.applies("GET", "/", None));
    }

    #[test]
    fn an_http_route_selector_caches_only_that_routes_requests() {
        let whole = spec(serde_json::json!({"service": "edge"})).unwrap();
        let route =
            spec(serde_json::json!({"service": "edge", "http_route": {"name": "items"}})).unwrap();
        let rule = spec(
            serde_json::json!({"service": "edge", "http_route": {"name": "items", "rule": "list"}}),
        )
        .unwrap();
        assert!(whole.applies("GET", "/", None) && whole.applies("GET", "/", Some(("a", "b"))));
        assert!(route.applies("GET", "/", Some(("items", "items-0"))));
        assert!(!route.applies("GET", "/", Some(("users", "users-0"))));
        assert!(
            !route.applies("GET", "/", None),
            "no HTTPRoute decided: not cached"
        );
        assert!(rule.applies("GET", "/", Some(("items", "list"))));
        assert!(!rule.applies("GET", "/", Some(("items", "search"))));
        assert!(rule.precedence() < route.precedence() && route.precedence() < whole.precedence());
        let bad = |j: serde_json::Value| spec(j).unwrap_err();
        assert!(
            bad(serde_json::json!({"service": "edge", "http_route": {"name": "Items"}}))
                .contains("http_route.name")
        );
        assert!(bad(
            serde_json::json!({"service": "edge", "http_route": {"name": "i", "rule": "default"}})
        )
        .contains("http_route.rule"));
        assert!(bad(
            serde_json::json!({"service": "edge", "http_route": {"name": "i", "path": "/"}})
        )
        .contains("unknown field `path`"));
    }

    #[test]
    fn rejects_bad_values_naming_the_field() {
        let bad = |extra: serde_json::Value| {
            let mut j = serde_json::json!({"service": "catalog"});
            for (k, v) in extra.as_object().unwrap() {
                j[k] = v.clone();
            }
            spec(j).unwrap_err()
        };
        assert!(bad(serde_json::json!({"methods": ["POST"]})).contains("methods: `POST`"));
        assert!(bad(serde_json::json!({"methods": []})).contains("methods"));
        assert!(
            bad(serde_json::json!({"default_ttl": "2d", "max_ttl": "1d"})).contains("default_ttl")
        );
        assert!(bad(serde_json::json!({"default_ttl": "0s"})).contains("default_ttl"));
        assert!(bad(serde_json::json!({"max_ttl": "0s"})).contains("max_ttl"));
        assert!(bad(serde_json::json!({"max_bytes": 10})).contains("max_bytes"));
        assert!(
            bad(serde_json::json!({"max_bytes": 1048576, "max_object_bytes": 1048576}))
                .contains("max_object_bytes")
        );
        assert!(bad(serde_json::json!({"coalesce_wait": "2m"})).contains("coalesce_wait"));
        assert!(bad(serde_json::json!({"min_uses": 0})).contains("min_uses: must be between 1"));
        assert!(bad(serde_json::json!({"min_uses": 16})).contains("min_uses: must be between 1"));
        assert!(bad(serde_json::json!({"min_uses": 4_000_000_000u64})).contains("min_uses: must"));
        assert!(bad(serde_json::json!({"min_uses": -1})).contains("invalid value"));
        assert!(bad(serde_json::json!({"min_uses": "2"})).contains("invalid type"));
        assert!(bad(serde_json::json!({"key": {"headers": ["Accept"]}})).contains("key.headers"));
        assert!(bad(serde_json::json!({"key": {"query": ["a=b"]}})).contains("key.query"));
        assert!(bad(serde_json::json!({"ttl": "1s"})).contains("unknown field `ttl`"));
        assert!(bad(serde_json::json!({"service": "Bad"})).contains("service"));
    }

    #[test]
    fn a_disk_tier_is_optional_and_validated() {
        let s = spec(serde_json::json!({"service": "catalog"})).unwrap();
        assert_eq!(s.disk, None, "memory only by default");
        let disk = |d: serde_json::Value| spec(serde_json::json!({"service": "c", "disk": d}));
        let ok = disk(serde_json::json!({"path": "/var/cache/trellis", "max_bytes": 1u64 << 30}))
            .unwrap();
        let d = ok.disk.unwrap();
        assert_eq!(d.object_limit(), 64 << 20);
        let small = disk(serde_json::json!({"path": "/c", "max_bytes": 4u64 << 20})).unwrap();
        assert_eq!(
            small.disk.unwrap().object_limit(),
            1 << 20,
            "a quarter of the bound"
        );
        let bad = |d: serde_json::Value| disk(d).unwrap_err();
        for p in ["relative/dir", "/", "/a/../etc", "/a/./b", ""] {
            let e = bad(serde_json::json!({"path": p, "max_bytes": 1u64 << 30}));
            assert!(e.contains("disk.path"), "{p}: {e}");
        }
        assert!(
            bad(serde_json::json!({"path": "/c", "max_bytes": 1024})).contains("disk.max_bytes")
        );
        assert!(
            bad(serde_json::json!({"path": "/c", "max_bytes": 1u64 << 50}))
                .contains("disk.max_bytes")
        );
        for n in [0u64, 1 << 29] {
            let e = bad(
                serde_json::json!({"path": "/c", "max_bytes": 1u64 << 30, "max_object_bytes": n}),
            );
            assert!(e.contains("disk.max_object_bytes"), "{e}");
        }
        assert!(
            bad(serde_json::json!({"path": "/c", "max_bytes": 1u64 << 30, "size": 1}))
                .contains("unknown field `size`")
        );
        assert!(bad(serde_json::json!({"max_bytes": 1u64 << 30})).contains("missing field `path`"));
    }

    #[test]
    fn purge_takes_at_most_one_selector() {
        let p = |j: serde_json::Value| {
            let s: CachePurgeSpec = serde_json::from_value(j).map_err(|e| e.to_string())?;
            s.validate()
        };
        assert!(p(serde_json::json!({"service": "a", "id": 1})).is_ok());
        assert!(p(serde_json::json!({"service": "a", "id": 1, "tag": "t1"})).is_ok());
        assert!(
            p(serde_json::json!({"service": "a", "id": 1, "tag": "t", "prefix": "/a"}))
                .unwrap_err()
                .contains("at most one")
        );
        assert!(
            p(serde_json::json!({"service": "a", "id": 1, "prefix": "a"}))
                .unwrap_err()
                .contains("prefix")
        );
        assert!(
            p(serde_json::json!({"service": "a", "id": 1, "tag": "a b"}))
                .unwrap_err()
                .contains("tag")
        );
    }
}
