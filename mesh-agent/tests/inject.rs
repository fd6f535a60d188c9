//! `mesh-agent inject` / `uninject` on every workload kind: golden outputs, idempotence, exact
//! uninjection, the Kubernetes schemas (`kubernetes-validate`, from PyPI), the hand-written
//! example reproduced, and bad input refused whole.
//!
//! `TRELLIS_UPDATE_GOLDEN=1 cargo test -p mesh-agent --test inject` rewrites the golden files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use mesh_agent::config::AgentConfig;
use mesh_agent::inject::manifest::{self, Format};
use serde_norway::Value;

/// The flags every golden output was made with.
const FLAGS: &[&str] = &[
    "--etcd-endpoints",
    "http://etcd.trellis-system.svc:2379",
    "--otlp-endpoint",
    "http://otel-collector.observability.svc:4317",
    "--trust-domain",
    "example.org",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/inject_data")
}

/// Every input: one file per workload kind, a List in JSON, several documents, and the
/// example of examples/kubernetes/inject/.
fn inputs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data())
        .expect("tests/inject_data")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v.push(root().join("examples/kubernetes/inject/app.yaml"));
    v
}

fn golden(input: &Path) -> PathBuf {
    let name = input.file_name().expect("file name");
    data().join("golden").join(name)
}

