//! `mesh-agent api delete` and `api gc`: removing API versions, and the stored documents no
//! version names any more (docs/api-specs.md#removing-apis).
//!
//! A document is stored once per content hash and named by the index entries of any number of
//! service versions, so deleting a version deletes its index entry and then its document only
//! if no other entry names it. That last step is a race with `api put` (and with the sidecars
//! storing their app's document): a put of the same content in between finds the blob there
//! and writes only its index entry. So a blob is deleted in a transaction guarded by "no index
//! entry changed since the index was read" (a compare over the whole index prefix): if one
//! did, the blob is kept and the next `api gc` decides again. A put after the delete finds no
//! blob and writes it again. Either way no index entry is left naming a missing document.

use std::collections::BTreeSet;

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use trellis_policies::ApiRef;

use crate::api::{entries_with, parse_entry, short, ApiError, IndexEntry};
use crate::config::EtcdConfig;
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;

/// What `api delete` removes: one version of a service, or all of them.
pub struct Deletion<'a> {
    pub service: &'a str,
    /// `None`: every version.
    pub version: Option<&'a str>,
    /// Delete even when an HTTPRoute validates with the version.
    pub force: bool,
}

/// Delete the index entries `d` names, then the documents no entry names any more. One line
/// per thing removed.
pub async fn delete(cfg: &EtcdConfig, d: &Deletion<'_>) -> Result<Vec<String>, ApiError> {
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let all = entries_with(&etcd, &keys).await?;
    let doomed: Vec<&IndexEntry> = all
        .iter()
        .filter(|e| e.service == d.service && d.version.is_none_or(|v| e.version == v))
        .collect();
    if doomed.is_empty() {
        let what = match d.version {
            Some(v) => format!("{} {v}", d.service),
            None => d.service.to_string(),
        };
        return Err(ApiError::NotFound(what));
    }
    if !d.force {
        refuse_if_validating(&etcd, &keys, &doomed).await?;
    }
    let mut client = etcd.client.clone();
    let ops: Vec<TxnOp> = doomed
        .iter()
        .map(|e| TxnOp::delete(keys.api_version(&e.service, &e.version), None))
        .collect();
    etcd.call(client.txn(Txn::new().and_then(ops))).await?;
    let mut report: Vec<String> = doomed
        .iter()
        .map(|e| format!("{} {}: deleted", e.service, e.version))
        .collect();
    let hashes: BTreeSet<String> = doomed.iter().map(|e| e.sha256.clone()).collect();
    report.extend(collect(&etcd, &keys, Some(&hashes), false).await?);
    Ok(report)
}

/// `api gc`: delete every stored document no index entry names.
pub async fn gc(cfg: &EtcdConfig, dry_run: bool) -> Result<Vec<String>, ApiError> {
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let report = collect(&etcd, &keys, None, dry_run).await?;
    match report.is_empty() {
        true => Ok(vec!["no unreferenced documents".to_string()]),
        false => Ok(report),
    }
}

/// A version an HTTPRoute validates with is not deleted: its ingresses would keep validating
/// with their last compilation, and answer 503 after a restart.
async fn refuse_if_validating(
    etcd: &Etcd,
    keys: &Keys,
    doomed: &[&IndexEntry],
) -> Result<(), ApiError> {
    let (routes, _) = crate::api_public::routes(etcd, keys).await?;
    let mut users = Vec::new();
    for (name, spec) in &routes {
        for (i, rule) in spec.rules.iter().enumerate() {
            let Some(v) = &rule.validation else {
                continue;
            };
            let named = |e: &&IndexEntry| {
                v.spec
                    == ApiRef {
                        service: e.service.clone(),
                        version: e.version.clone(),
                    }
            };
            if doomed.iter().any(named) {
                users.push(format!("HTTPRoute/{name} rules[{i}] ({})", v.spec));
            }
        }
    }
    match users.is_empty() {
        true => Ok(()),
        false => Err(ApiError::InUse(users.join(", "))),
    }
}

/// Delete the stored documents (of `only`, or all) that no index entry names, each guarded by
/// the index being unchanged since it was read. One line per document.
async fn collect(
    etcd: &Etcd,
    keys: &Keys,
    only: Option<&BTreeSet<String>>,
    dry_run: bool,
) -> Result<Vec<String>, ApiError> {
    let mut client = etcd.client.clone();
    let index = keys.api_index();
    let resp = etcd
        .call(client.get(index.as_str(), Some(GetOptions::new().with_prefix())))
        .await?;
    let read_at = resp.header().map_or(0, |h| h.revision());
    let named = resp
        .kvs()
        .iter()
        .map(|kv| parse_entry(&String::from_utf8_lossy(kv.key()), kv.value()).map(|e| e.sha256))
        .collect::<Result<BTreeSet<String>, _>>()?;
    let stored = stored_hashes(etcd, keys).await?;
    let mut report = Vec::new();
    let unnamed = stored
        .iter()
        .filter(|h| !named.contains(*h) && only.is_none_or(|o| o.contains(*h)));
    for hash in unnamed {
        if dry_run {
            report.push(format!("document sha256:{}: would be deleted", short(hash)));
            continue;
        }
        // Nothing in the index created or changed after it was read.
        let unchanged =
            Compare::mod_revision(index.as_str(), CompareOp::Less, read_at + 1).with_prefix();
        let txn = Txn::new()
            .when([unchanged])
            .and_then([TxnOp::delete(keys.api_spec(hash), None)]);
        let done = etcd.call(client.txn(txn)).await?.succeeded();
        report.push(match done {
            true => format!("document sha256:{}: deleted (no version names it)", short(hash)),
            false => format!("document sha256:{}: kept (the index changed meanwhile; run `mesh-agent api gc` again)", short(hash)),
        });
    }
    Ok(report)
}

/// The hashes of the stored documents (their keys only, not the blobs).
async fn stored_hashes(etcd: &Etcd, keys: &Keys) -> Result<Vec<String>, ApiError> {
    let mut client = etcd.client.clone();
    let prefix = keys.api_spec("");
    let opts = GetOptions::new().with_prefix().with_keys_only();
    let resp = etcd.call(client.get(prefix.as_str(), Some(opts))).await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            key.strip_prefix(prefix.as_str()).map(str::to_string)
        })
        .collect())
}
