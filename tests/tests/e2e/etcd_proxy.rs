//! Large fleets through etcd's own gRPC proxy (`etcd grpc-proxy start`, Debian's etcd 3.4): a
//! 3-member cluster, two proxies in front of it (each given every member), and sidecars given
//! only the proxies. Registration, discovery and `mesh-agent policy apply` / `status` work
//! through the proxies; the proxies coalesce the sidecars' watches; the cluster's leader dying
//! and then one proxy dying cost no registration and no request; no sidecar ever dials a
//! cluster member. The members send progress notifications every 2 s, which etcd 3.4's proxy
//! needs for quiet watches (docs/scale.md).

use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use mesh_agent::config::{AgentConfig, EtcdConfig};
use mesh_agent::testing::{EtcdCluster, EtcdGrpcProxy, ProxyMembers};
use trellis_proxy::app::Running;
use trellis_tests::backend::Backend;
use trellis_tests::{client, etcd_sidecar, init_logs, wait_for, Pki};

const INSTANCES: &str = "/trellis/v1/mesh/services/";
/// Where the proxies register themselves (`--resolver-prefix`), so that `MemberList` through
/// any of them names the proxies, not the cluster's members.
const PROXY_PREFIX: &str = "/trellis-grpc-proxies";
/// Sidecars besides `echo` and `client`.
const OTHERS: usize = 5;

async fn dump(r: &Running) -> serde_json::Value {
    client::admin(r.bound.admin, "/config_dump").await.json()
}

/// The CLI's configuration: the given proxies only.
fn cli(endpoints: Vec<String>) -> EtcdConfig {
    let mut c = EtcdConfig::new(endpoints);
    c.timeout = Duration::from_secs(2);
    c
}

fn policy(timeout: &str) -> Vec<trellis_policies::PolicyDocument> {
    let yaml = format!(
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {{name: echo}}\nspec: {{request_timeout: {timeout}}}\n"
    );
    trellis_policies::parse_documents(&yaml, "test")
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .expect("policy")
}

/// Registered instances (key -> lease), read from the cluster itself.
async fn registrations(etcd: &EtcdCluster) -> Vec<(String, i64)> {
    let mut c = Client::connect(etcd.live_endpoints(), None)
        .await
        .expect("etcd client");
    let resp = tokio::time::timeout(
        Duration::from_secs(5),
        c.get(INSTANCES, Some(GetOptions::new().with_prefix())),
    )
    .await
    .expect("read in time")
    .expect("read");
    resp.kvs()
        .iter()
        .filter(|kv| kv.key_str().is_ok_and(|k| k.contains("/instances/")))
        .map(|kv| (kv.key_str().unwrap_or("?").to_string(), kv.lease()))
        .collect()
}

/// Watchers on all members (`etcd_debugging_mvcc_watcher_total`).
async fn server_watchers(etcd: &EtcdCluster) -> f64 {
    let mut total = 0.0;
    for m in &etcd.members {
        let text = mesh_agent::testing::http_get(m.metrics_port, "/metrics")
            .await
            .expect("member metrics");
        total += client::metric(&text, "etcd_debugging_mvcc_watcher_total");
    }
    total
}

struct ProxyMesh {
    etcd: EtcdCluster,
    proxies: Vec<EtcdGrpcProxy>,
    _pki: Pki,
    backend: Backend,
    echo: Running,
    client: Running,
    /// More sidecars watching the same keys, through the same proxies.
    others: Vec<Running>,
    /// Watchers on the members before any sidecar started (the proxies' own).
    watchers_before: f64,
}

impl ProxyMesh {
    async fn start() -> Self {
        init_logs();
        // etcd 3.4's proxy never answers a watch progress request: without progress
        // notifications from the members, a quiet watch hears nothing and the sidecar takes
        // it for dead after 6 s (docs/scale.md).
        let etcd = EtcdCluster::start_with_args(
            3,
            &["--experimental-watch-progress-notify-interval", "2s"],
        )
        .await;
        let members = ProxyMembers::Registered(PROXY_PREFIX.into());
        let proxies = vec![
            EtcdGrpcProxy::start(etcd.endpoints(), members.clone()).await,
            EtcdGrpcProxy::start(etcd.endpoints(), members).await,
        ];
        let endpoints: Vec<String> = proxies.iter().map(EtcdGrpcProxy::endpoint).collect();
        let watchers_before = server_watchers(&etcd).await;
        let pki = Pki::new(&["client", "echo", "other"]);
        let backend = Backend::start().await;
        let tweak = |c: &mut AgentConfig| {
            if let Some(e) = c.store.etcd.as_mut() {
                e.lease_ttl = Duration::from_secs(6);
                e.auto_sync_interval = Duration::from_secs(1);
            }
        };
        let echo = etcd_sidecar(&pki, "echo", backend.addr, endpoints.clone(), tweak).await;
        let client = etcd_sidecar(&pki, "client", backend.addr, endpoints.clone(), |c| {
            tweak(c);
            if let Some(e) = c.store.etcd.as_mut() {
                e.discovery.dependencies = vec!["echo".into()];
            }
        })
        .await;
        let mut others = Vec::new();
        for i in 0..OTHERS {
            let cache = pki.path().join(format!("other-{i}.cache.json"));
            let r = etcd_sidecar(&pki, "other", backend.addr, endpoints.clone(), |c| {
                tweak(c);
                if let Some(e) = c.store.etcd.as_mut() {
                    e.cache_file = Some(cache);
                }
            })
            .await;
            others.push(r);
        }
        Self {
            etcd,
            proxies,
            _pki: pki,
            backend,
            echo,
            client,
            others,
            watchers_before,
        }
    }

