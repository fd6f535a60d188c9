//! `mesh-agent apikey`: a random API key and the digest a `Consumer` policy stores.
//!
//! 32 random bytes from the OS (ring's `SystemRandom`), base64url without padding, behind a
//! `trk_` prefix so that secret scanners and people can recognise one. Policies hold only the
//! SHA-256 of the key: it is a high-entropy secret, so a fast unsalted digest is safe to
//! store, and lookups on the request path stay one hash and one map probe.

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};

#[derive(Debug, thiserror::Error)]
#[error("the system's random number generator failed")]
pub struct RandomError;

/// A new key and its lower-case hex SHA-256.
pub fn generate() -> Result<(String, String), RandomError> {
    let mut raw = [0u8; 32];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| RandomError)?;
    let key = format!(
        "trk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    Ok((key.clone(), digest_hex(&key)))
}

/// The digest to store for `key`, as the data plane computes it.
pub fn digest_hex(key: &str) -> String {
    trellis_proxy::policy::access::key_digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_digests_match_the_data_plane() {
        let (a, da) = generate().expect("key");
        let (b, _) = generate().expect("key");
        assert_ne!(a, b);
        assert!(a.starts_with("trk_") && a.len() == 4 + 43, "{a}");
        assert_eq!(da, digest_hex(&a));
        assert_eq!(da.len(), 64);
    }
}
