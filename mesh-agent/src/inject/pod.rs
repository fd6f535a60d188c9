//! Injecting into and uninjecting from one pod template (a Pod, or a workload's
//! `spec.template`): the one change the CLI and the webhook share.
//!
//! Each call works on a copy and writes it back only when every step succeeded, so a refused
//! template is never half-modified.

use serde::{Deserialize, Serialize};
use serde_norway::{Mapping, Value};

use super::options::{Gate, Options, Settings};
use super::sidecar::{self, s};
use super::{InjectError, INIT_NAME, INJECTED_ANNOTATION, SIDECAR_NAME, VOLUMES};

/// What an injection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Injected,
    /// `trellis.dev/inject: disabled`, or not enabled where the gate requires it.
    Skipped,
}

/// What `uninject` restores, kept as JSON in the [`INJECTED_ANNOTATION`]: the values the
/// injection replaced, the keys it created (removed again if still empty) and the keys it
/// found null (null again if still empty: in place, so that injecting again keeps the order).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Undo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    termination_grace_period_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    created: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nulls: Vec<String>,
}

impl Undo {
    /// Note what `key` of `map` (at `path`) was before a list or mapping is put there.
    fn note(&mut self, map: &Mapping, key: &str, path: String) {
        match map.get(key) {
            None => self.created.push(path),
            Some(Value::Null) => self.nulls.push(path),
            Some(_) => {}
        }
    }
}

/// Add the sidecar to `template` (its `metadata` and `spec`). An injected template is first
/// uninjected, so injecting again with the same options changes nothing.
pub fn inject(
    template: &mut Mapping,
    opts: &Options,
    gate: Gate,
    what: &str,
) -> Result<Outcome, InjectError> {
    let mut t = template.clone();
    uninject_in(&mut t, what)?;
    let meta = match t.get("metadata") {
        None => None,
        Some(Value::Mapping(m)) => Some(m),
        Some(_) => return Err(malformed(what, "metadata is not a mapping")),
    };
    let Some(set) = opts.resolve(meta, gate, what)? else {
        return Ok(Outcome::Skipped);
    };
    let spec = match t.get_mut("spec") {
        Some(Value::Mapping(m)) => m,
        _ => return Err(malformed(what, "the pod template has no spec mapping")),
    };
    check(spec, what)?;
    let undo = add_sidecar(spec, &set, what)?;
    mark(&mut t, undo, what)?;
    *template = t;
    Ok(Outcome::Injected)
}

/// The containers first, the volumes last, the grace period; what to undo.
fn add_sidecar(spec: &mut Mapping, set: &Settings, what: &str) -> Result<Undo, InjectError> {
    let mut undo = Undo::default();
    for key in ["initContainers", "volumes"] {
        undo.note(spec, key, format!("spec.{key}"));
    }
    let inits = sidecar::init_containers(set, &probe_ports(spec));
    update_seq(spec, "initContainers", |v| {
        v.splice(0..0, inits);
    });
    update_seq(spec, "volumes", |v| v.extend(sidecar::volumes(set)));
    undo.termination_grace_period_seconds = grace(spec, what)?;
    let seconds = sidecar::grace_seconds(set, undo.termination_grace_period_seconds);
    spec.insert(s("terminationGracePeriodSeconds"), Value::from(seconds));
    Ok(undo)
}

/// Remove what [`inject`] added and restore what it replaced. `false`: not injected.
pub fn uninject(template: &mut Mapping, what: &str) -> Result<bool, InjectError> {
    let mut t = template.clone();
    let done = uninject_in(&mut t, what)?;
    *template = t;
    Ok(done)
}

