//! `mesh-agent injector` over real TLS: AdmissionReview v1 requests shaped as in the
//! Kubernetes API reference, answered with a JSONPatch that, applied to the pod, gives the
//! pod `mesh-agent inject` makes (the golden files of tests/inject_data).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_agent::inject::options::Options;
use mesh_agent::inject::webhook::{self, InjectorConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use trellis_proxy::identity::CertificateAuthority;

/// The Service name the API server dials (the certificate's DNS SAN).
const HOST: &str = "trellis-injector.trellis-system.svc";
/// The flags of the CLI's golden files.
const FLAGS: &[&str] = &[
    "--etcd-endpoints",
    "http://etcd.trellis-system.svc:2379",
    "--otlp-endpoint",
    "http://otel-collector.observability.svc:4317",
    "--trust-domain",
    "example.org",
];

fn data(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/inject_data")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("test data");
    let doc: serde_norway::Value = serde_norway::from_str(&text).expect("yaml");
    serde_json::to_value(doc).expect("json")
}

/// A started injector and a client trusting its CA.
struct Injector {
    addr: std::net::SocketAddr,
    tls: tokio_rustls::TlsConnector,
    _dir: tempfile::TempDir,
}

impl Injector {
    /// With a certificate from a CA of `CertificateAuthority` for [`HOST`].
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = write_certificate(dir.path());
        Self::start_in(dir, "", ca.cert_pem()).await
    }

    /// With `tls.crt` and `tls.key` of `dir/sub`, trusting `ca_pem`.
    async fn start_in(dir: tempfile::TempDir, sub: &str, ca_pem: &str) -> Self {
        let certs = dir.path().join(sub);
        let running = webhook::start(InjectorConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert: certs.join("tls.crt"),
            key: certs.join("tls.key"),
            reload_interval: Duration::from_millis(100),
            options: Options::from_flags(FLAGS).expect("flags"),
        })
        .await
        .expect("injector starts");
        Self {
            addr: running.addr,
            tls: Self::client(ca_pem),
            _dir: dir,
        }
    }

    /// A TLS client trusting only `ca_pem`.
    fn client(ca_pem: &str) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca pem"))
            .expect("root");
        let mut client =
            rustls::ClientConfig::builder_with_provider(trellis_proxy::identity::crypto_provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(client))
    }

    /// A TLS connection that verified the injector as [`HOST`].
    async fn connect(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let name = ServerName::try_from(HOST).expect("name");
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .expect("TLS handshake verifies the injector");
        tls
    }

    /// The certificate the injector presents now.
    async fn served_certificate(&self) -> Vec<u8> {
        let tls = self.connect().await;
        let (_, session) = tls.get_ref();
        session.peer_certificates().expect("certificate")[0].to_vec()
    }

    /// One HTTPS request; the status and the body.
    async fn call(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let tls = self.connect().await;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("http");
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", HOST)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body.to_vec())
    }

    async fn review(&self, path: &str, review: &Value) -> Value {
        let (status, body) = self
            .call("POST", path, review.to_string().into_bytes())
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).expect("json answer");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        assert_eq!(answer["response"]["uid"], review["request"]["uid"]);
        answer["response"].clone()
    }
}

/// `tls.crt` and `tls.key` for [`HOST`] in `dir`, from a new CA (returned).
fn write_certificate(dir: &Path) -> CertificateAuthority {
    let ca = CertificateAuthority::generate("example.org", Duration::from_secs(3600)).expect("ca");
    let leaf = ca
        .issue_for_hosts(&[HOST], Duration::from_secs(3600))
        .expect("leaf");
    std::fs::write(dir.join("tls.crt"), &leaf.cert_pem).expect("cert");
    std::fs::write(dir.join("tls.key"), &leaf.key_pem).expect("key");
    ca
}

