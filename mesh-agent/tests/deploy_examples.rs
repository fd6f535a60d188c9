//! The deployment examples (`examples/kubernetes/`, `examples/systemd/`) parse, and agree with the
//! binary: the sidecar config is valid for `mesh-agent run`, ports and paths match the defaults
//! and the image, the probes run `wait-ready` against the configured admin address, and the
//! shutdown budget leaves room for the drain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_agent::config::AgentConfig;
use serde::Deserialize;
use serde_norway::Value;
use trellis_proxy::config as defaults;

/// Time the sidecar needs after SIGTERM beyond its drain grace period: the last traces are
/// exported within 2 s, plus deregistration.
const EXIT_MARGIN: Duration = Duration::from_secs(3);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every YAML document directly under `examples/kubernetes/`, by `kind/name` (the
/// subdirectories, such as the injection's `inject/`, are tested by `tests/inject.rs`).
fn kubernetes_docs() -> BTreeMap<String, Value> {
    let mut docs = BTreeMap::new();
    let dir = root().join("examples/kubernetes");
    for entry in std::fs::read_dir(&dir).expect("examples/kubernetes") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            let key = format!("{}/{}", s(&v["kind"]), s(&v["metadata"]["name"]));
            assert!(docs.insert(key.clone(), v).is_none(), "{key} twice");
        }
    }
    docs
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v:?}"))
}

fn seq(v: &Value) -> &Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("expected a list, got {v:?}"))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    seq(list)
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no item named {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    seq(v).iter().map(|x| s(x).to_string()).collect()
}

fn port(addr: &str) -> u16 {
    addr.parse::<SocketAddr>().expect("address").port()
}

/// Where the runtime stage of the Dockerfile puts the binary.
fn image_binary() -> String {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let runtime = dockerfile.rsplit("\nFROM ").next().expect("stages");
    let copy = runtime
        .lines()
        .find(|l| l.starts_with("COPY --from=build"))
        .expect("runtime copies the binary");
    copy.split_whitespace().last().expect("dest").to_string()
}

#[test]
fn kubernetes_deployment_matches_the_binary_and_the_image() {
    let docs = kubernetes_docs();
    let deploy = &docs["Deployment/orders"];
    let pod = &deploy["spec"]["template"]["spec"];
    let sidecar = named(&pod["initContainers"], "mesh-agent");
    assert_eq!(s(&sidecar["restartPolicy"]), "Always", "a native sidecar");
    assert!(s(&sidecar["image"]).starts_with("trellis/mesh-agent:"));
    assert_eq!(strings(&sidecar["args"]), ["run"]);

    // The sidecar config from the ConfigMap, with the container's environment, is what
    // `mesh-agent run` accepts.
    let env: Vec<(String, String)> = seq(&sidecar["env"])
        .iter()
        .filter_map(|e| Some((s(&e["name"]).to_string(), e["value"].as_str()?.to_string())))
        .map(|(k, v)| (k, v.replace("$(POD_IP)", "10.1.2.3")))
        .collect();
    let env_of = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} not set"))
    };
    let yaml = s(&docs["ConfigMap/orders-sidecar"]["data"]["sidecar.yaml"]);
    let mut agent = AgentConfig::from_yaml(yaml, "configmap.yaml").expect("sidecar.yaml parses");
    agent.apply_env(env.clone()).expect("env applies");
    agent.validate().expect("sidecar.yaml is valid");
    let cfg = &agent.proxy;
    assert_eq!(env_of("TRELLIS_ADVERTISE_ADDR"), "10.1.2.3:15006");

    // Ports: the declared container port is the inbound listener, the image's default.
    let inbound = cfg.inbound.listen.port();
    assert_eq!(inbound, port(defaults::DEFAULT_INBOUND_ADDR));
    let declared: Vec<u64> = seq(&sidecar["ports"])
        .iter()
        .filter_map(|p| p["containerPort"].as_u64())
        .collect();
    assert_eq!(declared, [u64::from(inbound)]);
    assert_eq!(
        cfg.outbound.listen.to_string(),
        defaults::DEFAULT_OUTBOUND_ADDR
    );
    assert_eq!(cfg.inbound.app.to_string(), defaults::DEFAULT_APP_ADDR);

    // Probes: `wait-ready` (at the image's binary path) dials its default admin address, so the
    // config must keep the admin API there.
    assert_eq!(cfg.admin.listen.to_string(), defaults::DEFAULT_ADMIN_ADDR);
    for probe in ["startupProbe", "readinessProbe"] {
        let cmd = strings(&sidecar[probe]["exec"]["command"]);
        assert_eq!(cmd[0], image_binary(), "{probe}");
        assert_eq!(cmd[1], "wait-ready", "{probe}");
    }

    // Files: the config is mounted where TRELLIS_CONFIG points; the identity files come from
    // the Secret's keys; the cache is on a writable volume (the root filesystem is read-only).
    let mounts = seq(&sidecar["volumeMounts"]);
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(name))
            .map(|m| PathBuf::from(s(&m["mountPath"])))
            .unwrap_or_else(|| panic!("no mount {name}"))
    };
    assert_eq!(
        mount("sidecar-config"),
        PathBuf::from(env_of("TRELLIS_CONFIG"))
    );
    let secret_keys: Vec<String> = docs["Secret/orders-certs"]["stringData"]
        .as_mapping()
        .expect("stringData")
        .keys()
        .map(|k| s(k).to_string())
        .collect();
    for file in [&cfg.identity.cert, &cfg.identity.key, &cfg.identity.bundle] {
        assert_eq!(file.parent(), Some(mount("certs").as_path()), "{file:?}");
        let key = file.file_name().and_then(|n| n.to_str()).expect("name");
        assert!(
            secret_keys.iter().any(|k| k == key),
            "{key} not in the Secret"
        );
    }
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    let cache = agent
        .store
        .etcd
        .as_ref()
        .and_then(|e| e.cache_file.clone())
        .expect("etcd cache_file set");
    assert_eq!(cache.parent(), Some(mount("cache").as_path()));

    // Users: the sidecar runs as the uid the iptables rules exempt.
    let uid = mesh_agent::iptables::DEFAULT_PROXY_UID;
    assert_eq!(
        sidecar["securityContext"]["runAsUser"].as_u64(),
        Some(uid.into())
    );
    let init = named(&pod["initContainers"], "trellis-init");
    let args = strings(&init["args"]);
    assert_eq!(args[..2], ["iptables", "install"]);
    assert!(args
        .windows(2)
        .any(|w| w == ["--proxy-uid", &uid.to_string()]));
    assert_eq!(
        seq(&pod["initContainers"])[0]["name"].as_str(),
        Some("trellis-init"),
        "the redirect is in place before the sidecar and the app start"
    );

    // Shutdown: the pod's grace period covers the sidecar's drain after the app has stopped.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) > cfg.drain.grace_period + EXIT_MARGIN,
        "terminationGracePeriodSeconds {grace} leaves no time for the app before the sidecar's drain"
    );

    // The app listens where the sidecar forwards.
    let app = named(&pod["containers"], "app");
    assert_eq!(
        s(&named(&app["env"], "LISTEN_ADDR")["value"]),
        cfg.inbound.app.to_string()
    );
}