/// Run the binary with `args`, `stdin` on its standard input.
fn mesh_agent(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mesh-agent starts");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).expect("write stdin");
    drop(input);
    child.wait_with_output().expect("mesh-agent ends")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `mesh-agent inject -f - FLAGS` on `input`, which must succeed.
fn inject(input: &str) -> (String, String) {
    let mut args = vec!["inject", "-f", "-"];
    args.extend(FLAGS);
    let out = mesh_agent(&args, input);
    assert!(out.status.success(), "inject failed: {}", text(&out.stderr));
    (text(&out.stdout), text(&out.stderr))
}

fn uninject(input: &str) -> String {
    let out = mesh_agent(&["uninject", "-f", "-"], input);
    assert!(
        out.status.success(),
        "uninject failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn parse(text: &str) -> (Format, Vec<Value>) {
    manifest::parse(text).expect("parses")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn every_kind_matches_its_golden_output() {
    let update = std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some();
    for input in inputs() {
        let (out, _) = inject(&read(&input));
        let g = golden(&input);
        if update {
            std::fs::create_dir_all(g.parent().expect("dir")).expect("mkdir");
            std::fs::write(&g, &out).expect("write golden");
        }
        assert_eq!(
            out,
            read(&g),
            "{} differs from {}",
            input.display(),
            g.display()
        );
    }
}

#[test]
fn injecting_twice_changes_nothing() {
    for input in inputs() {
        let once = read(&golden(&input));
        let (twice, _) = inject(&once);
        assert_eq!(twice, once, "{}", input.display());
    }
}

/// Semantic equality (the parsed documents), and the exact text our renderer makes of the
/// input (key order included; comments are lost by the YAML library).
#[test]
fn uninject_restores_the_input_exactly() {
    for input in inputs() {
        let restored = uninject(&read(&golden(&input)));
        let original = read(&input);
        let (format, docs) = parse(&original);
        assert_eq!(parse(&restored).1, docs, "{}", input.display());
        let rendered = manifest::render(format, &docs).expect("renders");
        assert_eq!(restored, rendered, "{}: key order", input.display());
    }
}

#[test]
fn unknown_kinds_pass_through_with_a_warning_and_disabled_workloads_are_left_alone() {
    let input = read(&data().join("multi.yaml"));
    let (out, stderr) = inject(&input);
    assert!(
        stderr.contains("argoproj.io/v1alpha1 Rollout has no pod template Trellis knows"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Deployment/legacy): trellis.dev/inject is disabled"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("Service"),
        "Services pass silently: {stderr}"
    );
    let (_, docs) = parse(&out);
    let (_, before) = parse(&input);
    assert_eq!(docs[1], before[1], "disabled: untouched");
    assert_eq!(docs[2], before[2], "unknown kind: untouched");
    assert_eq!(docs[3], before[3], "Service: untouched");
    assert_ne!(docs[0], before[0], "payments is injected");
}

fn template<'a>(doc: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(doc, |v, k| &v[*k])
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .and_then(|l| l.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no {name} in {list:?}"))
}

/// The injected orders Deployment has the sidecar of examples/kubernetes/deployment.yaml:
/// the same image, native-sidecar restart policy, probes, resources, security context, mount
/// paths, iptables init container and grace period.
#[test]
fn the_hand_written_example_is_what_inject_makes() {
    let (_, injected) = parse(&read(&golden(
        &root().join("examples/kubernetes/inject/app.yaml"),
    )));
    let (_, hand) = parse(&read(&root().join("examples/kubernetes/deployment.yaml")));
    let spec = |d: &Value| template(d, &["spec", "template", "spec"]).clone();
    let (ours, theirs) = (spec(&injected[0]), spec(&hand[0]));
    assert_eq!(
        ours["terminationGracePeriodSeconds"],
        theirs["terminationGracePeriodSeconds"]
    );
    assert_eq!(
        named(&ours["initContainers"], "trellis-init"),
        named(&theirs["initContainers"], "trellis-init")
    );
    let (a, b) = (
        named(&ours["initContainers"], "mesh-agent"),
        named(&theirs["initContainers"], "mesh-agent"),
    );
    for key in [
        "image",
        "restartPolicy",
        "args",
        "ports",
        "startupProbe",
        "readinessProbe",
        "resources",
        "securityContext",
    ] {
        assert_eq!(a[key], b[key], "{key}");
    }
    let paths = |c: &Value| -> Vec<Value> {
        c["volumeMounts"]
            .as_sequence()
            .expect("mounts")
            .iter()
            .map(|m| m["mountPath"].clone())
            .collect()
    };
    assert_eq!(paths(a), paths(b));
    let names = |c: &Value| -> Vec<String> {
        c["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .map(|e| e["name"].as_str().expect("name").to_string())
            .collect()
    };
    for var in names(b) {
        assert!(names(a).contains(&var), "{var} missing");
    }
}

/// The `sidecar.yaml` of examples/kubernetes/inject/sidecar-configmap.yaml, parsed.
fn shared_config() -> AgentConfig {
    let path = root().join("examples/kubernetes/inject/sidecar-configmap.yaml");
    let (_, cm) = parse(&read(&path));
    let file = cm[0]["data"]["sidecar.yaml"]
        .as_str()
        .expect("sidecar.yaml");
    AgentConfig::from_yaml(file, "trellis-sidecar").expect("parses")
}

/// The shared ConfigMap plus the injected environment make a configuration `mesh-agent run`
/// accepts, whose files are on the injected volumes and whose admin address is the one the
/// probes' `wait-ready` dials by default.
#[test]
fn the_injected_sidecar_gets_a_valid_configuration() {
    let (_, injected) = parse(&read(&golden(
        &root().join("examples/kubernetes/inject/app.yaml"),
    )));
    let spec = template(&injected[0], &["spec", "template", "spec"]);
    let sidecar = named(&spec["initContainers"], "mesh-agent");
    let mut cfg = shared_config();
    let env: Vec<(String, String)> = sidecar["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter_map(|e| {
            let value = e["value"].as_str()?.replace("$(POD_IP)", "10.1.2.3");
            Some((e["name"].as_str()?.to_string(), value))
        })
        .collect();
    cfg.apply_env(env).expect("environment applies");
    cfg.validate().expect("valid for mesh-agent run");
    assert_eq!(cfg.proxy.service, "orders");
    assert_eq!(
        cfg.proxy.admin.listen.to_string(),
        trellis_proxy::config::DEFAULT_ADMIN_ADDR
    );
    let mount = |volume: &str| {
        named(&sidecar["volumeMounts"], volume)["mountPath"]
            .as_str()
            .expect("mountPath")
            .to_string()
    };
    for f in [
        &cfg.proxy.identity.cert,
        &cfg.proxy.identity.key,
        &cfg.proxy.identity.bundle,
    ] {
        assert!(f.starts_with(mount("trellis-certs")), "{}", f.display());
    }
    let etcd = cfg.store.etcd.as_ref().expect("etcd store");
    assert_eq!(etcd.endpoints, ["http://etcd.trellis-system.svc:2379"]);
    let cache = etcd.cache_file.as_ref().expect("cache file");
    assert!(
        cache.starts_with(mount("trellis-cache")),
        "{}",
        cache.display()
    );
    assert_eq!(
        mount("trellis-config"),
        sidecar["env"][0]["value"].as_str().expect("TRELLIS_CONFIG")
    );
    let drain = i64::try_from(cfg.proxy.drain.grace_period.as_secs()).expect("secs");
    let grace = spec["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("grace");
    assert!(
        grace >= 30 + drain + 2,
        "{grace}: app's 30 s + drain + trace flush"
    );
}

#[test]
fn kubelet_probe_ports_are_not_captured() {
    let (_, docs) = parse(&read(&golden(&data().join("statefulset.yaml"))));
    let spec = template(&docs[0], &["spec", "template", "spec"]);
    let args: Vec<&str> = named(&spec["initContainers"], "trellis-init")["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--exclude-inbound-ports")
        .expect("inbound exclusions");
    assert_eq!(args[at + 1], "8080,9090");
    let names: Vec<&str> = spec["initContainers"]
        .as_sequence()
        .expect("init containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["trellis-init", "mesh-agent", "migrate"]);
}

/// Where `kubernetes-validate` is: on PATH, or in the venv `.ci/run` makes.
fn kubernetes_validate() -> Option<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    let venv = cache.map(|c| c.join("trellis-kubeval/bin/kubernetes-validate"));
    let on_path = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        .then(|| PathBuf::from("kubernetes-validate"));
    on_path.or(venv.filter(|p| p.exists()))
}

/// Check `docs` against the Kubernetes 1.31 schemas (native sidecars are on by default from
/// 1.29), strictly: an unknown or misspelt field fails. Skipped where the validator is not
/// installed, except in CI (`.ci/run` installs it).
fn validate_schemas(docs: &[Value], origin: &Path) {
    let Some(validate) = kubernetes_validate() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "kubernetes-validate is missing; .ci/run installs it"
        );
        eprintln!("skipped: kubernetes-validate not installed (pip install kubernetes-validate)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("out.yaml");
    std::fs::write(
        &file,
        manifest::render(Format::Yaml, docs).expect("renders"),
    )
    .expect("write");
    let out = Command::new(&validate)
        .args(["--strict", "--quiet", "-k", "1.31"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate runs");
    assert!(
        out.status.success(),
        "{}: {}{}",
        origin.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn injected_workloads_pass_the_kubernetes_schemas() {
    for input in inputs() {
        let (_, docs) = parse(&read(&golden(&input)));
        // A List's items one by one (its schema does not look inside them); the custom
        // resource of multi.yaml has no schema to check against.
        let known: Vec<Value> = docs
            .into_iter()
            .flat_map(|d| match d["kind"].as_str() {
                Some("List") => d["items"].as_sequence().cloned().unwrap_or_default(),
                _ => vec![d],
            })
            .filter(|d| d["apiVersion"].as_str() != Some("argoproj.io/v1alpha1"))
            .collect();
        validate_schemas(&known, &input);
    }
}

/// Each refusal exits 1, names the reason, and prints nothing on stdout, even when other
/// documents of the input were fine.
#[test]
fn bad_input_is_refused_whole() {
    let ok = read(&data().join("pod.yaml"));
    let host_network = ok.replace("spec:\n", "spec:\n  hostNetwork: true\n");
    let taken = ok.replace("name: toolbox\n", "name: mesh-agent\n");
    let cases = [
        ("key: [unclosed\n".to_string(), "neither YAML nor JSON"),
        ("just a sentence\n".to_string(), "not a Kubernetes object"),
        (format!("{ok}---\n{host_network}"), "hostNetwork"),
        (format!("{ok}---\n{taken}"), "already has an entry named \"mesh-agent\""),
        (
            ok.replace("labels: {app: toolbox}", "labels: {app: toolbox}\n  annotations: {trellis.dev/cpu-request: lots}"),
            "not a Kubernetes quantity",
        ),
        (
            ok.replace("labels: {app: toolbox}", "annotations: {trellis.dev/skip-outbound-cidrs: 10.0.0.0}"),
            "skip-outbound-cidrs (--skip-outbound-cidrs or annotation trellis.dev/skip-outbound-cidrs): invalid CIDR",
        ),
        (ok.replace("labels: {app: toolbox}", "labels: {}"), "no service name"),
    ];
    for (input, reason) in cases {
        let out = mesh_agent(&["inject", "-f", "-"], &input);
        assert_eq!(out.status.code(), Some(1), "{input}");
        assert!(out.stdout.is_empty(), "half output: {}", text(&out.stdout));
        assert!(
            text(&out.stderr).contains(reason),
            "{reason}: {}",
            text(&out.stderr)
        );
    }
    let binary = mesh_agent(&["inject", "-f", "-"], "\u{0}\u{1}binary");
    assert_eq!(binary.status.code(), Some(1));
    assert!(binary.stdout.is_empty());
}

/// `examples/kubernetes/inject/injector.yaml` (and its cert-manager certificate) agree with
/// the binary: the Deployment's args
/// parse as `mesh-agent injector`, the port, certificate paths, Secret, Service name and
/// webhook paths line up, and the core documents pass the schemas.
#[test]
fn the_injector_manifests_agree_with_the_binary() {
    use clap::Parser;
    use mesh_agent::cli::{Cli, Command as Cmd};
    use mesh_agent::inject::webhook::{HEALTH_PATH, INJECT_ANNOTATED_PATH, INJECT_PATH};
    let path = root().join("examples/kubernetes/inject/injector.yaml");
    let (_, mut docs) = parse(&read(&path));
    let cert_manager = root().join("examples/kubernetes/inject/injector-cert-manager.yaml");
    docs.extend(parse(&read(&cert_manager)).1);
    let doc = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let pod = template(doc("Deployment"), &["spec", "template", "spec"]);
    let container = &pod["containers"][0];
    let args = container["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .filter_map(Value::as_str);
    let cli = Cli::try_parse_from(std::iter::once("mesh-agent").chain(args)).expect("args parse");
    let Cmd::Injector {
        listen,
        tls_cert,
        tls_key,
        options,
    } = cli.command
    else {
        panic!("not `injector`: {:?}", cli.command);
    };
    assert_eq!(
        options.config_map, "trellis-sidecar",
        "the ConfigMap of sidecar-configmap.yaml"
    );
    let cfg = shared_config();
    assert_eq!(
        options.trust_domain, cfg.proxy.trust_domain,
        "SPIFFE IDs of --certs csi"
    );
    let port = named(&container["ports"], "webhook");
    assert_eq!(
        port["containerPort"].as_u64(),
        Some(u64::from(listen.port()))
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &container[probe]["httpGet"];
        assert_eq!(
            (get["path"].as_str(), get["scheme"].as_str()),
            (Some(HEALTH_PATH), Some("HTTPS"))
        );
    }
    let mount = named(&container["volumeMounts"], "certs")["mountPath"]
        .as_str()
        .expect("mount");
    assert_eq!(tls_cert.parent(), Some(Path::new(mount)));
    assert_eq!(tls_key.parent(), Some(Path::new(mount)));
    let secret = named(&pod["volumes"], "certs")["secret"]["secretName"].clone();
    let certificate = doc("Certificate");
    assert_eq!(certificate["spec"]["secretName"], secret);
    let service = doc("Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "webhook");
    let ns = service["metadata"]["namespace"]
        .as_str()
        .expect("namespace");
    let dns = format!(
        "{}.{ns}.svc",
        service["metadata"]["name"].as_str().expect("name")
    );
    assert!(certificate["spec"]["dnsNames"]
        .as_sequence()
        .expect("dnsNames")
        .contains(&Value::from(dns)));
    let hooks = doc("MutatingWebhookConfiguration")["webhooks"]
        .as_sequence()
        .expect("webhooks");
    let paths: Vec<&str> = hooks
        .iter()
        .filter_map(|h| h["clientConfig"]["service"]["path"].as_str())
        .collect();
    assert_eq!(paths, [INJECT_PATH, INJECT_ANNOTATED_PATH]);
    for h in hooks {
        assert_eq!(
            h["clientConfig"]["service"]["name"],
            service["metadata"]["name"]
        );
        assert_eq!(
            h["clientConfig"]["service"]["port"],
            service["spec"]["ports"][0]["port"]
        );
    }
    validate_schemas(
        &docs
            .iter()
            .filter(|d| d["apiVersion"].as_str() != Some("cert-manager.io/v1"))
            .cloned()
            .collect::<Vec<_>>(),
        &path,
    );
}

/// `trellis.dev/certs: csi`: the csi-driver's certificate carries the SPIFFE ID the sidecar
/// requires of its own certificate (the shared ConfigMap's trust domain, the service), and
/// its files are where the configuration reads them.
#[test]
fn csi_certificates_carry_the_identity_the_sidecar_expects() {
    let (_, docs) = parse(&read(&golden(&data().join("csi.yaml"))));
    let spec = template(&docs[0], &["spec", "template", "spec"]);
    let csi = &named(&spec["volumes"], "trellis-certs")["csi"];
    assert_eq!(csi["driver"], "csi.cert-manager.io");
    let attrs = &csi["volumeAttributes"];
    let mut cfg = shared_config();
    cfg.proxy.service = "inventory".into();
    let want = trellis_policies::SpiffeId::for_service(&cfg.proxy.trust_domain, &cfg.proxy.service)
        .expect("id");
    assert_eq!(
        attrs["csi.cert-manager.io/uri-sans"].as_str(),
        Some(want.to_string().as_str())
    );
    // The driver's default file names are the ones the configuration reads.
    for f in [
        &cfg.proxy.identity.cert,
        &cfg.proxy.identity.key,
        &cfg.proxy.identity.bundle,
    ] {
        let name = f.file_name().and_then(|n| n.to_str()).expect("file name");
        assert!(["tls.crt", "tls.key", "ca.crt"].contains(&name), "{name}");
    }
    let fs_group = attrs["csi.cert-manager.io/fs-group"]
        .as_str()
        .expect("fs-group");
    let sidecar = named(&spec["initContainers"], "mesh-agent");
    assert_eq!(
        Some(fs_group),
        sidecar["securityContext"]["runAsGroup"]
            .as_u64()
            .map(|g| g.to_string())
            .as_deref()
    );
}
