//! `mesh-agent api put|list|get|diff`: OpenAPI documents in etcd (`delete` and `gc`:
//! [`crate::api_delete`]), once per content hash
//! (docs/api-specs.md).
//!
//! A document is stored as the gzip of its canonical JSON under
//! `<prefix>/v1/apis/specs/<sha256>`, and each service version has an index entry under
//! `<prefix>/v1/apis/index/<service>/<version>` naming that hash. Writing the same document
//! again (another instance of the service, another version with an unchanged API) only writes
//! the small index entry: the blob is created in a transaction guarded by "does not exist yet".
//!
//! etcd refuses requests over 1.5 MiB by default (`--max-request-bytes`), so documents are
//! compressed (OpenAPI JSON shrinks 5-15x) and refused, with the limit named, when still over
//! [`MAX_STORED_BYTES`]; they are never split across keys. Everything read back from etcd is
//! treated as untrusted: inflated with a bound, its hash checked, its JSON parsed and validated,
//! and any failure names the key.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use etcd_client::{Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_policies::{
    canonical_bytes, diff_api, parse_documents, parse_openapi, validate_openapi, ApiChange,
    ApiSpecSpec, Policy, SpecSummary, MAX_SPEC_BYTES,
};

use crate::config::EtcdConfig;
use crate::etcd::keys::Keys;
use crate::etcd::{Etcd, EtcdError};
use crate::policy::OutputFormat;

/// The largest compressed document written to etcd: 1 MiB, leaving room under etcd's default
/// 1.5 MiB request limit for the index entry written in the same transaction.
pub const MAX_STORED_BYTES: usize = 1024 * 1024;

/// A file given to `api put` may hold the document and its `ApiSpec` envelope.
const MAX_FILE_BYTES: u64 = MAX_SPEC_BYTES as u64 + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {size} bytes, over the limit of {limit} bytes (an 8 MiB document and its envelope); nothing was read")]
    FileTooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{} invalid document(s):\n  {}", .0.len(), .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("no ApiSpec documents in {0}")]
    Empty(String),
    #[error("{service} {version}: the document compresses to {compressed} bytes, over the limit of {limit} bytes stored per document (etcd refuses requests over 1.5 MiB by default); nothing was written")]
    StoredTooLarge {
        service: String,
        version: String,
        compressed: usize,
        limit: usize,
    },
    #[error("no API spec stored for {0}; see `mesh-agent api list`")]
    NotFound(String),
    #[error("not deleted: validation at the edge uses it: {0} (change the routes first, or delete with --force)")]
    InUse(String),
    #[error("etcd key {key}: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("{0} has a stored API document, but no HTTPRoute bound to gateway `{1}` reaches it: it is not public there")]
    NotPublic(String, String),
    #[error("cannot encode: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("cannot compress a document: {0}")]
    Compress(std::io::Error),
}

/// What the index says about one service version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub service: String,
    pub version: String,
    /// SHA-256 of the canonical JSON, hex.
    pub sha256: String,
    /// Canonical JSON size, bytes.
    pub size: usize,
    /// Stored (compressed) size, bytes.
    pub stored: usize,
    pub title: String,
    pub openapi: String,
    /// `info.version` of the document.
    pub info_version: String,
}

/// A validated document ready to store.
#[derive(Debug)]
pub struct Spec {
    pub service: String,
    pub version: String,
    pub document: Value,
    pub summary: SpecSummary,
}

// === reading input ===

/// Read a file with its size checked first, so a 50 MB file is refused without being read.
fn read_bounded(path: &Path) -> Result<String, ApiError> {
    let read = |source| ApiError::Read {
        path: path.to_path_buf(),
        source,
    };
    let size = std::fs::metadata(path).map_err(read)?.len();
    if size > MAX_FILE_BYTES {
        return Err(ApiError::FileTooLarge {
            path: path.to_path_buf(),
            size,
            limit: MAX_FILE_BYTES,
        });
    }
    std::fs::read_to_string(path).map_err(read)
}

/// The `ApiSpec` documents of a YAML file (other kinds are refused: use `policy apply`).
pub fn load_specs(path: &Path) -> Result<Vec<Spec>, ApiError> {
    let text = read_bounded(path)?;
    let origin = path.display().to_string();
    let mut specs = Vec::new();
    let mut problems = Vec::new();
    for doc in parse_documents(&text, &origin) {
        match doc.and_then(|d| d.validate().map(|p| (d, p))) {
            Ok((
                _,
                Policy::ApiSpec {
                    spec,
                    document,
                    summary,
                    ..
                },
            )) => specs.push(Spec::new(&spec, document, summary)),
            Ok((d, _)) => problems.push(format!(
                "{}: not an ApiSpec; apply it with `mesh-agent policy apply`",
                d.id()
            )),
            Err(e) => problems.push(e.to_string()),
        }
    }
    match (problems.is_empty(), specs.is_empty()) {
        (false, _) => Err(ApiError::Invalid(problems)),
        (true, true) => Err(ApiError::Empty(origin)),
        (true, false) => Ok(specs),
    }
}

