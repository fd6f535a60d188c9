//! `mesh-agent policy ...` and `mesh-agent status`: the operator's view of etcd.
//!
//! `apply` validates every document first and writes them all in one transaction, guarded by
//! each key's stored revision (optimistic concurrency): if someone changed a policy between our
//! read and our write, nothing is written and the command says so. Every change is recorded
//! in the policy's history in the same transaction ([`history`]), and can be rolled back
//! ([`rollback`]).

pub(crate) mod diff;
pub mod history;
pub mod report;
pub mod rollback;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::EtcdConfig;
use etcd_client::GetOptions;
use trellis_policies::{parse_documents, PolicyDocument, Registration};

use crate::etcd::keys::Keys;
use crate::etcd::{Etcd, EtcdError};
use history::{Action, Change};
pub use report::OutputFormat;
pub use rollback::rollback;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} invalid document(s):\n  {}", .0.len(), .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("no policy documents found in {0}")]
    Empty(String),
    #[error("conflict: {0} changed in etcd while applying; nothing was written, run apply again")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("`{0}` is not KIND/NAME")]
    BadRef(String),
    #[error("revision {revision} is not in the history of {reference} (its history revisions: {known}); see `mesh-agent policy history {reference}`")]
    NotInHistory {
        reference: String,
        revision: i64,
        known: String,
    },
    #[error("cannot roll {reference} back to revision {revision}: that version is not valid under the current rules: {reason}")]
    RollbackInvalid {
        reference: String,
        revision: i64,
        reason: String,
    },
    #[error("conflict: {0} changed in etcd while rolling back; nothing was written, check `policy history` and run rollback again")]
    RollbackConflict(String),
    #[error("{changes} changed document(s) need more operations than etcd allows in one transaction (--max-txn-ops, default 128: 64 documents, 42 once their histories are full); apply fewer at a time ({source})")]
    TooManyOps { changes: usize, source: EtcdError },
    #[error("cannot encode a document: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Api(#[from] Box<crate::api::ApiError>),
    #[error("etcd is out of space (its NOSPACE alarm is raised: the backend database reached --quota-backend-bytes, 2 GiB by default) and refuses every write; nothing was written. Sidecars keep serving. Free space, then clear the alarm: `etcdctl compact $(etcdctl endpoint status -w json | jq '.[0].Status.header.revision')`, `etcdctl defrag --cluster`, `etcdctl alarm disarm` (docs/etcd.md, \"Quotas and compaction\") ({0})")]
    NoSpace(EtcdError),
}

