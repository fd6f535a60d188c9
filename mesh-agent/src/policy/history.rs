//! The audit history of policy changes, kept in etcd next to the policies.
//!
//! Every `apply`, `delete` and `rollback` that changes a policy also writes one entry under
//! `<prefix>/v1/history/<Kind>/<name>/<seq>` **in the same transaction** as the change: either
//! both are stored or neither, so the history cannot miss a change made through the CLI nor
//! record one that failed. The entry does not hold its revision: etcd gives the entry key a
//! `mod_revision` equal to the transaction's revision, which is also the policy key's, and that
//! is what `policy history` shows and `policy rollback --to-revision` takes.
//!
//! History keys are outside `<prefix>/v1/mesh/`, so sidecars (which watch only the mesh prefix)
//! never see them. Each policy keeps its last [`HISTORY_LIMIT`] entries: once a write passes the
//! bound, the same transaction range-deletes the older ones (sequence numbers are zero-padded,
//! so key order is numeric order and one delete covers them). The history of a deleted policy is
//! kept, so it can be rolled back to.

use std::time::SystemTime;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_policies::PolicyDocument;

use super::PolicyError;
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;

/// Entries kept per policy; older ones are deleted by the write that passes the bound.
pub const HISTORY_LIMIT: u64 = 50;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Apply,
    Delete,
    Rollback,
}

/// The value stored under a history key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// `--author`, else the OS user.
    pub author: String,
    /// RFC 3339, UTC, from the writer's clock (the revision orders entries, not this).
    pub time: String,
    pub action: Action,
    /// The stored document before the change (JSON), absent when the policy did not exist. Kept
    /// as it was stored, even if it is not a valid document.
    #[serde(default)]
    pub previous: Option<Value>,
    /// The document after the change, absent for a delete.
    #[serde(default)]
    pub new: Option<Value>,
    /// For a rollback: the history revision whose `new` value was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_revision: Option<i64>,
}

/// An entry as read back, with the revision of the change it records.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recorded {
    pub revision: i64,
    #[serde(flatten)]
    pub entry: HistoryEntry,
}

/// One policy key's change, planned from a read: written only if the key still has
/// `expected_mod_revision` (0: the key is absent), else the whole transaction is refused.
#[derive(Clone, Debug)]
pub struct Change {
    pub kind: String,
    pub name: String,
    pub expected_mod_revision: i64,
    /// The stored value as read (for the record).
    pub previous: Option<Value>,
    /// `None` deletes the policy.
    pub new: Option<PolicyDocument>,
    pub action: Action,
    pub from_revision: Option<i64>,
}

/// The raw bytes of a stored policy as a JSON value; bytes that are not JSON (written around
/// the CLI) are kept as a string so the history still shows what was replaced.
pub fn stored_value(raw: &[u8]) -> Value {
    serde_json::from_slice(raw)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(raw).into()))
}

/// Who made a change when `--author` is not given: `$USER`, else `$LOGNAME`, else the uid
/// (containers often run with neither variable set).
pub fn default_author() -> String {
    for var in ["USER", "LOGNAME"] {
        if let Ok(v) = std::env::var(var) {
            if !v.trim().is_empty() {
                return v.trim().to_string();
            }
        }
    }
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map_or_else(|_| "unknown".into(), |m| format!("uid {}", m.uid()))
}

