//! Rate limits and concurrency limits on the inbound side: the sidecar of a service enforces
//! the limits declared for that service before a request reaches the app.
//!
//! Every decision is local: a GCRA bucket per (policy, key) in memory. A `global` policy's
//! bucket runs at this sidecar's *share* of the limit, which the agent sets from the demand
//! table it shares with the service's other sidecars through etcd (see `docs/ratelimit.md`);
//! the data plane only exposes its measured demand ([`RateLimits::sample`]) and accepts shares
//! ([`RateLimits::set_shares`]). No request ever waits on etcd.

pub mod allocate;
mod gcra;
mod key;
mod limits_metrics;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderMap, HeaderValue, Method};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use trellis_policies::{ConcurrencyLimitSpec, RateLimitSpec, Scope};

pub use gcra::Bucket;
use key::{KeyMap, RequestKey};
use limits_metrics::LimitMetrics;

use crate::error::ProxyError;
use crate::state::snapshot::Snapshot;

/// The key hash of a request under `policy` (see `key.rs`), for the fuzz targets only
/// (`fuzzing` feature): every part comes from the client.
#[cfg(feature = "fuzzing")]
pub fn fuzz_key_hash(
    headers: &http::HeaderMap,
    peer: Option<&http::HeaderValue>,
    source: std::net::IpAddr,
    consumer: Option<&str>,
    policy: &str,
    key: &trellis_policies::LimitKey,
) -> u64 {
    RequestKey {
        headers,
        peer,
        source,
        consumer,
    }
    .hash(policy, key)
}

/// Time constant of the demand average: long enough to smooth bursts, short enough that a
/// shift in traffic shows within a second or two.
pub const DEMAND_TAU: Duration = Duration::from_millis(500);
/// At most this many keys per policy get their own bucket; further keys share one overflow
/// bucket, so a flood of distinct header values cannot exhaust memory.
pub const MAX_KEYS_PER_POLICY: usize = 10_000;
/// A bucket unused for this long (and full again) is forgotten.
pub const KEY_IDLE_EVICT: Duration = Duration::from_secs(60);
/// How often idle keys are swept, in every mode ([`RateLimits::sweeper`]), and at most how
/// often a policy at its key cap sweeps before sending a new key to the overflow bucket.
pub const KEY_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Key reported for requests beyond [`MAX_KEYS_PER_POLICY`].
const OVERFLOW_KEY: u64 = 0;

/// The limits that apply to this sidecar's inbound traffic, and their state.
pub struct RateLimits {
    service: String,
    rules: ArcSwap<Rules>,
    /// `true` once an agent coordinates global limits; without one a global limit is enforced
    /// at its full value on each sidecar (and a warning says so).
    coordinated: std::sync::atomic::AtomicBool,
    epoch: tokio::time::Instant,
    metrics: LimitMetrics,
    update: Mutex<()>,
}

#[derive(Default)]
struct Rules {
    rate: Vec<Arc<RateRule>>,
    concurrency: Vec<Arc<ConcurrencyRule>>,
}

struct RateRule {
    name: Arc<str>,
    spec: RateLimitSpec,
    limit: f64,
    burst: f64,
    /// When the buckets were last swept (nanoseconds since the epoch).
    last_sweep: AtomicU64,
    /// Share for keys the agent has not allocated yet (`f64` bits).
    default_share: AtomicU64,
    /// The agent's last allocation per key, for buckets created after it: a key another
    /// sidecar is busy with starts here at its allocated (small) share, not the default.
    allocated: Mutex<HashMap<u64, f64>>,
    buckets: RwLock<KeyMap<Arc<Bucket>>>,
    /// `RateLimit-Policy` header value, built once.
    policy_header: HeaderValue,
    allowed: Counter,
    limited: Counter,
    share_gauge: Gauge<f64, AtomicU64>,
}

struct ConcurrencyRule {
    name: Arc<str>,
    spec: ConcurrencyLimitSpec,
    in_flight: Arc<AtomicU32>,
    allowed: Counter,
    limited: Counter,
    gauge: Gauge,
}