/// An AdmissionReview v1 for `operation` on `pod`, as the API server sends it.
fn admission_review(pod: &Value, operation: &str) -> Value {
    let gvk = json!({"group": "", "version": "v1", "kind": "Pod"});
    let gvr = json!({"group": "", "version": "v1", "resource": "pods"});
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": pod["metadata"]["name"],
            "namespace": "shop",
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "014fbff9a07c",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// Apply a JSONPatch of object-member operations (all the injector sends).
fn apply(doc: &mut Value, patch: &[Value]) {
    for op in patch {
        let path = op["path"].as_str().expect("path");
        let mut tokens: Vec<String> = path
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        let last = tokens.pop().expect("member");
        let parent = tokens.iter().fold(&mut *doc, |v, t| {
            v.get_mut(t).unwrap_or_else(|| panic!("no {t} in {path}"))
        });
        let obj = parent.as_object_mut().expect("an object member");
        match op["op"].as_str().expect("op") {
            "add" => {
                obj.insert(last, op["value"].clone());
            }
            "replace" => {
                assert!(obj.contains_key(&last), "replace of a missing {path}");
                obj.insert(last, op["value"].clone());
            }
            "remove" => {
                obj.remove(&last).expect("remove of a missing member");
            }
            other => panic!("unexpected op {other}"),
        }
    }
}

fn patch_of(response: &Value) -> Vec<Value> {
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    serde_json::from_slice(&raw).expect("a JSON array of operations")
}

/// A pod as a controller creates it from a workload's template.
fn pod_from_template(template: &Value, generate_name: &str) -> Value {
    let mut meta = template["metadata"].clone();
    meta["generateName"] = json!(generate_name);
    meta["namespace"] = json!("shop");
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": template["spec"]})
}

#[tokio::test]
async fn the_patched_pod_is_the_pod_the_cli_makes() {
    let injector = Injector::start().await;
    let cases = [
        (data("pod.yaml"), data("golden/pod.yaml")),
        (
            pod_from_template(&data("statefulset.yaml")["spec"]["template"], "ledger-"),
            pod_from_template(
                &data("golden/statefulset.yaml")["spec"]["template"],
                "ledger-",
            ),
        ),
        (
            pod_from_template(&data("job.yaml")["spec"]["template"], "nightly-report-"),
            pod_from_template(
                &data("golden/job.yaml")["spec"]["template"],
                "nightly-report-",
            ),
        ),
    ];
    for (pod, cli) in cases {
        let response = injector
            .review("/inject", &admission_review(&pod, "CREATE"))
            .await;
        let mut patched = pod.clone();
        apply(&mut patched, &patch_of(&response));
        assert_eq!(patched, cli);
        // A pod from an injected template gets no patch, even with the defaults the API
        // server fills in.
        let mut defaulted = cli.clone();
        for c in defaulted["spec"]["initContainers"]
            .as_array_mut()
            .expect("init containers")
        {
            c["imagePullPolicy"] = json!("IfNotPresent");
            c["terminationMessagePath"] = json!("/dev/termination-log");
        }
        let again = injector
            .review("/inject", &admission_review(&defaulted, "CREATE"))
            .await;
        assert_eq!(again["allowed"], true);
        assert!(again.get("patch").is_none(), "{again}");
    }
}

#[tokio::test]
async fn gates_operations_and_refusals() {
    let injector = Injector::start().await;
    let pod = data("pod.yaml");
    // Other namespaces: only annotated pods.
    let r = injector
        .review("/inject-annotated", &admission_review(&pod, "CREATE"))
        .await;
    assert_eq!(r["allowed"], true);
    assert!(r.get("patch").is_none(), "{r}");
    let mut annotated = pod.clone();
    annotated["metadata"]["annotations"] = json!({"trellis.dev/inject": "enabled"});
    let r = injector
        .review("/inject-annotated", &admission_review(&annotated, "CREATE"))
        .await;
    assert!(!patch_of(&r).is_empty());
    // Updates are not injected (a pod's containers cannot change after creation).
    let r = injector
        .review("/inject", &admission_review(&pod, "UPDATE"))
        .await;
    assert!(r.get("patch").is_none(), "{r}");
    // A refusal denies the pod with the reason.
    let mut host = pod.clone();
    host["spec"]["hostNetwork"] = json!(true);
    let r = injector
        .review("/inject", &admission_review(&host, "CREATE"))
        .await;
    assert_eq!(r["allowed"], false);
    let message = r["status"]["message"].as_str().expect("message");
    assert!(message.contains("hostNetwork"), "{message}");
    // Not an AdmissionReview, an unknown path, and the health check.
    let (status, _) = injector
        .call("POST", "/inject", b"{\"kind\": 1}".to_vec())
        .await;
    assert_eq!(status, 400);
    let (status, _) = injector.call("POST", "/elsewhere", Vec::new()).await;
    assert_eq!(status, 404);
    let (status, body) = injector.call("GET", "/healthz", Vec::new()).await;
    assert_eq!((status, body.as_slice()), (200, b"ok\n".as_slice()));
}

/// examples/kubernetes/inject/injector-certs.sh (the way without cert-manager): its
/// certificate is served and verified for the Service name; run again (renewal), it keeps the
/// CA and the running injector serves the new certificate without a restart.
#[tokio::test]
async fn the_documented_certificate_script_makes_what_the_injector_serves() {
    let has_openssl = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok();
    if !has_openssl {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl is missing; .ci/run installs it"
        );
        return eprintln!("skipped: no openssl");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/kubernetes/inject/injector-certs.sh");
    let dir = tempfile::tempdir().expect("tempdir");
    let out_dir = dir.path().join("certs");
    let run = || {
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(&out_dir)
            .output()
            .expect("bash");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("create secret tls trellis-injector-tls"),
            "{text}"
        );
        assert!(
            text.contains("mutatingwebhookconfiguration trellis-injector"),
            "{text}"
        );
    };
    run();
    let ca = std::fs::read_to_string(out_dir.join("ca.crt")).expect("ca.crt");
    let first = std::fs::read(out_dir.join("tls.crt")).expect("tls.crt");
    let injector = Injector::start_in(dir, "certs", &ca).await;
    let (status, _) = injector.call("GET", "/healthz", Vec::new()).await;
    assert_eq!(status, 200);
    let pem = |b: &[u8]| CertificateDer::from_pem_slice(b).expect("pem").to_vec();
    assert_eq!(injector.served_certificate().await, pem(&first));
    run();
    assert_eq!(
        std::fs::read_to_string(out_dir.join("ca.crt")).expect("ca.crt"),
        ca,
        "CA kept"
    );
    let renewed = pem(&std::fs::read(out_dir.join("tls.crt")).expect("tls.crt"));
    assert_ne!(renewed, pem(&first));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while injector.served_certificate().await != renewed {
        assert!(
            tokio::time::Instant::now() < deadline,
            "renewed certificate not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `mesh-agent injector` command itself: serves /healthz on the given address with the
/// given certificate, and exits 0 on SIGTERM (the kubelet stopping the pod).
#[tokio::test]
async fn the_injector_command_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write_certificate(dir.path());
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mesh-agent"))
        .args(["injector", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .kill_on_drop(true)
        .spawn()
        .expect("mesh-agent injector starts");
    let client = Injector::client(ca.cert_pem());
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "injector not listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let injector = Injector {
        addr,
        tls: client,
        _dir: dir,
    };
    let (status, _) = injector.call("GET", "/healthz", Vec::new()).await;
    assert_eq!(status, 200);
    let pid = child.id().expect("pid").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exits after SIGTERM")
        .expect("status");
    assert!(status.success(), "{status}");
}