/// Write every change and its history entry in one transaction. `Ok(None)` when a guarded key
/// changed since it was read: nothing was written.
pub async fn commit(
    etcd: &Etcd,
    keys: &Keys,
    author: &str,
    changes: &[Change],
) -> Result<Option<i64>, PolicyError> {
    let time = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut compares = Vec::new();
    let mut ops = Vec::new();
    for c in changes {
        let key = keys.policy(&c.kind, &c.name);
        compares.push(Compare::mod_revision(
            key.as_str(),
            CompareOp::Equal,
            c.expected_mod_revision,
        ));
        let new = match &c.new {
            Some(doc) => {
                ops.push(TxnOp::put(key.as_str(), serde_json::to_vec(doc)?, None));
                Some(serde_json::to_value(doc)?)
            }
            None => {
                ops.push(TxnOp::delete(key.as_str(), None));
                None
            }
        };
        let entry = HistoryEntry {
            author: author.to_string(),
            time: time.clone(),
            action: c.action,
            previous: c.previous.clone(),
            new,
            from_revision: c.from_revision,
        };
        // Concurrent writers of this policy cannot take the same sequence number: the compare
        // on the policy key above lets only one of them commit.
        let seq = last_seq(etcd, keys, &c.kind, &c.name).await? + 1;
        let entry_key = keys.history_entry(&c.kind, &c.name, seq);
        ops.push(TxnOp::put(entry_key, serde_json::to_vec(&entry)?, None));
        if seq > HISTORY_LIMIT {
            let keep_from = keys.history_entry(&c.kind, &c.name, seq + 1 - HISTORY_LIMIT);
            let all = keys.history(&c.kind, &c.name);
            ops.push(TxnOp::delete(
                all,
                Some(DeleteOptions::new().with_range(keep_from)),
            ));
        }
    }
    let mut client = etcd.client.clone();
    let resp = match etcd
        .call(client.txn(Txn::new().when(compares).and_then(ops)))
        .await
    {
        Ok(resp) => resp,
        // The limit is the server's (`--max-txn-ops`), so it is recognized, not predicted.
        Err(e) if e.to_string().contains("too many operations in txn request") => {
            return Err(PolicyError::TooManyOps {
                changes: changes.len(),
                source: e,
            })
        }
        Err(e) if e.is_no_space() => return Err(PolicyError::NoSpace(e)),
        Err(e) => return Err(e.into()),
    };
    Ok(resp
        .succeeded()
        .then(|| resp.header().map_or(0, |h| h.revision())))
}

/// The highest sequence number in a policy's history, 0 when there is none.
async fn last_seq(etcd: &Etcd, keys: &Keys, kind: &str, name: &str) -> Result<u64, PolicyError> {
    let prefix = keys.history(kind, name);
    let opts = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Key, SortOrder::Descend)
        .with_keys_only()
        .with_limit(1);
    let mut client = etcd.client.clone();
    let resp = etcd.call(client.get(prefix.as_str(), Some(opts))).await?;
    Ok(resp
        .kvs()
        .first()
        .and_then(|kv| seq_of(&prefix, kv.key()))
        .unwrap_or(0))
}

fn seq_of(prefix: &str, key: &[u8]) -> Option<u64> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    rest.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| rest.parse().ok())
        .flatten()
}

/// A policy's history, oldest first. Entries that cannot be read are skipped with a warning.
pub async fn read(
    etcd: &Etcd,
    keys: &Keys,
    kind: &str,
    name: &str,
) -> Result<Vec<Recorded>, PolicyError> {
    let prefix = keys.history(kind, name);
    let mut client = etcd.client.clone();
    let resp = etcd
        .call(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await?;
    let mut out: Vec<Recorded> = resp
        .kvs()
        .iter()
        .filter(|kv| seq_of(&prefix, kv.key()).is_some())
        .filter_map(|kv| match serde_json::from_slice(kv.value()) {
            Ok(entry) => Some(Recorded {
                revision: kv.mod_revision(),
                entry,
            }),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "unreadable history entry skipped");
                None
            }
        })
        .collect();
    out.sort_by_key(|r| r.revision);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_parse_only_under_the_prefix() {
        let k = Keys::new("/t");
        let p = k.history("ServicePolicy", "orders");
        assert_eq!(
            seq_of(
                &p,
                k.history_entry("ServicePolicy", "orders", 42).as_bytes()
            ),
            Some(42)
        );
        assert_eq!(seq_of(&p, format!("{p}x/1").as_bytes()), None);
        assert_eq!(seq_of(&p, b"/t/v1/history/ServicePolicy/other/1"), None);
    }

    #[test]
    fn entry_round_trips_and_non_json_is_kept_as_text() {
        let e = HistoryEntry {
            author: "alice".into(),
            time: "2026-01-01T00:00:00Z".into(),
            action: Action::Rollback,
            previous: Some(stored_value(b"not json")),
            new: None,
            from_revision: Some(7),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert!(text.contains(r#""action":"rollback""#), "{text}");
        assert_eq!(serde_json::from_str::<HistoryEntry>(&text).unwrap(), e);
        assert_eq!(e.previous, Some(Value::String("not json".into())));
    }

    #[test]
    fn default_author_is_never_empty() {
        assert!(!default_author().is_empty());
    }
}
