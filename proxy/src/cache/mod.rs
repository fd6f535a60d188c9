//! Response caching on the inbound side of a sidecar (responses of its app), under the
//! `CachePolicy`s of its own service, with RFC 9111's shared-cache semantics (see
//! `docs/caching.md` and [`control`]).
//!
//! The request path pays for it only when a policy applies: [`ResponseCache::plan`] is one
//! atomic load and a branch when none does. A plan then answers from the store (fresh: HIT;
//! stale within the origin's `stale-while-revalidate`: STALE, revalidated in the background),
//! revalidates with the origin (a 304 refreshes the stored headers: REVALIDATED), or goes
//! upstream (MISS, EXPIRED), coalescing identical misses and storing the response while it
//! streams to the client.
//!
//! Purges come from the store like policies (a `CachePurge` record per service, applied by each
//! sidecar from its watch); unsafe methods that succeed invalidate their target at once.

mod admission;
mod coalesce;
pub mod control;
mod disk;
mod entry;
mod fields;
mod key;
mod metrics;
mod revalidate;
mod store;
mod tee;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use trellis_policies::{CachePolicySpec, CachePurgeSpec};

use crate::error::ProxyError;
use crate::state::snapshot::Snapshot;
use crate::ResponseBody;
use coalesce::{Inflight, Leader, Turn};
use control::{CacheControl, Use};
use store::{Entry, Selector, Store};

pub use disk::DiskStream;
pub use metrics::CacheMetrics;
pub use revalidate::{app_revalidator, Revalidator};
pub use tee::Tee;

/// The header naming how the cache answered.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");
pub const HIT: &str = "HIT";
pub const MISS: &str = "MISS";
pub const STALE: &str = "STALE";
pub const REVALIDATED: &str = "REVALIDATED";
pub const BYPASS: &str = "BYPASS";
pub const EXPIRED: &str = "EXPIRED";

/// Purges remembered, so that a response already on its way when a purge arrived is not
/// stored after it.
const RECENT_PURGES: usize = 64;
/// Invalidations by unsafe methods remembered per policy.
const INVALIDATIONS: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("background revalidation of {uri} failed: {message}")]
    Revalidation { uri: String, message: String },
}

/// The cache of one sidecar: a store per `CachePolicy` of its service.
pub struct ResponseCache {
    service: String,
    /// Some policy applies: the request path's one check.
    enabled: AtomicBool,
    /// Some policy names an HTTPRoute: the ingress finds the request's before planning.
    routes: AtomicBool,
    policies: ArcSwap<Vec<Arc<Compiled>>>,
    shared: Arc<Shared>,
}

struct Shared {
    metrics: CacheMetrics,
    revalidator: OnceLock<Revalidator>,
    recent: Mutex<VecDeque<(Instant, Selector)>>,
    /// The id of the last purge applied.
    last_purge: Mutex<Option<u64>>,
}

/// One policy with its store; kept across snapshots while its spec is unchanged.
struct Compiled {
    name: String,
    spec: CachePolicySpec,
    store: Arc<Store>,
    inflight: Arc<Inflight>,
    /// When each resource was last invalidated by an unsafe method. Bounded by count, without
    /// expiry: a record only hides entries fetched before it, so an old one is harmless, and
    /// one evicted early lets through at most an entry it should have hidden (16,384 recent
    /// invalidations are kept).
    invalidated: quick_cache::sync::Cache<Arc<str>, Instant>,
    /// Something was invalidated: until then lookups skip `invalidated`.
    any_invalidated: AtomicBool,
    /// Use counts of keys, with `min_uses` above 1 (bounded: see [`admission`]).
    admission: Option<admission::Sketch>,
}

/// A listener's answer to a request.
pub type Answer = Result<Response<ResponseBody>, ProxyError>;

/// The listener's own forward of a request, called at most once per plan.
pub trait Upstream<B>: FnOnce(Request<B>) -> <Self as Upstream<B>>::Sent {
    type Sent: Future<Output = Answer>;
}

impl<B, F, Fut> Upstream<B> for F
where
    F: FnOnce(Request<B>) -> Fut,
    Fut: Future<Output = Answer>,
{
    type Sent = Fut;
}

