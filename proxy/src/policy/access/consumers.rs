//! Consumers by credential: the SHA-256 of an API key, a JWT `(issuer, subject)`, or a mesh
//! identity. Built once per snapshot; a lookup is one hash of the key and one map probe.

use std::collections::HashMap;
use std::sync::Arc;

use trellis_policies::ConsumerSpec;

/// Who a credential belongs to.
#[derive(Clone, Debug)]
pub struct ConsumerRef {
    pub name: Arc<str>,
    /// The API key's label (`api_keys[].id`), for audit logs; never the key.
    pub key_id: Option<Arc<str>>,
    pub disabled: bool,
}

#[derive(Default)]
pub struct ConsumerIndex {
    by_key: HashMap<[u8; 32], ConsumerRef>,
    /// Issuer -> subject -> consumer: looked up with borrowed strings, no allocation.
    by_subject: HashMap<String, HashMap<String, ConsumerRef>>,
    by_identity: HashMap<String, ConsumerRef>,
}

/// The digest consumers' `api_keys[].sha256` hold.
pub fn key_digest(key: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

// === impl ConsumerIndex ===

impl ConsumerIndex {
    pub fn build<'a>(consumers: impl IntoIterator<Item = (&'a String, &'a ConsumerSpec)>) -> Self {
        let mut idx = Self::default();
        for (name, spec) in consumers {
            let name: Arc<str> = Arc::from(name.as_str());
            let base = ConsumerRef {
                name: name.clone(),
                key_id: None,
                disabled: spec.disabled,
            };
            for k in &spec.api_keys {
                // Validated by the policies crate; a digest that still fails to parse is skipped.
                if let Some(d) = parse_hex(&k.sha256) {
                    let r = ConsumerRef {
                        key_id: Some(Arc::from(k.id.as_str())),
                        ..base.clone()
                    };
                    if let Some(prev) = idx.by_key.insert(d, r) {
                        tracing::warn!(consumer = %name, other = %prev.name, key_id = %k.id, "an API key digest is declared by two consumers; the last one by name wins");
                    }
                }
            }
            for s in &spec.jwt_subjects {
                idx.by_subject
                    .entry(s.issuer.clone())
                    .or_default()
                    .insert(s.subject.clone(), base.clone());
            }
            for id in &spec.identities {
                idx.by_identity.insert(id.clone(), base.clone());
            }
        }
        idx
    }

    pub fn by_api_key(&self, key: &[u8]) -> Option<&ConsumerRef> {
        self.by_key.get(&key_digest(key))
    }

    pub fn by_subject(&self, issuer: &str, subject: &str) -> Option<&ConsumerRef> {
        self.by_subject.get(issuer)?.get(subject)
    }

    pub fn by_identity(&self, id: &str) -> Option<&ConsumerRef> {
        self.by_identity.get(id)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
            + self.by_subject.values().map(HashMap::len).sum::<usize>()
            + self.by_identity.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn keys_are_found_by_digest_only() {
        let spec: ConsumerSpec = serde_norway::from_str(&format!(
            "api_keys: [{{id: k1, sha256: '{}'}}]\njwt_subjects: [{{issuer: i, subject: s}}]\nidentities: [spiffe://td/service/a]\n",
            hex(&key_digest(b"secret-key"))
        ))
        .expect("spec");
        let consumers = [("acme".to_string(), spec)];
        let idx = ConsumerIndex::build(consumers.iter().map(|(n, s)| (n, s)));
        let c = idx.by_api_key(b"secret-key").expect("found");
        assert_eq!(&*c.name, "acme");
        assert_eq!(c.key_id.as_deref(), Some("k1"));
        assert!(idx.by_api_key(b"secret-kez").is_none());
        assert!(idx.by_subject("i", "s").is_some());
        assert!(idx.by_subject("i", "x").is_none());
        assert!(idx.by_identity("spiffe://td/service/a").is_some());
        // Known SHA-256 test vector (FIPS 180-2, "abc").
        assert_eq!(
            hex(&key_digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
