//! Usage per consumer, route and day, for the portal's usage page, from the counters every
//! ingress already keeps (`trellis_consumer_requests_total`).
//!
//! Each ingress replica reads its own `/metrics` every [`INTERVAL`] and writes, per consumer,
//! what it counted today under `<prefix>/v1/portal/usage/<consumer>/<day>/<replica>`; the
//! portal adds the replicas up. A replica's name is random per process, so a restart starts a
//! new entry instead of overwriting the day's counts; at midnight (UTC) the counters at that
//! moment become the next day's zero. A day's entries share one lease, so etcd drops them after
//! [`RETENTION`]. No central collector: the portal reads etcd.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::store::{now, Store, StoreError};

pub const INTERVAL: Duration = Duration::from_secs(5);
/// How long a day's entries are kept: each day's are attached to one lease of this TTL.
pub const RETENTION: Duration = Duration::from_secs(32 * 86_400);

/// One route's counts on one day.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Counts {
    pub requests: u64,
    /// 401, 403 and 429 answers.
    pub refused: u64,
    /// 5xx answers.
    pub errors: u64,
}

/// `(consumer, route) -> counts`, cumulative since this process started.
type Totals = BTreeMap<(String, String), Counts>;

pub struct Ledger {
    pub store: Store,
    /// This ingress's admin listener (its `/metrics`).
    pub admin: SocketAddr,
    pub replica: String,
}

// === impl Ledger ===

impl Ledger {
    pub async fn run(self) {
        let mut base = Totals::new();
        let mut day = day_of(now());
        let mut written: BTreeMap<String, BTreeMap<String, Counts>> = BTreeMap::new();
        // The lease of the current day's entries.
        let mut lease: Option<i64> = None;
        let mut last_error = String::new();
        loop {
            tokio::time::sleep(INTERVAL).await;
            let totals = match self.totals().await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(error = %e, "portal usage: cannot read this ingress's metrics");
                    continue;
                }
            };
            let today = day_of(now());
            if today != day {
                (base, day) = (totals.clone(), today);
                written.clear();
                lease = None;
            }
            if lease.is_none() {
                match self.store.lease(RETENTION).await {
                    Ok(id) => lease = Some(id),
                    Err(e) => {
                        tracing::debug!(error = %e, "portal usage: no lease yet");
                        continue;
                    }
                }
            }
            let by_consumer = since(&totals, &base);
            for (consumer, routes) in by_consumer {
                if written.get(&consumer) == Some(&routes) {
                    continue;
                }
                let key = format!("usage/{consumer}/{day}/{}", self.replica);
                let value = serde_json::to_vec(&routes).unwrap_or_default();
                match self.store.put(&key, value, lease).await {
                    Ok(()) => {
                        written.insert(consumer, routes);
                        last_error.clear();
                    }
                    Err(e) => {
                        // The lease may be what failed (expired, or etcd restored from an
                        // older backup): a new one next time.
                        lease = None;
                        if e.to_string() != last_error {
                            last_error = e.to_string();
                            tracing::warn!(error = %last_error, "portal usage: cannot record usage in etcd");
                        }
                        break;
                    }
                }
            }
        }
    }

    async fn totals(&self) -> Result<Totals, crate::usage::ReportError> {
        let source = crate::usage::Source::Targets(vec![self.admin.to_string()]);
        let mut t = Totals::new();
        for s in crate::usage::scrape(&source).await? {
            if s.name != "trellis_consumer_requests_total" {
                continue;
            }
            let label = |n: &str| s.labels.get(n).cloned().unwrap_or_default();
            let c = t.entry((label("consumer"), label("route"))).or_default();
            let n = s.value.max(0.0) as u64;
            c.requests += n;
            match label("status_code").as_str() {
                "401" | "403" | "429" => c.refused += n,
                code if code.starts_with('5') => c.errors += n,
                _ => {}
            }
        }
        Ok(t)
    }
}

/// Per consumer and route: `totals - base` (counts since the day began).
fn since(totals: &Totals, base: &Totals) -> BTreeMap<String, BTreeMap<String, Counts>> {
    let mut out: BTreeMap<String, BTreeMap<String, Counts>> = BTreeMap::new();
    for ((consumer, route), c) in totals {
        let b = base
            .get(&(consumer.clone(), route.clone()))
            .cloned()
            .unwrap_or_default();
        let d = Counts {
            requests: c.requests.saturating_sub(b.requests),
            refused: c.refused.saturating_sub(b.refused),
            errors: c.errors.saturating_sub(b.errors),
        };
        if d.requests > 0 {
            out.entry(consumer.clone())
                .or_default()
                .insert(route.clone(), d);
        }
    }
    out
}

/// One day of a consumer's usage, every replica added up.
#[derive(Debug, Serialize, PartialEq)]
pub struct Day {
    pub day: String,
    pub routes: BTreeMap<String, Counts>,
    pub total: Counts,
}

/// A consumer's usage by day (latest first), at most 31 days.
pub async fn read(store: &Store, consumer: &str) -> Result<Vec<Day>, StoreError> {
    let mut days: BTreeMap<String, BTreeMap<String, Counts>> = BTreeMap::new();
    for (rel, value) in store.list(&format!("usage/{consumer}/")).await? {
        let Some((day, _replica)) = rel.split_once('/') else {
            continue;
        };
        // A value that does not parse is left out: usage is informative, never a gate.
        let Ok(routes) = serde_json::from_slice::<BTreeMap<String, Counts>>(&value) else {
            tracing::warn!(key = %rel, "portal usage: an entry does not parse");
            continue;
        };
        let d = days.entry(day.to_string()).or_default();
        for (route, c) in routes {
            let e = d.entry(route).or_default();
            e.requests += c.requests;
            e.refused += c.refused;
            e.errors += c.errors;
        }
    }
    Ok(days
        .into_iter()
        .rev()
        .take(31)
        .map(|(day, routes)| {
            let mut total = Counts::default();
            for c in routes.values() {
                total.requests += c.requests;
                total.refused += c.refused;
                total.errors += c.errors;
            }
            Day { day, routes, total }
        })
        .collect())
}

/// `YYYY-MM-DD` (UTC) of a unix time (Howard Hinnant's civil-from-days).
pub fn day_of(unix: u64) -> String {
    let z = (unix / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_counts_since_the_day_began() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_709_164_800), "2024-02-29");
        assert_eq!(day_of(1_796_083_200 + 86_399), "2026-12-01");
        let key = ("acme".to_string(), "shop".to_string());
        let mut base = Totals::new();
        base.insert(
            key.clone(),
            Counts {
                requests: 5,
                refused: 1,
                errors: 0,
            },
        );
        let mut now = Totals::new();
        now.insert(
            key.clone(),
            Counts {
                requests: 8,
                refused: 1,
                errors: 1,
            },
        );
        now.insert(("idle".into(), "shop".into()), Counts::default());
        let s = since(&now, &base);
        assert_eq!(
            s.len(),
            1,
            "consumers without requests today are not written"
        );
        assert_eq!(
            s["acme"]["shop"],
            Counts {
                requests: 3,
                refused: 0,
                errors: 1
            }
        );
    }
}
