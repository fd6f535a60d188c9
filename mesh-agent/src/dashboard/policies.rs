//! The policies that apply to one service, each with its last versions and what changed between
//! them, for the service page.
//!
//! The versions come from etcd's own MVCC history, not from the audit entries `policy apply`
//! writes: a get at `mod_revision - 1` returns the value the key had before its last change,
//! whoever wrote it (the CLI, etcdctl, a script), so nothing written around `mesh-agent` is
//! missing. The price is compaction: etcd forgets old revisions, and a walk that reaches a
//! compacted one ends there, which the page says rather than hiding.
//!
//! Everything read from etcd may be garbage (a value that is not JSON, a document that does not
//! validate): it is shown with its error, never unwrapped.

use std::future::Future;

use etcd_client::GetOptions;
use serde::Serialize;
use serde_json::Value;
use trellis_policies::{Policy, PolicyDocument};

use crate::etcd::keys::{Keys, MeshKey};
use crate::etcd::{Etcd, EtcdError};
use crate::policy::diff;

/// Versions shown per policy, the current one included.
pub const MAX_VERSIONS: usize = 10;

/// A key's value at one revision, as etcd stores it.
#[derive(Clone, Debug, PartialEq)]
pub struct RawVersion {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
    /// Changes since the key was created (1: this is its first value).
    pub version: i64,
}

/// Why reading an older revision failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// etcd compacted the revision away: the history ends here.
    #[error("revision {0} was compacted")]
    Compacted(i64),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// The service's policies, as the API serves them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ServicePolicies {
    pub service: String,
    /// The etcd revision they were read at.
    pub revision: i64,
    pub policies: Vec<PolicyHistory>,
    /// Policy keys whose value cannot be read well enough to tell whom it targets (sidecars
    /// refuse them too): they may or may not concern this service.
    pub unattributed: Vec<Unattributed>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Unattributed {
    pub key: String,
    pub error: String,
}

/// One policy that applies, and its last versions, newest first.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyHistory {
    pub kind: String,
    pub name: String,
    /// How it bears on the service ("rate-limits it", ...).
    pub applies: String,
    /// Why its current value is not applied by the sidecars (`None`: it is valid).
    pub error: Option<String>,
    pub versions: Vec<Version>,
    /// Why the list stops where it does.
    pub end: HistoryEnd,
}

/// One stored value of a policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Version {
    pub mod_revision: i64,
    /// The value as YAML (as `policy get` shows it), or as text when it is not JSON.
    pub text: String,
    /// Why this value is not a valid policy (`None`: it is).
    pub error: Option<String>,
    /// Line diff from the version before it; `None` when that version is not known (the
    /// oldest shown, unless it is the one that created the key).
    pub diff: Option<Vec<String>>,
}

/// Where a history ends.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum HistoryEnd {
    /// The oldest version shown created the key: there is nothing before it.
    Created { revision: i64 },
    /// [`MAX_VERSIONS`] shown; older ones exist.
    Limit,
    /// etcd compacted the revision before the oldest shown.
    Compacted { revision: i64 },
    /// Reading further failed, or etcd answered something that cannot be an older version.
    Error { message: String },
}

/// Read the policies applying to `service` and their histories.
pub async fn read(etcd: &Etcd, keys: &Keys, service: &str) -> Result<ServicePolicies, EtcdError> {
    let mut client = etcd.client.clone();
    let all = etcd
        .call(client.get(keys.policies(), Some(GetOptions::new().with_prefix())))
        .await?;
    let (applying, unattributed) = select(keys, all.kvs(), service);
    let mut policies = Vec::with_capacity(applying.len());
    for p in applying {
        let key = keys.policy(&p.kind, &p.name);
        let (versions, end) = walk(p.current, |rev| get_at(etcd, &key, rev)).await;
        policies.push(PolicyHistory {
            kind: p.kind,
            name: p.name,
            applies: p.applies,
            error: p.error,
            versions: with_diffs(versions, &end),
            end,
        });
    }
    Ok(ServicePolicies {
        service: service.to_string(),
        revision: all.header().map_or(0, |h| h.revision()),
        policies,
        unattributed,
    })
}