fn uninject_in(t: &mut Mapping, what: &str) -> Result<bool, InjectError> {
    let Some(raw) = annotations(t).and_then(|a| a.get(INJECTED_ANNOTATION)) else {
        return Ok(false);
    };
    let undo: Undo = raw
        .as_str()
        .and_then(|r| serde_json::from_str(r).ok())
        .ok_or_else(|| {
            malformed(
                what,
                &format!("{INJECTED_ANNOTATION} is not what inject wrote"),
            )
        })?;
    if let Some(Value::Mapping(spec)) = t.get_mut("spec") {
        remove_named(spec, "initContainers", &[INIT_NAME, SIDECAR_NAME]);
        remove_named(spec, "volumes", &VOLUMES);
        match undo.termination_grace_period_seconds {
            Some(g) => spec.insert(s("terminationGracePeriodSeconds"), Value::from(g)),
            None => spec.shift_remove("terminationGracePeriodSeconds"),
        };
    }
    if let Some(Value::Mapping(a)) = t.get_mut("metadata").and_then(|m| m.get_mut("annotations")) {
        a.shift_remove(INJECTED_ANNOTATION);
    }
    for path in undo.created.iter().rev() {
        reset_if_empty(t, path, None);
    }
    for path in &undo.nulls {
        reset_if_empty(t, path, Some(Value::Null));
    }
    Ok(true)
}

/// Refusals: host networking, and names the injection would duplicate.
fn check(spec: &Mapping, what: &str) -> Result<(), InjectError> {
    if spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        return Err(InjectError::HostNetwork { what: what.into() });
    }
    let taken = |field: &str, names: &[&str]| -> Result<(), InjectError> {
        let items = match spec.get(field) {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Sequence(items)) => items,
            Some(_) => return Err(malformed(what, &format!("spec.{field} is not a list"))),
        };
        match items
            .iter()
            .find_map(|i| names.iter().find(|n| i.get("name") == Some(&s(**n))))
        {
            Some(name) => Err(InjectError::NameTaken {
                what: what.into(),
                field: format!("spec.{field}"),
                name: (*name).into(),
            }),
            None => Ok(()),
        }
    };
    for field in ["initContainers", "containers", "ephemeralContainers"] {
        taken(field, &[SIDECAR_NAME, INIT_NAME])?;
    }
    taken("volumes", &VOLUMES)
}

/// Ports of the app containers' HTTP, TCP and gRPC probes: the kubelet probes them in
/// plaintext from the node, so inbound capture (strict mTLS) would fail them.
fn probe_ports(spec: &Mapping) -> Vec<u16> {
    let mut out = Vec::new();
    let containers = spec.get("containers").and_then(Value::as_sequence);
    for c in containers.into_iter().flatten() {
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                let port = c
                    .get(probe)
                    .and_then(|p| p.get(handler))
                    .and_then(|h| h.get("port"));
                if let Some(p) = port.and_then(|p| resolve_port(c, p)) {
                    out.push(p);
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// A probe's port: a number, or the name of one of the container's ports.
fn resolve_port(container: &Value, port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        Value::String(name) => container
            .get("ports")?
            .as_sequence()?
            .iter()
            .find(|p| p.get("name").and_then(Value::as_str) == Some(name))?
            .get("containerPort")
            .and_then(Value::as_u64)
            .and_then(|n| u16::try_from(n).ok()),
        _ => None,
    }
}

fn grace(spec: &Mapping, what: &str) -> Result<Option<i64>, InjectError> {
    match spec.get("terminationGracePeriodSeconds") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| malformed(what, "terminationGracePeriodSeconds is not an integer")),
    }
}