/// A bare OpenAPI document (JSON or YAML) for `service` at `version`.
pub fn load_document(path: &Path, service: &str, version: &str) -> Result<Spec, ApiError> {
    let text = read_bounded(path)?;
    let spec = ApiSpecSpec {
        service: service.to_string(),
        version: version.to_string(),
        document: Value::String(text),
    };
    let (document, summary) = spec
        .validate()
        .map_err(|e| ApiError::Invalid(vec![format!("{}: {e}", path.display())]))?;
    Ok(Spec::new(&spec, document, summary))
}

/// The spec an `ApiSpec` policy document carries; `None` for other kinds or invalid documents
/// (which `policy apply` has already refused).
pub fn spec_of(doc: &trellis_policies::PolicyDocument) -> Option<Spec> {
    match doc.validate() {
        Ok(Policy::ApiSpec {
            spec,
            document,
            summary,
            ..
        }) => Some(Spec::new(&spec, document, summary)),
        _ => None,
    }
}

impl Spec {
    fn new(spec: &ApiSpecSpec, document: Value, summary: SpecSummary) -> Self {
        Self {
            service: spec.service.clone(),
            version: spec.version.clone(),
            document,
            summary,
        }
    }
}

// === encoding ===

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes)?;
    enc.finish()
}

/// Inflate at most [`MAX_SPEC_BYTES`]: a small hostile value must not expand without bound.
fn gunzip_bounded(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_SPEC_BYTES as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("not a gzip-compressed document: {e}"))?;
    if out.len() > MAX_SPEC_BYTES {
        return Err(format!(
            "inflates past the limit of {MAX_SPEC_BYTES} bytes (8 MiB)"
        ));
    }
    Ok(out)
}

/// The blob and the index entry of a spec, refused when too large to store.
fn encode(spec: &Spec) -> Result<(Vec<u8>, IndexEntry), ApiError> {
    let canonical = canonical_bytes(&spec.document);
    let blob = gzip(&canonical).map_err(ApiError::Compress)?;
    if blob.len() > MAX_STORED_BYTES {
        return Err(ApiError::StoredTooLarge {
            service: spec.service.clone(),
            version: spec.version.clone(),
            compressed: blob.len(),
            limit: MAX_STORED_BYTES,
        });
    }
    let entry = IndexEntry {
        service: spec.service.clone(),
        version: spec.version.clone(),
        sha256: sha256_hex(&canonical),
        size: canonical.len(),
        stored: blob.len(),
        title: spec.summary.title.clone(),
        openapi: spec.summary.openapi.clone(),
        info_version: spec.summary.info_version.clone(),
    };
    Ok((blob, entry))
}

// === etcd ===

/// Store each spec: its blob if no blob has that hash yet, and its index entry. One line per
/// spec says what was written.
pub async fn put(cfg: &EtcdConfig, specs: &[Spec], dry_run: bool) -> Result<Vec<String>, ApiError> {
    let encoded = specs.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
    if dry_run {
        // Validation, hashing and compression are all offline: no need for etcd.
        return Ok(encoded
            .iter()
            .map(|(_, e)| format!("{} (dry run)", describe(e, "would store")))
            .collect());
    }
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let mut report = Vec::new();
    for (blob, entry) in encoded {
        report.push(put_one(&etcd, &keys, blob, &entry).await?);
    }
    Ok(report)
}

fn describe(e: &IndexEntry, verb: &str) -> String {
    format!(
        "{} {}: {verb} sha256:{} ({} bytes, {} compressed)",
        e.service,
        e.version,
        short(&e.sha256),
        e.size,
        e.stored
    )
}

async fn put_one(
    etcd: &Etcd,
    keys: &Keys,
    blob: Vec<u8>,
    entry: &IndexEntry,
) -> Result<String, ApiError> {
    let mut client = etcd.client.clone();
    let blob_key = keys.api_spec(&entry.sha256);
    let index_key = keys.api_version(&entry.service, &entry.version);
    let index = serde_json::to_vec(entry)?;
    let txn = Txn::new()
        .when([Compare::create_revision(
            blob_key.as_str(),
            CompareOp::Equal,
            0,
        )])
        .and_then([
            TxnOp::put(blob_key.as_str(), blob, None),
            TxnOp::put(index_key.as_str(), index.clone(), None),
        ])
        .or_else([TxnOp::put(index_key.as_str(), index, None)]);
    let resp = etcd.call(client.txn(txn)).await?;
    Ok(describe(
        entry,
        match resp.succeeded() {
            true => "stored",
            false => "indexed (document already stored)",
        },
    ))
}

