//! Kubernetes manifests as `mesh-agent inject` reads them from a user, and pods as the
//! injector webhook receives them (`mesh-agent/src/inject/`: `manifest::parse`, `rewrite`,
//! `pod::inject`/`uninject`, the YAML writer `yaml::to_string`). The manifest is the user's,
//! but a pod reaching the webhook may come from anyone allowed to create pods.

use mesh_agent::inject::manifest::{self, Mode};
use mesh_agent::inject::options::{Gate, Options};
use mesh_agent::inject::review;

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"apiVersion: apps/v1\nkind: Deployment\n",
    b"apiVersion: v1\nkind: Pod\n",
    b"apiVersion: v1\nkind: List\nitems:\n",
    b"apiVersion: batch/v1\nkind: CronJob\n",
    b"metadata: {name: a, labels: {app: a}}\n",
    b"spec:\n  template:\n",
    b"jobTemplate:",
    b"containers: [{name: a, image: b}]",
    b"initContainers:",
    b"volumes:",
    b"hostNetwork: true",
    b"terminationGracePeriodSeconds: ",
    b"readinessProbe: {httpGet: {port: http}}",
    b"ports: [{name: http, containerPort: 8080}]",
    b"annotations:",
    b"trellis.dev/inject: disabled",
    b"trellis.dev/injected: '{}'",
    b"trellis.dev/skip-outbound-cidrs: 10.0.0.0/8",
    b"trellis.dev/interception: explicit",
    b"trellis.dev/certs: csi",
    b"defaultMode: 0440",
    b"name: mesh-agent",
    b"\n---\n",
    b"|\n  ",
    b"'yes'",
    b"\"0x1F\"",
    b"{",
    b"[",
    b"&a ",
    b"*a",
    b"!!str ",
];

/// The properties: the YAML written is read back as the same documents; an injected manifest
/// injected again is unchanged; uninjecting it and injecting again gives it back.
pub fn run(data: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let opts = Options::from_flags(["--service", "fuzz"]).expect("flags");
    if let Ok((format, docs)) = manifest::parse(text) {
        let once = manifest::render(format, &docs).expect("renders");
        let (_, again) = manifest::parse(&once).expect("our output parses");
        let twice = manifest::render(format, &again).expect("renders");
        assert_eq!(once, twice, "written, read and written again differs");
        docs.iter().for_each(|d| webhook(d, &opts));
    }
    let injected = match manifest::rewrite(text, Mode::Inject(&opts)) {
        Ok(r) => r.output,
        Err(e) => return outcome(&e.to_string()),
    };
    let again = manifest::rewrite(&injected, Mode::Inject(&opts)).expect("injects again");
    assert_eq!(
        again.output, injected,
        "injecting twice changed the manifest"
    );
    let removed = manifest::rewrite(&injected, Mode::Uninject).expect("uninjects");
    let back = manifest::rewrite(&removed.output, Mode::Inject(&opts)).expect("re-injects");
    assert_eq!(
        back.output, injected,
        "uninject then inject changed the manifest"
    );
    outcome("injected")
}

/// The document as the pod of an AdmissionReview: answered (or refused as malformed), never a
/// panic.
fn webhook(doc: &serde_norway::Value, opts: &Options) {
    let Ok(pod) = serde_json::to_value(doc) else {
        return;
    };
    let body = serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "object": pod,
        },
    });
    let _ = review::answer(body.to_string().as_bytes(), opts, Gate::UnlessDisabled);
}