    fn sidecars(&self) -> impl Iterator<Item = &Running> {
        [&self.echo, &self.client].into_iter().chain(&self.others)
    }

    fn proxy_endpoints(&self) -> Vec<String> {
        self.proxies.iter().map(EtcdGrpcProxy::endpoint).collect()
    }

    /// A request from the client sidecar's outbound reaches echo's backend.
    async fn assert_reaches_echo(&self, what: &str) {
        let before = self.backend.requests.load(Ordering::Relaxed);
        let c = client::h1(self.client.bound.outbound);
        let r = client::get(&c, "http://echo/echo").await;
        assert_eq!(r.status, 200, "{what}: {} {}", r.cause(), r.body);
        assert!(
            self.backend.requests.load(Ordering::Relaxed) > before,
            "{what}: echo's backend served it"
        );
    }

    /// Apply echo's request timeout through `via`, wait (through `via` too) until every
    /// sidecar's status key reports the new mesh revision, and check the timeout is enforced.
    async fn apply_and_converge(&self, via: Vec<String>, timeout: &str, slow_status: u16) {
        let cfg = cli(via);
        mesh_agent::policy::apply(&cfg, &policy(timeout), false)
            .await
            .unwrap_or_else(|e| panic!("apply {timeout} through a proxy: {e}"));
        let (table, converged) = mesh_agent::policy::status_wait(&cfg, Duration::from_secs(10))
            .await
            .expect("status through a proxy");
        assert!(
            converged,
            "request_timeout {timeout}: not converged:\n{table}"
        );
        assert_eq!(
            table.lines().filter(|l| l.ends_with(" yes")).count(),
            2 + OTHERS,
            "both sidecars on the new revision:\n{table}"
        );
        let c = client::h1(self.client.bound.outbound);
        wait_for(
            Duration::from_secs(5),
            "the new request timeout enforced",
            || async { client::get(&c, "http://echo/slow/1000").await.status == slow_status },
        )
        .await;
    }

