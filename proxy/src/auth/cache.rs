//! Tokens already verified, so that a client sending the same token on every request pays
//! for one signature check, not one per request (an RS256 check costs ~30 us of CPU; a lookup,
//! one SHA-256 of the token and a map probe). Envoy's `jwt_authn` offers the same cache.
//!
//! Entries are keyed by the SHA-256 of the whole token (header, claims and signature), so only
//! the exact bytes that were verified hit. An entry lives until the token's `exp` (plus the
//! provider's skew, as verification allows) but at most [`MAX_AGE`]: a key removed from the
//! JWKS stops being honoured within that time. The cache belongs to one authenticator, which
//! is rebuilt when the policy changes, so a policy change empties it. Bounded: when full, the
//! expired entries go, and if none had, the whole cache is dropped (refilled by the next
//! requests: crude, but cheap and without per-entry bookkeeping).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::VerifiedToken;

/// Longest time a verified token is trusted without checking its signature again.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Most tokens kept.
pub const CAPACITY: usize = 4096;

#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<[u8; 32], Entry>>,
}

/// A verified token and the Unix time until which it is trusted.
type Entry = (Arc<VerifiedToken>, f64);

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
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (token, until) = entries.get(key)?;
        (now() < *until).then(|| token.clone())
    }

    /// Remember `token`, valid until `expires_at` (Unix seconds, skew included).
    pub fn put(&self, key: [u8; 32], token: &Arc<VerifiedToken>, expires_at: f64) {
        let until = expires_at.min(now() + MAX_AGE.as_secs_f64());
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CAPACITY {
            let t = now();
            entries.retain(|_, (_, until)| *until > t);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(key, (token.clone(), until));
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
