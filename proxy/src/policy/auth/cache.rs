//! Tokens already verified, so that a client sending the same token on every request pays
//! for one signature check, not one per request (an RS256 check costs ~30 us of CPU; a lookup,
//! one SHA-256 of the token and a map probe). Envoy's `jwt_authn` offers the same cache.
//!
//! Entries are keyed by the SHA-256 of the whole token (header, claims and signature), so only
//! the exact bytes that were verified hit. An entry lives until the token's `exp` (plus the
//! provider's skew, as verification allows) but at most [`MAX_AGE`]: a key removed from the
//! JWKS stops being honoured within that time. The cache belongs to one authenticator, which
//! is rebuilt when the policy changes, so a policy change empties it. Bounded: a concurrent
//! cache (moka, already in the tree through the DNS resolver) with per-entry expiry and
//! least-recently-used eviction past [`CAPACITY`], so authenticated requests take no shared
//! lock and a full cache evicts one entry, not all of them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::VerifiedToken;

/// Longest time a verified token is trusted without checking its signature again.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Most tokens kept.
pub const CAPACITY: usize = 4096;

pub struct TokenCache {
    entries: moka::sync::Cache<[u8; 32], Entry>,
}

/// A verified token and the Unix time until which it is trusted.
type Entry = (Arc<VerifiedToken>, f64);

/// Each entry expires at its own time: the token's `exp` (with skew), at most [`MAX_AGE`].
struct UntilTrusted;

impl moka::Expiry<[u8; 32], Entry> for UntilTrusted {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        (_, until): &Entry,
        _: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs_f64(
            (until - now()).clamp(0.0, MAX_AGE.as_secs_f64()),
        ))
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(CAPACITY as u64)
                .expire_after(UntilTrusted)
                .build(),
        }
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

pub fn key(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut k = [0u8; 32];
    k.copy_from_slice(d.as_ref());
    k
}

// === impl TokenCache ===

impl TokenCache {
    /// The verified token for `key`, if cached and not yet expired.
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<VerifiedToken>> {
        let (token, until) = self.entries.get(key)?;
        (now() < until).then_some(token)
    }

    /// Remember `token`, valid until `expires_at` (Unix seconds, skew included).
    pub fn put(&self, key: [u8; 32], token: &Arc<VerifiedToken>, expires_at: f64) {
        let until = expires_at.min(now() + MAX_AGE.as_secs_f64());
        self.entries.insert(key, (token.clone(), until));
    }

    /// Entries held (after pending evictions and expiries are applied).
    pub fn len(&self) -> usize {
        self.entries.run_pending_tasks();
        usize::try_from(self.entries.entry_count()).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Arc<VerifiedToken> {
        Arc::new(VerifiedToken {
            provider: Arc::from("p"),
            issuer: Arc::from("i"),
            subject: None,
            scopes: Vec::new(),
            claims: serde_json::Map::new(),
            forwarded_headers: Vec::new(),
        })
    }

    #[test]
    fn expired_tokens_miss_and_a_full_cache_evicts_entries_not_everything() {
        let cache = TokenCache::default();
        let t = token();
        cache.put(key("old"), &t, now() - 1.0);
        assert!(cache.get(&key("old")).is_none(), "expired");
        for i in 0..CAPACITY + 100 {
            cache.put(key(&format!("t{i}")), &t, now() + 30.0);
        }
        let held = cache.len();
        assert!(held <= CAPACITY, "{held}");
        // Eviction makes room entry by entry: most of the cache survives an overflow (the
        // old cache dropped everything at once).
        assert!(held > CAPACITY / 2, "{held}");
        let hits = (0..CAPACITY + 100)
            .filter(|i| cache.get(&key(&format!("t{i}"))).is_some())
            .count();
        assert!(hits > CAPACITY / 2, "{hits}");
    }
}
