//! `policy rollback KIND/NAME --to-revision R`: restore the value a history entry recorded.
//!
//! The restored value is the entry's *new* value (a delete entry restores absence), validated
//! again with this build's rules, since a document that was valid then may not be now. It is
//! written like an apply: guarded by the policy key's `mod_revision` as read when planning, so a
//! change made meanwhile by someone else makes the rollback fail instead of being overwritten,
//! and recorded in the history with action `rollback` and `from_revision: R`.
//!
//! Planning and committing are separate steps so that the guard can be exercised (and so a
//! caller can show what would happen before writing).

use crate::config::EtcdConfig;
use trellis_policies::PolicyDocument;

use super::history::{self, Action, Change};
use super::{diff, parse_ref, PolicyError};
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;

/// What a rollback will write, and the state it was planned against.
#[derive(Clone, Debug)]
pub struct RollbackPlan {
    pub reference: String,
    pub to_revision: i64,
    /// `None`: the entry was a delete, so the rollback deletes the policy.
    pub target: Option<PolicyDocument>,
    /// The target equals what is stored: nothing to write.
    pub unchanged: bool,
    change: Change,
}

/// Read the history and the current value, and check the target against the current rules.
pub async fn plan(
    cfg: &EtcdConfig,
    reference: &str,
    to_revision: i64,
) -> Result<RollbackPlan, PolicyError> {
    let (kind, name) = parse_ref(reference)?;
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let entries = history::read(&etcd, &keys, kind, name).await?;
    let Some(entry) = entries.iter().find(|r| r.revision == to_revision) else {
        let known: Vec<String> = entries.iter().map(|r| r.revision.to_string()).collect();
        return Err(PolicyError::NotInHistory {
            reference: reference.to_string(),
            revision: to_revision,
            known: if known.is_empty() {
                "none recorded".into()
            } else {
                known.join(", ")
            },
        });
    };
    let target = match &entry.entry.new {
        None => None,
        Some(v) => {
            let invalid = |reason: String| PolicyError::RollbackInvalid {
                reference: reference.to_string(),
                revision: to_revision,
                reason,
            };
            let doc: PolicyDocument =
                serde_json::from_value(v.clone()).map_err(|e| invalid(e.to_string()))?;
            if doc.kind != kind || doc.metadata.name != name {
                return Err(invalid(format!("it holds {}", doc.id())));
            }
            doc.validate().map_err(|e| invalid(e.to_string()))?;
            Some(doc)
        }
    };
    let mut client = etcd.client.clone();
    let current = etcd.call(client.get(keys.policy(kind, name), None)).await?;
    let (expected_mod_revision, previous) = match current.kvs().first() {
        Some(kv) => (kv.mod_revision(), Some(history::stored_value(kv.value()))),
        None => (0, None),
    };
    let unchanged = match (&previous, &target) {
        (None, None) => true,
        (Some(p), Some(t)) => {
            serde_json::from_value::<PolicyDocument>(p.clone())
                .ok()
                .as_ref()
                == Some(t)
        }
        _ => false,
    };
    Ok(RollbackPlan {
        reference: reference.to_string(),
        to_revision,
        target: target.clone(),
        unchanged,
        change: Change {
            kind: kind.to_string(),
            name: name.to_string(),
            expected_mod_revision,
            previous,
            new: target,
            action: Action::Rollback,
            from_revision: Some(to_revision),
        },
    })
}

// === impl RollbackPlan ===

impl RollbackPlan {
    /// What committing would do, with the diff from the stored value (`--dry-run`).
    pub fn describe(&self) -> String {
        if self.unchanged {
            return format!(
                "{} unchanged: already as of revision {} (dry run)",
                self.reference, self.to_revision
            );
        }
        let yaml = |v: Option<serde_json::Value>| {
            v.map_or_else(String::new, |v| {
                serde_norway::to_string(&v).unwrap_or_default()
            })
        };
        let new = self
            .change
            .new
            .as_ref()
            .and_then(|d| serde_json::to_value(d).ok());
        let verb = match self.target {
            Some(_) => "restored",
            None => "deleted",
        };
        let mut out = format!(
            "{} would be {verb} as of revision {} (dry run)",
            self.reference, self.to_revision
        );
        for line in diff::unified(&yaml(self.change.previous.clone()), &yaml(new)) {
            out.push_str("\n    ");
            out.push_str(&line);
        }
        out
    }
}

/// Write a planned rollback with its history entry; refused if the policy changed since.
pub async fn commit(
    cfg: &EtcdConfig,
    plan: &RollbackPlan,
    author: &str,
) -> Result<String, PolicyError> {
    let what = match plan.target {
        Some(_) => "restored",
        None => "deleted",
    };
    if plan.unchanged {
        return Ok(format!(
            "{} unchanged: already as of revision {}",
            plan.reference, plan.to_revision
        ));
    }
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let rev = history::commit(&etcd, &keys, author, std::slice::from_ref(&plan.change))
        .await?
        .ok_or_else(|| PolicyError::RollbackConflict(plan.reference.clone()))?;
    Ok(format!(
        "{} {what} as of revision {} (rollback at revision {rev})",
        plan.reference, plan.to_revision
    ))
}

pub async fn rollback(
    cfg: &EtcdConfig,
    reference: &str,
    to_revision: i64,
    author: &str,
) -> Result<String, PolicyError> {
    let plan = plan(cfg, reference, to_revision).await?;
    commit(cfg, &plan, author).await
}