/// Concurrency slots held by a request until its response ends. The first is held inline so
/// the usual case (one matching limit) does not allocate.
#[derive(Default)]
pub struct Permits {
    first: Option<Permit>,
    more: Vec<Permit>,
}

struct Permit {
    in_flight: Arc<AtomicU32>,
    gauge: Gauge,
}

/// What this sidecar reports for one global policy: its demand per key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PolicyDemand {
    pub policy: Arc<str>,
    pub limit: f64,
    /// `(key, requests per second)`, keys as hashes identical on every sidecar.
    pub keys: Vec<(u64, f64)>,
}

// === impl RateLimits ===

impl RateLimits {
    pub fn new(service: &str, registry: &mut Registry) -> Arc<Self> {
        Arc::new(Self {
            service: service.to_string(),
            rules: ArcSwap::from_pointee(Rules::default()),
            coordinated: Default::default(),
            epoch: tokio::time::Instant::now(),
            metrics: LimitMetrics::register(registry),
            update: Mutex::new(()),
        })
    }

    /// Declare that an agent shares global limits: new global buckets then start at a
    /// conservative share until the agent has read the demand table.
    pub fn set_coordinated(&self) {
        self.coordinated.store(true, Relaxed);
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Take the limits for this sidecar's service from a new snapshot. A policy whose spec did
    /// not change keeps its buckets and shares.
    pub fn update(&self, snap: &Snapshot) {
        let _serial = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.rules.load();
        let coordinated = self.coordinated.load(Relaxed);
        // Until the agent allocates, a new sidecar takes limit / (N + 1), N being the
        // service's registered instances (itself possibly among them: conservative).
        let peers = snap
            .services
            .get(&self.service)
            .map_or(0, |s| s.endpoints.len());
        let mut rules = Rules::default();
        for (name, spec) in &snap.rate_limits {
            if spec.service != self.service {
                continue;
            }
            if let Some(r) = old
                .rate
                .iter()
                .find(|r| &*r.name == name && &r.spec == spec)
            {
                rules.rate.push(r.clone());
                continue;
            }
            if spec.scope == Scope::Global && !coordinated {
                tracing::warn!(policy = %name, "global rate limit without etcd coordination: each sidecar enforces the full limit");
            }
            let limit = spec.limit.per_second();
            let initial = if spec.scope == Scope::Global && coordinated {
                limit / (peers + 1) as f64
            } else {
                limit
            };
            rules.rate.push(Arc::new(RateRule::new(
                name,
                spec.clone(),
                initial,
                &self.metrics,
            )));
        }
        for (name, spec) in &snap.concurrency_limits {
            if spec.service != self.service {
                continue;
            }
            let rule = match old.concurrency.iter().find(|r| &*r.name == name) {
                // Keep the in-flight count across a change of the maximum.
                Some(r) => ConcurrencyRule {
                    spec: spec.clone(),
                    ..ConcurrencyRule::clone_state(r)
                },
                None => ConcurrencyRule::new(name, spec.clone(), &self.metrics),
            };
            rules.concurrency.push(Arc::new(rule));
        }
        self.rules.store(Arc::new(rules));
    }

    /// Decide on one request. `Ok` carries the concurrency slots to hold until the response
    /// ends; `Err` is the 429 / 503 to answer.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        peer: Option<&HeaderValue>,
        source: IpAddr,
        consumer: Option<&str>,
    ) -> Result<Permits, ProxyError> {
        let rules = self.rules.load();
        if rules.rate.is_empty() && rules.concurrency.is_empty() {
            return Ok(Permits::default());
        }
        let req = RequestKey {
            headers,
            peer,
            source,
            consumer,
        };
        let mut now = None;
        for rule in &rules.rate {
            if !rule.matches(method, path, consumer) {
                continue;
            }
            let now = *now.get_or_insert_with(|| self.now());
            rule.check(&req, now)?;
        }
        let mut permits = Permits::default();
        for rule in &rules.concurrency {
            if rule
                .spec
                .route
                .as_ref()
                .is_some_and(|r| !r.matches(method.as_str(), path))
            {
                continue;
            }
            // Dropping `permits` on the error path releases the slots taken so far.
            permits.push(rule.acquire()?);
        }
        Ok(permits)
    }

