//! `mesh-agent cache purge`: one `CachePurge` record per service in etcd, which every sidecar
//! of the service applies from its watch (docs/caching.md). The record is written like a policy
//! (validated, one transaction, recorded in the policy history with its author), so who purged
//! what and when is audited like any other change; each purge replaces the service's previous
//! record with a new id.

use std::time::{SystemTime, UNIX_EPOCH};

use trellis_policies::{CachePurgeSpec, Metadata, PolicyDocument, API_VERSION};

use crate::config::EtcdConfig;
use crate::policy::PolicyError;

/// What to purge: everything of the service, or one selector.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purge {
    pub service: String,
    pub prefix: Option<String>,
    pub key: Option<String>,
    pub tag: Option<String>,
}

// === impl Purge ===

impl Purge {
    /// The record, with a fresh id (the time in nanoseconds: a later purge has a larger one),
    /// validated as every sidecar will validate it.
    pub fn document(&self) -> Result<PolicyDocument, String> {
        self.document_after(None)
    }

    /// [`Purge::document`], naming `previous` (the id of the record it replaces) so that a
    /// sidecar that did not apply that one knows it missed a purge.
    pub fn document_after(&self, previous: Option<u64>) -> Result<PolicyDocument, String> {
        let id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let spec = CachePurgeSpec {
            service: self.service.clone(),
            id,
            prefix: self.prefix.clone(),
            key: self.key.clone(),
            tag: self.tag.clone(),
            previous,
        };
        let doc = PolicyDocument {
            api_version: API_VERSION.into(),
            kind: "CachePurge".into(),
            metadata: Metadata {
                name: self.service.clone(),
                labels: Default::default(),
            },
            spec: serde_json::to_value(&spec).map_err(|e| e.to_string())?,
        };
        doc.validate().map_err(|e| e.to_string())?;
        Ok(doc)
    }

    /// Write the record; one line per what was done.
    ///
    /// The record names the one it replaces. Two purges of one service written at the same
    /// moment may name the same predecessor; a sidecar that saw neither then applies only the
    /// second's selector (docs/caching.md).
    pub async fn write(&self, cfg: &EtcdConfig, author: &str) -> Result<Vec<String>, PolicyError> {
        let previous = current_id(cfg, &self.service).await?;
        let doc = self
            .document_after(previous)
            .map_err(|e| PolicyError::Invalid(vec![e]))?;
        crate::policy::apply_as(cfg, &[doc], false, author).await
    }
}

/// The id of the service's current purge record, if there is one that can be read.
async fn current_id(cfg: &EtcdConfig, service: &str) -> Result<Option<u64>, PolicyError> {
    let etcd = crate::etcd::Etcd::connect(cfg).await?;
    let mut client = etcd.client.clone();
    let key = crate::etcd::keys::Keys::new(&cfg.prefix).policy("CachePurge", service);
    let resp = etcd.call(client.get(key, None)).await?;
    // A record that does not parse names nothing; sidecars refused it too.
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<PolicyDocument>(kv.value()).ok())
        .and_then(|d| d.spec.get("id").and_then(serde_json::Value::as_u64)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_purge_is_a_validated_record_with_a_growing_id() {
        let p = Purge {
            service: "catalog".into(),
            tag: Some("product-7".into()),
            ..Default::default()
        };
        let a = p.document().unwrap();
        let b = p.document().unwrap();
        assert_eq!(a.id(), "CachePurge/catalog");
        assert!(b.spec["id"].as_u64() > a.spec["id"].as_u64());
        let bad = Purge {
            prefix: Some("/a".into()),
            ..p
        };
        assert!(bad.document().unwrap_err().contains("at most one"));
    }
}
