//! A provider's key set: cached, refreshed in the background, refetched on an unknown `kid`
//! with a rate bound, and kept when a fetch fails.
//!
//! The set sits behind an `ArcSwap`, so a token whose `kid` is known verifies without a lock or
//! any I/O. A token whose `kid` is unknown may trigger one fetch (identity providers publish a
//! new key before signing with it, so the refetch picks up a rotation at once), but at most one
//! per `min_refresh_interval`: fetches are serialised by one async mutex that also holds the
//! time of the last attempt, so a burst of made-up `kid`s costs the identity provider a single
//! request (the first caller fetches, the others wait for it and reuse its result).
//!
//! A failed fetch (unreachable server, bad status, unusable document) keeps the last good set:
//! an identity provider's outage must not turn into a mesh-wide authentication outage.

use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::time::Instant;

use super::auth_metrics::FetchCounters;
use super::fetch::{FetchError, Fetcher};
use super::key::{Alg, RawJwk, VerifyingKey};
use super::JwtError;

/// Most keys kept from one JWKS document; real sets hold a handful.
pub const MAX_KEYS: usize = 64;

/// One provider's keys and how to renew them.
pub(crate) struct Jwks {
    provider: Arc<str>,
    fetcher: Option<Fetcher>,
    keys: ArcSwap<KeySet>,
    /// Serialises fetches (single flight); holds when the last one started.
    fetch_lock: tokio::sync::Mutex<Option<Instant>>,
    min_refresh_interval: Duration,
    refresh: Duration,
    status: Mutex<FetchStatus>,
    counters: OnceLock<FetchCounters>,
}

/// An immutable key set. `generation` changes on every successful fetch, so a caller that
/// waited for another's fetch can tell that it has happened.
#[derive(Default)]
pub(crate) struct KeySet {
    keys: Vec<VerifyingKey>,
    generation: u64,
    /// `false` until a first set is loaded: tells `jwks_unavailable` from `unknown_kid`.
    loaded: bool,
}

#[derive(Default)]
struct FetchStatus {
    last_attempt: Option<SystemTime>,
    last_success: Option<SystemTime>,
    last_error: Option<String>,
    fetches: u64,
    failures: u64,
}

/// A provider's key set as shown in `/config_dump`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JwksStatus {
    pub provider: String,
    /// `uri` or `inline`.
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// `kid (alg)` of each cached key; `-` for a key without an id.
    pub keys: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_fetch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_success: Option<String>,
    /// The last fetch's error, `None` once a fetch succeeds again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub fetches: u64,
    pub failures: u64,
}

// === impl Jwks ===

impl Jwks {
    /// Keys given inline: parsed now, never refreshed.
    pub(crate) fn inline(provider: Arc<str>, text: &str) -> Result<Self, FetchError> {
        let jwks = Self::new(provider, None, Duration::MAX, Duration::MAX);
        let keys = parse_set(&jwks.provider, text.as_bytes())?;
        jwks.keys.store(Arc::new(KeySet {
            keys,
            generation: 1,
            loaded: true,
        }));
        Ok(jwks)
    }

    /// Keys fetched from `uri`: empty until the first fetch (see [`Jwks::spawn_refresh`]).
    pub(crate) fn remote(
        provider: Arc<str>,
        uri: &str,
        refresh: Duration,
        min_refresh_interval: Duration,
    ) -> Result<Self, FetchError> {
        let fetcher = Fetcher::new(uri)?;
        Ok(Self::new(
            provider,
            Some(fetcher),
            refresh,
            min_refresh_interval,
        ))
    }

    fn new(
        provider: Arc<str>,
        fetcher: Option<Fetcher>,
        refresh: Duration,
        min_refresh_interval: Duration,
    ) -> Self {
        Self {
            provider,
            fetcher,
            keys: ArcSwap::from_pointee(KeySet::default()),
            fetch_lock: tokio::sync::Mutex::new(None),
            min_refresh_interval,
            refresh,
            status: Mutex::new(FetchStatus::default()),
            counters: OnceLock::new(),
        }
    }

    pub(crate) fn set_counters(&self, counters: FetchCounters) {
        let _ = self.counters.set(counters);
    }

    /// Verify `signature` over `message` with the key the token names. Only an unknown key
    /// (or no key set yet) leads to a fetch, rate-bounded as the module doc says.
    pub(crate) async fn verify(
        &self,
        kid: Option<&str>,
        alg: Alg,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), JwtError> {
        let generation = {
            let set = self.keys.load();
            match set.verify(kid, alg, message, signature) {
                Err(JwtError::UnknownKid)
                    if self.fetcher.is_some() && (kid.is_some() || !set.loaded) =>
                {
                    set.generation
                }
                Err(JwtError::UnknownKid) if !set.loaded => return Err(JwtError::JwksUnavailable),
                other => return other,
            }
        };
        self.refetch_after(generation).await;
        let set = self.keys.load();
        match set.verify(kid, alg, message, signature) {
            Err(JwtError::UnknownKid) if !set.loaded => Err(JwtError::JwksUnavailable),
            other => other,
        }
    }

    /// Fetch again unless a fetch completed since the caller saw `generation` or one started
    /// less than `min_refresh_interval` ago.
    async fn refetch_after(&self, generation: u64) {
        let mut last = self.fetch_lock.lock().await;
        if self.keys.load().generation != generation {
            return;
        }
        if last.is_some_and(|t| t.elapsed() < self.min_refresh_interval) {
            return;
        }
        self.fetch_locked(&mut last).await;
    }

