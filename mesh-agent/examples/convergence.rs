//! Policy convergence benchmark: N sidecars (in-process, full `mesh-agent run` wiring) against a
//! real etcd. Each round applies a changed policy with the CLI's code path and measures the time
//! from `apply` returning until every sidecar's data plane routes with that revision. Then etcd's
//! own metrics show the load per sidecar at steady state.
//!
//! cargo run --release --locked -p mesh-agent --features testing --example convergence -- 10 50

use std::time::{Duration, Instant};

use mesh_agent::testing::{http_get, EtcdCluster};
use trellis_policies::parse_documents;
use trellis_proxy::identity::CertificateAuthority;

const ROUNDS: usize = 40;
const IDLE_WINDOW: Duration = Duration::from_secs(6);

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn etcd_metric(text: &str, name: &str, label_filter: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label_filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn run(n: usize) -> String {
    let etcd = EtcdCluster::start(1).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = CertificateAuthority::generate("bench.local", Duration::from_secs(3600)).expect("CA");
    ca.write(dir.path()).expect("write CA");
    ca.issue_service("bench", Duration::from_secs(3600))
        .and_then(|c| c.write(dir.path(), "bench"))
        .expect("leaf");

    let mut sidecars = Vec::new();
    for i in 0..n {
        let mut cfg = mesh_agent::config::AgentConfig::new("bench", dir.path());
        cfg.proxy.trust_domain = "bench.local".into();
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        cfg.proxy.inbound.listen = any;
        cfg.proxy.outbound.listen = any;
        cfg.proxy.admin.listen = any;
        let mut e = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
        e.cache_file = Some(dir.path().join(format!("cache-{i}.json")));
        e.registration.instance_id = Some(format!("bench-{i}"));
        cfg.store.etcd = Some(e);
        sidecars.push(mesh_agent::run::start(cfg).await.expect("sidecar"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sidecars.iter().all(|s| s.ready.is_ready()) {
        assert!(Instant::now() < deadline, "sidecars not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    let (mut all, mut each) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let yaml = format!(
            "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {{name: bench}}\nspec: {{request_timeout: {}s}}\n",
            round + 1
        );
        let docs: Vec<_> = parse_documents(&yaml, "bench")
            .into_iter()
            .map(|d| d.expect("doc"))
            .collect();
        let report = mesh_agent::policy::apply(&cfg, &docs, false)
            .await
            .expect("apply");
        let applied_at = Instant::now();
        let revision: u64 = report
            .last()
            .and_then(|l| l.strip_prefix("applied at revision "))
            .and_then(|r| r.parse().ok())
            .expect("revision");
        let mut waits = Vec::new();
        for s in &sidecars {
            let mut rx = s.applied.clone();
            waits.push(tokio::spawn(async move {
                let _ = rx.wait_for(|v| *v >= revision).await;
                applied_at.elapsed()
            }));
        }
        let mut worst = Duration::ZERO;
        for w in waits {
            let d = w.await.expect("wait");
            each.push(d.as_secs_f64() * 1000.0);
            worst = worst.max(d);
        }
        all.push(worst.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    all.sort_by(f64::total_cmp);
    each.sort_by(f64::total_cmp);

    // Steady state: what the sidecars cost etcd while nothing changes (after the last round's
    // debounced status writes have landed).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let port = etcd.members[0].metrics_port;
    let before = http_get(port, "/metrics").await.unwrap_or_default();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after = http_get(port, "/metrics").await.unwrap_or_default();
    let delta = |name: &str, filter: &str| {
        etcd_metric(&after, name, filter) - etcd_metric(&before, name, filter)
    };
    let secs = IDLE_WINDOW.as_secs_f64();
    let nf = n as f64;
    let streams = etcd_metric(&after, "etcd_debugging_mvcc_watch_stream_total", "");
    let watchers = etcd_metric(&after, "etcd_debugging_mvcc_watcher_total", "");
    let ka_open = etcd_metric(
        &after,
        "grpc_server_started_total",
        "grpc_method=\"LeaseKeepAlive\"",
    ) - etcd_metric(
        &after,
        "grpc_server_handled_total",
        "grpc_method=\"LeaseKeepAlive\"",
    );
    let ranges = delta("grpc_server_handled_total", "grpc_method=\"Range\"");
    let puts = delta("grpc_server_handled_total", "grpc_method=\"Put\"");
    let ka_msgs = delta(
        "grpc_server_msg_received_total",
        "grpc_method=\"LeaseKeepAlive\"",
    );
    let watch_msgs = delta("grpc_server_msg_received_total", "grpc_method=\"Watch\"");

    for s in &sidecars {
        s.shutdown_handle().shutdown();
    }
    format!(
        "| {n} | {ROUNDS} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        pct(&all, 50.0),
        pct(&all, 99.0),
        all.last().copied().unwrap_or(0.0),
        pct(&each, 50.0),
        pct(&each, 99.0),
        streams / nf,
        watchers / nf,
        ka_open / nf,
        ranges / secs / nf,
        puts / secs / nf,
        ka_msgs / secs / nf,
        watch_msgs / secs / nf,
    )
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 50]
    } else {
        sizes
    };
    println!("| sidecars | rounds | all applied p50 ms | all applied p99 ms | all applied max ms | per sidecar p50 ms | per sidecar p99 ms | watch streams / sidecar | watchers / sidecar | keepalive streams / sidecar | Range calls /s / sidecar | Put calls /s / sidecar | keepalive msgs /s / sidecar | watch msgs /s / sidecar |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in sizes {
        println!("{}", run(n).await);
    }
}
