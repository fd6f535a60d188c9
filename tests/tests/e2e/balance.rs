//! Load-balancing policies end to end: three instances of `echo`, each behind its own sidecar,
//! called through the client sidecar.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use trellis_policies::ServicePolicy;
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::client;
use trellis_tests::{Instances, Load};

fn with_policy(t: &Instances, lb_yaml: &str, weights: [u32; 3]) -> Arc<Snapshot> {
    let policy = ServicePolicy {
        load_balancer: Some(serde_norway::from_str(lb_yaml).unwrap()),
        ..Default::default()
    };
    snapshot_with(t, policy, weights)
}

fn snapshot_with(t: &Instances, policy: ServicePolicy, weights: [u32; 3]) -> Arc<Snapshot> {
    let endpoints: Vec<_> = t.servers.iter().map(|s| s.inbound()).zip(weights).collect();
    trellis_tests::service_snapshot("echo", &endpoints, policy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_keeps_each_user_on_one_instance_and_weights_hold() {
    let t = Instances::start(3).await;
    t.client
        .apply(with_policy(
            &t,
            "{algorithm: consistent_hash, hash_on: {header: x-user}}",
            [1, 1, 1],
        ))
        .await;
    let c = client::h1(t.client.outbound());
    let mut used = [0usize; 3];
    for user in 0..30 {
        let before = t.counts();
        for _ in 0..5 {
            let req = http::Request::get("http://echo/echo")
                .header("x-user", format!("user-{user}"))
                .body(client::empty())
                .unwrap();
            assert_eq!(client::send(&c, req).await.unwrap().status, 200);
        }
        let delta: Vec<u64> = t.counts().iter().zip(&before).map(|(a, b)| a - b).collect();
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
    t.client
        .apply(with_policy(
            &t,
            "{algorithm: weighted_round_robin}",
            [3, 1, 1],
        ))
        .await;
    let before = t.counts();
    for _ in 0..50 {
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    }
    let delta: Vec<u64> = t.counts().iter().zip(&before).map(|(a, b)| a - b).collect();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_killed_under_load_is_ejected_without_failed_requests() {
    use std::time::Duration;

    let t = Instances::start(3).await;
    t.client
        .apply(with_policy(&t, "{algorithm: least_request}", [1, 1, 1]))
        .await;
    let load = Load::start(
        (0..4).map(|_| client::h1(t.client.outbound())).collect(),
        "http://echo/echo",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Instance 2 goes away: its sidecar stops listening.
    t.servers[2].running.shutdown_handle().shutdown();
    let admin = t.client.admin();
    trellis_tests::wait_for(
        Duration::from_secs(10),
        "the dead instance ejected",
        || async {
            let m = client::admin(admin, "/metrics").await.body;
            client::metric(
                &m,
                "trellis_outlier_events_total{service=\"echo\",event=\"ejected\"}",
            ) >= 1.0
        },
    )
    .await;
    let after_ejection = t.counts()[2];
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Enough traffic to mean something, however loaded the machine is (bounded).
    trellis_tests::wait_for(Duration::from_secs(15), "300 requests served", || {
        let n = load.ok_so_far();
        async move { n > 300 }
    })
    .await;
    let (ok, failed) = load.stop().await;
    eprintln!("{ok} ok, {failed} failed while one of three instances died");
    assert!(ok > 300, "{ok}");
    assert!(
        failed as f64 <= 0.001 * (ok + failed) as f64,
        "{failed} of {}",
        ok + failed
    );
    assert_eq!(
        t.counts()[2],
        after_ejection,
        "no request reached the dead instance after ejection"
    );
    let dump = client::admin(admin, "/config_dump").await.json();
    let dead = t.servers[2].inbound().to_string();
    let eps = dump["load_balancers"]["echo"]["endpoints"]
        .as_array()
        .unwrap()
        .clone();
    let state = eps.iter().find(|e| e["addr"] == dead).unwrap();
    assert_eq!(state["available"], false, "{state}");
    let m = client::admin(admin, "/metrics").await.body;
    let series = format!(
        "trellis_endpoint_events_total{{service=\"echo\",endpoint=\"{dead}\",event=\"ejected\"}}"
    );
    assert_eq!(
        client::metric(&m, &series),
        1.0,
        "per-endpoint event counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_limits_concurrent_requests_exactly() {
    let t = Instances::start(3).await;
    let policy = ServicePolicy {
        circuit_breaker: Some(trellis_policies::CircuitBreakerSpec {
            max_requests: 2,
            max_pending: 100,
            max_retries: 3,
        }),
        ..Default::default()
    };
    t.client.apply(snapshot_with(&t, policy, [1, 1, 1])).await;
    let mut calls = Vec::new();
    for _ in 0..5 {
        let c = client::h1(t.client.outbound());
        calls.push(tokio::spawn(async move {
            client::get(&c, "http://echo/slow/700").await
        }));
    }
    let mut statuses = Vec::new();
    for call in calls {
        let r = call.await.unwrap();
        statuses.push((r.status.as_u16(), r.cause().to_string()));
    }
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let refused = statuses
        .iter()
        .filter(|(s, c)| *s == 503 && c == "breaker-max-requests")
        .count();
    assert_eq!((ok, refused), (2, 3), "{statuses:?}");
    let m = client::admin(t.client.admin(), "/metrics").await.body;
    assert_eq!(
        client::metric(
            &m,
            "trellis_outlier_events_total{service=\"echo\",event=\"max_requests\"}"
        ),
        3.0
    );
    // Capacity frees up once the slow requests finish.
    assert_eq!(
        client::get(&client::h1(t.client.outbound()), "http://echo/echo")
            .await
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_checks_remove_an_endpoint_until_it_recovers() {
    use std::time::Duration;
    let t = Instances::start(3).await;
    let hc = trellis_policies::HealthCheckSpec {
        http_path: Some("/healthz".into()),
        interval: Duration::from_millis(150),
        timeout: Duration::from_millis(100),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    };
    let policy = ServicePolicy {
        health_check: Some(hc),
        ..Default::default()
    };
    t.client.apply(snapshot_with(&t, policy, [1, 1, 1])).await;
    let admin = t.client.admin();
    let dead = t.servers[2].inbound().to_string();
    let healthy_of = |dump: serde_json::Value| {
        dump["load_balancers"]["echo"]["endpoints"]
            .as_array()
            .and_then(|e| {
                e.iter()
                    .find(|e| e["addr"] == dead.as_str())
                    .map(|e| e["healthy"] == true)
            })
    };
    t.backends[2].health.store(503, Ordering::Relaxed);
    trellis_tests::wait_for(
        Duration::from_secs(5),
        "endpoint marked unhealthy",
        || async { healthy_of(client::admin(admin, "/config_dump").await.json()) == Some(false) },
    )
    .await;
    let c = client::h1(t.client.outbound());
    let before = t.counts();
    for _ in 0..30 {
        assert_eq!(client::get(&c, "http://echo/echo").await.status, 200);
    }
    let after = t.counts();
    assert_eq!(after[2], before[2], "an unhealthy endpoint gets no traffic");
    assert_eq!(after[0] + after[1] - before[0] - before[1], 30);

    t.backends[2].health.store(200, Ordering::Relaxed);
    trellis_tests::wait_for(Duration::from_secs(5), "endpoint healthy again", || async {
        healthy_of(client::admin(admin, "/config_dump").await.json()) == Some(true)
    })
    .await;
    let m = client::admin(admin, "/metrics").await.body;
    assert_eq!(
        client::metric(
            &m,
            "trellis_outlier_events_total{service=\"echo\",event=\"unhealthy\"}"
        ),
        1.0
    );
    assert_eq!(
        client::metric(
            &m,
            "trellis_outlier_events_total{service=\"echo\",event=\"healthy\"}"
        ),
        1.0
    );
}
