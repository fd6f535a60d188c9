//! Sharing global rate limits between a service's sidecars through etcd, without a server.
//!
//! Each sidecar measures its demand per global policy and key (the data plane counts it),
//! publishes it under its own lease at `<prefix>/v1/ratelimit/<service>/<instance>` at most
//! every [`PUBLISH_MIN_INTERVAL`] and only when it moved, and watches the same prefix. From that
//! table every sidecar computes the same max-min fair split
//! ([`trellis_proxy::policy::ratelimit::allocate`]) and runs its buckets at its own share, so the shares
//! sum to the limit. Nothing here is on the request path.
//!
//! - A sidecar that dies: its lease expires, its entry disappears, the others' shares grow.
//! - A new sidecar: it starts at `limit / (N + 1)` (set by the data plane) until it sees the
//!   table, then at `limit / (P + 1)` until its own entry appears in it.
//! - Cut off from etcd: it keeps its shares for [`GRACE`], then moves them linearly over
//!   [`DECAY`] towards `limit / N` (N: the sidecars last seen), which also sums to the limit.
//!
//! Algorithm and error bounds: `docs/ratelimit.md`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trellis_proxy::policy::ratelimit::allocate::{allocate, FLOOR_FRACTION, HEADROOM};
use trellis_proxy::policy::ratelimit::{PolicyDemand, RateLimits};

use super::keys::Keys;
use super::{backoff, Etcd, EtcdError};

/// How often demand is sampled and shares recomputed.
pub const TICK: Duration = Duration::from_millis(250);
/// Demand is published at most this often...
pub const PUBLISH_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// ...and only when some key moved by more than this fraction of its value...
const PUBLISH_RELATIVE: f64 = 0.03;
/// ...or by more than this fraction of the limit.
const PUBLISH_ABSOLUTE: f64 = 0.005;
/// Keys published per policy (the busiest); others get the default share.
pub const MAX_PUBLISHED_KEYS: usize = 100;
/// Cut off from etcd, a sidecar keeps its shares this long...
pub const GRACE: Duration = Duration::from_secs(5);
/// ...then moves them to `limit / N` over this long.
pub const DECAY: Duration = Duration::from_secs(10);

/// What a sidecar publishes: per global policy, demand (requests per second) per key (hex).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemandReport {
    pub policies: BTreeMap<String, BTreeMap<String, f64>>,
}

/// The demand table as this sidecar last read it.
#[derive(Debug, Default)]
struct Table {
    /// By instance id: BTreeMap order is the participants' order in the allocation.
    entries: BTreeMap<String, DemandReport>,
    /// Set once the table has been read at least once.
    loaded: bool,
    connected: bool,
    /// When `connected` last became false.
    lost_at: Option<Instant>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CoordinatorStatus {
    pub key: String,
    pub connected: bool,
    pub peers: usize,
    pub publishes: u64,
    pub last_error: Option<String>,
    /// Shares in force per policy (requests per second, sum over keys).
    pub shares: BTreeMap<String, f64>,
}

/// Shares computed while connected, the starting point of the decay.
#[derive(Clone, Debug, Default)]
struct Allocation {
    default: f64,
    keys: HashMap<u64, f64>,
    peers: usize,
}

pub struct Coordinator {
    conn: super::Connector,
    keys: Keys,
    service: String,
    instance: String,
    limits: Arc<RateLimits>,
    publish: watch::Sender<Vec<u8>>,
    table: Arc<Mutex<Table>>,
    status: Arc<Mutex<CoordinatorStatus>>,
}

// === impl Coordinator ===

impl Coordinator {
    /// `publish` goes to the registrar, which writes it under the instance's lease.
    pub fn new(
        conn: impl Into<super::Connector>,
        service: String,
        instance: String,
        limits: Arc<RateLimits>,
        publish: watch::Sender<Vec<u8>>,
    ) -> Self {
        let conn = conn.into();
        let keys = Keys::new(&conn.cfg().prefix);
        let status = CoordinatorStatus {
            key: keys.demand(&service, &instance),
            ..Default::default()
        };
        limits.set_coordinated();
        Self {
            conn,
            keys,
            service,
            instance,
            limits,
            publish,
            table: Arc::default(),
            status: Arc::new(Mutex::new(status)),
        }
    }