    /// Fold each bucket's recent attempts into its demand, forget idle keys, and report the
    /// demand of every global policy (keys with any demand, busiest first, at most `max_keys`).
    pub fn sample(&self, elapsed: Duration, max_keys: usize) -> Vec<PolicyDemand> {
        let rules = self.rules.load();
        let now = self.now();
        let evict_before = now.saturating_sub(KEY_IDLE_EVICT.as_nanos() as u64);
        let mut out = Vec::new();
        for rule in &rules.rate {
            let mut keys = Vec::new();
            {
                let buckets = rule.buckets.read().unwrap_or_else(|p| p.into_inner());
                for (k, b) in buckets.iter() {
                    let d = b.sample(elapsed.as_secs_f64(), DEMAND_TAU.as_secs_f64());
                    if d >= 0.01 {
                        keys.push((*k, d));
                    }
                }
            }
            rule.evict_idle(
                &mut rule.buckets.write().unwrap_or_else(|p| p.into_inner()),
                evict_before,
            );
            let total: f64 = keys.iter().map(|(_, d)| d).sum();
            self.metrics.demand(&rule.name).set(total);
            if rule.spec.scope != Scope::Global {
                continue;
            }
            keys.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            keys.truncate(max_keys);
            out.push(PolicyDemand {
                policy: rule.name.clone(),
                limit: rule.limit,
                keys,
            });
        }
        out
    }

    /// Forget every policy's keys idle for [`KEY_IDLE_EVICT`] (and without demand).
    pub fn evict_idle(&self) {
        let evict_before = self.now().saturating_sub(KEY_IDLE_EVICT.as_nanos() as u64);
        for rule in &self.rules.load().rate {
            rule.evict_idle(
                &mut rule.buckets.write().unwrap_or_else(|p| p.into_inner()),
                evict_before,
            );
        }
    }

    /// Sweep idle keys every [`KEY_SWEEP_INTERVAL`] until the limits are dropped. Runs in every
    /// mode: the etcd coordinator's sampling also evicts, but a sidecar fed from a file has no
    /// coordinator, and its keys must be forgotten all the same (or, after
    /// [`MAX_KEYS_PER_POLICY`] distinct keys, every new key would share the overflow bucket).
    pub async fn sweeper(limits: std::sync::Weak<Self>) {
        let mut tick = tokio::time::interval(KEY_SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match limits.upgrade() {
                Some(l) => l.evict_idle(),
                None => return,
            }
        }
    }

    /// Set this sidecar's share (requests per second) of global `policy`: `shares` per key,
    /// `default` for every other key; `peers` is how many sidecars share it.
    pub fn set_shares(&self, policy: &str, default: f64, shares: &HashMap<u64, f64>, peers: usize) {
        let rules = self.rules.load();
        let Some(rule) = rules.rate.iter().find(|r| &*r.name == policy) else {
            return;
        };
        rule.default_share.store(default.to_bits(), Relaxed);
        rule.allocated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone_from(shares);
        let buckets = rule.buckets.read().unwrap_or_else(|p| p.into_inner());
        let mut total = 0.0;
        for (k, b) in buckets.iter() {
            let share = shares.get(k).copied().unwrap_or(default);
            b.set_rate(share, rule.local_burst(share));
            total += share;
        }
        if buckets.is_empty() {
            total = default;
        }
        rule.share_gauge.set(total);
        self.metrics.peers(&rule.name).set(peers as i64);
    }

    /// Names of the global policies in force.
    pub fn global_policies(&self) -> Vec<(Arc<str>, f64)> {
        self.rules
            .load()
            .rate
            .iter()
            .filter(|r| r.spec.scope == Scope::Global)
            .map(|r| (r.name.clone(), r.limit))
            .collect()
    }

