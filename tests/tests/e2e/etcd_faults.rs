//! No etcd fault may cost requests: a 3-member cluster loses its leader, a follower, the
//! member the sidecars talk to, has a member replaced, runs out of space, or has its leader
//! paused, while a client sidecar sends traffic to two instances of `echo`. Each case asserts
//! 0 failed requests, the instances' registrations never deleted (the same lease kept
//! throughout), and every sidecar back on a live member.

use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions};
use mesh_agent::testing::EtcdCluster;
use trellis_proxy::app::Running;
use trellis_tests::backend::Backend;
use trellis_tests::{client, etcd_sidecar, init_logs, wait_for, Load, Pki};

const PREFIX: &str = "/trellis/v1";
const INSTANCES: &str = "/trellis/v1/mesh/services/echo/instances/";

struct FaultMesh {
    etcd: EtcdCluster,
    _pki: Pki,
    _backends: Vec<Backend>,
    echo: Vec<Running>,
    client: Running,
    start_revision: i64,
}

async fn dump(r: &Running) -> serde_json::Value {
    client::admin(r.bound.admin, "/config_dump").await.json()
}

/// A client connected to every running member (etcd-client waits on a dead one).
async fn etcd_client(etcd: &EtcdCluster) -> Client {
    Client::connect(etcd.live_endpoints(), None)
        .await
        .expect("etcd client")
}

impl FaultMesh {
    async fn start(etcd: EtcdCluster, lease_ttl: Duration) -> Self {
        init_logs();
        let pki = Pki::new(&["client", "echo"]);
        let mut backends = Vec::new();
        let mut echo = Vec::new();
        let tweak = |c: &mut mesh_agent::config::AgentConfig| {
            if let Some(e) = c.store.etcd.as_mut() {
                e.lease_ttl = lease_ttl;
                e.auto_sync_interval = Duration::from_secs(1);
                e.discovery.dependencies = vec!["echo".into()];
            }
        };
        for _ in 0..2 {
            let b = Backend::start().await;
            echo.push(etcd_sidecar(&pki, "echo", b.addr, etcd.endpoints(), tweak).await);
            backends.push(b);
        }
        let client = etcd_sidecar(&pki, "client", backends[0].addr, etcd.endpoints(), tweak).await;
        wait_for(Duration::from_secs(15), "both instances routed", || async {
            dump(&client).await["snapshot"]["services"]["echo"]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 2)
        })
        .await;
        let mut c = Client::connect(etcd.endpoints(), None)
            .await
            .expect("etcd client");
        // A loaded machine can see an election while the cluster settles ("leader changed"):
        // the harness's own read retries; what the test measures starts after it.
        let mut tries = 0;
        let start_revision = loop {
            match c.get("x", None).await {
                Ok(r) => break r.header().map_or(0, |h| h.revision()),
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("harness read retried: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("read: {e}"),
            }
        };
        Self {
            etcd,
            _pki: pki,
            _backends: backends,
            echo,
            client,
            start_revision,
        }
    }

    fn load(&self) -> Load {
        Load::start(
            (0..2)
                .map(|_| client::h1(self.client.bound.outbound))
                .collect(),
            "http://echo/echo",
        )
    }

    /// SIGSTOP the leader for `pause`, then let it run and the cluster settle for 2 s.
    async fn pause_leader(&self, pause: Duration) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let leader = self.etcd.leader().await.expect("a leader");
        self.etcd.members[leader].pause();
        tokio::time::sleep(pause).await;
        self.etcd.members[leader].resume();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    /// The member index the first echo sidecar's registration talks to.
    async fn connected_member(&self) -> usize {
        let ep = dump(&self.echo[0]).await["etcd"]["registration"]["endpoint"]
            .as_str()
            .map(str::to_string)
            .expect("registration endpoint");
        self.etcd
            .members
            .iter()
            .position(|m| m.endpoint() == ep)
            .expect("a member of the cluster")
    }

    /// Every DELETE of an instance key since the mesh started (replayed from etcd's history).
    async fn instance_deletes(&self) -> Vec<String> {
        let mut c = etcd_client(&self.etcd).await;
        // The cluster may still be electing after the fault ("leader changed"): the harness's
        // own read retries, within a bound, what a client of etcd would retry.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let head = loop {
            match tokio::time::timeout(Duration::from_secs(5), c.get("x", None)).await {
                Ok(Ok(resp)) => break resp.header().map_or(0, |h| h.revision()),
                Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                    eprintln!("reading the head revision: {e}; again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(Err(e)) => panic!("read: {e}"),
                Err(_) => panic!("read in time"),
            }
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.start_revision + 1)
            .with_progress_notify();
        let mut stream = c.watch(INSTANCES, Some(opts)).await.expect("watch");
        let mut deletes = Vec::new();
        let replay = async {
            while let Ok(Some(resp)) = stream.message().await {
                for ev in resp.events() {
                    if ev.event_type() == EventType::Delete {
                        if let Some(kv) = ev.kv() {
                            deletes.push(kv.key_str().unwrap_or("?").to_string());
                        }
                    }
                }
                if resp
                    .events()
                    .iter()
                    .filter_map(|e| e.kv())
                    .any(|kv| kv.mod_revision() >= head)
                {
                    break;
                }
            }
        };
        // Past events arrive at once; the bound only ends the replay.
        let _ = tokio::time::timeout(Duration::from_secs(2), replay).await;
        deletes
    }