    pub fn status(&self) -> Arc<Mutex<CoordinatorStatus>> {
        self.status.clone()
    }

    /// Run until the registrar (the receiver of `publish`) is gone.
    pub async fn run(self) {
        let watcher = tokio::spawn(watch_table(
            self.conn.clone(),
            self.keys.demands(&self.service),
            self.table.clone(),
            self.status.clone(),
        ));
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sample = Instant::now();
        let mut published: Option<(Instant, DemandReport)> = None;
        let mut last_good: HashMap<Arc<str>, Allocation> = HashMap::new();
        loop {
            tick.tick().await;
            if self.publish.is_closed() {
                watcher.abort();
                return;
            }
            let elapsed = last_sample.elapsed();
            last_sample = Instant::now();
            let demand = self.limits.sample(elapsed, MAX_PUBLISHED_KEYS);
            let report = to_report(&demand);
            if should_publish(published.as_ref(), &report, &demand) {
                if let Ok(bytes) = serde_json::to_vec(&report) {
                    self.publish.send_replace(bytes);
                    self.set_status(|s| s.publishes += 1);
                    published = Some((Instant::now(), report));
                }
            }
            self.apply_shares(&demand, &mut last_good);
        }
    }

    /// Compute this sidecar's shares from the table (or decay them when cut off) and hand
    /// them to the data plane.
    fn apply_shares(&self, demand: &[PolicyDemand], last_good: &mut HashMap<Arc<str>, Allocation>) {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if !table.loaded {
            // Keep the data plane's conservative start until the table has been read.
            return;
        }
        let cut_off = table
            .lost_at
            .map(|t| t.elapsed())
            .filter(|_| !table.connected);
        let mut shares = BTreeMap::new();
        for d in demand {
            let alloc = match cut_off {
                Some(lost) if lost > GRACE => {
                    let Some(last) = last_good.get(&d.policy) else {
                        continue;
                    };
                    let t = ((lost - GRACE).as_secs_f64() / DECAY.as_secs_f64()).min(1.0);
                    let target = d.limit / last.peers.max(1) as f64;
                    let blend = |s: f64| s + (target - s) * t;
                    Allocation {
                        default: blend(last.default),
                        keys: last.keys.iter().map(|(k, s)| (*k, blend(*s))).collect(),
                        peers: last.peers,
                    }
                }
                Some(_) => match last_good.get(&d.policy) {
                    Some(last) => last.clone(),
                    None => continue,
                },
                None => {
                    let a = allocation(&table.entries, &self.instance, &d.policy, d.limit);
                    last_good.insert(d.policy.clone(), a.clone());
                    a
                }
            };
            self.limits
                .set_shares(&d.policy, alloc.default, &alloc.keys, alloc.peers);
            let total = if alloc.keys.is_empty() {
                alloc.default
            } else {
                alloc.keys.values().sum()
            };
            shares.insert(d.policy.to_string(), total);
        }
        let peers = table.entries.len();
        drop(table);
        self.set_status(|s| {
            s.shares = shares;
            s.peers = peers;
        });
    }

