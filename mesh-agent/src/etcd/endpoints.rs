//! Which etcd member to talk to: a live one, never a member that just failed while others
//! answer, and members learned from etcd itself.
//!
//! The Rust client spreads calls over every configured endpoint and keeps calling a dead one
//! (a third of the calls fail while one member of three is down), and it never learns that a
//! member was replaced. So each [`super::Etcd`] talks to **one** member chosen here: the last
//! one that answered first, then members that have not failed lately, then those that have,
//! oldest failure first. Every failure is recorded, so the next connection moves on at once,
//! and the member list is refreshed from etcd (as the Go client's auto-sync does), so a member
//! added on a new address is found without a configuration change.
//!
//! One book per cluster (its configured endpoint list) per process, shared by the registrar,
//! the watch, the rate-limit coordinator and the CLI.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A member that failed this recently is tried after every other one.
pub const FAILED_RECENTLY: Duration = Duration::from_secs(30);

/// The members of one cluster and what we know of each.
#[derive(Debug)]
pub struct EndpointBook {
    configured: Vec<String>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Configured endpoints, then those learned from the member list.
    known: Vec<String>,
    failed_at: HashMap<String, Instant>,
    preferred: Option<String>,
    synced_at: Option<Instant>,
    /// A member list that did not name the endpoint it came from was ignored (logged once).
    foreign_list_seen: bool,
}

/// The book for `endpoints` (the configured list), created on first use.
pub fn book(endpoints: &[String]) -> Arc<EndpointBook> {
    static BOOKS: OnceLock<Mutex<HashMap<Vec<String>, Arc<EndpointBook>>>> = OnceLock::new();
    let books = BOOKS.get_or_init(Default::default);
    let mut books = books.lock().unwrap_or_else(|p| p.into_inner());
    books
        .entry(endpoints.to_vec())
        .or_insert_with(|| Arc::new(EndpointBook::new(endpoints.to_vec())))
        .clone()
}

// === impl EndpointBook ===

