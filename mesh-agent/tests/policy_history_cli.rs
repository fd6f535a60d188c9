//! The binary against a real etcd: `policy apply/delete --author`, `policy history` as a table
//! and as JSON, and `policy rollback` (including its refusal of an unknown revision).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use mesh_agent::testing::EtcdCluster;

fn agent(endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
    c.env("TRELLIS_ETCD_ENDPOINTS", endpoint)
        .env("RUST_LOG", "warn")
        .env_remove("TRELLIS_POLICY_AUTHOR")
        .stdin(Stdio::null());
    c
}

fn ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}", common::output_text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write(dir: &Path, timeout: &str) -> String {
    let p = dir.join(format!("orders-{timeout}.yaml"));
    let text = format!(
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {{name: orders}}\nspec: {{request_timeout: {timeout}}}\n"
    );
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn revision(applied: &str) -> i64 {
    applied
        .lines()
        .find_map(|l| l.strip_prefix("applied at revision "))
        .unwrap_or_else(|| panic!("{applied}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_rollback_through_the_binary() {
    let etcd = EtcdCluster::start(1).await;
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let v1 = write(dir.path(), "1s");
    let v2 = write(dir.path(), "2s");

    let r1 = revision(&ok(
        agent(&ep).args(["policy", "apply", "-f", &v1, "--author", "alice"])
    ));
    // Without --author: the OS user from the environment.
    ok(agent(&ep)
        .env("USER", "bob-from-env")
        .args(["policy", "apply", "-f", &v2]));
    ok(agent(&ep).args([
        "policy",
        "delete",
        "ServicePolicy/orders",
        "--author",
        "carol",
    ]));

    let table = ok(agent(&ep).args(["policy", "history", "ServicePolicy/orders"]));
    eprintln!("{table}");
    let rows: Vec<&str> = table.lines().filter(|l| !l.starts_with(' ')).collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(
        rows[0].starts_with("REVISION") && rows[0].contains("AUTHOR"),
        "{table}"
    );
    assert!(
        rows[1].starts_with(&r1.to_string()) && rows[1].contains("alice"),
        "{table}"
    );
    assert!(rows[1].ends_with("apply (created)"), "{table}");
    assert!(rows[2].contains("bob-from-env"), "{table}");
    assert!(
        rows[3].contains("carol") && rows[3].ends_with("delete"),
        "{table}"
    );
    assert!(
        table.contains("    -  request_timeout: 1s\n    +  request_timeout: 2s"),
        "{table}"
    );

    let json = ok(agent(&ep).args([
        "policy",
        "history",
        "ServicePolicy/orders",
        "--output",
        "json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(3), "{json}");
    assert_eq!(v[0]["revision"], r1);
    assert_eq!(v[2]["action"], "delete");

    let dry = ok(agent(&ep).args([
        "policy",
        "rollback",
        "ServicePolicy/orders",
        "--to-revision",
        &r1.to_string(),
        "--dry-run",
    ]));
    assert!(
        dry.contains("would be restored") && dry.contains("    +  request_timeout: 1s"),
        "{dry}"
    );
    assert!(
        !ok(agent(&ep).args(["policy", "list"])).contains("orders"),
        "a dry run writes nothing"
    );
    let restored = ok(agent(&ep).args([
        "policy",
        "rollback",
        "ServicePolicy/orders",
        "--to-revision",
        &r1.to_string(),
        "--author",
        "dave",
    ]));
    assert!(restored.contains("restored"), "{restored}");
    let get = ok(agent(&ep).args(["policy", "get", "ServicePolicy/orders"]));
    assert!(get.contains("request_timeout: 1s"), "{get}");
    let table = ok(agent(&ep).args(["policy", "history", "ServicePolicy/orders"]));
    let last = table.lines().rfind(|l| !l.starts_with(' ')).unwrap_or("");
    assert!(
        last.contains("dave") && last.ends_with(&format!("rollback to {r1}")),
        "{table}"
    );

    let o = agent(&ep)
        .args([
            "policy",
            "rollback",
            "ServicePolicy/orders",
            "--to-revision",
            "999999",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        common::output_text(&o)
            .contains("revision 999999 is not in the history of ServicePolicy/orders"),
        "{}",
        common::output_text(&o)
    );
}