    fn set_status(&self, f: impl FnOnce(&mut CoordinatorStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// This sidecar's shares of `policy` from the table: the participants are the entries that
/// report the policy, in instance order; every sidecar computes the same split.
fn allocation(
    entries: &BTreeMap<String, DemandReport>,
    me: &str,
    policy: &str,
    limit: f64,
) -> Allocation {
    let participants: Vec<(&String, &BTreeMap<String, f64>)> = entries
        .iter()
        .filter_map(|(id, r)| r.policies.get(policy).map(|p| (id, p)))
        .collect();
    let mut all_keys: Vec<&String> = participants.iter().flat_map(|(_, p)| p.keys()).collect();
    all_keys.sort_unstable();
    all_keys.dedup();
    let Some(my_index) = participants.iter().position(|(id, _)| *id == me) else {
        return newcomer(&participants, &all_keys, limit);
    };
    let n = participants.len();
    let mut keys = HashMap::new();
    let mut demands = vec![0.0; n];
    for key in all_keys {
        let Ok(hash) = u64::from_str_radix(key, 16) else {
            continue;
        };
        for (i, (_, p)) in participants.iter().enumerate() {
            demands[i] = p.get(key).copied().unwrap_or(0.0);
        }
        keys.insert(hash, allocate(limit, &demands)[my_index]);
    }
    Allocation {
        // A key nobody reports demand for is split equally.
        default: limit / n as f64,
        keys,
        peers: n,
    }
}

/// A sidecar not in the table yet (just started): the others still split the whole limit
/// between themselves, so whatever it admits is over the limit until they see its entry (one
/// publish, well under a second). For a key the others report it takes only what they leave
/// unused, between a floor and `limit / (n + 1)`; for other keys `limit / (n + 1)`.
fn newcomer(
    participants: &[(&String, &BTreeMap<String, f64>)],
    all_keys: &[&String],
    limit: f64,
) -> Allocation {
    let n = participants.len();
    let cap = limit / (n + 1) as f64;
    let floor = limit * FLOOR_FRACTION / (n + 1) as f64;
    let mut keys = HashMap::new();
    for key in all_keys {
        let Ok(hash) = u64::from_str_radix(key, 16) else {
            continue;
        };
        let used: f64 = participants
            .iter()
            .map(|(_, p)| p.get(*key).copied().unwrap_or(0.0) * HEADROOM)
            .sum();
        keys.insert(hash, (limit - used).clamp(floor, cap.max(floor)));
    }
    Allocation {
        default: cap,
        keys,
        peers: n + 1,
    }
}

fn to_report(demand: &[PolicyDemand]) -> DemandReport {
    DemandReport {
        policies: demand
            .iter()
            .map(|d| {
                let keys = d
                    .keys
                    .iter()
                    // Two decimals: identical text for identical values on every node.
                    .map(|(k, v)| (format!("{k:016x}"), (v * 100.0).round() / 100.0))
                    .collect();
                (d.policy.to_string(), keys)
            })
            .collect(),
    }
}

/// Publish when the set of policies or keys changed, or some key's demand moved noticeably,
/// and not more often than [`PUBLISH_MIN_INTERVAL`].
fn should_publish(
    last: Option<&(Instant, DemandReport)>,
    next: &DemandReport,
    demand: &[PolicyDemand],
) -> bool {
    let Some((at, prev)) = last else {
        return !next.policies.is_empty();
    };
    if at.elapsed() < PUBLISH_MIN_INTERVAL || prev == next {
        return false;
    }
    if prev.policies.len() != next.policies.len() {
        return true;
    }
    for d in demand {
        let (Some(old), Some(new)) = (prev.policies.get(&*d.policy), next.policies.get(&*d.policy))
        else {
            return true;
        };
        if old.len() != new.len() || old.keys().ne(new.keys()) {
            return true;
        }
        let moved = old.iter().zip(new.values()).any(|((_, o), n)| {
            (n - o).abs() > (o * PUBLISH_RELATIVE).max(d.limit * PUBLISH_ABSOLUTE)
        });
        if moved {
            return true;
        }
    }
    false
}

/// Read the service's demand table, then follow it with a watch; on any failure mark the
/// table disconnected, back off and read it again (it is small).
async fn watch_table(
    conn: super::Connector,
    prefix: String,
    table: Arc<Mutex<Table>>,
    status: Arc<Mutex<CoordinatorStatus>>,
) {
    let mut attempt = 0;
    loop {
        let start = Instant::now();
        let err = table_session(&conn, &prefix, &table, &status).await;
        {
            let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
            if t.connected {
                t.connected = false;
                t.lost_at = Some(Instant::now());
            }
        }
        {
            let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
            s.connected = false;
            s.last_error = Some(err.to_string());
        }
        tracing::warn!(error = %err, "rate-limit demand watch failed; keeping the current shares");
        if start.elapsed() > Duration::from_secs(10) {
            attempt = 0;
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt += 1;
    }
}

async fn table_session(
    conn: &super::Connector,
    prefix: &str,
    table: &Mutex<Table>,
    status: &Mutex<CoordinatorStatus>,
) -> EtcdError {
    let etcd = match conn.connect().await {
        Ok(e) => e,
        Err(e) => return e,
    };
    match follow(&etcd, prefix, table, status).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn follow(
    etcd: &Etcd,
    prefix: &str,
    table: &Mutex<Table>,
    status: &Mutex<CoordinatorStatus>,
) -> Result<std::convert::Infallible, EtcdError> {
    let mut client = etcd.client.clone();
    let resp = etcd
        .call(client.get(prefix, Some(GetOptions::new().with_prefix())))
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut entries = BTreeMap::new();
    for kv in resp.kvs() {
        if let Some((id, r)) = parse_entry(prefix, kv.key(), kv.value()) {
            entries.insert(id, r);
        }
    }
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = etcd.call(client.watch(prefix, Some(opts))).await?;
    {
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        t.entries = entries;
        t.loaded = true;
        t.connected = true;
        t.lost_at = None;
    }
    {
        let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
        s.connected = true;
        s.last_error = None;
    }
    let mut live = super::WatchLiveness::new();
    loop {
        let msg = tokio::select! {
            msg = stream.message() => msg.map_err(|e| etcd.err(e))?,
                        _ = live.tick() => {
                live.check(etcd, &mut stream).await?;
                continue;
            }
        };
        live.heard();
        let Some(resp) = msg else {
            return Err(etcd.err(etcd_client::Error::WatchError("watch stream ended".into())));
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            return Err(etcd.err(etcd_client::Error::WatchError(
                "watch canceled or compacted; re-reading the demand table".into(),
            )));
        }
        let mut t = table.lock().unwrap_or_else(|p| p.into_inner());
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    if let Some((id, r)) = parse_entry(prefix, kv.key(), kv.value()) {
                        t.entries.insert(id, r);
                    }
                }
                EventType::Delete => {
                    if let Some(id) = instance_of(prefix, kv.key()) {
                        t.entries.remove(&id);
                    }
                }
            }
        }
    }
}

fn instance_of(prefix: &str, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    let id = key.strip_prefix(prefix)?;
    (!id.is_empty() && !id.contains('/')).then(|| id.to_string())
}

/// The demand table as read from etcd values (`(key, value)` under `prefix`), and the shares
/// `me` computes from it for `policy`: `(default, per-key shares, peers, me in the table)`. Exposed for the fuzz
/// targets only (`fuzzing` feature): other sidecars' entries are untrusted input.
#[cfg(feature = "fuzzing")]
pub fn fuzz_shares(
    prefix: &str,
    kvs: &[(&[u8], &[u8])],
    me: &str,
    policy: &str,
    limit: f64,
) -> (f64, HashMap<u64, f64>, usize, bool) {
    let entries: BTreeMap<String, DemandReport> = kvs
        .iter()
        .filter_map(|(k, v)| parse_entry(prefix, k, v))
        .collect();
    let listed = entries
        .get(me)
        .is_some_and(|r| r.policies.contains_key(policy));
    let a = allocation(&entries, me, policy, limit);
    (a.default, a.keys, a.peers, listed)
}

/// A table entry; a malformed one is logged and left out (that sidecar then counts as absent,
/// which errs on the side of a smaller total).
fn parse_entry(prefix: &str, key: &[u8], value: &[u8]) -> Option<(String, DemandReport)> {
    let id = instance_of(prefix, key)?;
    match serde_json::from_slice::<DemandReport>(value) {
        Ok(r)
            if r.policies
                .values()
                .flat_map(|p| p.values())
                .all(|v| v.is_finite() && *v >= 0.0) =>
        {
            Some((id, r))
        }
        Ok(_) => {
            tracing::warn!(instance = %id, "ignoring demand entry with a negative or non-finite value");
            None
        }
        Err(e) => {
            tracing::warn!(instance = %id, error = %e, "ignoring malformed demand entry");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(policy: &str, keys: &[(u64, f64)]) -> DemandReport {
        DemandReport {
            policies: BTreeMap::from([(
                policy.to_string(),
                keys.iter()
                    .map(|(k, v)| (format!("{k:016x}"), *v))
                    .collect(),
            )]),
        }
    }

    #[test]
    fn every_sidecar_computes_shares_that_sum_to_the_limit() {
        let entries = BTreeMap::from([
            ("a".to_string(), report("p", &[(1, 120.0), (2, 5.0)])),
            ("b".to_string(), report("p", &[(1, 60.0)])),
            ("c".to_string(), report("p", &[(1, 20.0)])),
        ]);
        let shares: Vec<Allocation> = ["a", "b", "c"]
            .iter()
            .map(|me| allocation(&entries, me, "p", 100.0))
            .collect();
        for key in [1u64, 2] {
            let sum: f64 = shares.iter().map(|a| a.keys[&key]).sum();
            assert!((sum - 100.0).abs() < 1e-9, "key {key}: {sum}");
        }
        assert!(
            (shares[2].keys[&1] - 20.0 * trellis_proxy::policy::ratelimit::allocate::HEADROOM)
                .abs()
                < 1e-9
        );
        assert!(shares
            .iter()
            .all(|a| a.peers == 3 && (a.default - 100.0 / 3.0).abs() < 1e-9));
    }

    #[test]
    fn a_sidecar_missing_from_the_table_is_conservative() {
        let entries = BTreeMap::from([
            ("a".to_string(), report("p", &[(1, 50.0)])),
            ("b".to_string(), report("q", &[(1, 50.0)])),
        ]);
        let a = allocation(&entries, "new", "p", 90.0);
        assert_eq!(a.peers, 2);
        assert!((a.default - 45.0).abs() < 1e-9);
        // For the key `a` reports, only what `a` leaves unused.
        let spare = 90.0 - 50.0 * HEADROOM;
        assert!((a.keys[&1] - spare).abs() < 1e-9, "{:?}", a.keys);
        // A busy key: the floor.
        let busy = BTreeMap::from([("a".to_string(), report("p", &[(1, 200.0)]))]);
        let a = allocation(&busy, "new", "p", 90.0);
        assert!((a.keys[&1] - 90.0 * FLOOR_FRACTION / 2.0).abs() < 1e-9);
    }

    #[test]
    fn publishing_waits_for_a_meaningful_change() {
        let demand = |v: f64| {
            vec![PolicyDemand {
                policy: Arc::from("p"),
                limit: 100.0,
                keys: vec![(1, v)],
            }]
        };
        let first = to_report(&demand(40.0));
        assert!(should_publish(None, &first, &demand(40.0)));
        let long_ago = Instant::now() - Duration::from_secs(1);
        let last = (long_ago, first);
        assert!(!should_publish(
            Some(&last),
            &to_report(&demand(41.0)),
            &demand(41.0)
        ));
        assert!(should_publish(
            Some(&last),
            &to_report(&demand(45.0)),
            &demand(45.0)
        ));
        let recent = (Instant::now(), last.1.clone());
        assert!(!should_publish(
            Some(&recent),
            &to_report(&demand(80.0)),
            &demand(80.0)
        ));
    }

    #[test]
    fn malformed_entries_are_left_out() {
        let p = "/t/v1/ratelimit/orders/";
        assert!(parse_entry(p, b"/t/v1/ratelimit/orders/a", b"{\"policies\":{}}").is_some());
        assert!(parse_entry(p, b"/t/v1/ratelimit/orders/a", b"not json").is_none());
        assert!(parse_entry(
            p,
            b"/t/v1/ratelimit/orders/a",
            b"{\"policies\":{\"p\":{\"1\":-5}}}"
        )
        .is_none());
        assert!(parse_entry(p, b"/t/v1/ratelimit/orders/a/b", b"{\"policies\":{}}").is_none());
    }
}