    /// State for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let rules = self.rules.load();
        let rate: Vec<_> = rules
            .rate
            .iter()
            .map(|r| {
                let buckets = r.buckets.read().unwrap_or_else(|p| p.into_inner());
                let mut keys: Vec<_> = buckets
                    .iter()
                    .map(|(k, b)| (format!("{k:016x}"), b.rate(), b.demand()))
                    .collect();
                keys.sort_by(|a, b| b.2.total_cmp(&a.2));
                keys.truncate(20);
                serde_json::json!({
                    "name": &*r.name,
                    "spec": r.spec,
                    "limit_per_second": r.limit,
                    "default_share_per_second": f64::from_bits(r.default_share.load(Relaxed)),
                    "keys": buckets.len(),
                    "busiest_keys": keys.iter().map(|(k, share, demand)| serde_json::json!({"key": k, "share_per_second": share, "demand_per_second": demand})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let concurrency: Vec<_> = rules
            .concurrency
            .iter()
            .map(|r| serde_json::json!({"name": &*r.name, "spec": r.spec, "in_flight": r.in_flight.load(Relaxed)}))
            .collect();
        serde_json::json!({ "rate_limits": rate, "concurrency_limits": concurrency })
    }
}

// === impl RateRule ===

impl RateRule {
    fn new(name: &str, spec: RateLimitSpec, initial_share: f64, m: &LimitMetrics) -> Self {
        let name: Arc<str> = Arc::from(name);
        let limit = spec.limit.per_second();
        let policy_header = HeaderValue::from_str(&format!(
            "\"{name}\";q={};w={}",
            spec.limit.requests,
            spec.limit.per.seconds()
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("\"trellis\""));
        // A value built from a `Vec` allocates on its first clone (its buffer becomes shared);
        // clone it here so the first refused request does not.
        drop(policy_header.clone());
        let share_gauge = m.share(&name);
        share_gauge.set(initial_share);
        Self {
            burst: f64::from(spec.burst()),
            limit,
            last_sweep: AtomicU64::new(0),
            default_share: AtomicU64::new(initial_share.to_bits()),
            allocated: Mutex::default(),
            buckets: RwLock::new(KeyMap::default()),
            policy_header,
            allowed: m.decision(&name, "allowed"),
            limited: m.decision(&name, "limited"),
            share_gauge,
            spec,
            name,
        }
    }

    fn matches(&self, method: &Method, path: &str, consumer: Option<&str>) -> bool {
        self.spec
            .route
            .as_ref()
            .is_none_or(|r| r.matches(method.as_str(), path))
            && self
                .spec
                .consumer
                .as_deref()
                .is_none_or(|c| consumer == Some(c))
    }

    /// The bucket burst that goes with a share: the policy's burst, in proportion.
    fn local_burst(&self, share: f64) -> f64 {
        (self.burst * share / self.limit).max(1.0)
    }

    fn check(&self, req: &RequestKey<'_>, now: u64) -> Result<(), ProxyError> {
        let key = req.hash(&self.name, &self.spec.key);
        let found = {
            let buckets = self.buckets.read().unwrap_or_else(|p| p.into_inner());
            buckets
                .get(&key)
                .or_else(|| {
                    (buckets.len() >= MAX_KEYS_PER_POLICY)
                        .then(|| buckets.get(&OVERFLOW_KEY))
                        .flatten()
                })
                .cloned()
        };
        let bucket = match found {
            Some(b) => b,
            None => self.insert(key, now),
        };
        match bucket.acquire(now) {
            Ok(()) => {
                self.allowed.inc();
                Ok(())
            }
            Err(wait) => {
                self.limited.inc();
                Err(ProxyError::RateLimited {
                    policy: self.name.clone(),
                    retry_after: Duration::from_nanos(wait),
                    window: self.spec.limit.per.seconds(),
                    policy_header: self.policy_header.clone(),
                })
            }
        }
    }

    /// Forget keys unused since `evict_before` whose demand has decayed.
    fn evict_idle(&self, buckets: &mut KeyMap<Arc<Bucket>>, evict_before: u64) {
        buckets.retain(|_, b| b.idle_since() >= evict_before || b.demand() >= 0.01);
    }

    /// First request with a new key: create its bucket at its allocated or the default share,
    /// full: a new key (a new consumer) gets its burst, as with any token bucket. For a global
    /// limit the bucket's burst is the policy's burst in proportion to this sidecar's share, so
    /// the sidecars' fresh buckets together hold at most the policy's burst.
    fn insert(&self, key: u64, now: u64) -> Arc<Bucket> {
        let mut buckets = self.buckets.write().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS_PER_POLICY && !buckets.contains_key(&key) {
            // At the cap: make room from idle keys first, at most once per sweep interval so
            // that a flood of new keys costs one scan per interval, not one per request.
            let last = self.last_sweep.load(Relaxed);
            if now.saturating_sub(last) >= KEY_SWEEP_INTERVAL.as_nanos() as u64
                && self
                    .last_sweep
                    .compare_exchange(last, now, Relaxed, Relaxed)
                    .is_ok()
            {
                self.evict_idle(
                    &mut buckets,
                    now.saturating_sub(KEY_IDLE_EVICT.as_nanos() as u64),
                );
            }
        }
        let key = if buckets.len() >= MAX_KEYS_PER_POLICY {
            OVERFLOW_KEY
        } else {
            key
        };
        let share = self
            .allocated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
            .unwrap_or_else(|| f64::from_bits(self.default_share.load(Relaxed)));
        let burst = self.local_burst(share);
        buckets
            .entry(key)
            .or_insert_with(|| Arc::new(Bucket::new(share, burst, now)))
            .clone()
    }
}

// === impl ConcurrencyRule ===

impl ConcurrencyRule {
    fn new(name: &str, spec: ConcurrencyLimitSpec, m: &LimitMetrics) -> Self {
        let name: Arc<str> = Arc::from(name);
        Self {
            in_flight: Arc::new(AtomicU32::new(0)),
            allowed: m.concurrency_decision(&name, "allowed"),
            limited: m.concurrency_decision(&name, "limited"),
            gauge: m.in_flight(&name),
            spec,
            name,
        }
    }

    fn clone_state(r: &Self) -> Self {
        Self {
            name: r.name.clone(),
            spec: r.spec.clone(),
            in_flight: r.in_flight.clone(),
            allowed: r.allowed.clone(),
            limited: r.limited.clone(),
            gauge: r.gauge.clone(),
        }
    }

    fn acquire(&self) -> Result<Permit, ProxyError> {
        let max = self.spec.max_in_flight;
        let taken = self
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1));
        match taken {
            Ok(_) => {
                self.allowed.inc();
                self.gauge.inc();
                Ok(Permit {
                    in_flight: self.in_flight.clone(),
                    gauge: self.gauge.clone(),
                })
            }
            Err(_) => {
                self.limited.inc();
                Err(ProxyError::ConcurrencyLimited {
                    policy: self.name.clone(),
                    max,
                })
            }
        }
    }
}

// === impl Permit ===

impl Drop for Permit {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Relaxed);
        self.gauge.dec();
    }
}

// === impl Permits ===

impl Permits {
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    fn push(&mut self, p: Permit) {
        match self.first {
            None => self.first = Some(p),
            Some(_) => self.more.push(p),
        }
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }
}

impl std::fmt::Debug for Permits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Permits({})", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use trellis_policies::MeshDocument;

