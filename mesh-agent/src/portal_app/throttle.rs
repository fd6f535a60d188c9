//! Sign-in attempt limits, per account and per client address (the TCP peer the ingress
//! accepted, never a header a client writes): a password guesser is slowed whether it tries
//! many passwords on one account or one password on many accounts.
//!
//! Counted in this replica's memory: N replicas allow N times the budget, which still bounds
//! a guesser to a handful of tries per minute per account and keeps etcd out of the way of a
//! flood. Checked *before* the Argon2 verification, so a flood costs no hashing either.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed sign-ins allowed per account per window.
pub const ACCOUNT_FAILURES: u32 = 5;
/// Sign-in and sign-up attempts allowed per client address per window.
pub const PEER_ATTEMPTS: u32 = 30;
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Entries kept per table; past it, expired windows are dropped, then new keys are refused
/// (a flood of distinct keys cannot grow memory without bound).
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct Throttle {
    accounts: Table<String>,
    peers: Table<IpAddr>,
}

struct Table<K> {
    windows: Mutex<HashMap<K, (Instant, u32)>>,
}

impl<K> Default for Table<K> {
    fn default() -> Self {
        Self {
            windows: Mutex::default(),
        }
    }
}

// === impl Throttle ===

impl Throttle {
    /// Count an attempt from `peer`; `Err(retry_after)` when over its budget.
    pub fn attempt(&self, peer: IpAddr, now: Instant) -> Result<(), Duration> {
        self.peers.hit(peer, PEER_ATTEMPTS, now)
    }

    /// Whether `account` may try again (its failures are under the budget).
    pub fn account_open(&self, account: &str, now: Instant) -> Result<(), Duration> {
        self.accounts
            .check(&account.to_string(), ACCOUNT_FAILURES, now)
    }

    pub fn failed(&self, account: &str, now: Instant) {
        let _ = self.accounts.hit(account.to_string(), u32::MAX, now);
    }

    pub fn succeeded(&self, account: &str) {
        self.accounts.forget(&account.to_string());
    }
}

// === impl Table ===

impl<K: Hash + Eq + Clone> Table<K> {
    fn check(&self, key: &K, budget: u32, now: Instant) -> Result<(), Duration> {
        let w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        match w.get(key) {
            Some((start, n)) if now < *start + WINDOW && *n >= budget => Err(*start + WINDOW - now),
            _ => Ok(()),
        }
    }

    fn hit(&self, key: K, budget: u32, now: Instant) -> Result<(), Duration> {
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= MAX_ENTRIES && !w.contains_key(&key) {
            w.retain(|_, (start, _)| now < *start + WINDOW);
            if w.len() >= MAX_ENTRIES {
                return Err(WINDOW);
            }
        }
        let entry = w.entry(key).or_insert((now, 0));
        if now >= entry.0 + WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= budget {
            return Err(entry.0 + WINDOW - now);
        }
        entry.1 += 1;
        Ok(())
    }

    fn forget(&self, key: &K) {
        self.windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_per_account_and_peer_reset_after_the_window() {
        let t = Throttle::default();
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        for _ in 0..ACCOUNT_FAILURES {
            assert!(t.account_open("ann", now).is_ok());
            t.failed("ann", now);
        }
        assert!(t.account_open("ann", now).is_err());
        assert!(
            t.account_open("bob", now).is_ok(),
            "other accounts are not locked"
        );
        assert!(t.account_open("ann", now + WINDOW).is_ok());
        for _ in 0..PEER_ATTEMPTS {
            assert!(t.attempt(ip, now).is_ok());
        }
        let wait = t.attempt(ip, now).expect_err("over budget");
        assert!(wait <= WINDOW);
        assert!(t.attempt("192.0.2.2".parse().expect("ip"), now).is_ok());
        assert!(t.attempt(ip, now + WINDOW).is_ok());
        t.succeeded("ann");
        assert!(t.account_open("ann", now).is_ok());
    }
}
