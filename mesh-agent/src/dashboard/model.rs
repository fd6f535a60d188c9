//! What the dashboard remembers: per tick, the traffic every instance reported since the
//! previous tick (counters are cumulative, so a tick's figure is a difference), summed per
//! service (its inbound side: what it served) and per edge (caller -> callee, from the callers'
//! outbound and ingress sides). One hour of ticks and 24 hours of per-minute availability are
//! kept, in memory only: a dashboard is stateless and any replica rebuilds this in an hour.

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use trellis_proxy::telemetry::summary::{Histogram, RateLimitUse, Summary, Traffic};

use super::fleet::Member;

/// How long ticks are kept.
pub const HISTORY_MS: u64 = 60 * 60 * 1000;
/// How long per-minute availability is kept.
pub const AVAILABILITY_MS: u64 = 24 * 60 * 60 * 1000;
/// A minute with at least this share of 5xx answers counts as down.
pub const DOWN_ERROR_RATIO: f64 = 0.05;

/// One tick of one series.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Point {
    pub t_ms: u64,
    /// Seconds the tick covers.
    pub seconds: f64,
    pub requests: f64,
    pub errors: f64,
    /// Answered 429: refused by a rate limit.
    pub limited: f64,
    #[serde(skip)]
    pub latency: Histogram,
}

/// How long per-consumer ticks are kept: two of the longest quota period (a minute), enough
/// to cover a period that straddles a tick. Memory is bounded by consumers x services x ticks
/// in two minutes (12 at the default 10 s interval), a few dozen bytes each.
pub const CONSUMER_HISTORY_MS: u64 = 2 * 60 * 1000;

/// One tick of one consumer at one service: its requests since the previous tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ConsumerTick {
    pub t_ms: u64,
    /// Seconds the tick covers (0 for the first one: nothing to subtract from).
    pub seconds: f64,
    pub requests: f64,
    /// Answered 429: refused by the consumer's quota (or another rate limit).
    pub refused: f64,
}

/// A consumer's requests at a service in the last period of its quota.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PeriodUse {
    /// Requests counted in the period, refused ones included.
    pub requests: f64,
    /// Of which answered 429.
    pub refused: f64,
    /// Admitted: what used the quota's budget (`requests - refused`).
    pub used: f64,
}

/// A minute of a service: whether it was up (served with < 5 % errors, or had nothing to serve
/// while an instance answered).
#[derive(Clone, Debug, Serialize)]
pub struct Minute {
    pub start_ms: u64,
    pub requests: f64,
    pub errors: f64,
    pub reachable: bool,
}

/// The last state of one instance.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub member: Member,
    /// The last summary read (`None` until one is).
    #[serde(skip)]
    pub last: Option<Summary>,
    pub last_ok_ms: Option<u64>,
    pub error: Option<String>,
    /// Endpoints this instance currently ejects, by destination service.
    pub ejecting: BTreeMap<String, f64>,
    /// Requests this instance was serving (inbound, not yet answered) at its last read; `None`
    /// while it cannot be read, or from a sidecar too old to say.
    pub in_flight: Option<f64>,
    /// Its rate-limit budgets and their use between its last two reads.
    pub rate_limits: Vec<InstanceLimit>,
}

/// One rate limit as one instance enforces it: its share of the budget and what it decided
/// between its last two reads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceLimit {
    pub policy: String,
    /// This instance's share of the limit, requests per second.
    pub share_per_second: f64,
    /// Sidecars sharing the limit, this one included (1 for a local limit).
    pub peers: f64,
    /// Allowed and limited per second over the last interval; `None` on the first read (no
    /// earlier counter to subtract).
    pub allowed_rps: Option<f64>,
    pub limited_rps: Option<f64>,
}

