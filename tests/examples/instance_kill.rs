//! Error rate and latency while one of three instances dies under load (issue 4's benchmark).
//! Release build: `cargo run --release --locked -p trellis-tests --example instance_kill`
//!
//! Three `echo` instances behind their own sidecars, four closed-loop clients through one client
//! sidecar (least request, default outlier detection and retries) for 8 s; at 3 s one instance's
//! sidecar stops (its listener closes, as when a pod is killed). Reports requests, failures and
//! latency percentiles before, in the second after, and after the kill.

use std::time::{Duration, Instant};

use trellis_policies::ServicePolicy;
use trellis_tests::client;

const RUN: Duration = Duration::from_secs(8);
const KILL_AT: Duration = Duration::from_secs(3);

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

#[tokio::main]
async fn main() {
    let t = trellis_tests::Instances::start(3).await;
    let (backends, servers, client_sc) = (&t.backends, &t.servers, &t.client);
    let policy = ServicePolicy {
        load_balancer: Some(serde_norway::from_str("{algorithm: least_request}").unwrap()),
        ..Default::default()
    };
    let endpoints: Vec<_> = servers.iter().map(|s| (s.inbound(), 1)).collect();
    client_sc
        .apply(trellis_tests::service_snapshot("echo", &endpoints, policy))
        .await;

    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let c = client::h1(client_sc.outbound());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while start.elapsed() < RUN {
                let t = Instant::now();
                let ok = matches!(client::send(&c, http::Request::get("http://echo/echo").body(client::empty()).unwrap()).await, Ok(r) if r.status == 200);
                samples.push((t.duration_since(start), t.elapsed().as_secs_f64() * 1000.0, ok));
            }
            samples
        }));
    }
    tokio::time::sleep(KILL_AT).await;
    servers[2].running.shutdown_handle().shutdown();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    let failed = all.iter().filter(|s| !s.2).count();
    let phase = |from: Duration, to: Duration| -> Vec<f64> {
        all.iter()
            .filter(|s| s.0 >= from && s.0 < to)
            .map(|s| s.1)
            .collect()
    };
    println!("| phase | requests | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|");
    for (name, from, to) in [
        ("before the kill", Duration::ZERO, KILL_AT),
        (
            "1 s after the kill",
            KILL_AT,
            KILL_AT + Duration::from_secs(1),
        ),
        (
            "after",
            KILL_AT + Duration::from_secs(1),
            RUN + Duration::from_secs(1),
        ),
    ] {
        let mut v = phase(from, to);
        println!(
            "| {name} | {} | {:.3} | {:.3} |",
            v.len(),
            pct(&mut v, 50.0),
            pct(&mut v, 99.0)
        );
    }
    println!(
        "\n{} requests, {failed} failed ({:.4} %), backend requests {:?}",
        all.len(),
        100.0 * failed as f64 / all.len().max(1) as f64,
        backends
            .iter()
            .map(|b| b.requests.load(std::sync::atomic::Ordering::Relaxed))
            .collect::<Vec<_>>()
    );
}
