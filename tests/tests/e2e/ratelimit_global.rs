//! A global rate limit shared by three `orders` sidecars through a real etcd: uneven demand,
//! a sidecar crashing (its lease expires), and etcd going away for 10 s.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mesh_agent::testing::EtcdCluster;
use trellis_policies::parse_documents;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::crash::CrashableSidecar;
use trellis_tests::paced::Paced;
use trellis_tests::{etcd_sidecar_config, init_logs, wait_for, Pki, Sidecar};

/// The global limit, requests per second.
const LIMIT: f64 = 100.0;

fn policy_yaml() -> String {
    format!(
        "apiVersion: trellis.dev/v1\nkind: RateLimitPolicy\nmetadata: {{name: orders-global}}\n\
         spec: {{service: orders, scope: global, limit: {{requests: {LIMIT}, per: second}}, burst: 10}}\n"
    )
}

/// Requests the apps behind the sidecars have served.
fn admitted(backends: &[Backend]) -> u64 {
    backends.iter().map(|b| b.requests.load(Relaxed)).sum()
}

/// Admitted requests per second over `window`.
async fn rate_over(backends: &[Backend], window: Duration) -> f64 {
    let before = admitted(backends);
    tokio::time::sleep(window).await;
    (admitted(backends) - before) as f64 / window.as_secs_f64()
}