/// Every index entry, ordered by service and version.
pub async fn entries(cfg: &EtcdConfig) -> Result<Vec<IndexEntry>, ApiError> {
    let etcd = Etcd::connect(cfg).await?;
    entries_with(&etcd, &Keys::new(&cfg.prefix)).await
}

/// [`entries`] on a connection already made.
pub(crate) async fn entries_with(etcd: &Etcd, keys: &Keys) -> Result<Vec<IndexEntry>, ApiError> {
    let mut client = etcd.client.clone();
    let prefix = keys.api_index();
    let resp = etcd
        .call(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await?;
    let mut out = resp
        .kvs()
        .iter()
        .map(|kv| parse_entry(&String::from_utf8_lossy(kv.key()), kv.value()))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| (&a.service, &a.version).cmp(&(&b.service, &b.version)));
    Ok(out)
}

pub(crate) fn parse_entry(key: &str, value: &[u8]) -> Result<IndexEntry, ApiError> {
    serde_json::from_slice(value).map_err(|e| ApiError::Corrupt {
        key: key.to_string(),
        reason: format!("not an API index entry: {e}"),
    })
}

/// The index entry of `service` at `version`, or its most recently written one.
pub(crate) async fn entry(
    etcd: &Etcd,
    keys: &Keys,
    service: &str,
    version: Option<&str>,
) -> Result<IndexEntry, ApiError> {
    let mut client = etcd.client.clone();
    let (key, opts, what) = match version {
        Some(v) => (keys.api_version(service, v), None, format!("{service} {v}")),
        None => (
            keys.api_service(service),
            Some(GetOptions::new().with_prefix()),
            service.to_string(),
        ),
    };
    let resp = etcd.call(client.get(key.as_str(), opts)).await?;
    let latest = resp.kvs().iter().max_by_key(|kv| kv.mod_revision());
    let kv = latest.ok_or(ApiError::NotFound(what))?;
    parse_entry(&String::from_utf8_lossy(kv.key()), kv.value())
}

/// The document an index entry names: inflated with a bound, its hash checked, re-validated.
pub(crate) async fn document(
    etcd: &Etcd,
    keys: &Keys,
    entry: &IndexEntry,
) -> Result<Value, ApiError> {
    let mut client = etcd.client.clone();
    let key = keys.api_spec(&entry.sha256);
    let corrupt = |reason: String| ApiError::Corrupt {
        key: key.clone(),
        reason,
    };
    let resp = etcd.call(client.get(key.as_str(), None)).await?;
    let kv = resp.kvs().first().ok_or_else(|| {
        corrupt(format!(
            "missing, though {} {} names it",
            entry.service, entry.version
        ))
    })?;
    let bytes = gunzip_bounded(kv.value()).map_err(&corrupt)?;
    let actual = sha256_hex(&bytes);
    if actual != entry.sha256 {
        return Err(corrupt(format!("content hash is {actual}, not the key's")));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| corrupt(format!("not UTF-8: {e}")))?;
    let doc = parse_openapi(text).map_err(|e| corrupt(e.to_string()))?;
    validate_openapi(&doc).map_err(|e| corrupt(format!("not a valid document: {e}")))?;
    Ok(doc)
}

/// `api get`: the document as pretty JSON.
pub async fn get(
    cfg: &EtcdConfig,
    service: &str,
    version: Option<&str>,
) -> Result<String, ApiError> {
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let e = entry(&etcd, &keys, service, version).await?;
    let doc = document(&etcd, &keys, &e).await?;
    Ok(serde_json::to_string_pretty(&doc)?)
}

/// `api diff`: what changed from `from` to `to`.
pub async fn diff(
    cfg: &EtcdConfig,
    service: &str,
    from: &str,
    to: &str,
) -> Result<Vec<ApiChange>, ApiError> {
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let (a, b) = (
        entry(&etcd, &keys, service, Some(from)).await?,
        entry(&etcd, &keys, service, Some(to)).await?,
    );
    let old = document(&etcd, &keys, &a).await?;
    let new = match a.sha256 == b.sha256 {
        true => old.clone(),
        false => document(&etcd, &keys, &b).await?,
    };
    Ok(diff_api(&old, &new))
}

