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
        let id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let spec = CachePurgeSpec {
            service: self.service.clone(),
            id,
            prefix: self.prefix.clone(),
            key: self.key.clone(),
            tag: self.tag.clone(),
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
    pub async fn write(&self, cfg: &EtcdConfig, author: &str) -> Result<Vec<String>, PolicyError> {
        let doc = self.document().map_err(|e| PolicyError::Invalid(vec![e]))?;
        crate::policy::apply_as(cfg, &[doc], false, author).await
    }
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