/// Every valid `Consumer` policy with a quota: the quota by consumer name. An invalid one is
/// skipped (sidecars refuse it too), with a warning.
pub async fn quotas(
    etcd: &Etcd,
    keys: &Keys,
) -> Result<std::collections::BTreeMap<String, trellis_policies::Quota>, EtcdError> {
    let mut client = etcd.client.clone();
    let prefix = format!("{}Consumer/", keys.policies());
    let resp = etcd
        .call(client.get(prefix, Some(GetOptions::new().with_prefix())))
        .await?;
    let mut out = std::collections::BTreeMap::new();
    for kv in resp.kvs() {
        let parsed = serde_json::from_slice::<PolicyDocument>(kv.value())
            .map_err(|e| e.to_string())
            .and_then(|d| d.validate().map_err(|e| e.to_string()));
        match parsed {
            Ok(Policy::Consumer { name, spec }) => {
                if let Some(q) = spec.quota {
                    out.insert(name, q);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "consumer skipped")
            }
        }
    }
    Ok(out)
}

/// A stored policy found to apply, before its history is read.
struct Applying {
    kind: String,
    name: String,
    applies: String,
    error: Option<String>,
    current: RawVersion,
}

/// The stored policies that apply to `service`, and those that cannot be attributed.
fn select(
    keys: &Keys,
    kvs: &[etcd_client::KeyValue],
    service: &str,
) -> (Vec<Applying>, Vec<Unattributed>) {
    let (mut applying, mut quotas, mut unattributed) = (Vec::new(), Vec::new(), Vec::new());
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key());
        let Some(MeshKey::Policy { kind, name }) = keys.parse(&key) else {
            continue;
        };
        let found = |applies: &str, error| Applying {
            kind: kind.to_string(),
            name: name.to_string(),
            applies: applies.to_string(),
            error,
            current: raw(kv),
        };
        match classify(kind, name, kv.value(), service) {
            Target::Applies { applies, error } => applying.push(found(&applies, error)),
            Target::Quota => quotas.push(found("its quota limits calls to it", None)),
            Target::Elsewhere => {}
            Target::Unknown(error) => unattributed.push(Unattributed {
                key: key.to_string(),
                error,
            }),
        }
    }
    // A consumer's quota is a limit on every service that authenticates its callers.
    if applying.iter().any(|p| p.kind == "AuthenticationPolicy") {
        applying.extend(quotas);
    }
    (applying, unattributed)
}

fn raw(kv: &etcd_client::KeyValue) -> RawVersion {
    RawVersion {
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        version: kv.version(),
    }
}

/// The key's value at `revision` (`None`: it did not exist then).
async fn get_at(etcd: &Etcd, key: &str, revision: i64) -> Result<Option<RawVersion>, ReadError> {
    let mut client = etcd.client.clone();
    let opts = GetOptions::new().with_revision(revision);
    match etcd.call(client.get(key, Some(opts))).await {
        Ok(r) => Ok(r.kvs().first().map(raw)),
        Err(e) if is_compacted(&e) => Err(ReadError::Compacted(revision)),
        Err(e) => Err(e.into()),
    }
}

/// etcd's "mvcc: required revision has been compacted" (gRPC OUT_OF_RANGE).
fn is_compacted(e: &EtcdError) -> bool {
    matches!(e, EtcdError::Call { source: etcd_client::Error::GRpcStatus(s), .. }
        if s.message().contains("compacted"))
}

/// Whether a stored policy concerns the service.
#[derive(Debug, PartialEq)]
enum Target {
    /// It names the service; `error` when its value is not a valid policy (it names the
    /// service in its key or its `spec.service`, and is shown so that the error is seen).
    Applies {
        applies: String,
        error: Option<String>,
    },
    /// A consumer with a quota: it applies if the service authenticates.
    Quota,
    Elsewhere,
    /// Not readable enough to tell.
    Unknown(String),
}

/// Decide from the stored bytes whether the policy `kind/name` concerns `service`.
fn classify(kind: &str, name: &str, value: &[u8], service: &str) -> Target {
    let doc = match serde_json::from_slice::<Value>(value) {
        Ok(v) => v,
        Err(e) => return Target::Unknown(format!("not JSON: {e}")),
    };
    let invalid = match serde_json::from_value::<PolicyDocument>(doc.clone()) {
        Ok(d) => match d.validate() {
            Ok(p) => return valid_target(&p, service),
            Err(e) => e.to_string(),
        },
        Err(e) => format!("not a policy document: {e}"),
    };
    // Invalid, so sidecars refuse it; still shown where it was meant to apply, when that can
    // be told from the key or the spec, for the operator to see the error.
    let named = doc
        .pointer("/spec/service")
        .and_then(Value::as_str)
        .or_else(|| matches!(kind, "ServicePolicy" | "ExternalService").then_some(name));
    match named {
        Some(s) if s == service => Target::Applies {
            applies: "names it (invalid, not applied)".into(),
            error: Some(invalid),
        },
        Some(_) => Target::Elsewhere,
        None => Target::Unknown(invalid),
    }
}