async fn sharing(admin: std::net::SocketAddr) -> serde_json::Value {
    client::admin(admin, "/config_dump").await.json()["etcd"]["rate_limit_sharing"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limit_is_shared_rebalanced_after_a_crash_and_bounded_without_etcd() {
    init_logs();
    let mut etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["client", "orders"]);
    let mut backends = Vec::new();
    let mut orders = Vec::new();
    for i in 0..3 {
        let b = Backend::start().await;
        let mut cfg = etcd_sidecar_config(&pki, "orders", b.addr, etcd.endpoints());
        if let Some(e) = cfg.store.etcd.as_mut() {
            e.cache_file = Some(pki.path().join(format!("orders-{i}.cache.json")));
        }
        orders.push(CrashableSidecar::start(cfg));
        backends.push(b);
    }
    let docs: Vec<_> = parse_documents(&policy_yaml(), "test")
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    mesh_agent::policy::apply(&cfg, &docs, false).await.unwrap();

    // One caller per instance, so each instance sees its own demand: 60 / 30 / 10 % of 1.5 L.
    let mut clients = Vec::new();
    for o in &orders {
        let c = Sidecar::start(&pki, "client", backends[0].addr, |_| {}).await;
        c.route(&[("orders", &[o.bound.inbound])]).await;
        clients.push(c);
    }
    let demand = [0.9 * LIMIT, 0.45 * LIMIT, 0.15 * LIMIT];
    let mut loads: Vec<_> = clients
        .iter()
        .zip(demand)
        .map(|(c, d)| Paced::start(client::h1(c.outbound()), "http://orders/echo", d))
        .collect();
    for o in &orders {
        wait_for(Duration::from_secs(15), "three peers sharing", || async {
            sharing(o.bound.admin).await["peers"] == 3
        })
        .await;
    }
    // Let the demand averages settle, then measure over 20 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady = rate_over(&backends, Duration::from_secs(20)).await;
    eprintln!("steady: admitted {steady:.1}/s for a limit of {LIMIT}/s");
    for o in &orders {
        eprintln!("  {}", sharing(o.bound.admin).await);
    }
    assert!(
        (0.9 * LIMIT..=1.1 * LIMIT).contains(&steady),
        "admitted {steady}/s, limit {LIMIT}/s"
    );

    // The 10 % caller's instance crashes: its lease expires after the 2 s TTL and the two
    // others split the limit (their demand, 135/s, exceeds it).
    orders[2].crash();
    let crashed = Instant::now();
    if let Some(l) = loads.pop() {
        l.stop().await;
    }
    wait_for(
        Duration::from_secs(10),
        "survivors see two peers",
        || async {
            sharing(orders[0].bound.admin).await["peers"] == 2
                && sharing(orders[1].bound.admin).await["peers"] == 2
        },
    )
    .await;
    eprintln!("peers down to 2 after {:?}", crashed.elapsed());
    // Lease TTL + 2 s after the crash the total is back at the limit.
    let settle = Duration::from_secs(4).saturating_sub(crashed.elapsed());
    tokio::time::sleep(settle).await;
    let after_crash = rate_over(&backends, Duration::from_secs(6)).await;
    eprintln!("after the crash: admitted {after_crash:.1}/s");
    assert!(
        (0.9 * LIMIT..=1.1 * LIMIT).contains(&after_crash),
        "admitted {after_crash}/s after a sidecar crashed, limit {LIMIT}/s"
    );

    // etcd goes away for 10 s: the sidecars keep their shares, then decay towards L / N; the
    // total never exceeds 1.1 L.
    etcd.members[0].kill();
    let mut worst: f64 = 0.0;
    for _ in 0..5 {
        worst = worst.max(rate_over(&backends, Duration::from_secs(2)).await);
    }
    eprintln!("etcd down 10 s: worst 2 s window {worst:.1}/s");
    assert!(
        worst <= 1.1 * LIMIT,
        "admitted {worst}/s without etcd, limit {LIMIT}/s"
    );
    etcd.members[0].restart().await;
    let reconnected = Instant::now();
    wait_for(Duration::from_secs(15), "sharing reconnected", || async {
        sharing(orders[0].bound.admin).await["connected"] == true
    })
    .await;
    eprintln!(
        "sharing reconnected {:?} after etcd came back",
        reconnected.elapsed()
    );
    let after_outage = rate_over(&backends, Duration::from_secs(4)).await;
    eprintln!("after the outage: admitted {after_outage:.1}/s");
    assert!(
        (0.85 * LIMIT..=1.1 * LIMIT).contains(&after_outage),
        "admitted {after_outage}/s after etcd returned"
    );

    for l in loads {
        let c = l.counts.clone();
        l.stop().await;
        assert_eq!(c.skipped.load(Relaxed), 0, "the load generator kept pace");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_consumer_gets_its_quota_burst_with_etcd_coordination() {
    // The case: a consumer quota of 30/min with burst 3, shared through etcd. Eight
    // back-to-back requests of a new consumer: its burst (3) is admitted, then 429s.
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["client", "orders"]);
    let backend = Backend::start().await;
    let orders =
        trellis_tests::etcd_sidecar(&pki, "orders", backend.addr, etcd.endpoints(), |_| {}).await;
    let key = "tk_docs_quota_burst";
    let digest: String = trellis_proxy::policy::access::key_digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let yaml = format!(
        "apiVersion: trellis.dev/v1\nkind: AuthenticationPolicy\nmetadata: {{name: orders-keys}}\n\
         spec: {{service: orders, api_keys: {{header: x-api-key}}}}\n---\n\
         apiVersion: trellis.dev/v1\nkind: Consumer\nmetadata: {{name: acme}}\n\
         spec: {{api_keys: [{{id: k1, sha256: \"{digest}\"}}], quota: {{limit: {{requests: 30, per: minute}}, burst: 3}}}}\n"
    );
    let docs: Vec<_> = parse_documents(&yaml, "test")
        .into_iter()
        .map(|d| d.expect("valid document"))
        .collect();
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    mesh_agent::policy::apply(&cfg, &docs, false)
        .await
        .expect("policies applied");
    // The sidecar coordinates the quota: its share of the whole limit is allocated.
    wait_for(
        Duration::from_secs(15),
        "quota shared through etcd",
        || async {
            let s = sharing(orders.bound.admin).await;
            s["peers"] == 1
                && s["shares"]["quota.acme.orders"]
                    .as_f64()
                    .is_some_and(|v| v > 0.49)
        },
    )
    .await;
    let client = Sidecar::start(&pki, "client", backend.addr, |_| {}).await;
    client.route(&[("orders", &[orders.bound.inbound])]).await;
    let c = client::h1(client.outbound());
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let req = http::Request::get("http://orders/echo")
            .header("x-api-key", key)
            .body(client::empty())
            .expect("request");
        let r = client::send(&c, req).await.expect("answer");
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429, 429, 429]);
}
