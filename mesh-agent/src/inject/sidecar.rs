//! The containers and volumes the injection adds: those of
//! `examples/kubernetes/deployment.yaml`, with the pod-specific values from [`Settings`].
//! Built as ordered YAML mappings so that the output reads like the hand-written example.

use serde_norway::{Mapping, Value};

use super::options::{Certs, Interception, Settings};
use super::{INIT_NAME, SIDECAR_NAME};

pub const CONFIG_VOLUME: &str = "trellis-config";
pub const CERTS_VOLUME: &str = "trellis-certs";
pub const CACHE_VOLUME: &str = "trellis-cache";
/// The sidecar's uid and gid, the one the iptables rules exempt.
pub const PROXY_UID: u32 = crate::iptables::DEFAULT_PROXY_UID;
/// Where the image puts the binary (checked against the Dockerfile by the deploy tests).
pub const BINARY: &str = "/usr/local/bin/mesh-agent";
pub const CONFIG_PATH: &str = "/etc/trellis/sidecar.yaml";
pub const CERTS_DIR: &str = "/etc/trellis/certs";
pub const CACHE_DIR: &str = "/var/cache/trellis";
pub const INBOUND_PORT: u16 = 15006;
/// What the sidecar needs after the drain before it exits: the last trace export (2 s) and
/// deregistration, with a margin.
pub const EXIT_MARGIN_SECS: i64 = 5;
/// Kubernetes' terminationGracePeriodSeconds when a pod sets none.
pub const DEFAULT_GRACE_SECS: i64 = 30;