/// What the cache does with one request, decided before it goes anywhere.
pub struct Plan {
    policy: Arc<Compiled>,
    shared: Arc<Shared>,
    primary: Arc<str>,
    /// The resource's length: it is the start of `primary` ([`Plan::resource`]).
    resource_len: usize,
    /// The primary key's hash ([`Store::hash`]): computed once, used by the lookup, the
    /// coalescing slot and the insert.
    hash: u64,
    kind: Kind,
    /// The request has an `Authorization` (RFC 9111 3.5).
    authorization: bool,
    /// The request has a `Cache-Control` (parsed only then).
    cache_control: bool,
    /// The key's uses counted by this miss's admission sketch (`u32::MAX`: not counted, no
    /// `min_uses`).
    uses: u32,
    /// Stale entries may be revalidated in the background (the inbound side, whose origin
    /// is the local app); at the edge the origin is whatever the route picks, so they are
    /// revalidated in the foreground.
    background: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Lookup,
    /// Range requests, `no-store` requests: straight through.
    Bypass,
    /// An unsafe method: a success invalidates the target.
    Invalidate,
}

// === impl ResponseCache ===

impl ResponseCache {
    pub fn new(service: &str, registry: &mut Registry) -> Arc<Self> {
        Self::with_metrics(service, CacheMetrics::register(registry))
    }

    /// A cache whose metrics are registered nowhere (tests, listeners built without one).
    pub fn inert() -> Arc<Self> {
        Self::with_metrics("", CacheMetrics::default())
    }

    fn with_metrics(service: &str, metrics: CacheMetrics) -> Arc<Self> {
        Arc::new(Self {
            service: service.to_string(),
            enabled: AtomicBool::new(false),
            routes: AtomicBool::new(false),
            policies: ArcSwap::from_pointee(Vec::new()),
            shared: Arc::new(Shared {
                metrics,
                revalidator: OnceLock::new(),
                recent: Mutex::new(VecDeque::new()),
                last_purge: Mutex::new(None),
            }),
        })
    }

    /// Revalidate stale entries in the background with `r` (`stale-while-revalidate`);
    /// without one they are revalidated in the foreground.
    pub fn set_revalidator(&self, r: Revalidator) {
        let _ = self.shared.revalidator.set(r);
    }

    /// Apply a snapshot: the policies of this sidecar's service (a store survives while its
    /// policy is unchanged) and its latest purge.
    pub fn update(&self, snap: &Snapshot) {
        let old = self.policies.load_full();
        let mut list = Vec::new();
        for (name, spec) in snap
            .cache_policies
            .iter()
            .filter(|(_, s)| s.service == self.service && s.enabled)
        {
            let kept = old.iter().find(|c| &c.name == name && &c.spec == spec);
            list.push(
                kept.cloned()
                    .unwrap_or_else(|| Arc::new(Compiled::new(name, spec, &self.shared.metrics))),
            );
        }
        // The most specific first: a route's rule, a route, the whole service.
        list.sort_by_key(|c| c.spec.precedence());
        let routes = list.iter().any(|c| c.spec.http_route.is_some());
        self.routes.store(routes, Ordering::Release);
        self.enabled.store(!list.is_empty(), Ordering::Release);
        self.policies.store(Arc::new(list));
        if let Some(p) = snap.cache_purges.get(&self.service) {
            self.purge(p);
        }
    }

    /// Apply a purge record once (records are replaced, each with a new id). A record that
    /// does not follow the last one applied means purges were missed: everything goes.
    fn purge(&self, p: &CachePurgeSpec) {
        let missed = {
            let mut last = self
                .shared
                .last_purge
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if *last == Some(p.id) {
                return;
            }
            let missed = p.previous != *last;
            *last = Some(p.id);
            missed
        };
        if let Err(message) = p.validate() {
            // Validated when read from the store; a bad record is refused, the cache kept.
            self.shared.metrics.purge_errors.inc();
            tracing::warn!(service = %p.service, %message, "cache purge refused");
            return;
        }
        let selector = match (&p.prefix, &p.key, &p.tag) {
            _ if missed => {
                self.shared.metrics.purge_gaps.inc();
                tracing::info!(service = %p.service, "cache purges were missed: purging everything of the service");
                Selector::All
            }
            (Some(prefix), _, _) => Selector::Prefix(prefix.clone()),
            (_, Some(key), _) => Selector::Key(key.clone()),
            (_, _, Some(tag)) => Selector::Tag(tag.clone()),
            _ => Selector::All,
        };
        for c in self.policies.load().iter() {
            c.store.purge(selector.clone());
        }
        let mut recent = self.shared.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_PURGES {
            recent.pop_front();
        }
        recent.push_back((Instant::now(), selector.clone()));
        self.shared.metrics.purges.inc();
        tracing::info!(service = %p.service, id = p.id, ?selector, "cache purge applied");
    }