#[derive(Default)]
pub struct Model {
    pub instances: BTreeMap<(String, String), InstanceView>,
    pub services: BTreeMap<String, VecDeque<Point>>,
    pub edges: BTreeMap<(String, String), VecDeque<Point>>,
    /// Requests per (service, consumer, route) and status since this dashboard started.
    pub consumers: BTreeMap<(String, String, String), BTreeMap<u16, f64>>,
    /// Per (service, consumer), what each tick of the last [`CONSUMER_HISTORY_MS`] counted
    /// (all routes): what a quota's use in its last period is computed from.
    pub consumer_ticks: BTreeMap<(String, String), VecDeque<ConsumerTick>>,
    /// Rate-limit decisions per (service, policy): (allowed, limited) since start, and peers.
    pub rate_limits: BTreeMap<(String, String), (f64, f64, f64)>,
    pub availability: BTreeMap<String, VecDeque<Minute>>,
    pub last_tick_ms: Option<u64>,
    pub revision: i64,
    /// What the last refresh round cost (`None` before the first one).
    pub refresh: Option<Refresh>,
    /// Instances missing from the latest fleet read, with when they went missing: their last
    /// summary stays the baseline if they come back (a registration re-made after a lease lost
    /// to an etcd stall), so what they served meanwhile is still counted.
    departed: BTreeMap<(String, String), (InstanceView, u64)>,
}

/// One refresh round: how long reading the fleet and every summary took, and how many
/// instances answered. Shown in `/api/v1/overview` as `refresh`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Refresh {
    /// When the round started (unix ms).
    pub started_ms: u64,
    /// From the start of the round until the model had every answer: the fleet read from etcd
    /// plus every summary read, in ms.
    pub duration_ms: f64,
    /// The fleet read alone (registrations, statuses, lease TTLs), in ms.
    pub fleet_ms: f64,
    /// Instances in the fleet read.
    pub instances: usize,
    /// Instances whose summary was read.
    pub read: usize,
    /// Instances whose summary could not be read (refused, timed out, not a summary).
    pub failed: usize,
    /// Rounds completed since this dashboard started.
    pub rounds: u64,
}

/// How long a departed instance's baseline is kept.
const DEPARTED_MS: u64 = 5 * 60 * 1000;

/// Windowed figures of a series.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub rps: f64,
    pub requests: f64,
    pub errors: f64,
    /// Refused by rate limits (429), per second.
    pub limited_rps: f64,
    pub error_ratio: Option<f64>,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

// === impl Model ===

impl Model {
    /// Take one round of reads: the fleet as etcd has it and what each instance answered.
    pub fn tick(
        &mut self,
        now_ms: u64,
        revision: i64,
        members: Vec<Member>,
        reads: Vec<Result<Summary, String>>,
    ) {
        let seconds = self
            .last_tick_ms
            .map_or(0.0, |t| now_ms.saturating_sub(t) as f64 / 1000.0);
        self.last_tick_ms = Some(now_ms);
        self.revision = revision;
        let mut services: BTreeMap<String, Point> = BTreeMap::new();
        let mut edges: BTreeMap<(String, String), Point> = BTreeMap::new();
        let mut consumers: BTreeMap<(String, String), ConsumerTick> = BTreeMap::new();
        let mut reachable: BTreeMap<String, bool> = BTreeMap::new();
        let mut seen = BTreeMap::new();
        for (member, read) in members.into_iter().zip(reads) {
            let key = (member.service.clone(), member.instance.clone());
            let prev = self
                .instances
                .remove(&key)
                .or_else(|| self.departed.remove(&key).map(|(v, _)| v));
            let mut view = InstanceView {
                last: prev.as_ref().and_then(|p| p.last.clone()),
                last_ok_ms: prev.as_ref().and_then(|p| p.last_ok_ms),
                error: None,
                ejecting: BTreeMap::new(),
                in_flight: None,
                rate_limits: Vec::new(),
                member,
            };
            services.entry(view.member.service.clone()).or_default();
            let up = reachable.entry(view.member.service.clone()).or_default();
            match read {
                Ok(summary) => {
                    *up = true;
                    let older = view.last.as_ref();
                    self.add_deltas(&summary, older, &mut services, &mut edges, &mut consumers);
                    view.rate_limits = instance_limits(&summary, older);
                    view.in_flight = summary.in_flight.get(INBOUND).copied();
                    view.ejecting = summary
                        .endpoints
                        .iter()
                        .filter(|e| e.ejected > 0.0)
                        .map(|e| (e.service.clone(), e.ejected))
                        .collect();
                    view.last = Some(summary);
                    view.last_ok_ms = Some(now_ms);
                }
                Err(e) => view.error = Some(e),
            }
            seen.insert(key, view);
        }
        for (key, view) in std::mem::replace(&mut self.instances, seen) {
            self.departed.insert(key, (view, now_ms));
        }
        self.departed
            .retain(|_, (_, since)| now_ms.saturating_sub(*since) < DEPARTED_MS);
        for (name, mut p) in services {
            p.t_ms = now_ms;
            p.seconds = seconds;
            self.minute(
                &name,
                now_ms,
                &p,
                reachable.get(&name).copied().unwrap_or(false),
            );
            self.services.entry(name).or_default().push_back(p);
        }
        for (edge, mut p) in edges {
            p.t_ms = now_ms;
            p.seconds = seconds;
            self.edges.entry(edge).or_default().push_back(p);
        }
        for series in self.services.values_mut().chain(self.edges.values_mut()) {
            trim(series, now_ms);
        }
        self.services.retain(|_, s| !s.is_empty());
        self.edges.retain(|_, s| !s.is_empty());
        for (key, mut tick) in consumers {
            tick.t_ms = now_ms;
            tick.seconds = seconds;
            self.consumer_ticks.entry(key).or_default().push_back(tick);
        }
        for ticks in self.consumer_ticks.values_mut() {
            while ticks
                .front()
                .is_some_and(|t| t.t_ms + CONSUMER_HISTORY_MS < now_ms)
            {
                ticks.pop_front();
            }
        }
        self.consumer_ticks.retain(|_, t| !t.is_empty());
    }

