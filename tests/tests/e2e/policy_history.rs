//! Audit history and rollback of policies against a real etcd: entries written in the change's
//! own transaction (author, time, diff, revision), no entry for a no-op, rollback as a guarded
//! and recorded change that sidecars pick up, refusals (unknown revision, concurrent change, a
//! version invalid under today's rules), the per-policy bound, and history keys that the
//! sidecars' mesh watch never sees.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use mesh_agent::policy::history::HISTORY_LIMIT;
use mesh_agent::policy::{self, OutputFormat, PolicyError};
use mesh_agent::testing::EtcdCluster;
use serde_json::Value;
use trellis_policies::{parse_documents, PolicyDocument};
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::{etcd_sidecar, init_logs, wait_for, Pki};

const REF: &str = "ServicePolicy/echo";

fn etcd_cfg(endpoints: Vec<String>) -> mesh_agent::config::EtcdConfig {
    let mut c = mesh_agent::config::EtcdConfig::new(endpoints);
    c.timeout = Duration::from_secs(2);
    c
}

fn doc(timeout: &str) -> Vec<PolicyDocument> {
    let yaml = format!(
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {{name: echo}}\nspec: {{request_timeout: {timeout}}}\n"
    );
    parse_documents(&yaml, "test")
        .into_iter()
        .map(|d| d.unwrap())
        .collect()
}

/// The revision in the last line of an apply report (`applied at revision N`).
fn applied_rev(report: &[String]) -> i64 {
    let last = report.last().unwrap();
    last.strip_prefix("applied at revision ")
        .unwrap_or_else(|| panic!("{report:?}"))
        .parse()
        .unwrap()
}