fn valid_target(p: &Policy, service: &str) -> Target {
    match p.applies_to(service) {
        Some(how) => Target::Applies {
            applies: how.to_string(),
            error: None,
        },
        None if p.quota_applies() => Target::Quota,
        None => Target::Elsewhere,
    }
}

/// Walk back from `current` through the revisions before it, up to [`MAX_VERSIONS`]
/// versions, with `get_at(revision)` reading the key as it was at a revision. Newest first.
pub async fn walk<F, Fut>(current: RawVersion, mut get_at: F) -> (Vec<RawVersion>, HistoryEnd)
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<Option<RawVersion>, ReadError>>,
{
    let mut versions = vec![current];
    loop {
        let Some(last) = versions.last() else {
            return (versions, HistoryEnd::Limit);
        };
        let created = HistoryEnd::Created {
            revision: last.mod_revision,
        };
        // Version 1 is the value that created the key: no read needed to know nothing is
        // before it.
        if last.version <= 1 || last.mod_revision <= last.create_revision {
            return (versions, created);
        }
        if versions.len() >= MAX_VERSIONS {
            return (versions, HistoryEnd::Limit);
        }
        let newer = last.mod_revision;
        match get_at(newer - 1).await {
            // Only an older version moves the walk on: anything else would loop.
            Ok(Some(older)) if older.mod_revision < newer => versions.push(older),
            Ok(Some(odd)) => {
                let message = format!(
                    "etcd answered revision {} when asked for the value before {newer}",
                    odd.mod_revision
                );
                return (versions, HistoryEnd::Error { message });
            }
            // It did not exist just before: deleted, then created again at `newer`.
            Ok(None) => return (versions, created),
            Err(ReadError::Compacted(_)) => {
                return (
                    versions,
                    HistoryEnd::Compacted {
                        revision: newer - 1,
                    },
                )
            }
            Err(e) => {
                let message = e.to_string();
                return (versions, HistoryEnd::Error { message });
            }
        }
    }
}

/// Each version as text with its error and the diff from the one before it (newest first).
pub fn with_diffs(raw: Vec<RawVersion>, end: &HistoryEnd) -> Vec<Version> {
    let texts: Vec<(String, Option<String>)> = raw.iter().map(|r| render(&r.value)).collect();
    let oldest_created = matches!(end, HistoryEnd::Created { .. });
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            let before = match texts.get(i + 1) {
                Some((t, _)) => Some(t.as_str()),
                None if oldest_created => Some(""),
                None => None,
            };
            let (text, error) = texts[i].clone();
            Version {
                mod_revision: r.mod_revision,
                diff: before.map(|b| diff::unified(b, &text)),
                text,
                error,
            }
        })
        .collect()
}