    /// Every sidecar registered on its first lease, its watch connected, watch and
    /// registration reconnected at most `reconnects` times, and nothing but the proxies known
    /// to it or dialled by it.
    async fn assert_healthy(&self, what: &str, reconnects: u64) {
        let proxies = self.proxy_endpoints();
        for r in self.sidecars() {
            wait_for(Duration::from_secs(10), "watch connected", || async {
                dump(r).await["etcd"]["discovery"]["connected"] == true
            })
            .await;
            let d = dump(r).await;
            let reg = &d["etcd"]["registration"];
            let restarts = d["etcd"]["discovery"]["watch_restarts"].as_u64();
            assert!(
                restarts.is_some_and(|n| n <= reconnects),
                "{what}: watch restarts: {}",
                d["etcd"]["discovery"]
            );
            // Keepalives answered late by the proxy must not end the connection.
            assert!(
                reg["reconnects"].as_u64().is_some_and(|n| n <= reconnects),
                "{what}: registration reconnects: {reg}"
            );
            assert_eq!(reg["registered"], true, "{what}: {reg}");
            assert_eq!(
                reg["registrations"], 1,
                "{what}: one lease throughout: {reg}"
            );
            let ep = reg["endpoint"].as_str().unwrap_or_default().to_string();
            assert!(proxies.contains(&ep), "{what}: registered through {ep}");
        }
        let known = mesh_agent::etcd::endpoints::book(&proxies).known();
        assert_eq!(known, proxies, "{what}: only the proxies are known");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_behind_two_grpc_proxies_survive_the_leader_and_a_proxy_dying() {
    let mut m = ProxyMesh::start().await;
    wait_for(Duration::from_secs(15), "echo routed", || async {
        dump(&m.client).await["snapshot"]["services"]["echo"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    m.assert_reaches_echo("through the proxies").await;
    let leases = registrations(&m.etcd).await;
    assert_eq!(
        leases.len(),
        2 + OTHERS,
        "every sidecar registered: {leases:?}"
    );

    // The CLI through the first proxy; sidecars converge.
    m.apply_and_converge(vec![m.proxies[0].endpoint()], "300ms", 504)
        .await;
    // Idle for a few progress intervals: the watches must stay up.
    tokio::time::sleep(Duration::from_secs(7)).await;
    m.assert_healthy("idle", 0).await;
    // Coalescing: each sidecar watches the policies and its service's rate-limit demand table,
    // and the client also echo's instances (its dependency): 5 distinct ranges (the policies,
    // three demand tables, echo's instances). The members see at most one watcher per range
    // per proxy, not one per sidecar watch.
    let added = server_watchers(&m.etcd).await - m.watchers_before;
    let sidecar_watches = (2 * (2 + OTHERS) + 1) as f64;
    let ranges = 5.0;
    eprintln!(
        "{sidecar_watches} sidecar watches on {ranges} ranges cost the members {added} watchers"
    );
    assert!(
        added <= ranges * m.proxies.len() as f64,
        "{sidecar_watches} sidecar watches coalesced: {added} watchers on the members"
    );

    // The cluster's leader dies: the proxies move to the other members.
    let leader = m.etcd.leader().await.expect("a leader");
    m.etcd.members[leader].kill();
    m.apply_and_converge(m.proxy_endpoints(), "5s", 200).await;
    m.assert_reaches_echo("leader killed").await;
    m.assert_healthy("leader killed", 0).await;
    assert_eq!(registrations(&m.etcd).await, leases, "the same leases");

    // The proxy echo registered through dies: every sidecar moves to the other one.
    let ep = dump(&m.echo).await["etcd"]["registration"]["endpoint"]
        .as_str()
        .map(str::to_string)
        .expect("registration endpoint");
    let dead = m
        .proxies
        .iter()
        .position(|p| p.endpoint() == ep)
        .expect("a proxy");
    let live = m.proxies[1 - dead].endpoint();
    m.proxies[dead].kill();
    for r in m.sidecars() {
        wait_for(
            Duration::from_secs(10),
            "registration on the live proxy",
            || async {
                let reg = &dump(r).await["etcd"]["registration"];
                reg["endpoint"] == live.as_str() && reg["registered"] == true
            },
        )
        .await;
    }
    m.apply_and_converge(vec![live.clone()], "300ms", 504).await;
    m.assert_reaches_echo("a proxy killed").await;
    m.assert_healthy("a proxy killed", 1).await;
    assert_eq!(registrations(&m.etcd).await, leases, "the same leases");
    assert!(
        m.proxies[1 - dead].is_running(),
        "{}",
        m.proxies[1 - dead].log()
    );
}

/// What `MemberList` through etcd 3.4's gRPC proxy answers, and what a sidecar learns from it
/// (`store.etcd.auto_sync_interval`): never a cluster member, whatever the proxy's flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_lists_through_grpc_proxies_never_lead_sidecars_to_the_members() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let member = etcd.endpoint();
    let prefix = "/trellis-grpc-proxies-members";
    let default = EtcdGrpcProxy::start(etcd.endpoints(), ProxyMembers::Default).await;
    let forwarded = EtcdGrpcProxy::start(etcd.endpoints(), ProxyMembers::Forwarded).await;
    let registered = [
        EtcdGrpcProxy::start(etcd.endpoints(), ProxyMembers::Registered(prefix.into())).await,
        EtcdGrpcProxy::start(etcd.endpoints(), ProxyMembers::Registered(prefix.into())).await,
    ];
    let listed = |endpoint: String| async move {
        let mut c = Client::connect([endpoint], None).await.expect("client");
        let mut urls: Vec<String> = tokio::time::timeout(Duration::from_secs(5), c.member_list())
            .await
            .expect("member list in time")
            .expect("member list")
            .members()
            .iter()
            .flat_map(|m| m.client_urls().iter().cloned())
            .collect();
        urls.sort();
        urls
    };
    // etcd's default --advertise-client-url, not where the proxy listens.
    assert_eq!(listed(default.endpoint()).await, ["127.0.0.1:23790"]);
    // An empty one: the cluster's members.
    assert_eq!(listed(forwarded.endpoint()).await, [member]);
    // --resolver-prefix: every proxy registered there (without a scheme, as advertised).
    let mut both: Vec<String> = registered
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect();
    both.sort();
    wait_for(
        Duration::from_secs(10),
        "both proxies registered",
        || async { listed(registered[0].endpoint()).await == both },
    )
    .await;

    // A sidecar's connection learns members when it connects (the first sync is due).
    let learned = |endpoints: Vec<String>| async move {
        let mut cfg = cli(endpoints.clone());
        cfg.auto_sync_interval = Duration::from_millis(1);
        let _etcd = mesh_agent::etcd::Etcd::connect(&cfg)
            .await
            .expect("connect");
        mesh_agent::etcd::endpoints::book(&endpoints).known()
    };
    assert_eq!(
        learned(vec![default.endpoint()]).await,
        [default.endpoint()]
    );
    assert_eq!(
        learned(vec![forwarded.endpoint()]).await,
        [forwarded.endpoint()]
    );
    // Only the first registered proxy configured: the second is learned from it.
    assert_eq!(
        learned(vec![registered[0].endpoint()]).await,
        [registered[0].endpoint(), registered[1].endpoint()]
    );
}