/// Write the [`INJECTED_ANNOTATION`], creating `metadata` and `annotations` when missing.
fn mark(t: &mut Mapping, mut undo: Undo, what: &str) -> Result<(), InjectError> {
    if !t.contains_key("metadata") {
        undo.created.insert(0, "metadata".into());
    }
    let meta = t
        .entry(s("metadata"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    let Value::Mapping(meta) = meta else {
        return Err(malformed(what, "metadata is not a mapping"));
    };
    if !matches!(meta.get("annotations"), Some(Value::Mapping(_))) {
        undo.note(meta, "annotations", "metadata.annotations".into());
        meta.insert(s("annotations"), Value::Mapping(Mapping::new()));
    }
    let json = serde_json::to_string(&undo).map_err(|e| malformed(what, &e.to_string()))?;
    if let Some(Value::Mapping(a)) = meta.get_mut("annotations") {
        a.insert(s(INJECTED_ANNOTATION), s(json));
    }
    Ok(())
}

fn annotations(t: &Mapping) -> Option<&Mapping> {
    t.get("metadata")?.get("annotations")?.as_mapping()
}

/// Change the list under `key`, created when missing (or null: [`check`] refused other
/// values). Replacing an existing key keeps its position.
fn update_seq(spec: &mut Mapping, key: &str, change: impl FnOnce(&mut Vec<Value>)) {
    let mut items = match spec.get(key) {
        Some(Value::Sequence(v)) => v.clone(),
        _ => Vec::new(),
    };
    change(&mut items);
    spec.insert(s(key), Value::Sequence(items));
}

fn remove_named(spec: &mut Mapping, key: &str, names: &[&str]) {
    if let Some(Value::Sequence(items)) = spec.get_mut(key) {
        items.retain(|i| !names.iter().any(|n| i.get("name") == Some(&s(*n))));
    }
}

/// When the value at a dotted `path` is an empty list or mapping: remove the key, or (`to`)
/// put that value back in its place.
fn reset_if_empty(t: &mut Mapping, path: &str, to: Option<Value>) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut m = t;
    for p in parts {
        match m.get_mut(p) {
            Some(Value::Mapping(next)) => m = next,
            _ => return,
        }
    }
    let empty = match m.get(last) {
        Some(Value::Sequence(v)) => v.is_empty(),
        Some(Value::Mapping(v)) => v.is_empty(),
        _ => false,
    };
    match (empty, to) {
        (false, _) => {}
        (true, None) => {
            m.shift_remove(last);
        }
        (true, Some(v)) => {
            m.insert(s(last), v);
        }
    }
}

fn malformed(what: &str, message: &str) -> InjectError {
    InjectError::Malformed {
        what: what.into(),
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(yaml: &str) -> Mapping {
        serde_norway::from_str(yaml).expect("yaml")
    }

    fn opts(flags: &[&str]) -> Options {
        Options::from_flags(flags).expect("flags")
    }

    /// Keys the injection creates go again; keys that were there, even empty, stay.
    #[test]
    fn created_keys_are_removed_and_existing_empty_ones_kept() {
        for yaml in [
            "spec: {containers: [{name: a, image: b}]}",
            "spec: {containers: [{name: a, image: b}], volumes: [], initContainers: []}",
            "metadata: {annotations: {}}\nspec: {containers: [{name: a, image: b}]}",
            // Found by the `inject` fuzz target: null lists moved to the end when injected
            // again.
            "metadata: {annotations: null, x: 1}\nspec: {volumes: null, containers: [{name: a}], initContainers: ~}",
        ] {
            let original = template(yaml);
            let mut t = original.clone();
            let o = opts(&["--service", "orders"]);
            assert_eq!(
                inject(&mut t, &o, Gate::UnlessDisabled, "t").expect("inject"),
                Outcome::Injected
            );
            assert_ne!(t, original);
            assert!(uninject(&mut t, "t").expect("uninject"));
            assert_eq!(
                serde_norway::to_string(&t).expect("yaml"),
                serde_norway::to_string(&original).expect("yaml"),
                "{yaml}"
            );
        }
    }

    #[test]
    fn the_webhook_gate_needs_the_annotation() {
        let mut t = template("metadata: {labels: {app: a}}\nspec: {containers: [{name: a}]}");
        let o = opts(&[]);
        assert_eq!(
            inject(&mut t, &o, Gate::OnlyEnabled, "t").expect("ok"),
            Outcome::Skipped
        );
        let mut t = template(
            "metadata: {labels: {app: a}, annotations: {trellis.dev/inject: enabled}}\nspec: {containers: [{name: a}]}",
        );
        assert_eq!(
            inject(&mut t, &o, Gate::OnlyEnabled, "t").expect("ok"),
            Outcome::Injected
        );
    }

    #[test]
    fn a_tampered_record_is_refused() {
        let mut t = template(
            "metadata: {annotations: {trellis.dev/injected: 'not json'}}\nspec: {containers: []}",
        );
        let before = t.clone();
        let err = uninject(&mut t, "t").expect_err("refused");
        assert!(err.to_string().contains("not what inject wrote"), "{err}");
        assert_eq!(t, before);
    }
}