    /// What `consumer` sent `service` in the `period_ms` up to the last tick (the last read of
    /// the fleet): a quota's current period as the dashboard can see it. A tick counts in full
    /// when it lies within the period, pro rata when it straddles the period's start (a tick
    /// longer than a per-second period counts as its average rate over the period).
    pub fn period_use(&self, service: &str, consumer: &str, period_ms: u64) -> PeriodUse {
        let mut u = PeriodUse::default();
        let Some(end) = self.last_tick_ms else {
            return u;
        };
        let start = end.saturating_sub(period_ms) as f64;
        let key = (service.to_string(), consumer.to_string());
        for t in self.consumer_ticks.get(&key).into_iter().flatten().rev() {
            if t.t_ms as f64 <= start {
                break;
            }
            let covered_ms = t.seconds * 1000.0;
            if covered_ms <= 0.0 {
                continue;
            }
            let from = t.t_ms as f64 - covered_ms;
            let share = ((t.t_ms as f64 - from.max(start)) / covered_ms).clamp(0.0, 1.0);
            u.requests += t.requests * share;
            u.refused += t.refused * share;
        }
        u.used = (u.requests - u.refused).max(0.0);
        u
    }

    /// Record what the round that started at `started_ms` cost: `fleet` for the etcd read,
    /// `total` until every read had answered.
    pub fn refreshed<T, E>(
        &mut self,
        started_ms: u64,
        fleet: std::time::Duration,
        total: std::time::Duration,
        reads: &[Result<T, E>],
    ) {
        let read = reads.iter().filter(|r| r.is_ok()).count();
        let rounds = self.refresh.as_ref().map_or(0, |r| r.rounds) + 1;
        self.refresh = Some(Refresh {
            started_ms,
            duration_ms: total.as_secs_f64() * 1000.0,
            fleet_ms: fleet.as_secs_f64() * 1000.0,
            instances: reads.len(),
            read,
            failed: reads.len() - read,
            rounds,
        });
    }