/// Read every `.yaml`/`.yml` file (recursively for a directory) and return the valid documents,
/// or every problem found.
pub fn load_documents(path: &Path) -> Result<Vec<PolicyDocument>, PolicyError> {
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    let mut docs = Vec::new();
    let mut problems = Vec::new();
    let mut seen = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|source| PolicyError::Read {
            path: file.clone(),
            source,
        })?;
        for doc in parse_documents(&text, &file.display().to_string()) {
            match doc.and_then(|d| d.validate().map(|_| d)) {
                Ok(d) => {
                    if let Some(prev) = seen.insert(d.id(), file.display().to_string()) {
                        problems.push(format!(
                            "{}: defined twice ({prev} and {})",
                            d.id(),
                            file.display()
                        ));
                    }
                    docs.push(d);
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    if !problems.is_empty() {
        return Err(PolicyError::Invalid(problems));
    }
    if docs.is_empty() {
        return Err(PolicyError::Empty(path.display().to_string()));
    }
    Ok(docs)
}

fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), PolicyError> {
    let meta = std::fs::metadata(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .map_err(|source| PolicyError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() || p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                collect_files(&p, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// One line per document: what apply did (or would do). Recorded in the history with the OS
/// user as author ([`history::default_author`]).
pub async fn apply(
    cfg: &EtcdConfig,
    docs: &[PolicyDocument],
    dry_run: bool,
) -> Result<Vec<String>, PolicyError> {
    apply_as(cfg, docs, dry_run, &history::default_author()).await
}

/// [`apply`] recorded in the history under `author`.
pub async fn apply_as(
    cfg: &EtcdConfig,
    docs: &[PolicyDocument],
    dry_run: bool,
    author: &str,
) -> Result<Vec<String>, PolicyError> {
    // `ApiSpec` documents are stored by content hash, not under the policies (docs/api-specs.md).
    let (specs, docs): (Vec<&PolicyDocument>, Vec<&PolicyDocument>) =
        docs.iter().partition(|d| d.kind == "ApiSpec");
    let mut report = match specs.is_empty() {
        true => Vec::new(),
        false => {
            let specs: Vec<_> = specs
                .iter()
                .filter_map(|d| crate::api::spec_of(d))
                .collect();
            crate::api::put(cfg, &specs, dry_run)
                .await
                .map_err(Box::new)?
        }
    };
    if docs.is_empty() {
        return Ok(report);
    }
    let etcd = Etcd::connect(cfg).await?;
    let mut client = etcd.client.clone();
    let keys = Keys::new(&cfg.prefix);
    // A route validating with a document must name one stored (or stored just above).
    let applied = specs
        .iter()
        .filter_map(|d| crate::api::spec_of(d))
        .map(|s| trellis_policies::ApiRef {
            service: s.service,
            version: s.version,
        })
        .collect();
    let problems = crate::api_validators::check_routes(&etcd, &keys, &docs, &applied)
        .await
        .map_err(Box::new)?;
    if !problems.is_empty() {
        return Err(PolicyError::Invalid(problems));
    }
    let mut changes = Vec::new();
    for doc in docs.iter().copied() {
        let key = keys.policy(&doc.kind, &doc.metadata.name);
        let current = etcd.call(client.get(key.as_str(), None)).await?;
        let (mod_rev, previous, same) = match current.kvs().first() {
            Some(kv) => (
                kv.mod_revision(),
                Some(history::stored_value(kv.value())),
                serde_json::from_slice::<PolicyDocument>(kv.value())
                    .ok()
                    .as_ref()
                    == Some(doc),
            ),
            None => (0, None, false),
        };
        let verb = match (mod_rev, same) {
            (0, _) => "created",
            (_, true) => "unchanged",
            _ => "configured",
        };
        report.push(format!("{} {verb}", doc.id()));
        // A no-op apply writes nothing, so it leaves no history either.
        if same {
            continue;
        }
        // mod_revision 0 means "does not exist": create only if still absent.
        changes.push(Change {
            kind: doc.kind.clone(),
            name: doc.metadata.name.clone(),
            expected_mod_revision: mod_rev,
            previous,
            new: Some(doc.clone()),
            action: Action::Apply,
            from_revision: None,
        });
    }
    if dry_run || changes.is_empty() {
        if dry_run {
            report.iter_mut().for_each(|l| l.push_str(" (dry run)"));
        }
        return Ok(report);
    }
    let Some(rev) = history::commit(&etcd, &keys, author, &changes).await? else {
        let ids: Vec<String> = docs.iter().map(|d| d.id()).collect();
        return Err(PolicyError::Conflict(ids.join(", ")));
    };
    report.push(format!("applied at revision {rev}"));
    Ok(report)
}

pub(crate) fn parse_ref(r: &str) -> Result<(&str, &str), PolicyError> {
    r.split_once('/')
        .filter(|(k, n)| !k.is_empty() && !n.is_empty())
        .ok_or_else(|| PolicyError::BadRef(r.to_string()))
}

/// The stored document as YAML.
pub async fn get(cfg: &EtcdConfig, reference: &str) -> Result<String, PolicyError> {
    let (kind, name) = parse_ref(reference)?;
    let etcd = Etcd::connect(cfg).await?;
    let mut client = etcd.client.clone();
    let key = Keys::new(&cfg.prefix).policy(kind, name);
    let resp = etcd.call(client.get(key, None)).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| PolicyError::NotFound(reference.to_string()))?;
    let doc: serde_json::Value =
        serde_json::from_slice(kv.value()).unwrap_or(serde_json::Value::Null);
    let yaml = serde_norway::to_string(&doc).unwrap_or_default();
    Ok(format!("# revision {}\n{yaml}", kv.mod_revision()))
}

/// `KIND/NAME  revision` for every stored policy.
pub async fn list(cfg: &EtcdConfig) -> Result<Vec<String>, PolicyError> {
    let etcd = Etcd::connect(cfg).await?;
    let mut client = etcd.client.clone();
    let keys = Keys::new(&cfg.prefix);
    let prefix = keys.policies();
    let resp = etcd
        .call(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            kv.key_str()
                .ok()
                .map(|k| (k.trim_start_matches(&prefix).to_string(), kv.mod_revision()))
        })
        .map(|(id, rev)| format!("{id:<40} revision {rev}"))
        .collect())
}

/// Delete a stored policy, recorded in the history with the OS user as author.
pub async fn delete(cfg: &EtcdConfig, reference: &str) -> Result<String, PolicyError> {
    delete_as(cfg, reference, &history::default_author()).await
}

/// [`delete`] recorded under `author`; guarded like an apply, so the value recorded as
/// `previous` is exactly the one deleted.
pub async fn delete_as(
    cfg: &EtcdConfig,
    reference: &str,
    author: &str,
) -> Result<String, PolicyError> {
    let (kind, name) = parse_ref(reference)?;
    let etcd = Etcd::connect(cfg).await?;
    let mut client = etcd.client.clone();
    let keys = Keys::new(&cfg.prefix);
    let resp = etcd.call(client.get(keys.policy(kind, name), None)).await?;
    let kv = resp
        .kvs()
        .first()
        .ok_or_else(|| PolicyError::NotFound(reference.to_string()))?;
    let change = Change {
        kind: kind.to_string(),
        name: name.to_string(),
        expected_mod_revision: kv.mod_revision(),
        previous: Some(history::stored_value(kv.value())),
        new: None,
        action: Action::Delete,
        from_revision: None,
    };
    let rev = history::commit(&etcd, &keys, author, &[change])
        .await?
        .ok_or_else(|| PolicyError::Conflict(reference.to_string()))?;
    Ok(format!("{reference} deleted at revision {rev}"))
}

/// `policy history KIND/NAME`: every recorded change, oldest first.
pub async fn history(
    cfg: &EtcdConfig,
    reference: &str,
    format: OutputFormat,
) -> Result<String, PolicyError> {
    let (kind, name) = parse_ref(reference)?;
    let etcd = Etcd::connect(cfg).await?;
    let entries = history::read(&etcd, &Keys::new(&cfg.prefix), kind, name).await?;
    Ok(report::render(reference, &entries, format))
}

/// Services, instances with their lease TTLs, and the revision each sidecar has applied.
pub async fn status(cfg: &EtcdConfig) -> Result<String, PolicyError> {
    let etcd = Etcd::connect(cfg).await?;
    Ok(convergence(cfg, &etcd, true).await?.0)
}

/// `status --wait`: poll until every live instance has applied the latest mesh change, or
/// `timeout` passes. Returns the last table and whether the mesh converged. One connection
/// for the whole wait, and polls without the per-instance lease lookups (one call per
/// instance: the table is printed with them once, at the end), so the wait costs etcd two
/// reads per poll whatever the fleet size.
pub async fn status_wait(
    cfg: &EtcdConfig,
    timeout: std::time::Duration,
) -> Result<(String, bool), PolicyError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let etcd = Etcd::connect(cfg).await?;
    loop {
        let (_, converged) = convergence(cfg, &etcd, false).await?;
        if converged || tokio::time::Instant::now() >= deadline {
            let (out, _) = convergence(cfg, &etcd, true).await?;
            return Ok((out, converged));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The status table, and whether every registered instance has applied the mesh's latest
/// change. `ttls`: look up each instance's lease TTL for the table (one call per instance).
async fn convergence(
    cfg: &EtcdConfig,
    etcd: &Etcd,
    ttls: bool,
) -> Result<(String, bool), PolicyError> {
    let mut client = etcd.client.clone();
    let keys = Keys::new(&cfg.prefix);
    let regs = etcd
        .call(client.get(keys.services(), Some(GetOptions::new().with_prefix())))
        .await?;
    let current = regs.header().map_or(0, |h| h.revision());
    let mesh_rev = policies_revision(etcd, &keys, current).await?;
    let applied = crate::etcd::registration::applied_revisions(etcd, &keys).await?;
    let mut out = format!(
        "etcd {} prefix {}: store revision {current}, policies last changed at revision {mesh_rev}\n",
        etcd.endpoint(),
        cfg.prefix
    );
    out.push_str(&format!(
        "{:<16} {:<28} {:<22} {:>9} {:>9}  converged\n",
        "SERVICE", "INSTANCE", "ADDRESS", "LEASE TTL", "APPLIED"
    ));
    // Lease TTLs: one call per instance, 32 at a time (a fleet of 500 in a few round trips).
    let leases: Vec<i64> = if ttls {
        regs.kvs()
            .iter()
            .map(|kv| kv.lease())
            .filter(|l| *l != 0)
            .collect()
    } else {
        Vec::new()
    };
    let ttl_of: std::collections::HashMap<i64, String> = {
        use futures_util::StreamExt;
        futures_util::stream::iter(leases)
            .map(|id| {
                let mut client = client.clone();
                async move {
                    let ttl = match etcd.call(client.lease_time_to_live(id, None)).await {
                        Ok(t) => format!("{}s", t.ttl()),
                        Err(_) => "?".to_string(),
                    };
                    (id, ttl)
                }
            })
            .buffer_unordered(32)
            .collect()
            .await
    };
    let mut all = true;
    for kv in regs.kvs() {
        let Ok(r) = serde_json::from_slice::<Registration>(kv.value()) else {
            continue;
        };
        let ttl = ttl_of
            .get(&kv.lease())
            .cloned()
            .unwrap_or_else(|| "-".to_string());
        let applied_rev = applied
            .get(&(r.service.clone(), r.instance.clone()))
            .copied();
        let converged = match applied_rev {
            Some(a) if a >= mesh_rev => "yes",
            Some(_) => "no",
            None => "unknown",
        };
        all &= converged == "yes";
        let applied_s = applied_rev.map_or("-".to_string(), |a| a.to_string());
        out.push_str(&format!(
            "{:<16} {:<28} {:<22} {:>9} {:>9}  {converged}\n",
            r.service, r.instance, r.address, ttl, applied_s
        ));
    }
    Ok((out, all))
}

/// The revision of the policies' last change, deletions included: the newest `mod_revision`
/// under the policies prefix, then any deletion after it, found by replaying the watch from
/// there up to `head` (a range read cannot show a deleted key). Every sidecar watches every
/// policy, whatever its scope, so a sidecar that applied this revision applies the policies as
/// they are now; registrations are not compared, since a scoped sidecar only follows the
/// services it uses. Status keys live outside the mesh prefix, so the sidecars' own reports
/// never move this revision.
async fn policies_revision(etcd: &Etcd, keys: &Keys, head: i64) -> Result<i64, PolicyError> {
    let mut client = etcd.client.clone();
    let prefix = keys.policies();
    let newest = etcd
        .call(client.get(
            prefix.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ))
        .await?
        .kvs()
        .iter()
        .map(|kv| kv.mod_revision())
        .max()
        .unwrap_or(0);
    if head <= newest {
        return Ok(newest);
    }
    let opts = etcd_client::WatchOptions::new()
        .with_prefix()
        .with_start_revision(newest + 1)
        .with_progress_notify();
    // What the replay saw so far counts even when it ends by the time limit: etcd's gRPC
    // proxy (3.4) never answers the progress request, so behind one the replay ends only by
    // the limit (or by a progress notification the members send on their own), with every
    // past deletion long delivered.
    let mut last = newest;
    let replay = async {
        let mut stream = etcd.call(client.watch(prefix.as_str(), Some(opts))).await?;
        stream.request_progress().await.map_err(|e| etcd.err(e))?;
        while let Some(resp) = stream.message().await.map_err(|e| etcd.err(e))? {
            if resp.compact_revision() > 0 {
                // Compacted: the deletions are gone from history; the range read stands.
                break;
            }
            for ev in resp.events() {
                if let Some(kv) = ev.kv() {
                    last = last.max(kv.mod_revision());
                }
            }
            let at = resp.header().map_or(0, |h| h.revision());
            if resp.events().is_empty() && !resp.created() && at >= head {
                break;
            }
        }
        Ok::<(), EtcdError>(())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), replay).await {
        Ok(r) => r?,
        Err(_) => tracing::debug!(
            last,
            head,
            "no progress answer within 2 s (a gRPC proxy?): counting the deletions seen"
        ),
    }
    Ok(last)
}
