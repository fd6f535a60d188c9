//! The binary against a real etcd: `policy` commands, `status`, unreachable etcd, and a sidecar
//! killed with SIGKILL whose registration expires with its lease.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mesh_agent::testing::EtcdCluster;

fn agent(endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
    c.env("TRELLIS_ETCD_ENDPOINTS", endpoint)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}", common::output_text(&o));
    common::output_text(&o)
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

const GOOD: &str = "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {name: orders}\nspec: {request_timeout: 2s}\n---\napiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {name: payments}\nspec: {connect_timeout: 500ms}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_commands_round_trip() {
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "p.yaml", GOOD);

    let v = ok(agent(&ep).args(["policy", "validate", "-f", &file]));
    assert!(
        v.contains("ServicePolicy/orders valid") && v.contains("ServicePolicy/payments valid"),
        "{v}"
    );
    let dry = ok(agent(&ep).args(["policy", "apply", "-f", &file, "--dry-run"]));
    assert!(
        dry.contains("ServicePolicy/orders created (dry run)"),
        "{dry}"
    );
    assert!(
        !ok(agent(&ep).args(["policy", "list"])).contains("orders"),
        "dry run wrote nothing"
    );

    let applied = ok(agent(&ep).args(["policy", "apply", "-f", dir.path().to_str().unwrap()]));
    assert!(
        applied.contains("ServicePolicy/orders created") && applied.contains("applied at revision"),
        "{applied}"
    );
    let again = ok(agent(&ep).args(["policy", "apply", "-f", &file]));
    assert!(again.contains("ServicePolicy/orders unchanged"), "{again}");
    let list = ok(agent(&ep).args(["policy", "list"]));
    assert!(
        list.contains("ServicePolicy/orders") && list.contains("ServicePolicy/payments"),
        "{list}"
    );
    let get = ok(agent(&ep).args(["policy", "get", "ServicePolicy/orders"]));
    assert!(
        get.contains("request_timeout: 2s") && get.contains("# revision"),
        "{get}"
    );
    let del = ok(agent(&ep).args(["policy", "delete", "ServicePolicy/orders"]));
    assert!(del.contains("deleted"), "{del}");
    let missing = agent(&ep)
        .args(["policy", "get", "ServicePolicy/orders"])
        .output()
        .unwrap();
    assert!(
        !missing.status.success() && common::output_text(&missing).contains("not found"),
        "{}",
        common::output_text(&missing)
    );

    // An invalid document anywhere in the input: nothing is written, every problem is named.
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {name: web}\nspec: {request_timeout: 0s}\n---\napiVersion: trellis.dev/v2\nkind: ServicePolicy\nmetadata: {name: api}\nspec: {}\n",
    );
    let o = agent(&ep)
        .args(["policy", "apply", "-f", &bad])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let text = common::output_text(&o);
    assert!(
        text.contains("ServicePolicy/web: spec.request_timeout")
            && text.contains("apiVersion `trellis.dev/v2`"),
        "{text}"
    );
    assert!(!ok(agent(&ep).args(["policy", "list"])).contains("web"));
}

