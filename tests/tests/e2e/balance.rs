//! Load-balancing policies end to end: three instances of `echo`, each behind its own sidecar,
//! called through the client sidecar.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use trellis_policies::{EndpointSpec, MeshDocument, ServicePolicy, ServiceSpec};
use trellis_proxy::snapshot::Snapshot;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::{init_logs, Pki, Sidecar, TRUST_DOMAIN};

struct Three {
    _pki: Pki,
    backends: Vec<Backend>,
    servers: Vec<Sidecar>,
    client: Sidecar,
}

async fn three() -> Three {
    init_logs();
    let pki = Pki::new(&["client", "echo"]);
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let b = Backend::start().await;
        let s = Sidecar::start(&pki, "echo", b.addr, |_| {}).await;
        s.route(&[]).await;
        backends.push(b);
        servers.push(s);
    }
    let client = Sidecar::start(&pki, "client", backends[0].addr, |_| {}).await;
    Three {
        _pki: pki,
        backends,
        servers,
        client,
    }
}

fn with_policy(t: &Three, lb_yaml: &str, weights: [u32; 3], version: u64) -> Arc<Snapshot> {
    let endpoints = t
        .servers
        .iter()
        .zip(weights)
        .map(|(s, weight)| EndpointSpec {
            address: s.inbound().to_string(),
            identity: None,
            weight,
            zone: None,
        })
        .collect();
    let policy = ServicePolicy {
        load_balancer: Some(serde_norway::from_str(lb_yaml).unwrap()),
        ..Default::default()
    };
    let mut doc = MeshDocument::default();
    doc.services.insert(
        "echo".into(),
        ServiceSpec {
            endpoints,
            policy,
            external: None,
        },
    );
    Arc::new(Snapshot::from_document(&doc, TRUST_DOMAIN, version, "test".into()).unwrap())
}

fn counts(t: &Three) -> Vec<u64> {
    t.backends
        .iter()
        .map(|b| b.requests.load(Ordering::Relaxed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_each_user_on_one_instance_and_weights_hold() {
    let t = three().await;
    t.client.set_snapshot(with_policy(
        &t,
        "{algorithm: consistent_hash, hash_on: {header: x-user}}",
        [1, 1, 1],
        1,
    ));
    t.client.wait_ready().await;
    let c = client::h1(t.client.outbound());
    let mut used = [0usize; 3];
    for user in 0..30 {
        let before = counts(&t);
        for _ in 0..5 {
            let req = http::Request::get("http://echo/echo")
                .header("x-user", format!("user-{user}"))
                .body(client::empty())
                .unwrap();
            assert_eq!(client::send(&c, req).await.unwrap().status, 200);
        }
        let delta: Vec<u64> = counts(&t).iter().zip(&before).map(|(a, b)| a - b).collect();
        let target: Vec<usize> = (0..3).filter(|&i| delta[i] > 0).collect();
        assert_eq!(target.len(), 1, "user-{user} was spread over {delta:?}");
        assert_eq!(delta[target[0]], 5);
        used[target[0]] += 1;
    }
    assert!(
        used.iter().all(|&u| u > 0),
        "30 users all landed on a subset: {used:?}"
    );

    // Smooth weighted round robin: exact proportions over whole schedules.
    t.client.set_snapshot(with_policy(
        &t,
        "{algorithm: weighted_round_robin}",
        [3, 1, 1],
        2,
    ));
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let before = counts(&t);
    for _ in 0..50 {
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    }
    let delta: Vec<u64> = counts(&t).iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(delta, vec![30, 10, 10]);

    let dump = client::admin(t.client.admin(), "/config_dump").await.json();
    assert_eq!(
        dump["load_balancers"]["echo"]["balancer"],
        "weighted_round_robin"
    );
    assert_eq!(
        dump["load_balancers"]["echo"]["endpoints"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}