    /// Add what `summary` counted since `older` (nothing for a first read: its counters
    /// start before this dashboard looked).
    fn add_deltas(
        &mut self,
        summary: &Summary,
        older: Option<&Summary>,
        services: &mut BTreeMap<String, Point>,
        edges: &mut BTreeMap<(String, String), Point>,
        consumers: &mut BTreeMap<(String, String), ConsumerTick>,
    ) {
        let Some(older) = older else { return };
        for t in &summary.traffic {
            let before = older.traffic.iter().find(|o| {
                o.direction == t.direction && o.service == t.service && o.route == t.route
            });
            let (requests, errors, latency) = delta(t, before);
            let status = |t: &Traffic| t.statuses.get(&429).copied().unwrap_or(0.0);
            let limited = counter_delta(status(t), before.map_or(0.0, status));
            let point = match t.direction.as_str() {
                "inbound" => services.entry(t.service.clone()).or_default(),
                "outbound" | "ingress" => edges
                    .entry((summary.service.clone(), t.service.clone()))
                    .or_default(),
                _ => continue,
            };
            point.requests += requests;
            point.errors += errors;
            point.limited += limited;
            point.latency.merge(&latency);
        }
        for c in &summary.consumers {
            let before = older
                .consumers
                .iter()
                .find(|o| o.service == c.service && o.consumer == c.consumer && o.route == c.route);
            let totals = self
                .consumers
                .entry((c.service.clone(), c.consumer.clone(), c.route.clone()))
                .or_default();
            let tick = consumers
                .entry((c.service.clone(), c.consumer.clone()))
                .or_default();
            for (status, n) in &c.statuses {
                let was = before
                    .and_then(|b| b.statuses.get(status))
                    .copied()
                    .unwrap_or(0.0);
                let d = counter_delta(*n, was);
                *totals.entry(*status).or_default() += d;
                tick.requests += d;
                if *status == 429 {
                    tick.refused += d;
                }
            }
        }
        for r in &summary.rate_limits {
            let before = older.rate_limits.iter().find(|o| o.policy == r.policy);
            let e = self
                .rate_limits
                .entry((summary.service.clone(), r.policy.clone()))
                .or_default();
            e.0 += counter_delta(r.allowed, before.map_or(0.0, |b| b.allowed));
            e.1 += counter_delta(r.limited, before.map_or(0.0, |b| b.limited));
            e.2 = r.peers;
        }
    }

    fn minute(&mut self, service: &str, now_ms: u64, p: &Point, reachable: bool) {
        let start_ms = now_ms - now_ms % 60_000;
        let minutes = self.availability.entry(service.to_string()).or_default();
        match minutes.back_mut() {
            Some(m) if m.start_ms == start_ms => {
                m.requests += p.requests;
                m.errors += p.errors;
                m.reachable |= reachable;
            }
            _ => minutes.push_back(Minute {
                start_ms,
                requests: p.requests,
                errors: p.errors,
                reachable,
            }),
        }
        while minutes
            .front()
            .is_some_and(|m| m.start_ms + AVAILABILITY_MS < now_ms)
        {
            minutes.pop_front();
        }
    }

    /// Figures of `series` over the last `window_ms`.
    pub fn stats(series: &VecDeque<Point>, now_ms: u64, window_ms: u64) -> Stats {
        let mut s = Stats::default();
        let mut seconds = 0.0;
        let mut hist = Histogram::default();
        let mut limited = 0.0;
        for p in series.iter().filter(|p| p.t_ms + window_ms > now_ms) {
            s.requests += p.requests;
            s.errors += p.errors;
            limited += p.limited;
            seconds += p.seconds;
            hist.merge(&p.latency);
        }
        if seconds > 0.0 {
            s.rps = s.requests / seconds;
            s.limited_rps = limited / seconds;
        }
        if s.requests > 0.0 {
            s.error_ratio = Some(s.errors / s.requests);
            s.success_rate = Some(1.0 - s.errors / s.requests);
        }
        s.p50_ms = hist.quantile(0.5).map(|v| v * 1000.0);
        s.p99_ms = hist.quantile(0.99).map(|v| v * 1000.0);
        s
    }

    /// Availability of `service` over the last `window_ms`: the share of its observed minutes
    /// that were up, with the minutes that were not.
    pub fn availability(&self, service: &str, now_ms: u64, window_ms: u64) -> Availability {
        let mut a = Availability::default();
        for m in self
            .availability
            .get(service)
            .into_iter()
            .flatten()
            .filter(|m| m.start_ms + window_ms > now_ms)
        {
            a.minutes += 1;
            let failing = m.requests > 0.0 && m.errors / m.requests >= DOWN_ERROR_RATIO;
            if !m.reachable || failing {
                a.down.push(m.start_ms);
            }
        }
        if a.minutes > 0 {
            a.ratio = Some(1.0 - a.down.len() as f64 / a.minutes as f64);
        }
        a
    }
}

// === impl Model (alert signals) ===