    /// What to do with a request: `None` (the cost of a sidecar without a cache policy: one
    /// atomic load) when no policy applies. `consumer` isolates entries unless the policy is
    /// public.
    pub fn plan<B>(&self, req: &Request<B>, consumer: Option<&str>) -> Option<Plan> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        self.plan_for(req, consumer, None, true)
    }

    /// Some policy caches only the requests of an HTTPRoute: [`ResponseCache::edge_plan`]
    /// needs the route.
    pub fn names_routes(&self) -> bool {
        self.routes.load(Ordering::Acquire)
    }

    /// [`ResponseCache::plan`] for the ingress, whose responses come from routed services:
    /// no background revalidation (the revalidator reaches the local app only). `route`
    /// names the HTTPRoute and rule that route the request, if any.
    pub fn edge_plan<B>(
        &self,
        req: &Request<B>,
        consumer: Option<&str>,
        route: Option<(&str, &str)>,
    ) -> Option<Plan> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        self.plan_for(req, consumer, route, false)
    }

    fn plan_for<B>(
        &self,
        req: &Request<B>,
        consumer: Option<&str>,
        route: Option<(&str, &str)>,
        background: bool,
    ) -> Option<Plan> {
        let kind = match *req.method() {
            Method::GET | Method::HEAD => Kind::Lookup,
            Method::POST | Method::PUT | Method::DELETE | Method::PATCH => Kind::Invalidate,
            _ => return None,
        };
        let path = req.uri().path();
        let policies = self.policies.load();
        let policy = policies.iter().find(|c| match kind {
            Kind::Invalidate => c.spec.applies("GET", path, route),
            _ => c.spec.applies(req.method().as_str(), path, route),
        })?;
        let spec = &policy.spec;
        let consumer = consumer.filter(|_| !spec.public);
        let (primary, len) = key::keys(req, &spec.key, consumer);
        let hash = policy.store.hash(&primary);
        let facts = control::RequestFacts::of(req.headers());
        let kind = match kind {
            Kind::Lookup if bypass(req.headers(), facts) => Kind::Bypass,
            k => k,
        };
        Some(Plan {
            policy: policy.clone(),
            shared: self.shared.clone(),
            primary,
            resource_len: len,
            hash,
            kind,
            authorization: facts.authorization,
            cache_control: facts.cache_control,
            uses: u32::MAX,
            background,
        })
    }

    /// Entries held, for tests and `/config_dump`.
    pub fn entries(&self) -> u64 {
        self.policies
            .load()
            .iter()
            .map(|c| c.store.entry_count())
            .sum()
    }

    /// The cache's state for `/config_dump` (read when asked, never on the request path):
    /// each applied policy, most specific first, with what its store holds, its admission
    /// sketch and its disk tier. The policies' specs are in the dump's snapshot.
    pub fn dump(&self) -> serde_json::Value {
        let policies = self.policies.load();
        let list: Vec<_> = policies
            .iter()
            .map(|c| {
                serde_json::json!({
                    "policy": c.name,
                    "entries": c.store.entry_count(),
                    "bytes": c.store.bytes(),
                    "max_bytes": c.spec.max_bytes,
                    "max_object_bytes": c.spec.max_object_bytes,
                    "min_uses": c.spec.min_uses,
                    "admission_sketch_bytes": c.admission.as_ref().map(|s| s.bytes()),
                    "disk": c.store.disk().map(|d| d.dump()),
                })
            })
            .collect();
        serde_json::json!({"service": self.service, "policies": list})
    }

    /// Entries held by the disk tiers, and the directory each writes (tests, `/config_dump`).
    pub fn disk_entries(&self) -> Vec<(std::path::PathBuf, u64)> {
        let policies = self.policies.load();
        let tiers = policies.iter().filter_map(|c| c.store.disk());
        tiers
            .map(|d| (d.dir().to_path_buf(), d.entry_count()))
            .collect()
    }
}

/// Requests the cache passes straight through: ranges (not cached), upgrades and `no-store`.
fn bypass(h: &HeaderMap, facts: control::RequestFacts) -> bool {
    facts.range_or_upgrade || (facts.cache_control && CacheControl::parse(h).no_store)
}

// === impl Compiled ===

impl Compiled {
    fn new(name: &str, spec: &CachePolicySpec, metrics: &CacheMetrics) -> Self {
        Self {
            name: name.to_string(),
            spec: spec.clone(),
            store: Arc::new(
                Store::new(spec.max_bytes, spec.max_object_bytes, metrics).with_disk(
                    spec.disk
                        .as_ref()
                        .map(|d| disk::DiskTier::new(name, d, metrics)),
                ),
            ),
            inflight: Arc::default(),
            invalidated: quick_cache::sync::Cache::new(INVALIDATIONS),
            any_invalidated: AtomicBool::new(false),
            admission: (spec.min_uses > 1).then(|| admission::Sketch::new(spec.max_bytes)),
        }
    }
}