/// Run one `mesh-agent api` command; returns what it prints.
pub async fn execute(command: crate::cli::ApiCommand) -> Result<String, ApiError> {
    use crate::cli::ApiCommand as C;
    let lines = |v: Vec<String>| v.iter().map(|l| format!("{l}\n")).collect::<String>();
    match command {
        C::Put {
            file,
            service,
            version,
            dry_run,
            etcd,
        } => {
            let specs = match (service, version) {
                (Some(s), Some(v)) => vec![load_document(&file, &s, &v)?],
                _ => load_specs(&file)?,
            };
            Ok(lines(put(&etcd.config(), &specs, dry_run).await?))
        }
        C::List { output, etcd } => render_list(&entries(&etcd.config()).await?, output),
        C::Get {
            service,
            version,
            etcd,
        } => Ok(get(&etcd.config(), &service, version.as_deref()).await? + "\n"),
        C::Public {
            gateway,
            public_url,
            service,
            title,
            etcd,
        } => {
            let req = crate::api_public::Request {
                gateway: &gateway,
                public_url: public_url.as_deref(),
                service: service.as_deref(),
                title: &title,
            };
            let (doc, notes) = crate::api_public::public(&etcd.config(), &req).await?;
            for n in notes {
                eprintln!("note: {n}");
            }
            Ok(doc)
        }
        C::Diff {
            service,
            from,
            to,
            output,
            etcd,
        } => {
            let changes = diff(&etcd.config(), &service, &from, &to).await?;
            render_diff(&service, &from, &to, &changes, output)
        }
        C::Delete {
            service,
            version,
            all: _,
            force,
            etcd,
        } => {
            let d = crate::api_delete::Deletion {
                service: &service,
                version: version.as_deref(),
                force,
            };
            Ok(lines(crate::api_delete::delete(&etcd.config(), &d).await?))
        }
        C::Gc { dry_run, etcd } => Ok(lines(crate::api_delete::gc(&etcd.config(), dry_run).await?)),
    }
}

// === rendering ===

pub(crate) fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

pub fn render_list(entries: &[IndexEntry], format: OutputFormat) -> Result<String, ApiError> {
    if format == OutputFormat::Json {
        return Ok(serde_json::to_string_pretty(entries)? + "\n");
    }
    let mut out = format!(
        "{:<20} {:<12} {:<12} {:>9} {:>9}  {}\n",
        "SERVICE", "VERSION", "SHA256", "SIZE", "STORED", "TITLE"
    );
    for e in entries {
        out.push_str(&format!(
            "{:<20} {:<12} {:<12} {:>9} {:>9}  {}\n",
            e.service,
            e.version,
            short(&e.sha256),
            e.size,
            e.stored,
            e.title
        ));
    }
    Ok(out)
}

pub fn render_diff(
    service: &str,
    from: &str,
    to: &str,
    changes: &[ApiChange],
    format: OutputFormat,
) -> Result<String, ApiError> {
    let breaking = changes.iter().filter(|c| c.breaking).count();
    if format == OutputFormat::Json {
        let v = serde_json::json!({
            "service": service, "from": from, "to": to,
            "breaking": breaking, "changes": changes,
        });
        return Ok(serde_json::to_string_pretty(&v)? + "\n");
    }
    let mut out = format!(
        "{service} {from} -> {to}: {} change(s), {breaking} breaking\n",
        changes.len()
    );
    if changes.is_empty() {
        return Ok(out);
    }
    out.push_str(&format!(
        "{:<9} {:<26} {:<28} {}\n",
        "BREAKING", "CHANGE", "WHERE", "DETAIL"
    ));
    for c in changes {
        out.push_str(&format!(
            "{:<9} {:<26} {:<28} {}\n",
            if c.breaking { "yes" } else { "no" },
            c.kind.as_str(),
            c.location,
            c.detail
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_blobs_are_refused_with_a_reason() {
        assert!(gunzip_bounded(b"garbage")
            .unwrap_err()
            .contains("not a gzip-compressed document"));
        // 20 MiB of zeros compress to ~20 KiB: inflation stops at the limit.
        let bomb = gzip(&vec![0u8; 20 << 20]).unwrap();
        assert!(bomb.len() < MAX_STORED_BYTES);
        assert!(gunzip_bounded(&bomb).unwrap_err().contains("8 MiB"));
        let ok = gzip(b"{}").unwrap();
        assert_eq!(gunzip_bounded(&ok).unwrap(), b"{}");
    }

    #[test]
    fn a_document_too_large_even_compressed_is_refused_with_the_limit() {
        // 3 MiB of incompressible text (a hex digest chain) in one description.
        let mut noise = String::new();
        let mut h = sha256_hex(b"seed");
        while noise.len() < 3 << 20 {
            h = sha256_hex(h.as_bytes());
            noise.push_str(&h);
        }
        let spec = Spec {
            service: "orders".into(),
            version: "v1".into(),
            document: serde_json::json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"}, "x-noise": noise}),
            summary: SpecSummary {
                openapi: "3.1.0".into(),
                title: "t".into(),
                info_version: "1".into(),
            },
        };
        let e = encode(&spec).unwrap_err().to_string();
        assert!(e.contains("over the limit of 1048576 bytes"), "{e}");
    }

    #[test]
    fn index_entries_from_etcd_are_checked() {
        let e = parse_entry("/k", b"{\"service\": 1}")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("etcd key /k: not an API index entry"), "{e}");
    }
}