    fn limits(spec: serde_json::Value, coordinated: bool) -> Arc<RateLimits> {
        let mut doc = MeshDocument::default();
        doc.services.insert(
            "orders".into(),
            serde_json::from_value(serde_json::json!({"endpoints": [{"address": "127.0.0.1:1"}]}))
                .expect("service"),
        );
        doc.rate_limits.insert(
            "quota".into(),
            serde_json::from_value(spec).expect("rate limit spec"),
        );
        let snap =
            Snapshot::from_document(&doc, "trellis.local", 1, "test".into()).expect("snapshot");
        let limits = RateLimits::new("orders", &mut Registry::default());
        if coordinated {
            limits.set_coordinated();
        }
        limits.update(&snap);
        limits
    }

    fn call(l: &RateLimits, tenant: &str) -> bool {
        let mut h = HeaderMap::new();
        h.insert("x-tenant", HeaderValue::from_str(tenant).expect("header"));
        l.check(
            &Method::GET,
            "/",
            &h,
            None,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some("acme"),
        )
        .is_ok()
    }

    fn keys(l: &RateLimits) -> usize {
        l.rules.load().rate[0]
            .buckets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_forgotten_without_a_coordinator() {
        // File mode: nobody calls `sample`. 1 request per minute per tenant, no burst.
        let l = limits(
            serde_json::json!({"service": "orders", "scope": "local", "key": {"headers": ["x-tenant"]},
                               "limit": {"requests": 1, "per": "minute"}}),
            false,
        );
        let sweeper = tokio::spawn(RateLimits::sweeper(Arc::downgrade(&l)));
        for i in 0..MAX_KEYS_PER_POLICY {
            assert!(call(&l, &format!("t{i}")), "tenant {i} has its own bucket");
        }
        assert_eq!(keys(&l), MAX_KEYS_PER_POLICY);
        // At the cap, new keys share the overflow bucket: one is admitted, then it is spent.
        assert!(call(&l, "late-1"));
        assert!(!call(&l, "late-2"), "overflow bucket shared at the cap");
        // A minute later the idle keys are gone, so new keys get their own buckets again.
        tokio::time::sleep(KEY_IDLE_EVICT + 2 * KEY_SWEEP_INTERVAL).await;
        assert_eq!(keys(&l), 0, "idle keys evicted by the sweeper");
        for i in 0..100 {
            assert!(
                call(&l, &format!("new{i}")),
                "new tenant {i} has its own bucket"
            );
        }
        sweeper.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_policy_at_its_key_cap_makes_room_from_idle_keys_itself() {
        let l = limits(
            serde_json::json!({"service": "orders", "scope": "local", "key": {"headers": ["x-tenant"]},
                               "limit": {"requests": 1, "per": "minute"}}),
            false,
        );
        for i in 0..MAX_KEYS_PER_POLICY {
            assert!(call(&l, &format!("t{i}")));
        }
        // No sweeper running: the cap itself evicts the idle keys when a new key arrives.
        tokio::time::advance(KEY_IDLE_EVICT + KEY_SWEEP_INTERVAL).await;
        assert!(call(&l, "late-1"));
        assert!(
            call(&l, "late-2"),
            "late-2 has its own bucket, not the overflow"
        );
        assert_eq!(keys(&l), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_consumer_gets_its_burst_under_a_global_quota() {
        // The numbers: 30/min with burst 3, one sidecar, coordinated. Once the agent
        // allocated (the whole limit to the only participant), a new consumer's first eight
        // back-to-back requests: the burst (3) admitted, the rest refused.
        let l = limits(
            serde_json::json!({"service": "orders", "scope": "global",
                               "key": {"consumer": true},
                               "limit": {"requests": 30, "per": "minute"}, "burst": 3}),
            true,
        );
        l.set_shares("quota", 0.5, &HashMap::new(), 1);
        let admitted = (0..8).filter(|_| call(&l, "x")).count();
        assert_eq!(admitted, 3, "a new bucket starts full");
        // Then the rate: one more every 2 s.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(call(&l, "x"));
        assert!(!call(&l, "x"));
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_buckets_of_a_shared_limit_hold_the_burst_in_proportion_to_the_share() {
        // Two sidecars: this one's share is half the limit, so half the burst.
        let l = limits(
            serde_json::json!({"service": "orders", "scope": "global",
                               "key": {"headers": ["x-tenant"]},
                               "limit": {"requests": 100, "per": "second"}, "burst": 10}),
            true,
        );
        l.set_shares("quota", 50.0, &HashMap::new(), 2);
        assert_eq!((0..20).filter(|_| call(&l, "a")).count(), 5);
    }
}