#[test]
fn unreachable_etcd_is_named_in_the_error() {
    let dead = || {
        format!(
            "http://127.0.0.1:{}",
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        )
    };
    let (a, b) = (dead(), dead());
    let o = agent(&format!("{a},{b}"))
        .args(["policy", "list", "--etcd-timeout", "500ms"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let text = common::output_text(&o);
    // Each endpoint on a line of its own, with why it failed.
    for ep in [&a, &b] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{ep}:")) && l.contains("refused")),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_sidecar_registration_expires_with_its_lease() {
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(agent(&ep).args(["cert", "init", "--trust-domain", "cli.test", "--dir", d]));
    ok(agent(&ep).args(["cert", "issue", "--service", "orders", "--dir", d]));
    let port = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let cfg = write(
        dir.path(),
        "sidecar.yaml",
        &format!(
            "service: orders\ntrust_domain: cli.test\nidentity: {{cert: {d}/orders.pem, key: {d}/orders-key.pem, bundle: {d}/ca.pem}}\n\
             inbound: {{listen: 127.0.0.1:{}, app: 127.0.0.1:9}}\noutbound: {{listen: 127.0.0.1:{}}}\nadmin: {{listen: 127.0.0.1:{}}}\n\
             store:\n  etcd:\n    endpoints: [{ep}]\n    lease_ttl: 2s\n    cache_file: {d}/cache.json\n",
            port(),
            port(),
            port()
        ),
    );
    let mut child = agent(&ep)
        .args(["run", "--config", &cfg])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let registered = loop {
        let s = ok(agent(&ep).args(["status"]));
        if s.contains("orders") {
            break s;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("sidecar exited ({status}): {err}");
        }
        assert!(Instant::now() < deadline, "never registered");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        registered.contains("2s") || registered.contains("1s"),
        "lease TTL shown: {registered}"
    );

    child.kill().unwrap(); // SIGKILL: no chance to revoke the lease.
    let _ = child.wait();
    let killed = Instant::now();
    loop {
        if !ok(agent(&ep).args(["status"])).contains("orders") {
            break;
        }
        // TTL 2 s plus a margin for etcd's lease checks (leases are a lower bound).
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "registration outlived its lease"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "registration expired {:?} after SIGKILL (TTL 2 s)",
        killed.elapsed()
    );
    assert!(
        killed.elapsed() >= Duration::from_millis(1000),
        "expired before the lease could have"
    );
}

fn fails(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        !o.status.success(),
        "{cmd:?} should fail: {}",
        common::output_text(&o)
    );
    common::output_text(&o)
}

/// `etcd rbac`: the printed etcdctl commands, run by etcdctl, and `--apply` both give users
/// that can do what their role allows and nothing else; credentials errors name the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_rbac_prints_and_applies_least_privilege_roles() {
    let etcd = EtcdCluster::start(1).await;
    etcd.enable_auth("root-pw").await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let root = ["--etcd-user", "root", "--etcd-password", "root-pw"];

    // Printed: etcdctl commands that never contain the password, only the file's path.
    let pw_payments = write(dir.path(), "payments.pw", "payments-pw\n");
    let script = ok(agent(&ep).args([
        "etcd",
        "rbac",
        "--service",
        "payments",
        "--password-file",
        &pw_payments,
    ]));
    assert!(
        script.contains("etcdctl role grant-permission trellis-service-payments --prefix=true readwrite /trellis/v1/mesh/services/payments/instances/")
            && script.contains("--prefix=true read /trellis/v1/mesh/ ")
            && !script.contains("payments-pw"),
        "{script}"
    );
    // ...which etcdctl runs as they are.
    let o = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("ETCDCTL_API", "3")
        .env("ETCDCTL_ENDPOINTS", &ep)
        .env("ETCDCTL_USER", "root:root-pw")
        .output()
        .unwrap();
    assert!(o.status.success(), "etcdctl: {}", common::output_text(&o));

    // Applied.
    let pw_orders = write(dir.path(), "orders.pw", "orders-pw\n");
    let applied = ok(agent(&ep)
        .args([
            "etcd",
            "rbac",
            "--service",
            "orders",
            "--apply",
            "--password-file",
            &pw_orders,
        ])
        .args(root));
    assert!(
        applied.contains("created role trellis-service-orders")
            && applied.contains("created user orders with a password"),
        "{applied}"
    );
    let pw_alice = write(dir.path(), "alice.pw", "alice-pw\n");
    ok(agent(&ep)
        .args([
            "etcd",
            "rbac",
            "--operator",
            "alice",
            "--apply",
            "--password-file",
            &pw_alice,
        ])
        .args(root));
    // Applying the printed plan over etcdctl's result finds nothing to change.
    let again = ok(agent(&ep)
        .args(["etcd", "rbac", "--service", "payments", "--apply"])
        .args(root));
    assert!(again.contains("already as planned"), "{again}");

    // The operator applies policies; a service may not.
    let file = write(dir.path(), "p.yaml", GOOD);
    let by_alice = ok(agent(&ep).args(["policy", "apply", "-f", &file]).args([
        "--etcd-user",
        "alice",
        "--etcd-password",
        "alice-pw",
    ]));
    assert!(by_alice.contains("applied at revision"), "{by_alice}");
    let changed = write(dir.path(), "changed.yaml", &GOOD.replace("2s", "3s"));
    for (user, pw) in [("orders", "orders-pw"), ("payments", "payments-pw")] {
        let refused = fails(
            agent(&ep)
                .args(["policy", "apply", "-f", &changed, "--author", user])
                .args(["--etcd-user", user, "--etcd-password", pw]),
        );
        assert!(
            refused.contains(&format!("permission denied for user `{user}`")),
            "{refused}"
        );
    }
    // Creating roles needs root.
    let refused = fails(
        agent(&ep)
            .args(["etcd", "rbac", "--service", "evil", "--apply"])
            .args(["--etcd-user", "alice", "--etcd-password", "alice-pw"]),
    );
    assert!(
        refused.contains("add role trellis-service-evil: etcd at"),
        "{refused}"
    );
    assert!(refused.contains("permission denied"), "{refused}");
    // `--api-specs`: orders' sidecars may store their app's documents under their own
    // service only; payments' (without it) may not store any.
    let doc = write(
        dir.path(),
        "openapi.json",
        r#"{"openapi": "3.1.0", "info": {"title": "Orders", "version": "1"}, "paths": {}}"#,
    );
    let refused = fails(agent(&ep).args(["etcd", "rbac", "--operator", "bob", "--api-specs"]));
    assert!(refused.contains("--service"), "{refused}");
    let applied = ok(agent(&ep)
        .args([
            "etcd",
            "rbac",
            "--service",
            "orders",
            "--api-specs",
            "--apply",
        ])
        .args(root));
    assert!(
        applied.contains("/trellis/v1/apis/index/orders/"),
        "{applied}"
    );
    let put = |service: &str, user: &str, pw: &str| {
        let mut c = agent(&ep);
        c.args(["api", "put", &doc, "--service", service, "--version", "v1"])
            .args(["--etcd-user", user, "--etcd-password", pw]);
        c
    };
    let out = ok(&mut put("orders", "orders", "orders-pw"));
    assert!(out.starts_with("orders v1: stored"), "{out}");
    let refused = fails(&mut put("payments", "orders", "orders-pw"));
    assert!(refused.contains("permission denied"), "{refused}");
    let refused = fails(&mut put("payments", "payments", "payments-pw"));
    assert!(refused.contains("permission denied"), "{refused}");

    // A wrong password, named as such.
    let refused =
        fails(
            agent(&ep)
                .args(["status"])
                .args(["--etcd-user", "root", "--etcd-password", "nope"]),
        );
    assert!(
        refused.contains("authentication failed for user `root`: wrong user name or password"),
        "{refused}"
    );
}