async fn history_json(cfg: &mesh_agent::config::EtcdConfig) -> Vec<Value> {
    let text = policy::history(cfg, REF, OutputFormat::Json).await.unwrap();
    serde_json::from_str::<Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

async fn mod_revision(etcd: &mut Client, key: &str) -> i64 {
    etcd.get(key, None)
        .await
        .unwrap()
        .kvs()
        .first()
        .map_or(0, |kv| kv.mod_revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_update_delete_are_recorded_with_author_revision_and_diff() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let cfg = etcd_cfg(etcd.endpoints());
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let key = "/trellis/v1/mesh/policies/ServicePolicy/echo";

    let r1 = applied_rev(
        &policy::apply_as(&cfg, &doc("1s"), false, "alice")
            .await
            .unwrap(),
    );
    let r2 = applied_rev(
        &policy::apply_as(&cfg, &doc("2s"), false, "bob")
            .await
            .unwrap(),
    );
    assert_eq!(
        mod_revision(&mut c, key).await,
        r2,
        "entry revision = change revision"
    );

    // A no-op apply writes nothing: no history entry, no new revision.
    let same = policy::apply_as(&cfg, &doc("2s"), false, "bob")
        .await
        .unwrap();
    assert_eq!(same, ["ServicePolicy/echo unchanged"]);
    // A dry run records nothing either.
    policy::apply_as(&cfg, &doc("9s"), true, "bob")
        .await
        .unwrap();
    assert_eq!(history_json(&cfg).await.len(), 2);

    let deleted = policy::delete_as(&cfg, REF, "carol").await.unwrap();
    let r3: i64 = deleted.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(mod_revision(&mut c, key).await, 0);

    let h = history_json(&cfg).await;
    assert_eq!(h.len(), 3, "{h:#?}");
    let revs: Vec<i64> = h.iter().map(|e| e["revision"].as_i64().unwrap()).collect();
    assert_eq!(revs, [r1, r2, r3]);
    let who: Vec<&str> = h.iter().map(|e| e["author"].as_str().unwrap()).collect();
    assert_eq!(who, ["alice", "bob", "carol"]);
    let what: Vec<&str> = h.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(what, ["apply", "apply", "delete"]);
    for e in &h {
        let t = e["time"].as_str().unwrap();
        let b = t.as_bytes();
        assert!(
            b.len() == 20 && b[4] == b'-' && b[10] == b'T' && b[19] == b'Z',
            "RFC 3339 UTC: {t}"
        );
    }
    assert_eq!(h[0]["previous"], Value::Null);
    assert!(h[0]["diff"]
        .as_array()
        .unwrap()
        .contains(&"+  request_timeout: 1s".into()));
    let d1: Vec<&str> = h[1]["diff"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        d1.contains(&"-  request_timeout: 1s") && d1.contains(&"+  request_timeout: 2s"),
        "{d1:?}"
    );
    assert!(
        !d1.iter().any(|l| l.contains("kind")),
        "unchanged lines beyond the context are elided: {d1:?}"
    );
    assert_eq!(h[2]["new"], Value::Null);
    assert!(h[2]["diff"]
        .as_array()
        .unwrap()
        .contains(&"-  request_timeout: 2s".into()));

    // The table: one row per change with its diff beneath.
    let table = policy::history(&cfg, REF, OutputFormat::Table)
        .await
        .unwrap();
    eprintln!("{table}");
    let rows: Vec<&str> = table.lines().filter(|l| !l.starts_with(' ')).collect();
    assert!(rows[0].starts_with("REVISION"), "{table}");
    assert!(
        rows[1].starts_with(&r1.to_string()) && rows[1].contains("alice"),
        "{table}"
    );
    assert!(rows[2].contains("bob") && rows[3].contains("carol") && rows[3].ends_with("delete"));
    assert!(table.contains("    +  request_timeout: 2s"), "{table}");

    // An empty history is not an error.
    let none = policy::history(&cfg, "ServicePolicy/nothing", OutputFormat::Json)
        .await
        .unwrap();
    assert_eq!(none.trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_restores_a_version_and_sidecars_follow() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let cfg = etcd_cfg(etcd.endpoints());
    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let _server = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), |_| {}).await;
    let client_sidecar = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), |_| {}).await;
    let c = client::h1(client_sidecar.bound.outbound);
    let slow_status = || async { client::get(&c, "http://echo/slow/1000").await.status };

    let r1 = applied_rev(
        &policy::apply_as(&cfg, &doc("300ms"), false, "alice")
            .await
            .unwrap(),
    );
    wait_for(Duration::from_secs(5), "v1 (300 ms) in force", || async {
        slow_status().await == 504
    })
    .await;
    policy::apply_as(&cfg, &doc("5s"), false, "bob")
        .await
        .unwrap();
    let r_del: i64 = policy::delete_as(&cfg, REF, "carol")
        .await
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    wait_for(Duration::from_secs(5), "policy gone", || async {
        slow_status().await == 200
    })
    .await;

    let out = policy::rollback(&cfg, REF, r1, "dave").await.unwrap();
    assert!(
        out.contains(&format!("restored as of revision {r1}")),
        "{out}"
    );
    wait_for(
        Duration::from_secs(5),
        "rolled-back v1 in force at the sidecar",
        || async { slow_status().await == 504 },
    )
    .await;
    let stored = policy::get(&cfg, REF).await.unwrap();
    assert!(stored.contains("request_timeout: 300ms"), "{stored}");

    let h = history_json(&cfg).await;
    assert_eq!(h.len(), 4, "{h:#?}");
    let last = &h[3];
    assert_eq!(last["action"], "rollback");
    assert_eq!(last["from_revision"], r1);
    assert_eq!(last["author"], "dave");
    assert_eq!(last["previous"], Value::Null, "restored from absence");
    assert_eq!(last["new"], h[0]["new"]);

    // Rolling back to the delete deletes; doing it again changes nothing and records nothing.
    let out = policy::rollback(&cfg, REF, r_del, "dave").await.unwrap();
    assert!(out.contains("deleted as of revision"), "{out}");
    let again = policy::rollback(&cfg, REF, r_del, "dave").await.unwrap();
    assert!(again.contains("unchanged"), "{again}");
    assert_eq!(history_json(&cfg).await.len(), 5);
    wait_for(Duration::from_secs(5), "policy gone again", || async {
        slow_status().await == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_refuses_unknown_revision_concurrent_change_and_invalid_version() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let cfg = etcd_cfg(etcd.endpoints());
    let r1 = applied_rev(
        &policy::apply_as(&cfg, &doc("1s"), false, "a")
            .await
            .unwrap(),
    );
    let r2 = applied_rev(
        &policy::apply_as(&cfg, &doc("2s"), false, "a")
            .await
            .unwrap(),
    );

    // Not a revision of this policy's history: refused, naming the ones that are.
    let err = policy::rollback(&cfg, REF, r2 + 1000, "b")
        .await
        .unwrap_err();
    assert!(matches!(err, PolicyError::NotInHistory { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!(
            "revision {} is not in the history of {REF}",
            r2 + 1000
        )) && msg.contains(&format!("{r1}, {r2}")),
        "{msg}"
    );
    let err = policy::rollback(&cfg, "ServicePolicy/other", r1, "b")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("none recorded"), "{err}");

    // Someone changes the policy between the rollback's read and its write: refused.
    let plan = policy::rollback::plan(&cfg, REF, r1).await.unwrap();
    let r3 = applied_rev(
        &policy::apply_as(&cfg, &doc("3s"), false, "c")
            .await
            .unwrap(),
    );
    let err = policy::rollback::commit(&cfg, &plan, "b")
        .await
        .unwrap_err();
    assert!(matches!(err, PolicyError::RollbackConflict(_)), "{err:?}");
    assert!(err.to_string().contains("nothing was written"), "{err}");
    let stored = policy::get(&cfg, REF).await.unwrap();
    assert!(
        stored.contains(&format!("# revision {r3}")) && stored.contains("3s"),
        "the concurrent change stands: {stored}"
    );
    assert_eq!(
        history_json(&cfg).await.len(),
        3,
        "no entry for a refused rollback"
    );

    // A version that today's rules refuse (written around the CLI) is not restored.
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let bad = serde_json::json!({
        "author": "x", "time": "2026-01-01T00:00:00Z", "action": "apply", "previous": null,
        "new": {"apiVersion": "trellis.dev/v1", "kind": "ServicePolicy",
                "metadata": {"name": "echo"}, "spec": {"request_timeout": "0s"}}
    });
    let r_bad = c
        .put(
            "/trellis/v1/history/ServicePolicy/echo/00000000000000000900",
            bad.to_string(),
            None,
        )
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let err = policy::rollback(&cfg, REF, r_bad, "b").await.unwrap_err();
    assert!(
        matches!(err, PolicyError::RollbackInvalid { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("greater than zero"), "{err}");
    assert!(policy::get(&cfg, REF).await.unwrap().contains("3s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_per_policy() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let cfg = etcd_cfg(etcd.endpoints());
    let extra = 7;
    let total = HISTORY_LIMIT + extra;
    let mut revs = Vec::new();
    for i in 1..=total {
        let r = policy::apply_as(&cfg, &doc(&format!("{i}ms")), false, "loop")
            .await
            .unwrap();
        revs.push(applied_rev(&r));
    }
    let h = history_json(&cfg).await;
    assert_eq!(h.len() as u64, HISTORY_LIMIT);
    let kept: Vec<i64> = h.iter().map(|e| e["revision"].as_i64().unwrap()).collect();
    assert_eq!(kept, revs[extra as usize..], "the newest entries are kept");
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let stored = c
        .get(
            "/trellis/v1/history/ServicePolicy/echo/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap()
        .count();
    assert_eq!(
        stored as u64, HISTORY_LIMIT,
        "pruned in etcd, not just hidden"
    );
    // The oldest kept entry can still be rolled back to.
    policy::rollback(&cfg, REF, kept[0], "loop").await.unwrap();
    assert_eq!(history_json(&cfg).await.len() as u64, HISTORY_LIMIT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_watchers_never_see_history_writes() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let cfg = etcd_cfg(etcd.endpoints());
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let mut mesh = c
        .watch("/trellis/v1/mesh/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let mut all = c
        .watch("/trellis/v1/", Some(WatchOptions::new().with_prefix()))
        .await
        .unwrap();

    let r1 = applied_rev(
        &policy::apply_as(&cfg, &doc("1s"), false, "a")
            .await
            .unwrap(),
    );
    policy::apply_as(&cfg, &doc("2s"), false, "a")
        .await
        .unwrap();
    policy::delete_as(&cfg, REF, "a").await.unwrap();
    policy::rollback(&cfg, REF, r1, "a").await.unwrap();

    // Four transactions, each writing the policy and its history entry together.
    let mut seen_all = Vec::new();
    while seen_all.len() < 8 {
        let msg = tokio::time::timeout(Duration::from_secs(5), all.message())
            .await
            .expect("events on the whole prefix")
            .unwrap()
            .unwrap();
        for e in msg.events() {
            let kv = e.kv().unwrap();
            seen_all.push((kv.key_str().unwrap().to_string(), kv.mod_revision()));
        }
    }
    let history: Vec<_> = seen_all
        .iter()
        .filter(|(k, _)| k.starts_with("/trellis/v1/history/"))
        .collect();
    let changes: Vec<_> = seen_all
        .iter()
        .filter(|(k, _)| k.starts_with("/trellis/v1/mesh/"))
        .collect();
    assert_eq!(history.len(), 4, "{seen_all:?}");
    assert_eq!(
        history.iter().map(|(_, r)| r).collect::<Vec<_>>(),
        changes.iter().map(|(_, r)| r).collect::<Vec<_>>(),
        "each entry in its change's transaction"
    );

    let mut seen_mesh = Vec::new();
    let quiet = tokio::time::sleep(Duration::from_millis(500));
    tokio::pin!(quiet);
    loop {
        tokio::select! {
            msg = mesh.message() => {
                for e in msg.unwrap().unwrap().events() {
                    let kv = e.kv().unwrap();
                    seen_mesh.push((e.event_type(), kv.key_str().unwrap().to_string()));
                }
            }
            _ = &mut quiet => break,
        }
    }
    assert_eq!(seen_mesh.len(), 4, "{seen_mesh:?}");
    assert!(
        seen_mesh
            .iter()
            .all(|(_, k)| k == "/trellis/v1/mesh/policies/ServicePolicy/echo"),
        "{seen_mesh:?}"
    );
    assert_eq!(seen_mesh[2].0, EventType::Delete);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_around_the_cli_are_flagged_in_the_history() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let cfg = etcd_cfg(etcd.endpoints());
    policy::apply_as(&cfg, &doc("1s"), false, "a")
        .await
        .unwrap();
    // etcdctl-style write: no history entry of its own.
    let mut c = Client::connect(etcd.endpoints(), None).await.unwrap();
    let direct = r#"{"apiVersion":"trellis.dev/v1","kind":"ServicePolicy","metadata":{"name":"echo"},"spec":{"request_timeout":"7s"}}"#;
    c.put("/trellis/v1/mesh/policies/ServicePolicy/echo", direct, None)
        .await
        .unwrap();
    policy::apply_as(&cfg, &doc("2s"), false, "a")
        .await
        .unwrap();
    let h = history_json(&cfg).await;
    assert_eq!(h.len(), 2);
    assert_eq!(h[0]["changed_outside"], false);
    assert_eq!(h[1]["changed_outside"], true);
    assert!(
        h[1]["diff"]
            .as_array()
            .unwrap()
            .contains(&"-  request_timeout: 7s".into()),
        "the diff is from the value actually replaced: {h:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_too_large_for_one_transaction_is_explained() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let cfg = etcd_cfg(etcd.endpoints());
    // 2 operations per changed document (policy + entry) against etcd's default of 128.
    let docs = |n: usize| -> Vec<PolicyDocument> {
        (0..n)
            .map(|i| {
                let yaml = format!(
                    "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {{name: s{i}}}\nspec: {{request_timeout: 1s}}\n"
                );
                parse_documents(&yaml, "t").remove(0).unwrap()
            })
            .collect()
    };
    let err = policy::apply_as(&cfg, &docs(65), false, "a")
        .await
        .unwrap_err();
    assert!(
        matches!(err, PolicyError::TooManyOps { changes: 65, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("apply fewer at a time"), "{err}");
    assert!(
        policy::list(&cfg).await.unwrap().is_empty(),
        "nothing written"
    );
    policy::apply_as(&cfg, &docs(64), false, "a").await.unwrap();
}
