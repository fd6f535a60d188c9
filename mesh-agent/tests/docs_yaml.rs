//! Every YAML block of the README and docs/*.md is something Trellis accepts, checked with the
//! code the binary uses: a policy document (`apiVersion: trellis.dev/v1`) by what `mesh-agent
//! policy validate` runs, a sidecar configuration by the sidecar's own parse and validation,
//! and a fragment (a few fields shown on their own) as part of a sidecar configuration or of a
//! `ServicePolicy` spec. A user copies examples from the docs: none may be refused.

use std::path::{Path, PathBuf};

use serde_norway::{Mapping, Value};

struct Block {
    origin: String,
    text: String,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The ```yaml blocks of `file`, each with `file:line` of its first line.
fn yaml_blocks(file: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let name = file
        .strip_prefix(root())
        .unwrap_or(file)
        .display()
        .to_string();
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match current.take() {
            Some(b) if fence => out.push(b),
            Some(mut b) => {
                b.text.push_str(line);
                b.text.push('\n');
                current = Some(b);
            }
            None if fence => {
                let lang = line.trim_start().trim_start_matches('`').trim();
                if lang == "yaml" || lang == "yml" {
                    current = Some(Block {
                        origin: format!("{name}:{}", i + 2),
                        text: String::new(),
                    });
                }
            }
            None => {}
        }
    }
    assert!(current.is_none(), "{name}: unterminated code block");
    out
}

fn doc_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Validate policy documents exactly as `mesh-agent policy validate FILE` does.
fn check_policies(dir: &Path, b: &Block) -> Result<String, String> {
    let path = dir.join("block.yaml");
    std::fs::write(&path, &b.text).map_err(|e| e.to_string())?;
    let docs = mesh_agent::policy::load_documents(&path).map_err(|e| e.to_string())?;
    Ok(format!("{} policy document(s)", docs.len()))
}

fn as_mapping(text: &str) -> Result<Mapping, String> {
    match serde_norway::from_str::<Value>(text).map_err(|e| e.to_string())? {
        Value::Mapping(m) => Ok(m),
        other => Err(format!("not a mapping: {other:?}")),
    }
}

/// A sidecar configuration, whole or a fragment completed with the required fields.
fn check_sidecar(text: &str) -> Result<String, String> {
    let mut m = as_mapping(text)?;
    let whole = m.contains_key("service") && m.contains_key("identity");
    if !m.contains_key("service") {
        m.insert("service".into(), "orders".into());
    }
    if !m.contains_key("identity") {
        let identity: Value =
            serde_norway::from_str("{cert: c.pem, key: k.pem, bundle: ca.pem}").expect("literal");
        m.insert("identity".into(), identity);
    }
    let text = serde_norway::to_string(&m).map_err(|e| e.to_string())?;
    let cfg =
        mesh_agent::config::AgentConfig::from_yaml(&text, "block").map_err(|e| e.to_string())?;
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(if whole {
        "sidecar configuration".into()
    } else {
        "sidecar configuration fragment".into()
    })
}

/// Fields of a `ServicePolicy` spec shown on their own.
fn check_service_policy_spec(dir: &Path, b: &Block) -> Result<String, String> {
    let spec = as_mapping(&b.text)?;
    let mut doc = Mapping::new();
    doc.insert("apiVersion".into(), "trellis.dev/v1".into());
    doc.insert("kind".into(), "ServicePolicy".into());
    let mut meta = Mapping::new();
    meta.insert("name".into(), "orders".into());
    doc.insert("metadata".into(), Value::Mapping(meta));
    doc.insert("spec".into(), Value::Mapping(spec));
    let text = serde_norway::to_string(&doc).map_err(|e| e.to_string())?;
    check_policies(
        dir,
        &Block {
            origin: b.origin.clone(),
            text,
        },
    )
    .map(|_| "ServicePolicy spec fragment".into())
}

#[test]
fn every_yaml_block_in_the_docs_is_accepted() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    for file in doc_files() {
        for b in yaml_blocks(&file) {
            let result = if b.text.contains("apiVersion: trellis.dev/v1") {
                check_policies(dir.path(), &b)
            } else {
                check_sidecar(&b.text).or_else(|sidecar| {
                    check_service_policy_spec(dir.path(), &b).map_err(|policy| {
                        format!(
                            "neither a sidecar configuration ({sidecar}) nor a ServicePolicy spec ({policy})"
                        )
                    })
                })
            };
            match result {
                Ok(what) => checked.push(format!("{}: {what}", b.origin)),
                Err(e) => problems.push(format!("{}: {e}", b.origin)),
            }
        }
    }
    assert!(
        problems.is_empty(),
        "YAML blocks the docs show that Trellis refuses:\n{}",
        problems.join("\n")
    );
    assert!(checked.len() >= 10, "found too few blocks: {checked:?}");
    eprintln!("{}", checked.join("\n"));
}