    /// The end of every case: no failed request, no registration deleted, each echo sidecar
    /// on its first lease and registered, every sidecar's watch connected.
    /// Every request served and every watch connected again.
    async fn assert_served(&self, load: Load, what: &str) {
        // Let everything settle on live members before stopping the traffic.
        wait_for(
            Duration::from_secs(15),
            "watches connected again",
            || async {
                let mut all = true;
                for r in self.echo.iter().chain(std::iter::once(&self.client)) {
                    all &= dump(r).await["etcd"]["discovery"]["connected"] == true;
                }
                all
            },
        )
        .await;
        let (ok, failed) = load.stop().await;
        eprintln!("{what}: {ok} requests ok, {failed} failed");
        assert!(ok > 100, "{what}: traffic flowed ({ok})");
        assert_eq!(failed, 0, "{what}: no request failed");
    }

    /// [`Self::assert_served`], and no registration deleted: one lease per instance throughout.
    async fn assert_unharmed(&self, load: Load, what: &str) {
        self.assert_served(load, what).await;
        let deletes = self.instance_deletes().await;
        assert!(
            deletes.is_empty(),
            "{what}: registrations of live instances deleted: {deletes:?}"
        );
        for r in &self.echo {
            let reg = &dump(r).await["etcd"]["registration"];
            assert_eq!(reg["registered"], true, "{what}: {reg}");
            assert_eq!(
                reg["registrations"], 1,
                "{what}: one lease throughout: {reg}"
            );
        }
    }
}