impl Model {
    /// 5xx share of `service`'s requests over the last `window_ms`, from its per-minute
    /// counts (which reach back 24 h, where the ticks keep one hour).
    pub fn minute_error_ratio(&self, service: &str, now_ms: u64, window_ms: u64) -> Option<f64> {
        let (mut requests, mut errors) = (0.0, 0.0);
        for m in self
            .availability
            .get(service)
            .into_iter()
            .flatten()
            .filter(|m| m.start_ms + 60_000 + window_ms > now_ms)
        {
            requests += m.requests;
            errors += m.errors;
        }
        (requests > 0.0).then(|| errors / requests)
    }

    /// Instances of `service` whose last read succeeded.
    pub fn instances_up(&self, service: &str) -> usize {
        self.instances
            .values()
            .filter(|i| i.member.service == service && i.error.is_none() && i.last.is_some())
            .count()
    }

    /// Requests `service` was serving at its instances' last reads (those that answered).
    pub fn in_flight(&self, service: &str) -> f64 {
        self.instances
            .values()
            .filter(|i| i.member.service == service && i.error.is_none())
            .filter_map(|i| i.in_flight)
            .sum()
    }

    /// Endpoints of `service` its callers eject now.
    pub fn ejected(&self, service: &str) -> f64 {
        self.instances
            .values()
            .filter_map(|i| i.ejecting.get(service))
            .sum()
    }
}

/// Uptime / observed time, by minute.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Availability {
    pub ratio: Option<f64>,
    pub minutes: usize,
    /// Start (unix ms) of each minute that was down.
    pub down: Vec<u64>,
}

/// The direction a service's own requests are counted under.
const INBOUND: &str = "inbound";

/// Each rate limit of `summary` with its rates since `older`, over the time between the two
/// summaries by the sidecar's own clock (the read itself may have been slow).
fn instance_limits(summary: &Summary, older: Option<&Summary>) -> Vec<InstanceLimit> {
    let seconds = older
        .map(|o| summary.unix_ms.saturating_sub(o.unix_ms) as f64 / 1000.0)
        .filter(|s| *s > 0.0);
    summary
        .rate_limits
        .iter()
        .map(|r| {
            let before = older.and_then(|o| o.rate_limits.iter().find(|b| b.policy == r.policy));
            let rate = |now: f64, was: fn(&RateLimitUse) -> f64| {
                seconds.map(|s| counter_delta(now, before.map_or(0.0, was)) / s)
            };
            InstanceLimit {
                policy: r.policy.clone(),
                share_per_second: r.share_per_second,
                peers: r.peers,
                allowed_rps: rate(r.allowed, |b| b.allowed),
                limited_rps: rate(r.limited, |b| b.limited),
            }
        })
        .collect()
}

fn trim(series: &mut VecDeque<Point>, now_ms: u64) {
    while series.front().is_some_and(|p| p.t_ms + HISTORY_MS < now_ms) {
        series.pop_front();
    }
}

/// `now - was` for a cumulative counter; after a restart (it went down) the whole new value.
fn counter_delta(now: f64, was: f64) -> f64 {
    if now >= was {
        now - was
    } else {
        now
    }
}