/// `mesh-agent api ...` as a user runs it: two versions put, listed, one read back, the diff
/// with its breaking changes; garbage in etcd is an `error:` line naming the key and exit 1,
/// never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_commands_through_the_binary() {
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let v1 = r#"{"openapi": "3.1.0", "info": {"title": "Orders API", "version": "1"},
        "paths": {"/orders": {"get": {"responses": {"200": {"description": "ok"}}},
                              "delete": {"responses": {"204": {"description": "gone"}}}}}}"#;
    let v2 = "apiVersion: trellis.dev/v1\nkind: ApiSpec\nmetadata: {name: orders-v2}\nspec:\n  service: orders\n  version: v2\n  document: |\n    openapi: 3.1.0\n    info: {title: Orders API, version: '2'}\n    paths:\n      /orders:\n        get:\n          parameters: [{name: tenant, in: query, required: true}]\n          responses: {'200': {description: ok}}\n";
    let f1 = write(dir.path(), "openapi.json", v1);
    let f2 = write(dir.path(), "v2.yaml", v2);

    // A dry run is offline: validated, hashed and compressed, etcd never asked.
    let dry = ok(agent("http://127.0.0.1:1").args(["api", "put", &f2, "--dry-run"]));
    assert!(
        dry.starts_with("orders v2: would store sha256:") && dry.contains("(dry run)"),
        "{dry}"
    );
    let out = ok(agent(&ep).args(["api", "put", &f1, "--service", "orders", "--version", "v1"]));
    assert!(out.starts_with("orders v1: stored sha256:"), "{out}");
    let v = ok(agent(&ep).args(["policy", "validate", "-f", &f2]));
    assert!(v.contains("ApiSpec/orders-v2 valid"), "{v}");
    let out = ok(agent(&ep).args(["policy", "apply", "-f", &f2]));
    assert!(out.starts_with("orders v2: stored sha256:"), "{out}");

    let list = ok(agent(&ep).args(["api", "list"]));
    assert_eq!(list.lines().count(), 3, "{list}");
    assert!(
        list.lines()
            .all(|l| l.starts_with("SERVICE") || l.ends_with("Orders API")),
        "{list}"
    );
    let doc = ok(agent(&ep).args(["api", "get", "orders", "--version", "v1"]));
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc, serde_json::from_str::<serde_json::Value>(v1).unwrap());
    let diff = ok(agent(&ep).args(["api", "diff", "orders", "v1", "v2"]));
    assert!(
        diff.starts_with("orders v1 -> v2: 2 change(s), 2 breaking"),
        "{diff}"
    );
    assert!(
        diff.contains("DELETE /orders") && diff.contains("new required query parameter `tenant`"),
        "{diff}"
    );

    let mut c = etcd_client::Client::connect([ep.as_str()], None)
        .await
        .unwrap();
    c.put(
        "/trellis/v1/apis/index/orders/v3",
        vec![0xff, 0x00, 0x7b],
        None,
    )
    .await
    .unwrap();
    let o = agent(&ep)
        .args(["api", "diff", "orders", "v1", "v3"])
        .output()
        .unwrap();
    let text = common::output_text(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with(
            "error: etcd key /trellis/v1/apis/index/orders/v3: not an API index entry"
        ),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}