async fn fault_mesh() -> FaultMesh {
    FaultMesh::start(EtcdCluster::start(3).await, Duration::from_secs(3)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_killed_costs_nothing() {
    let mut m = fault_mesh().await;
    let load = m.load();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = m.etcd.leader().await.expect("a leader");
    let dead_first: Vec<String> = {
        let mut e = m.etcd.endpoints();
        e.rotate_left(leader);
        e
    };
    m.etcd.members[leader].kill();
    // The CLI works while a quorum lives, with the dead member listed first.
    let cfg = mesh_agent::config::EtcdConfig {
        timeout: Duration::from_secs(1),
        ..mesh_agent::config::EtcdConfig::new(dead_first)
    };
    let policy = trellis_policies::parse_documents(
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {name: other}\nspec: {request_timeout: 5s}\n",
        "cli",
    )
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .expect("policy");
    for i in 0..10 {
        let started = std::time::Instant::now();
        mesh_agent::policy::status(&cfg)
            .await
            .unwrap_or_else(|e| panic!("status {i} with a dead member listed: {e}"));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "status {i} in time"
        );
    }
    mesh_agent::policy::apply(&cfg, &policy, false)
        .await
        .expect("apply with a dead member listed");
    tokio::time::sleep(Duration::from_secs(4)).await;
    m.etcd.members[leader].restart().await;
    m.assert_unharmed(load, "leader killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_costs_nothing() {
    let mut m = fault_mesh().await;
    let load = m.load();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let leader = m.etcd.leader().await.expect("a leader");
    let follower = (leader + 1) % 3;
    m.etcd.members[follower].kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    m.etcd.members[follower].restart().await;
    m.assert_unharmed(load, "follower killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connected_member_killed_costs_nothing() {
    let mut m = fault_mesh().await;
    let load = m.load();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected = m.connected_member().await;
    m.etcd.members[connected].kill();
    // The sidecars move to a live member within 2 s.
    wait_for(
        Duration::from_secs(2),
        "registration on another member",
        || async {
            let reg = &dump(&m.echo[0]).await["etcd"]["registration"];
            reg["endpoint"] != m.etcd.members[connected].endpoint().as_str()
                && reg["registered"] == true
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    m.etcd.members[connected].restart().await;
    m.assert_unharmed(load, "connected member killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_paused_costs_nothing() {
    // Leases of the default 10 s outlive the pause: the sidecars keep them alive through the
    // other members, and the resumed leader finds nothing expired.
    let m = FaultMesh::start(EtcdCluster::start(3).await, Duration::from_secs(10)).await;
    let load = m.load();
    m.pause_leader(Duration::from_secs(5)).await;
    m.assert_unharmed(load, "leader paused 5 s").await;
}

/// A pause longer than the lease TTL: etcd 3.4's resumed leader revokes the leases it thinks
/// expired (etcd-io/etcd#12528), deleting live instances' registrations. Peers keep those
/// instances (they still answer) while their owners register again: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_longer_than_a_lease_costs_no_request() {
    let m = fault_mesh().await;
    let load = m.load();
    m.pause_leader(Duration::from_secs(5)).await;
    m.assert_served(load, "leader paused 5 s, 3 s leases").await;
    let deletes = m.instance_deletes().await;
    eprintln!("registrations deleted by the resumed leader: {deletes:?}");
    if !deletes.is_empty() {
        let text = client::admin(m.client.bound.admin, "/metrics").await.body;
        assert!(
            client::metric(&text, "trellis_etcd_retained_total") >= 1.0,
            "deleted registrations {deletes:?} were retained while they answered"
        );
    }
    for r in &m.echo {
        wait_for(Duration::from_secs(10), "registered again", || async {
            dump(r).await["etcd"]["registration"]["registered"] == true
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_replaced_are_found_without_a_configuration_change() {
    let mut m = fault_mesh().await;
    let load = m.load();
    // Two of three members replaced on new addresses; the sidecars were configured with the
    // original three and learn the new ones from the member list.
    for i in [0, 1] {
        m.etcd.replace(i).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    // The last original member goes too: only learned members are left to talk to.
    m.etcd.members[2].kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    m.assert_unharmed(load, "members replaced").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_out_of_space_keeps_registrations_and_traffic() {
    // A 4 MiB quota is reached in a second with 64 KiB values.
    let etcd = EtcdCluster::start_with_args(3, &["--quota-backend-bytes", "4194304"]).await;
    // A 6 s lease (the other fault tests use 3 s): filling the quota keeps three members on two
    // cores busy writing, and a quorum that stalls for more than a short TTL really does
    // expire leases; what is under test is that NOSPACE itself costs none.
    let ttl = Duration::from_secs(6);
    let m = FaultMesh::start(etcd, ttl).await;
    let cfg = mesh_agent::testing::EtcdCluster::config(&m.etcd, None, None);
    // A policy to delete later: deletions are allowed under NOSPACE and are mesh changes.
    let probe = trellis_policies::parse_documents(
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {name: echo}\nspec: {request_timeout: 5s}\n",
        "probe",
    )
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .expect("probe policy");
    mesh_agent::policy::apply(&cfg, &probe, false)
        .await
        .expect("apply probe");
    let load = m.load();
    let mut c = etcd_client(&m.etcd).await;
    let filler = vec![b'x'; 64 * 1024];
    let mut i = 0;
    loop {
        match c.put(format!("/filler/{i}"), filler.clone(), None).await {
            Ok(_) => i += 1,
            Err(e) if e.to_string().contains("database space exceeded") => break,
            Err(e) => panic!("filling etcd: {e}"),
        }
        assert!(i < 1000, "etcd never ran out of space");
    }
    // A mesh change under NOSPACE: every sidecar's status write now fails.
    c.delete(format!("{PREFIX}/mesh/policies/ServicePolicy/echo"), None)
        .await
        .expect("deletes are allowed under NOSPACE");
    wait_for(Duration::from_secs(5), "the alarm reported", || async {
        let text = client::admin(m.echo[0].bound.admin, "/metrics").await.body;
        client::metric(&text, "trellis_etcd_no_space") == 1.0
    })
    .await;
    let ready = client::admin(m.echo[0].bound.admin, "/ready").await;
    assert_eq!(ready.status, 200, "still ready: {}", ready.body);
    assert!(ready.body.contains("out of space"), "{}", ready.body);
    let err = mesh_agent::policy::apply(&cfg, &probe, false)
        .await
        .expect_err("no write under NOSPACE")
        .to_string();
    assert!(
        err.contains("out of space") && err.contains("alarm disarm"),
        "{err}"
    );
    // Several lease TTLs under the alarm.
    tokio::time::sleep(ttl * 5 / 2).await;

    // The way out: delete, compact, defragment, disarm.
    c.delete(
        "/filler/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .expect("delete filler");
    let rev = c
        .get("x", None)
        .await
        .expect("read")
        .header()
        .map_or(0, |h| h.revision());
    c.compact(rev, None).await.expect("compact");
    for member in &m.etcd.members {
        let mut one = Client::connect([member.endpoint()], None)
            .await
            .expect("member");
        one.defragment().await.expect("defragment");
    }
    // `etcdctl alarm disarm`: each raised alarm deactivated by its member.
    let raised = c
        .alarm(
            etcd_client::AlarmAction::Get,
            etcd_client::AlarmType::None,
            None,
        )
        .await
        .expect("alarm list");
    for a in raised.alarms() {
        let mut opts = etcd_client::AlarmOptions::new();
        opts.with_member(a.member_id());
        c.alarm(
            etcd_client::AlarmAction::Deactivate,
            etcd_client::AlarmType::Nospace,
            Some(opts),
        )
        .await
        .expect("alarm disarm");
    }
    wait_for(Duration::from_secs(10), "writes accepted again", || async {
        let text = client::admin(m.echo[0].bound.admin, "/metrics").await.body;
        client::metric(&text, "trellis_etcd_no_space") == 0.0
    })
    .await;
    m.assert_unharmed(load, "NOSPACE").await;
}