    /// One fetch now (the periodic refresh); `true` when it succeeded.
    pub(crate) async fn refresh(&self) -> bool {
        let mut last = self.fetch_lock.lock().await;
        self.fetch_locked(&mut last).await
    }

    async fn fetch_locked(&self, last: &mut Option<Instant>) -> bool {
        let Some(fetcher) = &self.fetcher else {
            return true;
        };
        *last = Some(Instant::now());
        let started = SystemTime::now();
        let result = match fetcher.fetch().await {
            Ok(body) => parse_set(&self.provider, &body),
            Err(e) => Err(e),
        };
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        status.last_attempt = Some(started);
        status.fetches += 1;
        match result {
            Ok(keys) => {
                let generation = self.keys.load().generation + 1;
                tracing::debug!(
                    provider = %self.provider,
                    uri = %fetcher.uri(),
                    keys = keys.len(),
                    "JWKS fetched"
                );
                self.keys.store(Arc::new(KeySet {
                    keys,
                    generation,
                    loaded: true,
                }));
                status.last_success = Some(started);
                status.last_error = None;
                if let Some(c) = self.counters.get() {
                    c.ok.inc();
                }
                true
            }
            Err(error) => {
                tracing::warn!(
                    provider = %self.provider,
                    uri = %fetcher.uri(),
                    %error,
                    "JWKS fetch failed; keeping the last good key set"
                );
                status.failures += 1;
                status.last_error = Some(error.to_string());
                if let Some(c) = self.counters.get() {
                    c.error.inc();
                }
                false
            }
        }
    }

    /// Refresh every `refresh` in a task that ends when the last `Arc` to this set is dropped
    /// (the authenticator was replaced). The first fetch is immediate; after a failure the
    /// next try comes sooner, backing off from `min_refresh_interval` to `refresh`.
    pub(crate) fn spawn_refresh(self: &Arc<Self>) {
        if self.fetcher.is_none() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut delay = Duration::ZERO;
            let mut backoff = Duration::ZERO;
            loop {
                tokio::time::sleep(delay).await;
                let Some(jwks) = weak.upgrade() else {
                    return;
                };
                if jwks.refresh().await {
                    backoff = Duration::ZERO;
                    delay = jwks.refresh;
                } else {
                    backoff = (backoff * 2)
                        .max(jwks.min_refresh_interval)
                        .min(jwks.refresh);
                    delay = backoff;
                }
            }
        });
    }

    pub(crate) fn status(&self) -> JwksStatus {
        let keys = self
            .keys
            .load()
            .keys
            .iter()
            .map(|k| format!("{} ({})", k.kid.as_deref().unwrap_or("-"), k.alg.as_str()))
            .collect();
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let time =
            |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_seconds(t).to_string());
        JwksStatus {
            provider: self.provider.to_string(),
            source: if self.fetcher.is_some() {
                "uri"
            } else {
                "inline"
            },
            uri: self.fetcher.as_ref().map(|f| f.uri().to_string()),
            keys,
            last_fetch: time(status.last_attempt),
            last_success: time(status.last_success),
            last_error: status.last_error.clone(),
            fetches: status.fetches,
            failures: status.failures,
        }
    }
}

// === impl KeySet ===

impl KeySet {
    /// `unknown_kid` when no key fits the `kid` (or, without a `kid`, none has the token's
    /// algorithm); `unsupported_alg` when the named key is for another algorithm.
    fn verify(
        &self,
        kid: Option<&str>,
        alg: Alg,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), JwtError> {
        let mut named = false;
        let mut tried = false;
        for key in &self.keys {
            if let Some(kid) = kid {
                if key.kid.as_deref() != Some(kid) {
                    continue;
                }
                named = true;
            }
            if key.alg != alg {
                continue;
            }
            tried = true;
            if key.verify(message, signature) {
                return Ok(());
            }
        }
        match (tried, named) {
            (true, _) => Err(JwtError::BadSignature),
            (false, true) => Err(JwtError::UnsupportedAlg),
            (false, false) if kid.is_none() && !self.keys.is_empty() => {
                Err(JwtError::UnsupportedAlg)
            }
            (false, false) => Err(JwtError::UnknownKid),
        }
    }
}

/// The usable keys of a JWKS document. Keys Trellis cannot use are skipped (a set may mix
/// signature and encryption keys); a document without one usable key is an error, so that a
/// broken publication does not replace a good set.
fn parse_set(provider: &str, body: &[u8]) -> Result<Vec<VerifyingKey>, FetchError> {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(body).map_err(|e| FetchError::Document(e.to_string()))?;
    let mut keys = Vec::new();
    for value in doc.keys.into_iter().take(MAX_KEYS) {
        let kid = value
            .get("kid")
            .and_then(|k| k.as_str())
            .unwrap_or("-")
            .to_string();
        let parsed = serde_json::from_value::<RawJwk>(value)
            .map_err(|e| e.to_string())
            .and_then(|jwk| VerifyingKey::from_jwk(&jwk).map_err(|e| e.to_string()));
        match parsed {
            Ok(k) => keys.push(k),
            Err(error) => tracing::debug!(provider, kid, %error, "JWK skipped"),
        }
    }
    if keys.is_empty() {
        return Err(FetchError::Document("no usable signing key".into()));
    }
    Ok(keys)
}
