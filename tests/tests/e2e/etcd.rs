//! Coordination through a real etcd started by the test: registration and discovery, policies,
//! rejection of invalid values, fail-static at runtime and at startup, failover in a 3-member
//! cluster, and compaction while disconnected.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use mesh_agent::testing::EtcdCluster;
use trellis_policies::parse_documents;
use trellis_proxy::app::Running;
use trellis_tests::backend::Backend;
use trellis_tests::client::{self, metric};
use trellis_tests::disk::SmallDisk;
use trellis_tests::{etcd_sidecar, init_logs, wait_for, Load, Pki};

const PREFIX: &str = "/trellis/v1";

fn etcd_cfg(endpoints: Vec<String>) -> mesh_agent::config::EtcdConfig {
    let mut c = mesh_agent::config::EtcdConfig::new(endpoints);
    c.timeout = Duration::from_secs(1);
    c
}

async fn etcd_client(endpoints: Vec<String>) -> Client {
    Client::connect(endpoints, None).await.unwrap()
}

async fn keys_with_prefix(c: &mut Client, prefix: &str) -> Vec<String> {
    c.get(
        prefix,
        Some(GetOptions::new().with_prefix().with_keys_only()),
    )
    .await
    .map(|r| {
        r.kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap_or("").to_string())
            .collect()
    })
    .unwrap_or_default()
}

fn policy(service: &str, timeout: &str) -> Vec<trellis_policies::PolicyDocument> {
    let yaml = format!(
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {{name: {service}}}\nspec: {{request_timeout: {timeout}}}\n"
    );
    parse_documents(&yaml, "test")
        .into_iter()
        .map(|d| d.unwrap())
        .collect()
}

async fn status_of(c: &client::HttpClient, uri: &str) -> u16 {
    match client::send(c, http::Request::get(uri).body(client::empty()).unwrap()).await {
        Ok(r) => r.status.as_u16(),
        Err(_) => 0,
    }
}

async fn dump(r: &Running) -> serde_json::Value {
    client::admin(r.bound.admin, "/config_dump").await.json()
}

struct EtcdMesh {
    etcd: EtcdCluster,
    pki: Pki,
    backend: Backend,
    server: Running,
    client: Running,
}