/// `KEY=value` lines of a unit file (the last one wins, as for most systemd settings).
fn unit_settings(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(k.to_string()).or_default().push(v.to_string());
        }
    }
    out
}

#[test]
fn systemd_unit_matches_the_binary() {
    let path = root().join("examples/systemd/mesh-agent@.service");
    let text = std::fs::read_to_string(&path).expect("unit");
    let unit = unit_settings(&text);
    let one = |k: &str| unit[k].last().expect(k).clone();
    assert_eq!(one("ExecStart"), "/usr/local/bin/mesh-agent run");
    assert!(one("ExecStartPost").starts_with("/usr/local/bin/mesh-agent wait-ready"));
    assert!(unit["Environment"].contains(&"TRELLIS_CONFIG=/etc/trellis/%i.yaml".to_string()));
    let stop = humantime::parse_duration(&format!("{}s", one("TimeoutStopSec"))).expect("secs");
    assert!(stop > defaults::DEFAULT_DRAIN_GRACE + EXIT_MARGIN);
    assert_eq!(one("KillSignal"), "SIGTERM");

    let drop_in =
        std::fs::read_to_string(root().join("examples/systemd/app-drop-in.conf")).expect("drop-in");
    let drop_in = unit_settings(&drop_in);
    assert!(drop_in["Environment"]
        .iter()
        .any(|e| e == &format!("HTTP_PROXY=http://{}", defaults::DEFAULT_OUTBOUND_ADDR)));

    // systemd's own checker, where installed: only the binary's absence from /usr/local/bin
    // may be reported.
    let dir = tempfile::tempdir().expect("tempdir");
    let instance = dir.path().join("mesh-agent@orders.service");
    std::fs::write(&instance, &text).expect("write");
    match std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&instance)
        .output()
    {
        Err(_) => eprintln!("systemd-analyze not installed: unit syntax not verified by systemd"),
        Ok(out) => {
            let report = String::from_utf8_lossy(&out.stderr);
            for line in report.lines().filter(|l| !l.trim().is_empty()) {
                assert!(
                    line.contains("is not executable"),
                    "systemd-analyze: {line}"
                );
            }
        }
    }
}
