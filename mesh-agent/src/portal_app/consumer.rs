//! A portal account's API keys are its `Consumer` policy's: written through the same guarded,
//! history-recording path as `mesh-agent policy apply` (author `portal:<email>`), so every
//! ingress and sidecar receives a new or revoked key in its next snapshot and the operator
//! sees, audits and can undo every change with the usual commands.

use trellis_policies::{ApiKeySpec, ConsumerSpec, Metadata, PolicyDocument};

use crate::config::EtcdConfig;
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;
use crate::policy::PolicyError;

/// Most keys an account may hold (the policy allows 64; the operator's own keys need room).
pub const MAX_PORTAL_KEYS: usize = 10;

/// The consumer's spec, `None` when no such policy exists.
pub async fn read(cfg: &EtcdConfig, name: &str) -> Result<Option<ConsumerSpec>, PolicyError> {
    let etcd = Etcd::connect(cfg).await?;
    let key = Keys::new(&cfg.prefix).policy("Consumer", name);
    let resp = etcd
        .call(etcd.client.clone().get(key.as_str(), None))
        .await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let doc: PolicyDocument = serde_json::from_slice(kv.value())
        .map_err(|e| PolicyError::Invalid(vec![format!("{key}: {e}")]))?;
    serde_json::from_value(doc.spec)
        .map(Some)
        .map_err(|e| PolicyError::Invalid(vec![format!("{key}: {e}")]))
}

/// Change the consumer's spec with `edit` (a new, empty consumer when absent) and write it.
/// A concurrent change of the same policy makes the write fail; it is read and tried again.
pub async fn update<F>(
    cfg: &EtcdConfig,
    name: &str,
    author: &str,
    edit: F,
) -> Result<(), PolicyError>
where
    F: Fn(&mut ConsumerSpec) -> Result<(), PolicyError>,
{
    let mut attempt = 0;
    loop {
        let mut spec = read(cfg, name).await?.unwrap_or_default();
        edit(&mut spec)?;
        spec.validate()
            .map_err(|m| PolicyError::Invalid(vec![format!("Consumer/{name}: {m}")]))?;
        let doc = PolicyDocument {
            api_version: trellis_policies::API_VERSION.into(),
            kind: "Consumer".into(),
            metadata: Metadata {
                name: name.to_string(),
                labels: Default::default(),
            },
            spec: serde_json::to_value(&spec)
                .map_err(|e| PolicyError::Invalid(vec![e.to_string()]))?,
        };
        match crate::policy::apply_as(cfg, &[doc], false, author).await {
            Err(PolicyError::Conflict(_)) if attempt < 3 => attempt += 1,
            other => return other.map(|_| ()),
        }
    }
}

/// Add a key (its digest) under `id`.
pub fn add(spec: &mut ConsumerSpec, id: &str, sha256: &str) -> Result<(), PolicyError> {
    if spec.api_keys.iter().any(|k| k.id == id) {
        return Err(PolicyError::Invalid(vec![format!(
            "a key named `{id}` exists"
        )]));
    }
    if spec.api_keys.len() >= MAX_PORTAL_KEYS {
        return Err(PolicyError::Invalid(vec![format!(
            "at most {MAX_PORTAL_KEYS} keys: revoke one first"
        )]));
    }
    spec.api_keys.push(ApiKeySpec {
        id: id.to_string(),
        sha256: sha256.to_string(),
    });
    Ok(())
}

/// Replace the digest of key `id`.
pub fn rotate(spec: &mut ConsumerSpec, id: &str, sha256: &str) -> Result<(), PolicyError> {
    let k = spec
        .api_keys
        .iter_mut()
        .find(|k| k.id == id)
        .ok_or_else(|| PolicyError::NotFound(format!("key `{id}`")))?;
    k.sha256 = sha256.to_string();
    Ok(())
}

pub fn revoke(spec: &mut ConsumerSpec, id: &str) -> Result<(), PolicyError> {
    let before = spec.api_keys.len();
    spec.api_keys.retain(|k| k.id != id);
    match spec.api_keys.len() < before {
        true => Ok(()),
        false => Err(PolicyError::NotFound(format!("key `{id}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_added_rotated_and_revoked_by_label_within_the_limit() {
        let mut spec = ConsumerSpec::default();
        let digest = |n: u8| format!("{n:02x}").repeat(32);
        add(&mut spec, "laptop", &digest(1)).expect("add");
        assert!(
            add(&mut spec, "laptop", &digest(2)).is_err(),
            "labels are unique"
        );
        rotate(&mut spec, "laptop", &digest(3)).expect("rotate");
        assert_eq!(spec.api_keys[0].sha256, digest(3));
        assert!(matches!(
            rotate(&mut spec, "nope", &digest(4)),
            Err(PolicyError::NotFound(_))
        ));
        for n in 1..MAX_PORTAL_KEYS {
            add(&mut spec, &format!("k{n}"), &digest(n as u8 + 10)).expect("add");
        }
        assert!(add(&mut spec, "one-too-many", &digest(99)).is_err());
        spec.validate().expect("a valid Consumer");
        revoke(&mut spec, "laptop").expect("revoke");
        assert!(spec.api_keys.iter().all(|k| k.id != "laptop"));
        assert!(matches!(
            revoke(&mut spec, "laptop"),
            Err(PolicyError::NotFound(_))
        ));
    }
}