async fn etcd_mesh() -> EtcdMesh {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let server = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), |_| {}).await;
    let client = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), |_| {}).await;
    let c = client::h1(client.bound.outbound);
    wait_for(
        Duration::from_secs(10),
        "echo reachable through the mesh",
        || async { status_of(&c, "http://echo/echo").await == 200 },
    )
    .await;
    EtcdMesh {
        etcd,
        pki,
        backend,
        server,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_discovery_status_and_deregistration_on_shutdown() {
    let m = etcd_mesh().await;
    let mut etcd = etcd_client(m.etcd.endpoints()).await;
    let instances = keys_with_prefix(
        &mut etcd,
        &format!("{PREFIX}/mesh/services/echo/instances/"),
    )
    .await;
    assert_eq!(instances.len(), 1, "{instances:?}");

    // `mesh-agent status` shows both instances with their lease and converged revisions.
    let cfg = etcd_cfg(m.etcd.endpoints());
    wait_for(Duration::from_secs(5), "status converged", || async {
        let s = mesh_agent::policy::status(&cfg).await.unwrap();
        s.lines().filter(|l| l.ends_with(" yes")).count() == 2
    })
    .await;
    let s = mesh_agent::policy::status(&cfg).await.unwrap();
    assert!(s.contains("echo") && s.contains("client"), "{s}");

    let d = dump(&m.client).await;
    assert_eq!(d["etcd"]["discovery"]["connected"], true);
    assert!(d["snapshot"]["source"]
        .as_str()
        .unwrap()
        .starts_with("etcd:"));

    // Clean shutdown revokes the lease first: the key is gone at once, not after the TTL.
    m.server.shutdown_handle().shutdown();
    let start = Instant::now();
    wait_for(
        Duration::from_secs(1),
        "registration removed on shutdown",
        || {
            let mut etcd = etcd.clone();
            async move {
                keys_with_prefix(&mut etcd, &format!("{PREFIX}/mesh/services/echo/"))
                    .await
                    .is_empty()
            }
        },
    )
    .await;
    eprintln!("deregistered {:?} after shutdown", start.elapsed());
    let c = client::h1(m.client.bound.outbound);
    // With no instance left the service leaves the mesh state: 503 unknown-service.
    wait_for(
        Duration::from_secs(2),
        "client stops routing to the gone instance",
        || async {
            let r = client::get(&c, "http://echo/echo").await;
            r.status == 503 && r.cause() == "unknown-service"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_receives_traffic_within_a_second() {
    let m = etcd_mesh().await;
    let backend2 = Backend::start().await;
    let c = client::h1(m.client.bound.outbound);
    let started = Instant::now();
    let _second = etcd_sidecar(&m.pki, "echo", backend2.addr, m.etcd.endpoints(), |_| {}).await;
    let etcd = etcd_client(m.etcd.endpoints()).await;
    wait_for(Duration::from_secs(5), "second instance registered", || {
        let mut etcd = etcd.clone();
        async move {
            keys_with_prefix(
                &mut etcd,
                &format!("{PREFIX}/mesh/services/echo/instances/"),
            )
            .await
            .len()
                == 2
        }
    })
    .await;
    let registered = Instant::now();
    while backend2.requests.load(Ordering::Relaxed) == 0 {
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
        assert!(
            registered.elapsed() < Duration::from_secs(1),
            "new instance got no traffic within 1 s"
        );
    }
    eprintln!(
        "new instance: registered {:?} after start, first request {:?} after registration",
        registered - started,
        registered.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policy_is_rejected_and_the_last_good_one_kept() {
    let m = etcd_mesh().await;
    let cfg = etcd_cfg(m.etcd.endpoints());
    let report = mesh_agent::policy::apply(&cfg, &policy("echo", "300ms"), false)
        .await
        .unwrap();
    assert_eq!(report[0], "ServicePolicy/echo created", "{report:?}");
    let c = client::h1(m.client.bound.outbound);
    wait_for(Duration::from_secs(3), "policy timeout applied", || async {
        let r = client::get(&c, "http://echo/slow/1000").await;
        r.status == 504
    })
    .await;

    // Someone writes an invalid version straight into etcd (bypassing validation).
    let mut etcd = etcd_client(m.etcd.endpoints()).await;
    let bad = r#"{"apiVersion":"trellis.dev/v1","kind":"ServicePolicy","metadata":{"name":"echo"},"spec":{"request_timeout":"0s"}}"#;
    let key = format!("{PREFIX}/mesh/policies/ServicePolicy/echo");
    let rev = etcd
        .put(key.as_str(), bad, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    wait_for(
        Duration::from_secs(3),
        "rejection visible in /config_dump",
        || async {
            let d = dump(&m.client).await;
            d["etcd"]["discovery"]["rejected"][&key]["revision"] == rev
        },
    )
    .await;
    let d = dump(&m.client).await;
    let reason = d["etcd"]["discovery"]["rejected"][&key]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("request_timeout") && reason.contains("greater than zero"),
        "{reason}"
    );
    let text = client::admin(m.client.bound.admin, "/metrics").await.body;
    assert_eq!(
        metric(&text, "trellis_policy_rejected_total{kind=\"policy\"}"),
        1.0
    );
    assert_eq!(
        client::get(&c, "http://echo/slow/1000").await.status,
        504,
        "last good policy still applies"
    );

    // The CLI refuses the same invalid document before it reaches etcd.
    let docs = parse_documents(bad, "t");
    assert!(docs[0].as_ref().unwrap().validate().is_err());
    // And a valid change applies again.
    mesh_agent::policy::apply(&cfg, &policy("echo", "5s"), false)
        .await
        .unwrap();
    wait_for(Duration::from_secs(3), "new policy applied", || async {
        client::get(&c, "http://echo/slow/1000").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_under_traffic_drops_nothing_and_recovers() {
    let mut m = etcd_mesh().await;
    let load = Load::start(
        (0..2)
            .map(|_| client::h1(m.client.bound.outbound))
            .collect(),
        "http://echo/echo",
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    m.etcd.members[0].kill();
    // Longer than the 2 s lease TTL: leases cannot expire while etcd is down, and the sidecars
    // keep serving their last snapshot.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = dump(&m.client).await;
    assert_eq!(d["etcd"]["discovery"]["connected"], false);
    let text = client::admin(m.client.bound.admin, "/metrics").await.body;
    let stale = metric(&text, "trellis_etcd_state_staleness_seconds");
    // Lost within the watch's liveness bound after the kill, 3 s ago.
    assert!((0.5..3.5).contains(&stale), "staleness {stale}");
    m.etcd.members[0].restart().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.stop().await;
    eprintln!("{ok} requests while etcd was down and restarted, {failed} failed");
    assert_eq!(failed, 0);
    assert!(ok > 20);

    // After etcd returns, new policies apply.
    let cfg = etcd_cfg(m.etcd.endpoints());
    wait_for(Duration::from_secs(10), "apply after etcd restart", || {
        let cfg = cfg.clone();
        async move {
            mesh_agent::policy::apply(&cfg, &policy("echo", "300ms"), false)
                .await
                .is_ok()
        }
    })
    .await;
    let c = client::h1(m.client.bound.outbound);
    wait_for(
        Duration::from_secs(10),
        "policy applied after etcd restart",
        || async { client::get(&c, "http://echo/slow/1000").await.status == 504 },
    )
    .await;
    let _ = &m.backend;
}

/// Wait until the cache file holds `echo`'s instances. It is written at most once a second;
/// `echo` is learned on the first request.
async fn cache_holds_echo(cache: &std::path::Path) {
    wait_for(Duration::from_secs(3), "cache written", || async {
        std::fs::read_to_string(cache).is_ok_and(|c| c.contains("/services/echo/"))
    })
    .await;
}

fn cache_revision(path: &std::path::Path) -> Option<i64> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["revision"].as_i64()
}

/// The disk under the fail-static cache fills up: the sidecar keeps applying and serving the
/// newest state, says the file is behind (metric, `/config_dump`, the previous file intact and
/// no temporary file left), and writes the newest state by itself once there is room again,
/// with no further change in etcd to prompt it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_cache_is_reported_and_caught_up_when_room_returns() {
    let Some(disk) = SmallDisk::mount(256 * 1024) else {
        return;
    };
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let server = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), |_| {}).await;
    let cache = disk.path().join("client.cache.json");
    let file = cache.clone();
    let client = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), move |cfg| {
        if let Some(e) = cfg.store.etcd.as_mut() {
            e.cache_file = Some(file);
        }
    })
    .await;
    let c = client::h1(client.bound.outbound);
    wait_for(Duration::from_secs(10), "echo reachable", || async {
        status_of(&c, "http://echo/echo").await == 200
    })
    .await;
    cache_holds_echo(&cache).await;
    let before = cache_revision(&cache).expect("cache revision");

    disk.fill("filler");
    let cfg = etcd_cfg(etcd.endpoints());
    mesh_agent::policy::apply(&cfg, &policy("echo", "300ms"), false)
        .await
        .unwrap();
    // Applied and served although it cannot be persisted.
    wait_for(Duration::from_secs(5), "policy applied", || async {
        client::get(&c, "http://echo/slow/1000").await.status == 504
    })
    .await;
    wait_for(Duration::from_secs(5), "failed write reported", || async {
        let text = client::admin(client.bound.admin, "/metrics").await.body;
        metric(&text, "trellis_etcd_cache_write_failing") == 1.0
    })
    .await;
    let text = client::admin(client.bound.admin, "/metrics").await.body;
    assert!(
        metric(&text, "trellis_etcd_cache_writes_total{result=\"error\"}") >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "trellis_etcd_cache_revision"),
        before as f64,
        "the file's revision"
    );
    let d = dump(&client).await;
    let error = d["etcd"]["discovery"]["cache_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("No space left on device") && error.contains("client.cache.json"),
        "{error}"
    );
    assert_eq!(
        cache_revision(&cache),
        Some(before),
        "the previous file is intact"
    );
    let mut names: Vec<String> = std::fs::read_dir(disk.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["client.cache.json", "filler"],
        "no temporary file left"
    );
    assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);

    // Room again: the newest state lands without another change in etcd.
    std::fs::remove_file(disk.path().join("filler")).unwrap();
    let applied = metric(&text, "trellis_etcd_applied_revision") as i64;
    assert!(applied > before, "applied {applied}, cached {before}");
    wait_for(Duration::from_secs(10), "cache caught up", || {
        let cache = cache.clone();
        async move { cache_revision(&cache) == Some(applied) }
    })
    .await;
    let text = client::admin(client.bound.admin, "/metrics").await.body;
    assert_eq!(metric(&text, "trellis_etcd_cache_write_failing"), 0.0);
    assert_eq!(metric(&text, "trellis_etcd_cache_revision"), applied as f64);
    assert!(std::fs::read_to_string(&cache)
        .unwrap()
        .contains("ServicePolicy/echo"));
    let d = dump(&client).await;
    assert!(d["etcd"]["discovery"]["cache_error"].is_null(), "{d}");
    drop((client, server));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_restarted_while_etcd_is_down_starts_from_its_cache() {
    let mut m = etcd_mesh().await;
    let cache = m.pki.path().join("client.cache.json");
    cache_holds_echo(&cache).await;
    m.client.shutdown_handle().shutdown();
    m.etcd.members[0].kill();

    let restarted =
        etcd_sidecar(&m.pki, "client", m.backend.addr, m.etcd.endpoints(), |_| {}).await;
    wait_for(Duration::from_secs(10), "ready from cache", || async {
        client::admin(restarted.bound.admin, "/ready").await.status == 200
    })
    .await;
    let ready = client::admin(restarted.bound.admin, "/ready").await.body;
    assert!(ready.contains("serving from cache at revision"), "{ready}");
    let text = client::admin(restarted.bound.admin, "/metrics").await.body;
    assert_eq!(metric(&text, "trellis_etcd_serving_from_cache"), 1.0);
    // As old as the cache file: written before the kill, at least a few hundred ms ago.
    let stale = metric(&text, "trellis_etcd_state_staleness_seconds");
    assert!((0.0..30.0).contains(&stale), "staleness {stale}");
    let c = client::h1(restarted.bound.outbound);
    assert_eq!(
        client::get(&c, "http://echo/echo").await.status,
        200,
        "serves from the cached state"
    );

    // etcd comes back: the sidecar resyncs and stops reporting the cache.
    m.etcd.members[0].restart().await;
    wait_for(Duration::from_secs(10), "resynced with etcd", || async {
        !client::admin(restarted.bound.admin, "/ready")
            .await
            .body
            .contains("cache")
    })
    .await;
    // The re-read is published before the watch is opened on it; staleness is 0 once it is.
    wait_for(
        Duration::from_secs(5),
        "watch established again",
        || async {
            let text = client::admin(restarted.bound.admin, "/metrics").await.body;
            metric(&text, "trellis_etcd_state_staleness_seconds") == 0.0
        },
    )
    .await;
    assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    let _ = &m.server;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_a_member_dying_in_a_three_member_cluster() {
    init_logs();
    let mut etcd = EtcdCluster::start(3).await;
    let pki = Pki::new(&["client"]);
    let backend = Backend::start().await;
    // Scoped: the policies and the 20 declared services, each a watch on one stream.
    let client = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), |c| {
        if let Some(e) = c.store.etcd.as_mut() {
            e.discovery.dependencies = (0..2)
                .flat_map(|v| (0..10).map(move |i| format!("svc-{v}-{i}")))
                .collect();
        }
    })
    .await;
    wait_for(Duration::from_secs(10), "client ready", || async {
        client::admin(client.bound.admin, "/ready").await.status == 200
    })
    .await;
    for victim in [0usize, 1] {
        etcd.members[victim].kill();
        let alive: Vec<String> = etcd
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, m)| m.endpoint())
            .collect();
        let cfg = etcd_cfg(alive);
        for i in 0..10 {
            let svc = format!("svc-{victim}-{i}");
            wait_for(
                Duration::from_secs(10),
                "write through a live member",
                || {
                    let (cfg, svc) = (cfg.clone(), svc.clone());
                    async move {
                        mesh_agent::policy::apply(&cfg, &policy(&svc, "1s"), false)
                            .await
                            .is_ok()
                    }
                },
            )
            .await;
        }
        wait_for(
            Duration::from_secs(15),
            "every event seen after a member died",
            || async {
                let d = dump(&client).await;
                (0..10).all(|i| !d["snapshot"]["services"][format!("svc-{victim}-{i}")].is_null())
            },
        )
        .await;
        etcd.members[victim].restart().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_while_disconnected_is_handled_by_a_diff_resync() {
    init_logs();
    let mut etcd = EtcdCluster::start(3).await;
    let pki = Pki::new(&["client"]);
    let backend = Backend::start().await;
    // The sidecar only knows member 0 (and does not learn the others from the member list),
    // so killing it disconnects the sidecar.
    let only_m0 = vec![etcd.members[0].endpoint()];
    let client = etcd_sidecar(&pki, "client", backend.addr, only_m0, |c| {
        if let Some(e) = c.store.etcd.as_mut() {
            e.auto_sync_interval = Duration::ZERO;
            e.discovery.dependencies = ["old", "new-0", "new-1", "new-2", "new-3", "new-4"]
                .map(String::from)
                .to_vec();
        }
    })
    .await;
    let others = etcd_cfg(vec![etcd.members[1].endpoint(), etcd.members[2].endpoint()]);
    // Writes are retried throughout: under CPU load a 3-member cluster can be mid-election.
    wait_for(Duration::from_secs(10), "first write", || {
        let others = others.clone();
        async move {
            mesh_agent::policy::apply(&others, &policy("old", "1s"), false)
                .await
                .is_ok()
        }
    })
    .await;
    wait_for(Duration::from_secs(5), "first policy seen", || async {
        !dump(&client).await["snapshot"]["services"]["old"].is_null()
    })
    .await;
    let resyncs_before = dump(&client).await["etcd"]["discovery"]["resyncs"]
        .as_u64()
        .unwrap();

    etcd.members[0].kill();
    // The first writes may meet a leader election among the survivors: retry.
    wait_for(
        Duration::from_secs(10),
        "delete through a live member",
        || {
            let others = others.clone();
            async move {
                mesh_agent::policy::delete(&others, "ServicePolicy/old")
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    for i in 0..5 {
        wait_for(
            Duration::from_secs(10),
            "write through a live member",
            || {
                let others = others.clone();
                async move {
                    mesh_agent::policy::apply(&others, &policy(&format!("new-{i}"), "1s"), false)
                        .await
                        .is_ok()
                }
            },
        )
        .await;
    }
    let c = etcd_client(vec![etcd.members[1].endpoint(), etcd.members[2].endpoint()]).await;
    wait_for(Duration::from_secs(10), "compaction", || {
        let mut c = c.clone();
        async move {
            let Ok(r) = c.get("x", None).await else {
                return false;
            };
            let rev = r.header().map_or(0, |h| h.revision());
            c.compact(rev, None).await.is_ok()
        }
    })
    .await;
    etcd.members[0].restart().await;

    wait_for(
        Duration::from_secs(15),
        "state resynced after compaction",
        || async {
            let d = dump(&client).await;
            let s = &d["snapshot"]["services"];
            s["old"].is_null() && (0..5).all(|i| !s[format!("new-{i}")].is_null())
        },
    )
    .await;
    let resyncs = dump(&client).await["etcd"]["discovery"]["resyncs"]
        .as_u64()
        .unwrap();
    assert!(
        resyncs > resyncs_before,
        "a full re-read happened ({resyncs_before} -> {resyncs})"
    );
}

/// Revoke the lease of the first registration under `prefix` (what a partition longer than
/// the TTL does: the lease is gone and the key with it) and wait until it is registered again
/// under a new one.
async fn revoke_and_wait_for_a_new_lease(etcd: &mut Client, prefix: &str) {
    let resp = etcd
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let old_lease = resp.kvs()[0].lease();
    etcd.lease_revoke(old_lease).await.unwrap();
    wait_for(
        Duration::from_secs(5),
        "re-registered under a new lease",
        || {
            let (mut etcd, prefix) = (etcd.clone(), prefix.to_string());
            async move {
                let r = etcd
                    .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                    .await
                    .unwrap();
                r.kvs()
                    .first()
                    .is_some_and(|kv| kv.lease() != 0 && kv.lease() != old_lease)
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_replaced_by_a_new_registration() {
    let m = etcd_mesh().await;
    let mut etcd = etcd_client(m.etcd.endpoints()).await;
    let prefix = format!("{PREFIX}/mesh/services/echo/instances/");
    let start = Instant::now();
    revoke_and_wait_for_a_new_lease(&mut etcd, &prefix).await;
    eprintln!(
        "re-registered {:?} after the lease was revoked",
        start.elapsed()
    );
    let c = client::h1(m.client.bound.outbound);
    wait_for(Duration::from_secs(3), "traffic flows again", || async {
        status_of(&c, "http://echo/echo").await == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_waits_for_the_app_to_be_healthy() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["echo"]);
    // Bound but not served yet: connections wait in the backlog, health checks time out, and
    // no other test can take the port before the app starts.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_addr = reserved.local_addr().unwrap();
    let _sidecar = etcd_sidecar(&pki, "echo", app_addr, etcd.endpoints(), |c| {
        if let Some(e) = c.store.etcd.as_mut() {
            e.registration.app_health_path = Some("/echo".into());
        }
    })
    .await;
    let mut etcd_c = etcd_client(etcd.endpoints()).await;
    let prefix = format!("{PREFIX}/mesh/services/echo/");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        keys_with_prefix(&mut etcd_c, &prefix).await.is_empty(),
        "registered before the app was up"
    );
    let _app = Backend::start_from(reserved);
    wait_for(
        Duration::from_secs(5),
        "registered once the app is healthy",
        || {
            let (mut etcd_c, prefix) = (etcd_c.clone(), prefix.clone());
            async move { !keys_with_prefix(&mut etcd_c, &prefix).await.is_empty() }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_converges_after_re_registration_restart_and_compaction() {
    let mut m = etcd_mesh().await;
    let cfg = etcd_cfg(m.etcd.endpoints());
    let converged = |what: &'static str| {
        let cfg = cfg.clone();
        async move {
            let (table, ok) = mesh_agent::policy::status_wait(&cfg, Duration::from_secs(10))
                .await
                .expect("status");
            assert!(ok, "{what}: not converged:\n{table}");
            assert!(!table.contains(" no\n"), "{what}:\n{table}");
        }
    };
    mesh_agent::policy::apply(&cfg, &policy("echo", "2s"), false)
        .await
        .expect("apply");
    converged("after apply").await;

    // Re-registration with the same content: a lease lost and granted again.
    let mut etcd = etcd_client(m.etcd.endpoints()).await;
    let prefix = format!("{PREFIX}/mesh/services/echo/instances/");
    revoke_and_wait_for_a_new_lease(&mut etcd, &prefix).await;
    converged("after re-registration").await;

    // etcd restarted with its data.
    m.etcd.members[0].restart().await;
    converged("after an etcd restart").await;

    // History compacted up to now.
    let mut etcd = etcd_client(m.etcd.endpoints()).await;
    let rev = etcd
        .get("x", None)
        .await
        .unwrap()
        .header()
        .map_or(0, |h| h.revision());
    etcd.compact(rev, None).await.unwrap();
    converged("after compaction").await;
}