impl EndpointBook {
    pub fn new(configured: Vec<String>) -> Self {
        let inner = Inner {
            known: configured.clone(),
            ..Inner::default()
        };
        Self {
            configured,
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The order to try members in: the preferred one (last to answer) unless it failed
    /// since, then members without a recent failure, then the recently failed ones, oldest
    /// failure first (the one most likely to be back).
    pub fn candidates(&self) -> Vec<String> {
        let inner = self.lock();
        let now = Instant::now();
        let recent = |e: &String| {
            inner
                .failed_at
                .get(e)
                .is_some_and(|t| now.duration_since(*t) < FAILED_RECENTLY)
        };
        let mut healthy: Vec<String> = inner.known.iter().filter(|e| !recent(e)).cloned().collect();
        if let Some(p) = &inner.preferred {
            if let Some(i) = healthy.iter().position(|e| e == p) {
                let p = healthy.remove(i);
                healthy.insert(0, p);
            }
        }
        let mut failed: Vec<String> = inner.known.iter().filter(|e| recent(e)).cloned().collect();
        failed.sort_by_key(|e| inner.failed_at.get(e).copied());
        healthy.extend(failed);
        healthy
    }

    /// `endpoint` answered: try it first next time.
    pub fn succeeded(&self, endpoint: &str) {
        let mut inner = self.lock();
        inner.failed_at.remove(endpoint);
        inner.preferred = Some(endpoint.to_string());
    }

    /// `endpoint` failed (unreachable, no quorum, a stream broke): try the others first.
    pub fn failed(&self, endpoint: &str) {
        let mut inner = self.lock();
        inner.failed_at.insert(endpoint.to_string(), Instant::now());
        if inner.preferred.as_deref() == Some(endpoint) {
            inner.preferred = None;
        }
    }

    /// Whether the member list is due for a refresh, `every` being the interval (and claim
    /// it, so one caller does it). A zero interval turns syncing off.
    pub fn sync_due(&self, every: Duration) -> bool {
        if every.is_zero() {
            return false;
        }
        let mut inner = self.lock();
        let due = inner.synced_at.is_none_or(|t| t.elapsed() >= every);
        if due {
            inner.synced_at = Some(Instant::now());
        }
        due
    }

    /// Replace the learned members with `members` (client URLs from etcd's member list).
    /// Configured endpoints stay (a replaced member's old address just fails and goes last);
    /// an empty list (a refused or odd answer) changes nothing.
    pub fn set_members(&self, members: Vec<String>) {
        if members.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let mut known = self.configured.clone();
        for m in members {
            let m = self.with_scheme(m);
            if !known.contains(&m) {
                known.push(m);
            }
        }
        if known != inner.known {
            tracing::info!(endpoints = ?known, "etcd members refreshed from the member list");
            inner.known = known;
        }
    }

    /// [`Self::set_members`] with the member list `source` answered, which counts only when
    /// it names `source` itself; `false` when it was ignored. An etcd member always lists
    /// itself. etcd's gRPC proxy (`etcd grpc-proxy`) or a load balancer in front of etcd does
    /// not: the proxy passes the cluster's members on (`--advertise-client-url` empty) or,
    /// 3.4 without `--resolver-prefix`, answers with its `--advertise-client-url` alone,
    /// `127.0.0.1:23790` unless set. Learning those would have sidecars dial around the
    /// proxies. A proxy started with `--advertise-client-url` and `--resolver-prefix` lists
    /// every proxy registered under that prefix, itself included: those are learned.
    pub fn set_members_from(&self, source: &str, members: Vec<String>) -> bool {
        let members: Vec<String> = members.into_iter().map(|m| self.with_scheme(m)).collect();
        if members.is_empty() || members.iter().any(|m| m == source) {
            self.set_members(members);
            return true;
        }
        let first = {
            let mut inner = self.lock();
            !std::mem::replace(&mut inner.foreign_list_seen, true)
        };
        if first {
            tracing::info!(
                endpoint = source,
                members = ?members,
                "etcd's member list does not name the endpoint that sent it (a gRPC proxy or load balancer in front of etcd?): members are not learned; only the configured endpoints are used"
            );
        }
        false
    }

    /// `m` with the configured endpoints' scheme when it has none and they have one. etcd's gRPC proxy lists
    /// itself (and the proxies registered with it) by `--advertise-client-url`, which etcd's
    /// documentation writes without a scheme (`127.0.0.1:23790`): without this, a proxy that
    /// is configured as `http://127.0.0.1:23790` would be known twice.
    fn with_scheme(&self, m: String) -> String {
        if m.contains("://") {
            return m;
        }
        // Configured endpoints without a scheme are compared as they are.
        match self.configured.first().and_then(|c| c.split_once("://")) {
            Some((scheme, _)) => format!("{scheme}://{m}"),
            None => m,
        }
    }

    /// Every endpoint known now, for status and `/config_dump`.
    pub fn known(&self) -> Vec<String> {
        self.lock().known.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_failed_member_goes_last_and_the_preferred_first() {
        let b = EndpointBook::new(eps(&["a", "b", "c"]));
        assert_eq!(b.candidates(), eps(&["a", "b", "c"]));
        b.succeeded("c");
        assert_eq!(b.candidates(), eps(&["c", "a", "b"]));
        b.failed("c");
        b.failed("a");
        assert_eq!(
            b.candidates(),
            eps(&["b", "c", "a"]),
            "oldest failure first"
        );
        b.succeeded("a");
        assert_eq!(b.candidates(), eps(&["a", "b", "c"]));
    }

    #[test]
    fn members_without_a_scheme_take_the_configured_one() {
        let b = EndpointBook::new(eps(&["https://p1:23790", "https://p2:23790"]));
        b.set_members(eps(&["p2:23790", "p3:23790", "http://m:2379"]));
        assert_eq!(
            b.known(),
            eps(&[
                "https://p1:23790",
                "https://p2:23790",
                "https://p3:23790",
                "http://m:2379"
            ])
        );
    }

    #[test]
    fn a_member_list_that_does_not_name_its_sender_is_ignored() {
        let b = EndpointBook::new(eps(&["http://p1:23790", "http://p2:23790"]));
        // A proxy passing the cluster's members on, or answering with etcd's default.
        assert!(!b.set_members_from(
            "http://p1:23790",
            eps(&["http://m1:2379", "http://m2:2379"])
        ));
        assert!(!b.set_members_from("http://p1:23790", eps(&["127.0.0.1:23790"])));
        assert_eq!(b.known(), eps(&["http://p1:23790", "http://p2:23790"]));
        // Proxies registered under a --resolver-prefix: the sender among them.
        assert!(b.set_members_from("http://p1:23790", eps(&["p1:23790", "p3:23790"])));
        assert_eq!(
            b.known(),
            eps(&["http://p1:23790", "http://p2:23790", "http://p3:23790"])
        );
    }

    #[test]
    fn members_learned_from_etcd_are_added_and_configured_ones_kept() {
        let b = EndpointBook::new(eps(&["a", "b"]));
        b.set_members(eps(&["b", "d"]));
        assert_eq!(b.known(), eps(&["a", "b", "d"]));
        b.set_members(Vec::new());
        assert_eq!(b.known(), eps(&["a", "b", "d"]));
        b.set_members(eps(&["e"]));
        assert_eq!(
            b.known(),
            eps(&["a", "b", "e"]),
            "a removed member is forgotten"
        );
        let every = Duration::from_secs(30);
        assert!(b.sync_due(every));
        assert!(!b.sync_due(every), "claimed by the first caller");
        assert!(!b.sync_due(Duration::ZERO), "off");
    }
}
