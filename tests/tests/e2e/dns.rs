//! DNS: host-name endpoints and external services resolved with hickory against a test name
//! server, re-resolved when records expire, balanced across records, last records kept when DNS
//! stops answering.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::dns::TestDns;
use trellis_tests::{init_logs, wait_for, Pki, Sidecar};

/// Two backends on the same port at 127.0.0.2 and 127.0.0.3, so that only DNS tells them apart.
async fn twin_backends() -> (Backend, Backend, u16) {
    for _ in 0..20 {
        let a = Backend::start_on("127.0.0.2:0".parse().unwrap()).await;
        let port = a.addr.port();
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.3", port)) {
            drop(l);
            let b = Backend::start_on(SocketAddr::from(([127, 0, 0, 3], port))).await;
            return (a, b, port);
        }
    }
    panic!("no common free port on 127.0.0.2/3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_name_endpoints_and_external_services_follow_dns() {
    init_logs();
    let dns = TestDns::start().await;
    let (b2, b3, port) = twin_backends().await;
    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let server = Sidecar::start(&pki, "echo", backend.addr, |_| {}).await;
    server.route(&[]).await;
    dns.set("peer.test", &[Ipv4Addr::LOCALHOST]);
    dns.set("api.test", &[Ipv4Addr::new(127, 0, 0, 2)]);

    let mesh_file = pki.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "services:\n  echo:\n    endpoints:\n      - address: peer.test:{}\n  ext:\n    external: {{host: api.test, port: {port}}}\n",
            server.inbound().port()
        ),
    )
    .unwrap();
    let mut cfg = mesh_agent::testing::config("client", pki.path(), backend.addr);
    cfg.store.file = Some(mesh_file);
    cfg.dns.nameservers = vec![dns.addr];
    let running = mesh_agent::run::start(cfg).await.unwrap();
    let c = client::h1(running.bound.outbound);

    wait_for(
        Duration::from_secs(5),
        "mesh endpoint by host name",
        || async { client::get(&c, "http://echo/echo").await.status == 200 },
    )
    .await;
    let r = client::get(&c, "http://ext/echo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["headers"]["host"], format!("api.test:{port}"));
    assert!(
        r.json()["headers"].get("trellis-peer-identity").is_none(),
        "external calls carry no mesh identity"
    );
    assert_eq!(b2.requests.load(Ordering::Relaxed), 1);

    // The record changes: once its TTL expires, traffic follows.
    dns.set("api.test", &[Ipv4Addr::new(127, 0, 0, 3)]);
    wait_for(Duration::from_secs(6), "re-resolved after TTL", || async {
        client::get(&c, "http://ext/echo").await;
        b3.requests.load(Ordering::Relaxed) > 0
    })
    .await;

    // Two records: both get traffic.
    dns.set(
        "api.test",
        &[Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)],
    );
    let before = (
        b2.requests.load(Ordering::Relaxed),
        b3.requests.load(Ordering::Relaxed),
    );
    wait_for(
        Duration::from_secs(6),
        "balanced across both records",
        || async {
            for _ in 0..4 {
                client::get(&c, "http://ext/echo").await;
            }
            b2.requests.load(Ordering::Relaxed) > before.0 + 1
                && b3.requests.load(Ordering::Relaxed) > before.1 + 1
        },
    )
    .await;

    // DNS stops answering: the last records keep serving.
    dns.set_silent(true);
    let asked = dns.queries.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(8), "a failed re-resolution", || async {
        dns.queries.load(Ordering::Relaxed) > asked + 1
    })
    .await;
    for _ in 0..10 {
        assert_eq!(client::get(&c, "http://ext/echo").await.status, 200);
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    }
    wait_for(Duration::from_secs(5), "failed lookup counted", || async {
        let m = client::admin(running.bound.admin, "/metrics").await.body;
        client::metric(&m, "trellis_dns_lookups_total{result=\"error\"}") >= 1.0
    })
    .await;
    assert_eq!(
        client::get(&c, "http://ext/echo").await.status,
        200,
        "still served after the failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_service_policy_from_etcd() {
    init_logs();
    let etcd = mesh_agent::testing::EtcdCluster::start(1).await;
    let dns = TestDns::start().await;
    let (b2, _b3, port) = twin_backends().await;
    dns.set("billing.example", &[Ipv4Addr::new(127, 0, 0, 2)]);
    let pki = Pki::new(&["client"]);
    let backend = Backend::start().await;
    let running =
        trellis_tests::etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), |c| {
            c.dns.nameservers = vec![dns.addr];
        })
        .await;
    let yaml = format!(
        "apiVersion: trellis.dev/v1\nkind: ExternalService\nmetadata: {{name: billing}}\nspec: {{host: billing.example, port: {port}}}\n"
    );
    let docs: Vec<_> = trellis_policies::parse_documents(&yaml, "t")
        .into_iter()
        .map(|d| d.unwrap())
        .collect();
    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    mesh_agent::policy::apply(&cfg, &docs, false).await.unwrap();
    let c = client::h1(running.bound.outbound);
    wait_for(
        Duration::from_secs(5),
        "external service routed",
        || async { client::get(&c, "http://billing/echo").await.status == 200 },
    )
    .await;
    assert!(b2.requests.load(Ordering::Relaxed) >= 1);
}