/// A stored value as YAML, with why it is not a valid policy. Bytes that are not JSON are
/// shown as (lossy) text, so the diff still shows what changed.
fn render(value: &[u8]) -> (String, Option<String>) {
    let json = match serde_json::from_slice::<Value>(value) {
        Ok(v) => v,
        Err(e) => {
            let text = String::from_utf8_lossy(value).into_owned();
            return (text, Some(format!("not JSON: {e}")));
        }
    };
    let text = serde_norway::to_string(&json).unwrap_or_else(|_| json.to_string());
    let error = match serde_json::from_value::<PolicyDocument>(json) {
        Ok(d) => d.validate().err().map(|e| e.to_string()),
        Err(e) => Some(format!("not a policy document: {e}")),
    };
    (text, error)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn doc(timeout: &str) -> Vec<u8> {
        format!(r#"{{"apiVersion":"trellis.dev/v1","kind":"ServicePolicy","metadata":{{"name":"echo"}},"spec":{{"request_timeout":"{timeout}"}}}}"#).into_bytes()
    }

    fn v(value: &[u8], mod_revision: i64, version: i64) -> RawVersion {
        RawVersion {
            value: value.to_vec(),
            mod_revision,
            create_revision: 5,
            version,
        }
    }

    /// A key's stored revisions; reads below `compacted` fail as etcd's do.
    struct Store {
        at: BTreeMap<i64, RawVersion>,
        compacted: i64,
    }

    impl Store {
        async fn get(&self, rev: i64) -> Result<Option<RawVersion>, ReadError> {
            if rev < self.compacted {
                return Err(ReadError::Compacted(rev));
            }
            Ok(self.at.range(..=rev).next_back().map(|(_, v)| v.clone()))
        }
    }

    #[tokio::test]
    async fn walks_back_to_creation_with_a_diff_per_change_even_through_garbage() {
        let store = Store {
            at: [
                (5, v(&doc("1s"), 5, 1)),
                (7, v(b"\xff not json {", 7, 2)),
                (9, v(&doc("2s"), 9, 3)),
            ]
            .into(),
            compacted: 0,
        };
        let current = store.at[&9].clone();
        let (raw, end) = walk(current, |r| store.get(r)).await;
        assert_eq!(end, HistoryEnd::Created { revision: 5 });
        let revs: Vec<i64> = raw.iter().map(|r| r.mod_revision).collect();
        assert_eq!(revs, [9, 7, 5]);
        let versions = with_diffs(raw, &end);
        assert!(versions[1]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not JSON")));
        assert!(versions[1].text.contains("not json"), "{:?}", versions[1]);
        assert_eq!(versions[0].error, None);
        let d = versions[0].diff.clone().expect("diff from the garbage");
        assert!(d.iter().any(|l| l == "+  request_timeout: 2s"), "{d:?}");
        let created = versions[2]
            .diff
            .clone()
            .expect("the creation is a diff from nothing");
        assert!(created.iter().all(|l| l.starts_with('+')), "{created:?}");
    }

    #[tokio::test]
    async fn a_compacted_revision_ends_the_history_and_says_so() {
        let store = Store {
            at: [
                (5, v(&doc("1s"), 5, 1)),
                (7, v(&doc("2s"), 7, 2)),
                (9, v(&doc("3s"), 9, 3)),
            ]
            .into(),
            // etcd keeps revision 9 and later.
            compacted: 9,
        };
        let (raw, end) = walk(store.at[&9].clone(), |r| store.get(r)).await;
        assert_eq!(raw.len(), 1);
        assert_eq!(end, HistoryEnd::Compacted { revision: 8 });
        assert_eq!(
            with_diffs(raw, &end)[0].diff,
            None,
            "nothing to diff against"
        );
    }

    #[tokio::test]
    async fn stops_at_the_limit_and_on_answers_that_would_loop() {
        let at: BTreeMap<i64, RawVersion> = (1..=30).map(|r| (r, v(&doc("1s"), r, r))).collect();
        let store = Store { at, compacted: 0 };
        let (raw, end) = walk(store.at[&30].clone(), |r| store.get(r)).await;
        assert_eq!((raw.len(), end), (MAX_VERSIONS, HistoryEnd::Limit));

        // A "previous" version no older than the current one (a misbehaving store).
        let same = v(&doc("1s"), 9, 3);
        let (raw, end) = walk(same.clone(), |_| {
            let same = same.clone();
            async move { Ok(Some(same)) }
        })
        .await;
        assert_eq!(raw.len(), 1);
        assert!(matches!(end, HistoryEnd::Error { .. }), "{end:?}");
        // Deleted and created again: nothing before the new incarnation.
        let (_, end) = walk(v(&doc("1s"), 9, 3), |_| async { Ok(None) }).await;
        assert_eq!(end, HistoryEnd::Created { revision: 9 });
    }

    #[test]
    fn garbage_values_are_classified_not_unwrapped() {
        let c = |v: &[u8]| classify("RateLimitPolicy", "lim", v, "echo");
        assert!(matches!(c(b"\x00\x01"), Target::Unknown(e) if e.contains("not JSON")));
        assert!(matches!(c(b"[1,2]"), Target::Unknown(_)));
        // Invalid, but it names the service: shown there, with its error.
        let named = br#"{"apiVersion":"trellis.dev/v1","kind":"RateLimitPolicy","metadata":{"name":"lim"},"spec":{"service":"echo","bogus":1}}"#;
        assert!(matches!(c(named), Target::Applies { error: Some(_), .. }));
        let other = br#"{"spec":{"service":"payments"}}"#;
        assert_eq!(c(other), Target::Elsewhere);
        let valid = classify("ServicePolicy", "echo", &doc("1s"), "echo");
        assert_eq!(
            valid,
            Target::Applies {
                applies: "calls to it".into(),
                error: None
            }
        );
        let (text, error) = render(b"");
        assert!(text.is_empty() && error.is_some());
    }
}