// === impl Plan ===

impl Plan {
    /// The resource (purges and invalidations select it): the start of the primary key.
    fn resource(&self) -> key::Resource {
        key::Resource::prefix(self.primary.clone(), self.resource_len)
    }

    /// Answer the request from the cache, or through `upstream` (the listener's own forward).
    ///
    /// Boxed: the cache's state (lookup, coalescing, storing, with the forward's future inside)
    /// is larger than the rest of the request's; inline, every request would carry and copy
    /// it, cached or not. Allocated first, then written: `Box::pin(f)` evaluates `f` before
    /// it allocates, so the whole future (several KB) was built on the stack and copied to
    /// the heap, about 500 instructions per request (docs/caching.md#benchmark; the same as
    /// `listeners::server`'s `Boxed`).
    ///
    /// Not an `async fn` itself: it returns the future of the kind's own, so that a lookup's
    /// (the large one) is not built and then moved into a second state machine around it.
    pub fn serve<B>(
        self,
        req: Request<B>,
        upstream: impl Upstream<B>,
    ) -> Pin<Box<impl Future<Output = Answer>>> {
        use futures_util::future::Either;
        let slot = Box::new_uninit();
        let boxed = Box::write(
            slot,
            match self.kind {
                Kind::Lookup => Either::Left(self.lookup(req, upstream)),
                Kind::Invalidate => Either::Right(Either::Left(self.invalidate(req, upstream))),
                Kind::Bypass => Either::Right(Either::Right(self.bypass(req, upstream))),
            },
        );
        Box::into_pin(boxed)
    }

    async fn bypass<B>(self, req: Request<B>, upstream: impl Upstream<B>) -> Answer {
        let mut resp = upstream(req).await?;
        self.mark(&mut resp, BYPASS);
        Ok(resp)
    }