/// An ordered mapping from string keys.
pub fn map<const N: usize>(pairs: [(&str, Value); N]) -> Value {
    Value::Mapping(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
}

pub fn s(v: impl Into<String>) -> Value {
    Value::String(v.into())
}

fn list<I: IntoIterator<Item = Value>>(items: I) -> Value {
    Value::Sequence(items.into_iter().collect())
}

fn strings(items: &[&str]) -> Value {
    list(items.iter().map(|i| s(*i)))
}

/// The init containers to put first, in order: the iptables one (transparent mode), then the
/// sidecar, so that app init containers already have the mesh.
pub fn init_containers(set: &Settings, probe_ports: &[u16]) -> Vec<Value> {
    let mut out = Vec::with_capacity(2);
    if set.opts.interception == Interception::Transparent {
        out.push(iptables_init(set, probe_ports));
    }
    out.push(sidecar(set));
    out
}

/// `mesh-agent iptables install` as root with NET_ADMIN; probe ports are left uncaptured so
/// that the kubelet's plaintext probes still reach the app.
fn iptables_init(set: &Settings, probe_ports: &[u16]) -> Value {
    let mut args = vec![
        s("iptables"),
        s("install"),
        s("--proxy-uid"),
        s(PROXY_UID.to_string()),
    ];
    args.extend(exclusions(set, probe_ports));
    map([
        ("name", s(INIT_NAME)),
        ("image", s(&set.opts.init_image)),
        ("args", list(args)),
        (
            "securityContext",
            map([
                ("runAsUser", Value::from(0)),
                ("runAsNonRoot", Value::Bool(false)),
                ("allowPrivilegeEscalation", Value::Bool(false)),
                (
                    "capabilities",
                    map([
                        ("add", strings(&["NET_ADMIN", "NET_RAW"])),
                        ("drop", strings(&["ALL"])),
                    ]),
                ),
            ]),
        ),
    ])
}

/// `--exclude-*` arguments of `iptables install`, each only when it has values.
fn exclusions(set: &Settings, probe_ports: &[u16]) -> Vec<Value> {
    let mut inbound: Vec<u16> = set.opts.skip_inbound_ports.clone();
    inbound.extend(probe_ports);
    inbound.sort_unstable();
    inbound.dedup();
    let ports = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>();
    let mut args = Vec::new();
    for (flag, values) in [
        ("--exclude-inbound-ports", ports(&inbound)),
        (
            "--exclude-outbound-ports",
            ports(&set.opts.skip_outbound_ports),
        ),
        (
            "--exclude-outbound-cidrs",
            set.opts.skip_outbound_cidrs.clone(),
        ),
    ] {
        if !values.is_empty() {
            args.extend([s(flag), s(values.join(","))]);
        }
    }
    args
}

/// The native sidecar: restarted always, its startup probe gating the app containers.
fn sidecar(set: &Settings) -> Value {
    let probe = |period: u64, failures: u64| {
        map([
            (
                "exec",
                map([(
                    "command",
                    strings(&[BINARY, "wait-ready", "--timeout", "2s"]),
                )]),
            ),
            ("periodSeconds", Value::from(period)),
            ("timeoutSeconds", Value::from(3)),
            ("failureThreshold", Value::from(failures)),
        ])
    };
    map([
        ("name", s(SIDECAR_NAME)),
        ("image", s(&set.opts.image)),
        ("restartPolicy", s("Always")),
        ("args", strings(&["run"])),
        ("env", env(set)),
        (
            "ports",
            list([map([
                ("name", s("mesh-inbound")),
                ("containerPort", Value::from(INBOUND_PORT)),
            ])]),
        ),
        ("startupProbe", probe(1, 60)),
        ("readinessProbe", probe(5, 2)),
        ("resources", resources(set)),
        ("securityContext", security_context()),
        ("volumeMounts", volume_mounts()),
    ])
}

fn env(set: &Settings) -> Value {
    let var = |name: &str, value: String| map([("name", s(name)), ("value", s(value))]);
    let field = |name: &str, path: &str| {
        map([
            ("name", s(name)),
            (
                "valueFrom",
                map([("fieldRef", map([("fieldPath", s(path))]))]),
            ),
        ])
    };
    let mut vars = vec![
        var("TRELLIS_CONFIG", CONFIG_PATH.into()),
        var("TRELLIS_SERVICE", set.service.clone()),
        field("POD_IP", "status.podIP"),
        var(
            "TRELLIS_ADVERTISE_ADDR",
            format!("$(POD_IP):{INBOUND_PORT}"),
        ),
        field("TRELLIS_INSTANCE_ID", "metadata.name"),
        var("TRELLIS_LOG_FORMAT", "json".into()),
    ];
    let o = &set.opts;
    if !o.etcd_endpoints.is_empty() {
        vars.push(var("TRELLIS_ETCD_ENDPOINTS", o.etcd_endpoints.join(",")));
    }
    if let Some(e) = &o.otlp_endpoint {
        vars.push(var("OTEL_EXPORTER_OTLP_ENDPOINT", e.clone()));
    }
    if let Some(p) = o.app_port {
        vars.push(var("TRELLIS_APP_ADDR", format!("127.0.0.1:{p}")));
    }
    if let Some(l) = &o.log_level {
        vars.push(var("RUST_LOG", l.clone()));
    }
    if o.cpu_limit.is_some() {
        // The sidecar cannot see a CPU quota: without this it sizes its runtime from the node's
        // CPUs. Kubernetes rounds the limit up to whole CPUs (divisor 1), so `500m` gives one
        // worker, on tokio's current-thread scheduler (mesh-agent/src/runtime.rs).
        vars.push(map([
            ("name", s("TRELLIS_WORKERS")),
            (
                "valueFrom",
                map([(
                    "resourceFieldRef",
                    map([
                        ("containerName", s(SIDECAR_NAME)),
                        ("resource", s("limits.cpu")),
                        ("divisor", s("1")),
                    ]),
                )]),
            ),
        ]));
    }
    list(vars)
}

fn resources(set: &Settings) -> Value {
    let o = &set.opts;
    let mut limits = Mapping::new();
    if let Some(c) = &o.cpu_limit {
        limits.insert(s("cpu"), s(c));
    }
    limits.insert(s("memory"), s(&o.memory_limit));
    map([
        (
            "requests",
            map([("cpu", s(&o.cpu_request)), ("memory", s(&o.memory_request))]),
        ),
        ("limits", Value::Mapping(limits)),
    ])
}

fn security_context() -> Value {
    map([
        ("runAsUser", Value::from(PROXY_UID)),
        ("runAsGroup", Value::from(PROXY_UID)),
        ("runAsNonRoot", Value::Bool(true)),
        ("readOnlyRootFilesystem", Value::Bool(true)),
        ("allowPrivilegeEscalation", Value::Bool(false)),
        ("capabilities", map([("drop", strings(&["ALL"]))])),
    ])
}

fn volume_mounts() -> Value {
    list([
        map([
            ("name", s(CONFIG_VOLUME)),
            ("mountPath", s(CONFIG_PATH)),
            ("subPath", s("sidecar.yaml")),
            ("readOnly", Value::Bool(true)),
        ]),
        // No subPath: Secret updates reach the files (certificate rotation).
        map([
            ("name", s(CERTS_VOLUME)),
            ("mountPath", s(CERTS_DIR)),
            ("readOnly", Value::Bool(true)),
        ]),
        map([("name", s(CACHE_VOLUME)), ("mountPath", s(CACHE_DIR))]),
    ])
}

/// The volumes, in [`super::VOLUMES`] order.
pub fn volumes(set: &Settings) -> Vec<Value> {
    vec![
        map([
            ("name", s(CONFIG_VOLUME)),
            ("configMap", map([("name", s(&set.opts.config_map))])),
        ]),
        certs_volume(set),
        map([("name", s(CACHE_VOLUME)), ("emptyDir", map([]))]),
    ]
}

/// The Secret's files are world-readable (0444) rather than group-readable with an `fsGroup`
/// as in the hand-written example: setting the pod's fsGroup would change the ownership of the
/// app's own volumes, and only the sidecar container mounts this volume. The csi-driver's
/// files get the sidecar's group instead (its own attribute, not the pod's fsGroup).
fn certs_volume(set: &Settings) -> Value {
    let o = &set.opts;
    let source = match o.certs {
        Certs::Secret => (
            "secret",
            map([
                ("secretName", s(&set.certs_secret)),
                ("defaultMode", Value::from(0o444)),
            ]),
        ),
        Certs::Csi => {
            let id = format!("spiffe://{}/service/{}", o.trust_domain, set.service);
            let attr = |k: &str| format!("csi.cert-manager.io/{k}");
            let attributes = Value::Mapping(
                [
                    (attr("issuer-name"), o.csi_issuer.clone()),
                    (attr("issuer-kind"), o.csi_issuer_kind.clone()),
                    (attr("uri-sans"), id),
                    (
                        attr("key-usages"),
                        "digital signature,server auth,client auth".into(),
                    ),
                    (attr("fs-group"), PROXY_UID.to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (s(k), s(v)))
                .collect(),
            );
            (
                "csi",
                map([
                    ("driver", s("csi.cert-manager.io")),
                    ("readOnly", Value::Bool(true)),
                    ("volumeAttributes", attributes),
                ]),
            )
        }
    };
    map([("name", s(CERTS_VOLUME)), source])
}

/// The grace period that covers the app's own shutdown (its previous grace period) plus the
/// sidecar's drain and exit: the sidecar is stopped only after the app has exited.
pub fn grace_seconds(set: &Settings, original: Option<i64>) -> i64 {
    let drain = i64::try_from(set.opts.drain_grace.as_secs()).unwrap_or(i64::MAX / 2);
    original
        .unwrap_or(DEFAULT_GRACE_SECS)
        .saturating_add(drain)
        .saturating_add(EXIT_MARGIN_SECS)
}
