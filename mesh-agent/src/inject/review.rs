//! AdmissionReview v1: the API server's question about a pod, and the injector's answer with
//! a JSONPatch made by the same [`pod::inject`] as `mesh-agent inject`.
//!
//! Kubernetes' types are read leniently (no `deny_unknown_fields`): the API server adds fields
//! across versions and an injector must not break on them.

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::options::{Gate, Options};
use super::pod::{self, Outcome};
use super::{patch, InjectError};

pub const API_VERSION: &str = "admission.k8s.io/v1";

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("not an {API_VERSION} AdmissionReview with a request")]
    Shape,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdmissionReview {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    kind: Option<Kind>,
    operation: Option<String>,
    namespace: Option<String>,
    object: Option<Value>,
}

#[derive(Deserialize)]
struct Kind {
    group: String,
    kind: String,
}

/// What the injector decided, for its log.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Injected { pod: String, operations: usize },
    Skipped,
    Refused { reason: String },
}

/// Answer one AdmissionReview. Pods being created are injected (per `gate`); anything else is
/// allowed unchanged. A pod the injection refuses (hostNetwork, a name taken, a bad
/// annotation) is denied with the reason, so it never starts silently outside the mesh.
pub fn answer(body: &[u8], opts: &Options, gate: Gate) -> Result<(Value, Decision), ReviewError> {
    let review: AdmissionReview = serde_json::from_slice(body)?;
    let request = match review.request {
        Some(r) if review.api_version == API_VERSION && review.kind == "AdmissionReview" => r,
        _ => return Err(ReviewError::Shape),
    };
    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|k| k.group.is_empty() && k.kind == "Pod");
    let object = match request.object {
        Some(o) if is_pod && request.operation.as_deref() == Some("CREATE") => o,
        _ => return Ok((response(&request.uid, json!({})), Decision::Skipped)),
    };
    let what = describe(&object, request.namespace.as_deref());
    let (extra, decision) = match injected(&object, opts, gate, &what) {
        Ok(Some(ops)) => {
            let decision = Decision::Injected {
                pod: what,
                operations: ops.len(),
            };
            let patch =
                base64::engine::general_purpose::STANDARD.encode(Value::from(ops).to_string());
            (json!({"patchType": "JSONPatch", "patch": patch}), decision)
        }
        Ok(None) => (json!({}), Decision::Skipped),
        Err(e) => {
            let reason = e.to_string();
            let status = json!({"allowed": false, "status": {"code": 400, "message": format!("trellis injector: {reason}")}});
            (status, Decision::Refused { reason })
        }
    };
    Ok((response(&request.uid, extra), decision))
}

/// The patch operations, or `None` when the pod is not to be injected or already is. A pod
/// made from a template `mesh-agent inject` rewrote is left as it is: the API server has
/// filled in defaults of its containers, which re-injecting would patch away for nothing, and
/// with `reinvocationPolicy: IfNeeded` the injector also sees its own pods again.
fn injected(
    pod_json: &Value,
    opts: &Options,
    gate: Gate,
    what: &str,
) -> Result<Option<Vec<Value>>, InjectError> {
    let malformed = |e: String| InjectError::Malformed {
        what: what.into(),
        message: e,
    };
    if pod_json["metadata"]["annotations"]
        .get(super::INJECTED_ANNOTATION)
        .is_some()
    {
        return Ok(None);
    }
    let mut pod: serde_norway::Value =
        serde_json::from_value(pod_json.clone()).map_err(|e| malformed(e.to_string()))?;
    let template = pod
        .as_mapping_mut()
        .ok_or_else(|| InjectError::NotAnObject { what: what.into() })?;
    if pod::inject(template, opts, gate, what)? == Outcome::Skipped {
        return Ok(None);
    }
    let after = serde_json::to_value(&pod).map_err(|e| malformed(e.to_string()))?;
    let ops = patch::diff(pod_json, &after);
    Ok((!ops.is_empty()).then_some(ops))
}

/// `pod namespace/name`; pods made by controllers have only a `generateName` yet.
fn describe(pod: &Value, namespace: Option<&str>) -> String {
    let meta = &pod["metadata"];
    let name = meta["name"]
        .as_str()
        .map(str::to_string)
        .or_else(|| meta["generateName"].as_str().map(|g| format!("{g}*")))
        .unwrap_or_default();
    format!("pod {}/{name}", namespace.unwrap_or(""))
}

fn response(uid: &str, extra: Value) -> Value {
    let mut r = json!({"uid": uid, "allowed": true});
    if let (Value::Object(r), Value::Object(extra)) = (&mut r, extra) {
        r.extend(extra);
    }
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": r})
}
