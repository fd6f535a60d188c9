//! Manifests: multi-document YAML or a stream of JSON objects, each document walked to the
//! pod templates of the workload kinds (and through `List` items). Documents of other kinds
//! pass through unchanged, with a warning. Everything is changed in memory first: one refused
//! document refuses the whole input, so no output is ever half-injected.

use serde::Deserialize;
use serde_norway::{Mapping, Value};

use super::options::{Gate, Options};
use super::pod::{self, Outcome};
use super::InjectError;

/// What the input was, so that the output is the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

#[derive(Clone, Copy, Debug)]
pub enum Mode<'a> {
    Inject(&'a Options),
    Uninject,
}

/// The rewritten manifest and what the user should know about it.
#[derive(Debug)]
pub struct Rewritten {
    pub output: String,
    pub warnings: Vec<String>,
}

/// Where a kind keeps its pod template.
enum Template {
    Here,
    At(&'static [&'static str]),
    List,
}

/// Inject into (or uninject from) every workload of `text`.
pub fn rewrite(text: &str, mode: Mode<'_>) -> Result<Rewritten, InjectError> {
    let (format, mut docs) = parse(text)?;
    let mut warnings = Vec::new();
    for (i, doc) in docs.iter_mut().enumerate() {
        walk(doc, &format!("document {}", i + 1), mode, &mut warnings)?;
    }
    Ok(Rewritten {
        output: render(format, &docs)?,
        warnings,
    })
}

/// JSON when the input is a stream of JSON values, else YAML (which also reads most JSON).
/// Mappings keep their key order (serde_norway's mapping is ordered). Empty documents
/// (comments only) are dropped. YAML is read and written as Kubernetes reads it
/// ([`super::yaml`]).
pub fn parse(text: &str) -> Result<(Format, Vec<Value>), InjectError> {
    if text.trim_start().starts_with(['{', '[']) {
        let json: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect();
        if let Ok(docs) = json {
            return Ok((Format::Json, docs));
        }
    }
    let mut docs = Vec::new();
    for d in serde_norway::Deserializer::from_str(text) {
        let mut v = Value::deserialize(d).map_err(|e| InjectError::Parse(e.to_string()))?;
        super::yaml::as_kubernetes_reads(&mut v);
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok((Format::Yaml, docs))
}

pub fn render(format: Format, docs: &[Value]) -> Result<String, InjectError> {
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        let text = match format {
            Format::Yaml => Ok(super::yaml::to_string(d)),
            Format::Json => serde_json::to_string_pretty(d)
                .map(|s| s + "\n")
                .map_err(|e| e.to_string()),
        }
        .map_err(|e| InjectError::Malformed {
            what: format!("document {}", i + 1),
            message: format!("cannot render: {e}"),
        })?;
        if i > 0 && format == Format::Yaml {
            out.push_str("---\n");
        }
        out.push_str(&text);
    }
    Ok(out)
}

fn walk(
    doc: &mut Value,
    at: &str,
    mode: Mode<'_>,
    warnings: &mut Vec<String>,
) -> Result<(), InjectError> {
    let m = doc
        .as_mapping_mut()
        .ok_or_else(|| InjectError::NotAnObject { what: at.into() })?;
    let (api, kind, what) = identify(m, at)?;
    match template(&api, &kind) {
        Some(Template::List) => {
            let items = match m.get_mut("items") {
                Some(Value::Sequence(items)) => items,
                Some(Value::Null) | None => return Ok(()),
                Some(_) => return Err(malformed(&what, "items is not a list")),
            };
            for (j, item) in items.iter_mut().enumerate() {
                walk(item, &format!("{what} item {}", j + 1), mode, warnings)?;
            }
            Ok(())
        }
        Some(Template::Here) => one(m, &what, mode, warnings),
        Some(Template::At(path)) => one(descend(m, path, &what)?, &what, mode, warnings),
        None if PODLESS.contains(&kind.as_str()) => Ok(()),
        None => {
            warnings.push(format!(
                "{what}: {api} {kind} has no pod template Trellis knows; passed through unchanged"
            ));
            Ok(())
        }
    }
}

/// `apiVersion`, `kind`, and how errors name the object (`document 2 (Deployment/orders)`).
fn identify(m: &Mapping, at: &str) -> Result<(String, String, String), InjectError> {
    let text = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let (Some(api), Some(kind)) = (text("apiVersion"), text("kind")) else {
        return Err(InjectError::NotAnObject { what: at.into() });
    };
    let name = m
        .get("metadata")
        .and_then(|x| x.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let what = format!("{at} ({kind}/{name})");
    Ok((api, kind, what))
}

/// The mapping at `path` (the pod template of a workload).
fn descend<'a>(
    mut m: &'a mut Mapping,
    path: &[&str],
    what: &str,
) -> Result<&'a mut Mapping, InjectError> {
    for key in path {
        m = match m.get_mut(*key) {
            Some(Value::Mapping(next)) => next,
            _ => return Err(malformed(what, &format!("no {}", path.join(".")))),
        };
    }
    Ok(m)
}

fn one(
    template: &mut Mapping,
    what: &str,
    mode: Mode<'_>,
    warnings: &mut Vec<String>,
) -> Result<(), InjectError> {
    match mode {
        Mode::Inject(opts) => {
            if pod::inject(template, opts, Gate::UnlessDisabled, what)? == Outcome::Skipped {
                warnings.push(format!(
                    "{what}: trellis.dev/inject is disabled; left unchanged"
                ));
            }
        }
        Mode::Uninject => {
            pod::uninject(template, what)?;
        }
    }
    Ok(())
}

/// Kinds that appear next to workloads and never hold a pod template: passed through without
/// a warning, which is kept for kinds the injection may be missing (custom workloads).
const PODLESS: &[&str] = &[
    "Service",
    "ConfigMap",
    "Secret",
    "ServiceAccount",
    "Namespace",
    "Ingress",
    "NetworkPolicy",
    "PersistentVolumeClaim",
    "PersistentVolume",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "LimitRange",
    "ResourceQuota",
    "StorageClass",
    "PriorityClass",
    "Endpoints",
    "EndpointSlice",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "CustomResourceDefinition",
];

/// The workload kinds (by API group, so that a custom resource named like one is left alone).
fn template(api: &str, kind: &str) -> Option<Template> {
    const SPEC_TEMPLATE: &[&str] = &["spec", "template"];
    match (api, kind) {
        ("v1", "Pod") => Some(Template::Here),
        ("apps/v1", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch/v1", "Job")
        | ("v1", "ReplicationController") => Some(Template::At(SPEC_TEMPLATE)),
        ("batch/v1" | "batch/v1beta1", "CronJob") => {
            Some(Template::At(&["spec", "jobTemplate", "spec", "template"]))
        }
        ("v1", "List") => Some(Template::List),
        _ => None,
    }
}

fn malformed(what: &str, message: &str) -> InjectError {
    InjectError::Malformed {
        what: what.into(),
        message: message.into(),
    }
}