fn delta(t: &Traffic, before: Option<&Traffic>) -> (f64, f64, Histogram) {
    let Some(b) = before else {
        // A series that appeared since the last read: all of it is new.
        return (t.requests(), t.errors(), t.latency.clone());
    };
    let (req, err) = (t.requests(), t.errors());
    if req < b.requests() {
        return (req, err, t.latency.clone());
    }
    let latency = t.latency.since(&b.latency).unwrap_or_default();
    (
        counter_delta(req, b.requests()),
        counter_delta(err, b.errors()),
        latency,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_proxy::telemetry::summary::{ConsumerTraffic, Traffic};

    fn member(service: &str, instance: &str) -> Member {
        Member {
            service: service.into(),
            instance: instance.into(),
            address: "127.0.0.1:1".into(),
            identity: format!("spiffe://t/service/{service}"),
            zone: None,
            version: "0".into(),
            draining: false,
            lease_ttl_left: Some(10),
            applied_revision: Some(1),
        }
    }

    fn summary(service: &str, ok: f64, failed: f64, calls: f64) -> Summary {
        let traffic = |direction: &str, to: &str, statuses: Vec<(u16, f64)>| Traffic {
            direction: direction.into(),
            service: to.into(),
            route: "default".into(),
            statuses: statuses.into_iter().collect(),
            latency: Histogram {
                bounds: vec![0.01, 0.1],
                counts: vec![ok + failed, ok + failed],
                count: ok + failed,
                sum: 0.0,
            },
        };
        Summary {
            service: service.into(),
            traffic: vec![
                traffic("inbound", service, vec![(200, ok), (503, failed)]),
                traffic("outbound", "payments", vec![(200, calls)]),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn ticks_are_differences_summed_over_instances_and_restarts_count_from_zero() {
        let mut m = Model::default();
        let members = || vec![member("orders", "a"), member("orders", "b")];
        m.tick(
            0,
            1,
            members(),
            vec![
                Ok(summary("orders", 100.0, 0.0, 5.0)),
                Ok(summary("orders", 50.0, 0.0, 0.0)),
            ],
        );
        // a: +90 ok, +10 failed; b restarted: 9 ok, 1 failed since.
        m.tick(
            10_000,
            1,
            members(),
            vec![
                Ok(summary("orders", 190.0, 10.0, 25.0)),
                Ok(summary("orders", 9.0, 1.0, 0.0)),
            ],
        );
        let s = Model::stats(&m.services["orders"], 10_000, 60_000);
        assert_eq!((s.requests, s.errors), (110.0, 11.0));
        assert!((s.rps - 11.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.error_ratio, Some(0.1));
        let e = Model::stats(
            &m.edges[&("orders".into(), "payments".into())],
            10_000,
            60_000,
        );
        assert_eq!(e.requests, 20.0);
        // An instance that stops answering is kept with its error and marks nothing up.
        m.tick(
            20_000,
            1,
            vec![member("orders", "a")],
            vec![Err("refused".into())],
        );
        assert_eq!(m.instances.len(), 1);
        assert!(m.instances.values().all(|i| i.error.is_some()));
        // b, missing from one fleet read, comes back: what it served meanwhile counts.
        let back = vec![
            Ok(summary("orders", 190.0, 10.0, 25.0)),
            Ok(summary("orders", 19.0, 1.0, 0.0)),
        ];
        m.tick(30_000, 1, members(), back);
        let s = Model::stats(&m.services["orders"], 30_000, 10_000);
        assert_eq!(
            s.requests, 10.0,
            "b's 10 since its last read, a's none: {s:?}"
        );
    }

    #[test]
    fn instances_report_in_flight_and_rate_limit_use_per_interval() {
        let mut m = Model::default();
        let read = |unix_ms, in_flight, allowed, limited| {
            let mut s = summary("orders", 0.0, 0.0, 0.0);
            s.unix_ms = unix_ms;
            s.in_flight.insert("inbound".into(), in_flight);
            s.in_flight.insert("outbound".into(), 9.0);
            s.rate_limits.push(RateLimitUse {
                policy: "orders-rps".into(),
                allowed,
                limited,
                share_per_second: 5.0,
                peers: 2.0,
            });
            s
        };
        m.tick(
            0,
            1,
            vec![member("orders", "a")],
            vec![Ok(read(1_000, 3.0, 10.0, 0.0))],
        );
        let first = &m.instances[&("orders".into(), "a".into())];
        assert_eq!(
            first.rate_limits[0].allowed_rps, None,
            "no rate from one read"
        );
        assert_eq!(m.in_flight("orders"), 3.0, "inbound only");
        m.tick(
            2_000,
            1,
            vec![member("orders", "a")],
            vec![Ok(read(3_000, 0.0, 30.0, 4.0))],
        );
        let view = &m.instances[&("orders".into(), "a".into())];
        let l = &view.rate_limits[0];
        assert_eq!((l.allowed_rps, l.limited_rps), (Some(10.0), Some(2.0)));
        assert_eq!((l.share_per_second, l.peers), (5.0, 2.0));
        assert_eq!(m.in_flight("orders"), 0.0);
        m.tick(
            4_000,
            1,
            vec![member("orders", "a")],
            vec![Err("refused".into())],
        );
        assert_eq!(
            m.in_flight("orders"),
            0.0,
            "an unread instance counts nothing"
        );
    }

    #[test]
    fn a_refresh_round_records_its_duration_and_the_reads_that_failed() {
        let mut m = Model::default();
        assert_eq!(m.refresh, None);
        let reads: Vec<Result<(), String>> = vec![Ok(()), Err("refused".into()), Ok(())];
        let ms = std::time::Duration::from_millis;
        m.refreshed(1_000, ms(40), ms(250), &reads);
        m.refreshed(11_000, ms(30), ms(200), &reads[..1]);
        assert_eq!(
            m.refresh,
            Some(Refresh {
                started_ms: 11_000,
                duration_ms: 200.0,
                fleet_ms: 30.0,
                instances: 1,
                read: 1,
                failed: 0,
                rounds: 2,
            })
        );
    }

    fn consumer_read(routes: &[(&str, f64, f64)]) -> Summary {
        let mut s = summary("gw", 0.0, 0.0, 0.0);
        s.consumers = routes
            .iter()
            .map(|(route, ok, refused)| ConsumerTraffic {
                service: "gw".into(),
                consumer: "acme".into(),
                route: route.to_string(),
                statuses: [(200, *ok), (429, *refused)].into_iter().collect(),
            })
            .collect();
        s
    }

    #[test]
    fn consumers_are_counted_per_route_and_per_quota_period() {
        let mut m = Model::default();
        let gw = || vec![member("gw", "a")];
        let at = |m: &mut Model, t, routes: &[(&str, f64, f64)]| {
            m.tick(t, 1, gw(), vec![Ok(consumer_read(routes))])
        };
        at(&mut m, 0, &[("list", 100.0, 0.0), ("get", 10.0, 0.0)]);
        // Every 10 s: list +6 ok, get +3 ok and +1 refused.
        for i in 1..=8u64 {
            let f = i as f64;
            at(
                &mut m,
                i * 10_000,
                &[("list", 100.0 + 6.0 * f, 0.0), ("get", 10.0 + 3.0 * f, f)],
            );
        }
        let key = |r: &str| ("gw".to_string(), "acme".to_string(), r.to_string());
        assert_eq!(m.consumers[&key("list")].get(&200), Some(&48.0));
        assert_eq!(m.consumers[&key("get")].get(&200), Some(&24.0));
        assert_eq!(m.consumers[&key("get")].get(&429), Some(&8.0));
        // A minute: the last six ticks, 10 requests each, 1 refused.
        let minute = m.period_use("gw", "acme", 60_000);
        assert_eq!(
            minute,
            PeriodUse {
                requests: 60.0,
                refused: 6.0,
                used: 54.0
            }
        );
        // A second: a tenth of the last tick.
        let second = m.period_use("gw", "acme", 1_000);
        assert!((second.requests - 1.0).abs() < 1e-9, "{second:?}");
        assert!((second.used - 0.9).abs() < 1e-9, "{second:?}");
        assert_eq!(m.period_use("gw", "nobody", 60_000), PeriodUse::default());
        // Ticks older than two minutes are dropped: memory stays bounded.
        for i in 9..=30u64 {
            let f = i as f64;
            at(
                &mut m,
                i * 10_000,
                &[("list", 100.0 + 6.0 * f, 0.0), ("get", 10.0 + 3.0 * f, f)],
            );
        }
        let ticks = &m.consumer_ticks[&("gw".to_string(), "acme".to_string())];
        assert_eq!(ticks.len(), 13, "{ticks:?}");
    }

    #[test]
    fn availability_counts_minutes_down() {
        let mut m = Model::default();
        let p = |requests, errors| Point {
            requests,
            errors,
            ..Default::default()
        };
        m.minute("s", 0, &p(100.0, 1.0), true);
        m.minute("s", 60_000, &p(100.0, 20.0), true);
        m.minute("s", 120_000, &p(0.0, 0.0), false);
        m.minute("s", 180_000, &p(0.0, 0.0), true);
        let a = m.availability("s", 200_000, 3_600_000);
        assert_eq!((a.minutes, a.down.clone()), (4, vec![60_000, 120_000]));
        assert_eq!(a.ratio, Some(0.5));
    }
}
