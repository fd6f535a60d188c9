//! `examples/compose/` cannot run here (no container engine), so it is kept correct by
//! construction: every mesh-agent command in it parses with this build's CLI, every sidecar's
//! configuration (file plus environment) validates, the policies validate, the files it mounts
//! exist, and the addresses the apps and sidecars use agree with each other.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use mesh_agent::cli::{Cli, Command};
use serde_norway::Value;

const IMAGE: &str = "trellis/mesh-agent:dev";

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/compose")
}

fn compose() -> Value {
    let text = std::fs::read_to_string(example_dir().join("docker-compose.yaml"))
        .expect("read docker-compose.yaml");
    let mut v: Value = serde_norway::from_str(&text).expect("docker-compose.yaml is YAML");
    // Merge keys inside anchors (`<<: *sidecar`, itself `<<: *mesh-agent`) take a pass each.
    for _ in 0..3 {
        v.apply_merge().expect("merge keys resolve");
    }
    v
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("string item").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn env_of(svc: &Value) -> BTreeMap<String, String> {
    svc.get("environment")
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => serde_norway::to_string(other)
                            .expect("scalar")
                            .trim()
                            .into(),
                    };
                    (k.as_str().expect("env name").to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Host-side files mounted into `svc`, by their path in the container.
fn mounts(svc: &Value) -> BTreeMap<String, String> {
    strings(svc.get("volumes").unwrap_or(&Value::Null))
        .into_iter()
        .filter_map(|v| {
            let mut parts = v.split(':');
            let (host, container) = (parts.next()?, parts.next()?);
            Some((container.to_string(), host.to_string()))
        })
        .collect()
}

#[test]
fn compose_example_agrees_with_the_binary() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    let mut sidecars = BTreeMap::new();
    let mut apps = Vec::new();
    for (name, svc) in services {
        let name = name.as_str().expect("service name").to_string();
        let image = svc["image"].as_str().expect("every service names an image");
        if image != IMAGE {
            // Public images only, pinned to a version.
            assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{name}: pin {image}"
            );
            continue;
        }
        assert_eq!(svc["build"]["context"].as_str(), Some("../.."), "{name}");
        let dockerfile = svc["build"]["dockerfile"].as_str().expect("dockerfile");
        assert!(example_dir().join("../..").join(dockerfile).exists());
        for (container, host) in mounts(svc) {
            if host.starts_with("./") {
                assert!(
                    example_dir().join(&host).exists(),
                    "{name}: {host} (for {container}) is missing"
                );
            }
        }
        let args = strings(&svc["command"]);
        let cli = Cli::try_parse_from(std::iter::once("mesh-agent".to_string()).chain(args))
            .unwrap_or_else(|e| panic!("{name}: command does not parse: {e}"));
        match cli.command {
            Command::Run { config, .. } => {
                let host = mounts(svc)
                    .get(config.to_str().expect("utf-8 path"))
                    .cloned()
                    .unwrap_or_else(|| panic!("{name}: {} is not mounted", config.display()));
                assert_eq!(host, "./sidecar.yaml");
                sidecars.insert(name, svc.clone());
            }
            Command::DemoApp {
                listen,
                call,
                outbound,
                ..
            } => apps.push((name, svc.clone(), listen, call, outbound)),
            Command::Policy { .. } => {
                let m = mounts(svc);
                let file = m
                    .get("/etc/trellis/policies.yaml")
                    .expect("policies mounted");
                let docs = mesh_agent::policy::load_documents(&example_dir().join(file))
                    .expect("policies parse");
                for d in &docs {
                    d.validate().unwrap_or_else(|e| panic!("{e}"));
                }
                assert!(docs.len() >= 2);
            }
            Command::Cert { .. } => {}
            other => panic!("{name}: unexpected command {other:?}"),
        }
    }
    assert_eq!(sidecars.len(), 3, "frontend, orders, payments");

    let sidecar_yaml =
        std::fs::read_to_string(example_dir().join("sidecar.yaml")).expect("sidecar.yaml");
    let mut configs = BTreeMap::new();
    for (name, svc) in &sidecars {
        let mut cfg = mesh_agent::config::AgentConfig::from_yaml(&sidecar_yaml, "sidecar.yaml")
            .expect("sidecar.yaml parses");
        let env = env_of(svc);
        cfg.apply_env(env.clone()).expect("environment applies");
        cfg.validate().expect("config validates");
        assert_eq!(
            &cfg.proxy.service, name,
            "TRELLIS_SERVICE names the compose service"
        );
        let certs = mounts(svc);
        assert!(
            certs.contains_key("/etc/trellis/certs"),
            "{name}: certs volume"
        );
        assert!(cfg.proxy.identity.cert.starts_with("/etc/trellis/certs"));
        assert!(env["OTEL_EXPORTER_OTLP_ENDPOINT"].starts_with("http://jaeger:4317"));
        let etcd = cfg.store.etcd.as_ref().expect("etcd store");
        assert_eq!(etcd.endpoints, vec!["http://etcd:2379".to_string()]);
        configs.insert(name.clone(), cfg.proxy);
    }

    // The certificate job issues one for every sidecar.
    let issue = strings(&services[&Value::from("certs")]["command"]).join(" ");
    for name in sidecars.keys() {
        assert!(issue.contains(name.as_str()), "no certificate for {name}");
    }

    for (name, svc, listen, call, outbound) in apps {
        let owner = svc["network_mode"]
            .as_str()
            .and_then(|m| m.strip_prefix("service:"))
            .unwrap_or_else(|| panic!("{name}: shares a sidecar's network namespace"));
        let cfg = &configs[owner];
        assert_eq!(listen.port(), cfg.inbound.app.port(), "{name}: app port");
        assert_eq!(
            outbound, cfg.outbound.listen,
            "{name}: calls via its sidecar"
        );
        if let Some(call) = call {
            let target = call.split('/').next().unwrap_or_default();
            assert!(
                configs.contains_key(target),
                "{name} calls unknown {target}"
            );
        }
    }
}