    async fn lookup<B>(mut self, req: Request<B>, upstream: impl Upstream<B>) -> Answer {
        let now = Instant::now();
        let req_cc = match self.cache_control {
            true => CacheControl::parse(req.headers()),
            false => CacheControl::default(),
        };
        if let Some(entry) = self.find_any(req.headers()).await {
            let age = entry.age(now);
            return match control::usable(age, entry.lifetime, &entry.cc, &req_cc) {
                Use::Fresh => Ok(self.hit(&entry, &req, HIT, now)),
                Use::StaleWhileRevalidate if self.background(&req, &entry) => {
                    Ok(self.hit(&entry, &req, STALE, now))
                }
                _ => self.revalidate(req, &req_cc, entry, upstream).await,
            };
        }
        if req_cc.only_if_cached {
            self.shared.metrics.count(MISS);
            let msg = "only-if-cached: no stored response";
            return Ok(crate::error::error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "cache-miss-only-if-cached",
                msg,
            ));
        }
        if let Some(sketch) = &self.policy.admission {
            // Every request that misses is a use, those that will wait for a leader too.
            self.uses = u32::from(sketch.increment(&self.primary));
        }
        let leader = match self.coalesce(&req, &req_cc).await {
            Ok(entry) => return Ok(self.hit(&entry, &req, HIT, Instant::now())),
            Err(leader) => leader,
        };
        let fetch = self.fetch(&req, &req_cc);
        let mut resp = upstream(req).await?;
        self.store(fetch, &mut resp, leader, MISS);
        Ok(resp)
    }

    /// A stored response for this request that it may use, from memory or else from the
    /// disk tier (whose file is opened off the runtime's threads).
    async fn find_any(&self, headers: &HeaderMap) -> Option<Arc<Entry>> {
        if let Some(e) = self.find(headers) {
            return Some(e);
        }
        let disk = self.policy.store.disk()?;
        let entry = disk.lookup(&self.primary, headers).await?;
        self.admit(entry)
    }

    /// A stored response in memory for this request that it may use.
    fn find(&self, headers: &HeaderMap) -> Option<Arc<Entry>> {
        let key = store::KeyRef {
            hash: self.hash,
            text: &self.primary,
        };
        let entry = self.policy.store.find(key, headers)?;
        self.admit(entry)
    }

    /// `entry` unless it was invalidated or purged since, or is an unshareable one for an
    /// authorized request.
    fn admit(&self, entry: Arc<Entry>) -> Option<Arc<Entry>> {
        let policy = &self.policy;
        if policy.any_invalidated.load(Ordering::Acquire)
            && policy
                .invalidated
                .get(&*self.resource())
                .is_some_and(|at| entry.fetched <= at)
        {
            return None;
        }
        // RFC 9111 3.5: only these let a shared cache answer an authorized request.
        let shareable = entry.cc.public || entry.cc.s_maxage.is_some() || entry.cc.must_revalidate;
        if self.authorization && !shareable {
            return None;
        }
        Some(entry)
    }

    /// Wait for an identical miss already upstream (bounded), then look again: the entry, or
    /// the leadership of this miss (`None`: go upstream without coalescing).
    async fn coalesce<B>(
        &self,
        req: &Request<B>,
        req_cc: &CacheControl,
    ) -> Result<Arc<Entry>, Option<Leader>> {
        if req.method() != Method::GET {
            return Err(None);
        }
        let rx = match self.policy.inflight.join(self.hash) {
            Turn::Lead(l) => return Err(Some(l)),
            Turn::Wait(rx) => rx,
        };
        if !coalesce::wait(rx, self.policy.spec.coalesce_wait).await {
            self.shared.metrics.coalesce_timeouts.inc();
            return Err(None);
        }
        self.shared.metrics.coalesced.inc();
        let now = Instant::now();
        match self.find_any(req.headers()).await {
            Some(e) if control::usable(e.age(now), e.lifetime, &e.cc, req_cc) == Use::Fresh => {
                Ok(e)
            }
            _ => Err(None),
        }
    }

    /// The request's side of a fetch (its headers copied only if the store needs them).
    fn fetch<B>(&self, req: &Request<B>, req_cc: &CacheControl) -> entry::Fetch {
        let keep = self.policy.store.keeps_request_headers();
        entry::Fetch::start(req, req_cc, keep, self.authorization)
    }

    /// Attach the store to a response from upstream when it may be stored, and mark it (in
    /// place: a response is several hundred bytes, each move a copy).
    fn store(
        mut self,
        fetch: entry::Fetch,
        resp: &mut Response<ResponseBody>,
        mut leader: Option<Leader>,
        status: &'static str,
    ) {
        let spec = &self.policy.spec;
        let mut status = status;
        // Admission first: a response it refuses is not even built into an entry.
        let built = match self.admitted(&mut leader) {
            true => fetch.entry(resp, spec, self.resource()),
            false => Err(control::NotStored::TooFewUses),
        };
        match built {
            Err(why) => {
                if why == control::NotStored::VaryUnseen {
                    // From now on misses keep what a variant key needs.
                    self.policy.store.keep_request_headers();
                }
                tracing::trace!(?why, "response not stored");
            }
            Ok(built) => {
                let tee = match built.expected.filter(|n| *n > spec.max_object_bytes) {
                    Some(n) => self.disk_tee(&fetch, built.entry, leader, n),
                    None => Some(self.memory_tee(fetch, built, leader)),
                };
                match tee {
                    Some(tee) => tee_into(resp, tee),
                    None => status = BYPASS,
                }
            }
        }
        self.mark(resp, status);
    }

    /// Whether this miss may store its response under the policy's `min_uses`: its key was
    /// asked for that often, or other requests wait for this response (uses too, which find
    /// it stored). Otherwise the coalescing slot is released at once, so that a request
    /// arriving while this response streams leads a fetch of its own (counted, so stored)
    /// rather than waiting for one that will not be stored.
    fn admitted(&self, leader: &mut Option<Leader>) -> bool {
        if self.uses >= self.policy.spec.min_uses {
            return true;
        }
        match leader.take().map(Leader::release_if_alone) {
            Some(Err(kept)) => {
                *leader = Some(kept);
                true
            }
            _ => false,
        }
    }

    /// Store the body in memory as it streams (or on disk if it grows too large).
    fn memory_tee(
        &mut self,
        fetch: entry::Fetch,
        built: entry::Built,
        leader: Option<Leader>,
    ) -> Box<Tee> {
        let limit = usize::try_from(self.policy.spec.max_object_bytes).unwrap_or(usize::MAX);
        let pending = tee::Pending {
            store: self.policy.store.clone(),
            // The pending entry shares the plan's key.
            primary: self.primary.clone(),
            hash: self.hash,
            req_headers: fetch.headers,
            entry: built.entry,
            purged: self.shared.purge_check(fetch.started),
            started: fetch.started,
            _leader: leader,
        };
        let expected = built.expected.and_then(|n| usize::try_from(n).ok());
        Tee::new(pending, limit, expected, built.body)
    }

    /// Write a body announced too large for memory to the disk tier as it streams; `None`
    /// (not stored) without a tier, above its limit, or while it takes no writes.
    fn disk_tee(
        &self,
        fetch: &entry::Fetch,
        e: Arc<Entry>,
        leader: Option<Leader>,
        len: u64,
    ) -> Option<Box<Tee>> {
        let disk = self.policy.store.disk()?;
        let key = key::variant_of(&self.primary, fetch.headers.as_ref(), &e.vary)?;
        let sink = disk.tee(key, self.primary.len(), e, fetch.started, leader, Some(len))?;
        Some(Tee::to_disk(sink))
    }

    /// Validate a stored response with the origin (conditional request with its validators,
    /// unless the client sent its own): a 304 refreshes it; an origin error may be answered
    /// with it only within `stale-if-error`; an unreachable origin with `must-revalidate` is
    /// a 504 (RFC 9111 5.2.2.2).
    async fn revalidate<B>(
        self,
        mut req: Request<B>,
        req_cc: &CacheControl,
        stored: Arc<Entry>,
        upstream: impl Upstream<B>,
    ) -> Answer {
        let age = stored.age(Instant::now());
        let ours = entry::add_validators(req.headers_mut(), &stored);
        let fetch = self.fetch(&req, req_cc);
        let head = req.method() == Method::HEAD;
        let may_stale = control::stale_if_error(age, stored.lifetime, &stored.cc);
        match upstream(req).await {
            Ok(resp) if ours && resp.status() == StatusCode::NOT_MODIFIED => {
                let fresh = stored.refreshed(resp.headers(), fetch.requested, &self.policy.spec);
                drop(resp);
                // Purged while revalidating: answer, but do not bring it back.
                if self.shared.purge_check(fetch.started).selects(&fresh) {
                    return Ok(self.hit_parts(&fresh, head, REVALIDATED, Instant::now()));
                }
                let fresh = self.policy.store.insert_hashed(
                    self.primary.clone(),
                    self.hash,
                    fetch.headers.as_ref(),
                    Arc::new(fresh),
                );
                Ok(self.hit_parts(&fresh, head, REVALIDATED, Instant::now()))
            }
            Ok(resp) if resp.status().is_server_error() && may_stale => {
                Ok(self.hit_parts(&stored, head, STALE, Instant::now()))
            }
            Ok(mut resp) => {
                self.store(fetch, &mut resp, None, EXPIRED);
                Ok(resp)
            }
            Err(_) if may_stale => Ok(self.hit_parts(&stored, head, STALE, Instant::now())),
            Err(e) if stored.cc.must_revalidate || stored.cc.proxy_revalidate => {
                self.shared.metrics.count(EXPIRED);
                let msg = format!("stored response must be revalidated and the origin failed: {e}");
                Ok(crate::error::error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "cache-revalidation-failed",
                    &msg,
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// Start a background revalidation (one per key at a time); `false` when there is no way
    /// to (the stale entry is then revalidated in the foreground).
    fn background<B>(&self, req: &Request<B>, stored: &Arc<Entry>) -> bool {
        let Some(rv) = self
            .shared
            .revalidator
            .get()
            .filter(|_| self.background)
            .cloned()
        else {
            return false;
        };
        let Some(leader) = self.policy.inflight.try_lead(self.hash) else {
            // Already being fetched or revalidated: the stale entry answers meanwhile.
            return true;
        };
        let job = revalidate::Job {
            request: entry::revalidation_request(req, stored),
            stored: stored.clone(),
            store: self.policy.store.clone(),
            primary: self.primary.clone(),
            hash: self.hash,
            spec: self.policy.spec.clone(),
            resource: self.resource(),
            leader,
            purged: self.shared.purge_check(Instant::now()),
        };
        tokio::spawn(job.run(rv));
        true
    }

    /// Invalidate the target (and same-origin `Location` / `Content-Location`) of an unsafe
    /// method that succeeded (RFC 9111 4.4).
    async fn invalidate<B>(self, req: Request<B>, upstream: impl Upstream<B>) -> Answer {
        let resp = upstream(req).await?;
        if resp.status().is_success() || resp.status().is_redirection() {
            let now = Instant::now();
            self.policy.any_invalidated.store(true, Ordering::Release);
            self.policy
                .invalidated
                .insert(Arc::from(&*self.resource()), now);
            for h in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(r) = entry::same_origin(&self.resource(), resp.headers().get(h)) {
                    self.policy.invalidated.insert(r, now);
                }
            }
        }
        Ok(resp)
    }

    fn hit<B>(
        &self,
        e: &Entry,
        req: &Request<B>,
        status: &'static str,
        now: Instant,
    ) -> Response<ResponseBody> {
        if status == HIT && entry::not_modified(req.headers(), e) {
            let mut resp = e.response(true, now);
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            self.mark(&mut resp, status);
            return resp;
        }
        self.hit_parts(e, req.method() == Method::HEAD, status, now)
    }

    fn hit_parts(
        &self,
        e: &Entry,
        head: bool,
        status: &'static str,
        now: Instant,
    ) -> Response<ResponseBody> {
        if e.disk.is_some() {
            self.shared.metrics.disk_hits.inc();
            tracing::debug!(tier = "disk", status, "cache answer from the disk tier");
        }
        let mut resp = e.response(head, now);
        self.mark(&mut resp, status);
        resp
    }

    fn mark(&self, resp: &mut Response<ResponseBody>, status: &'static str) {
        self.shared.metrics.count(status);
        resp.headers_mut()
            .insert(CACHE_STATUS, HeaderValue::from_static(status));
    }
}

/// Copy `resp`'s body into `tee` as it streams (a local body is not stored: the tee is
/// dropped).
fn tee_into(resp: &mut Response<ResponseBody>, tee: Box<Tee>) {
    // An empty body is never polled: it is complete now.
    if http_body::Body::is_end_stream(resp.body()) {
        tee.finish();
        return;
    }
    if let http_body_util::Either::Left(s) = resp.body_mut() {
        s.set_tee(tee);
    }
}

// === impl Shared ===

impl Shared {
    /// Whether a purge since `started` selects an entry (checked just before storing it).
    fn purge_check(self: &Arc<Self>, started: Instant) -> PurgeCheck {
        PurgeCheck {
            shared: Some(self.clone()),
            started,
        }
    }
}

/// Whether a purge applied since a request started selects its entry: checked just before the
/// entry is stored, so that a purge wins over a response already on its way.
pub(crate) struct PurgeCheck {
    /// `None`: no purge can select it (tests).
    shared: Option<Arc<Shared>>,
    started: Instant,
}

impl PurgeCheck {
    pub(crate) fn selects(&self, e: &Entry) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let recent = shared.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .any(|(at, s)| *at >= self.started && e.matches(s))
    }

    #[cfg(test)]
    pub(crate) fn never() -> Self {
        Self {
            shared: None,
            started: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(policies: serde_json::Value, purges: serde_json::Value) -> Snapshot {
        let doc: trellis_policies::MeshDocument = serde_json::from_value(serde_json::json!({
            "cache_policies": policies,
            "cache_purges": purges,
        }))
        .expect("document");
        Snapshot::from_document(&doc, "td", 1, "test".into()).expect("snapshot")
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "h");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn plans_only_for_the_own_services_enabled_policies() {
        let cache = ResponseCache::inert();
        assert!(
            cache.plan(&req("GET", "/a", &[]), None).is_none(),
            "no snapshot yet"
        );
        cache.update(&snapshot(
            serde_json::json!({"x": {"service": "other"}}),
            serde_json::json!({}),
        ));
        assert!(
            cache.plan(&req("GET", "/a", &[]), None).is_none(),
            "another service's"
        );
        let mine = ResponseCache::with_metrics("web", CacheMetrics::default());
        mine.update(&snapshot(
            serde_json::json!({"off": {"service": "web", "enabled": false}}),
            serde_json::json!({}),
        ));
        assert!(
            !mine.enabled.load(Ordering::Relaxed),
            "a disabled policy costs nothing"
        );
        let on =
            serde_json::json!({"c": {"service": "web", "match": {"path": {"prefix": "/api"}}}});
        mine.update(&snapshot(on.clone(), serde_json::json!({})));
        let kind = |m: &str, uri: &str, h: &[(&str, &str)]| {
            mine.plan(&req(m, uri, h), None).map(|p| p.kind)
        };
        assert_eq!(kind("GET", "/api/x", &[]), Some(Kind::Lookup));
        assert_eq!(kind("HEAD", "/api/x", &[]), Some(Kind::Lookup));
        assert_eq!(kind("GET", "/other", &[]), None);
        assert_eq!(kind("POST", "/api/x", &[]), Some(Kind::Invalidate));
        assert_eq!(kind("OPTIONS", "/api/x", &[]), None);
        assert_eq!(
            kind("GET", "/api/x", &[("range", "bytes=0-1")]),
            Some(Kind::Bypass)
        );
        assert_eq!(
            kind("GET", "/api/x", &[("cache-control", "no-store")]),
            Some(Kind::Bypass)
        );
        // An unchanged policy keeps its store across snapshots; a changed one starts empty.
        let before = mine.policies.load()[0].store.clone();
        mine.update(&snapshot(on, serde_json::json!({})));
        assert!(Arc::ptr_eq(&before, &mine.policies.load()[0].store));
        mine.update(&snapshot(
            serde_json::json!({"c": {"service": "web"}}),
            serde_json::json!({}),
        ));
        assert!(!Arc::ptr_eq(&before, &mine.policies.load()[0].store));
    }

    #[test]
    fn consumers_are_isolated_unless_public() {
        let cache = ResponseCache::with_metrics("web", CacheMetrics::default());
        cache.update(&snapshot(
            serde_json::json!({"c": {"service": "web"}}),
            serde_json::json!({}),
        ));
        let r = req("GET", "/a", &[]);
        let a = cache.plan(&r, Some("acme")).expect("plan").primary;
        let b = cache.plan(&r, Some("globex")).expect("plan").primary;
        assert_ne!(a, b);
        cache.update(&snapshot(
            serde_json::json!({"c": {"service": "web", "public": true}}),
            serde_json::json!({}),
        ));
        let a = cache.plan(&r, Some("acme")).expect("plan").primary;
        let b = cache.plan(&r, Some("globex")).expect("plan").primary;
        assert_eq!(a, b);
    }

    #[test]
    fn a_purge_record_is_applied_once_and_a_bad_one_refused() {
        let cache = ResponseCache::with_metrics("web", CacheMetrics::default());
        let policy = serde_json::json!({"c": {"service": "web"}});
        let purge = |id: u64, previous: Option<u64>| serde_json::json!({"web": {"service": "web", "id": id, "tag": "t", "previous": previous}});
        cache.update(&snapshot(policy.clone(), purge(1, None)));
        cache.update(&snapshot(policy.clone(), purge(1, None)));
        assert_eq!(cache.shared.metrics.purges.get(), 1);
        cache.update(&snapshot(policy.clone(), purge(2, Some(1))));
        assert_eq!(cache.shared.metrics.purges.get(), 2);
        assert_eq!(
            cache.shared.metrics.purge_gaps.get(),
            0,
            "each followed the last"
        );
        // Bypassing validation (a snapshot built by hand): refused, counted.
        let mut snap = snapshot(policy, serde_json::json!({}));
        snap.cache_purges.insert(
            "web".into(),
            CachePurgeSpec {
                service: "web".into(),
                id: 3,
                prefix: Some("no-slash".into()),
                key: None,
                tag: None,
                previous: Some(2),
            },
        );
        cache.update(&snap);
        assert_eq!(cache.shared.metrics.purge_errors.get(), 1);
        assert_eq!(cache.shared.metrics.purges.get(), 2);
        // Record 4 was never seen (two purges within one snapshot, or a disconnection): 5
        // names it as its predecessor, so everything of the service is purged.
        cache.update(&snapshot(
            serde_json::json!({"c": {"service": "web"}}),
            purge(5, Some(4)),
        ));
        assert_eq!(cache.shared.metrics.purge_gaps.get(), 1);
        assert_eq!(cache.shared.metrics.purges.get(), 3);
    }

    #[test]
    fn a_missed_purge_purges_everything_of_the_service() {
        let cache = ResponseCache::with_metrics("web", CacheMetrics::default());
        let policy = serde_json::json!({"c": {"service": "web"}});
        let purge = |id: u64, previous: Option<u64>, tag: &str| serde_json::json!({"web": {"service": "web", "id": id, "tag": tag, "previous": previous}});
        cache.update(&snapshot(policy.clone(), purge(1, None, "a")));
        let store = cache.policies.load()[0].store.clone();
        let entry = store::tests::entry(1, 10);
        let tagged = Entry {
            tags: vec!["other-tag".into()],
            ..entry
        };
        store.insert("h\0/o/1", &http::HeaderMap::new(), tagged);
        let purged_all = |store: &store::Store| store.entry_count() == 0;
        assert!(!purged_all(&store));
        // Follows 1: only tag `b` goes, the entry tagged `other-tag` stays.
        cache.update(&snapshot(policy.clone(), purge(2, Some(1), "b")));
        assert!(!purged_all(&store));
        // Skips 3: everything goes, whatever its own selector.
        cache.update(&snapshot(policy, purge(4, Some(3), "b")));
        assert!(purged_all(&store));
    }
}
