//! Global rate-limit accuracy benchmark: N sidecars' limiters (the real data-plane buckets,
//! the real coordinator and registrar) share one limit through a real etcd. Each peer gets
//! open-loop arrivals at its own demand, decided by `RateLimits::check` exactly as on the
//! request path (HTTP is left out so that 10 peers fit on a 2-core machine; the e2e test
//! `ratelimit_global` covers the same sharing through real sidecars and sockets).
//!
//! Phases per N: steady uneven demand; demand shift (heavy and light peers swap); a peer
//! crashes (its lease expires); a peer leaves cleanly (lease revoked); a peer joins.
//! Reported against the limit measured in the same run: use (admitted / min(L, demand)),
//! peak 1 s window / L, and re-convergence time (until every later 1 s window stays within
//! +-3 % of the target).
//!
//! cargo run --release --locked -p mesh-agent --features testing --example ratelimit_accuracy -- 3 10

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use mesh_agent::config::EtcdConfig;
use mesh_agent::etcd::ratelimit::{Coordinator, CoordinatorStatus};
use mesh_agent::etcd::registration::{self, RegistrationHandle};
use mesh_agent::testing::EtcdCluster;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use trellis_policies::{MeshDocument, Registration};
use trellis_proxy::policy::ratelimit::RateLimits;
use trellis_proxy::state::snapshot::Snapshot;

/// The global limit (requests per second) and its burst.
const LIMIT: f64 = 1000.0;
const BURST: u32 = 50;
const LEASE_TTL: Duration = Duration::from_secs(3);
const SAMPLE: Duration = Duration::from_millis(100);
const TOLERANCE: f64 = 0.03;

struct Peer {
    demand: Arc<AtomicU64>,
    admitted: Arc<AtomicU64>,
    registration: Option<RegistrationHandle>,
    status: Arc<Mutex<CoordinatorStatus>>,
    driver: tokio::task::JoinHandle<()>,
    _applied: watch::Sender<i64>,
}

fn snapshot(peers: usize) -> Snapshot {
    let endpoints: Vec<_> = (0..peers)
        .map(|i| serde_json::json!({"address": format!("127.0.0.1:{}", 20000 + i)}))
        .collect();
    let doc: MeshDocument = serde_json::from_value(serde_json::json!({
        "services": {"orders": {"endpoints": endpoints}},
        "rate_limits": {"orders-global": {
            "service": "orders", "scope": "global",
            "limit": {"requests": LIMIT as u32, "per": "second"}, "burst": BURST,
        }},
    }))
    .expect("document");
    Snapshot::from_document(&doc, "bench.local", 1, "bench".into()).expect("snapshot")
}

/// Start a peer: its limiter, coordinator and registrar, and arrivals at `demand` per second.
fn start_peer(cfg: &EtcdConfig, id: usize, running: usize, demand: f64) -> Peer {
    let limits = RateLimits::new("orders", &mut Registry::default());
    limits.set_coordinated();
    limits.update(&snapshot(running));
    let instance = format!("peer-{id:02}");
    let record = Registration {
        service: "orders".into(),
        instance: instance.clone(),
        address: format!("127.0.0.1:{}", 20000 + id),
        identity: "spiffe://bench.local/service/orders".into(),
        weight: 1,
        zone: None,
        metadata: Default::default(),
        version: "bench".into(),
        ttl_seconds: LEASE_TTL.as_secs() as i64,
        draining: false,
    };
    let (publish, demand_rx) = watch::channel(Vec::new());
    let coordinator = Coordinator::new(
        cfg.clone(),
        "orders".into(),
        instance,
        limits.clone(),
        publish,
    );
    let status = coordinator.status();
    tokio::spawn(coordinator.run());
    let (applied, applied_rx) = watch::channel(0);
    let registration = registration::spawn(
        cfg.clone(),
        record,
        None,
        applied_rx,
        demand_rx,
        Default::default(),
        None,
    );
    let demand = Arc::new(AtomicU64::new(demand.to_bits()));
    let admitted = Arc::new(AtomicU64::new(0));
    let driver = tokio::spawn(drive(limits.clone(), demand.clone(), admitted.clone()));
    Peer {
        demand,
        admitted,
        registration: Some(registration),
        status,
        driver,
        _applied: applied,
    }
}

/// Open-loop arrivals, evenly spaced at the current demand; count what the limiter admits.
async fn drive(limits: Arc<RateLimits>, demand: Arc<AtomicU64>, admitted: Arc<AtomicU64>) {
    let headers = HeaderMap::new();
    let source = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last = Instant::now();
    let mut credit = 0.0;
    loop {
        tick.tick().await;
        let now = Instant::now();
        credit += f64::from_bits(demand.load(Relaxed)) * (now - last).as_secs_f64();
        last = now;
        while credit >= 1.0 {
            credit -= 1.0;
            if limits
                .check(&Method::GET, "/orders", &headers, None, source, None)
                .is_ok()
            {
                admitted.fetch_add(1, Relaxed);
            }
        }
    }
}

// === impl Peer ===

impl Peer {
    fn set_demand(&self, d: f64) {
        self.demand.store(d.to_bits(), Relaxed);
    }
    fn demand(&self) -> f64 {
        f64::from_bits(self.demand.load(Relaxed))
    }
    fn peers_seen(&self) -> usize {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).peers
    }
    /// Crash: arrivals stop, the lease is left to expire.
    fn crash(mut self) {
        self.driver.abort();
        if let Some(r) = self.registration.take() {
            r.abandon();
        }
    }
    /// Clean exit: arrivals stop, the lease is revoked.
    async fn leave(mut self) {
        self.driver.abort();
        if let Some(r) = self.registration.take() {
            r.deregister().await;
        }
    }
}

/// Cumulative admitted totals sampled every [`SAMPLE`] over `span`.
async fn record(peers: &[Peer], span: Duration) -> Vec<u64> {
    let total = || peers.iter().map(|p| p.admitted.load(Relaxed)).sum::<u64>();
    let mut out = vec![total()];
    let mut tick = tokio::time::interval(SAMPLE);
    tick.tick().await;
    let start = Instant::now();
    while start.elapsed() < span {
        tick.tick().await;
        out.push(total());
    }
    out
}

/// Admitted per second in each sliding 1 s window.
fn windows(samples: &[u64]) -> Vec<f64> {
    let per = (Duration::from_secs(1).as_millis() / SAMPLE.as_millis()) as usize;
    samples
        .windows(per + 1)
        .map(|w| (w[per] - w[0]) as f64)
        .collect()
}

struct Phase {
    name: String,
    use_pct: f64,
    peak_pct: f64,
    converged_s: Option<f64>,
}

fn phase(name: &str, samples: &[u64], target: f64) -> Phase {
    let w = windows(samples);
    let secs = (samples.len() - 1) as f64 * SAMPLE.as_secs_f64();
    let admitted = (samples[samples.len() - 1] - samples[0]) as f64;
    // Converged at the end of the first window from which every later window is in band.
    let in_band = |x: &f64| (x - target).abs() <= TOLERANCE * target;
    let converged = (0..w.len())
        .find(|&i| w[i..].iter().all(in_band))
        .map(|i| (i as f64) * SAMPLE.as_secs_f64() + 1.0);
    Phase {
        name: name.to_string(),
        use_pct: 100.0 * admitted / secs / target,
        peak_pct: 100.0 * w.iter().copied().fold(0.0, f64::max) / LIMIT,
        converged_s: converged,
    }
}

fn target(peers: &[Peer]) -> f64 {
    peers.iter().map(Peer::demand).sum::<f64>().min(LIMIT)
}

async fn wait_peers(peers: &[Peer], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !peers.iter().all(|p| p.peers_seen() == n) {
        assert!(Instant::now() < deadline, "peers never saw {n} entries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(n: usize) -> Vec<Phase> {
    let etcd = EtcdCluster::start(1).await;
    let mut cfg = EtcdConfig::new(etcd.endpoints());
    cfg.lease_ttl = LEASE_TTL;
    // Uneven demand, 1.5 x L in total: 60/30/10 % for 3 peers, Zipf-like for more.
    let weights: Vec<f64> = if n == 3 {
        vec![0.6, 0.3, 0.1]
    } else {
        let raw: Vec<f64> = (0..n).map(|i| 1.0 / (i + 1) as f64).collect();
        let sum: f64 = raw.iter().sum();
        raw.iter().map(|w| w / sum).collect()
    };
    let demand: Vec<f64> = weights.iter().map(|w| w * 1.5 * LIMIT).collect();
    let mut peers: Vec<Peer> = Vec::new();
    for (i, d) in demand.iter().enumerate() {
        let p = start_peer(&cfg, i, i, *d);
        peers.push(p);
    }
    wait_peers(&peers, n).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut out = Vec::new();

    let s = record(&peers, Duration::from_secs(20)).await;
    out.push(phase("steady, uneven demand", &s, target(&peers)));

    // Heavy and light swap demands.
    for (p, d) in peers.iter().zip(demand.iter().rev()) {
        p.set_demand(*d);
    }
    let s = record(&peers, Duration::from_secs(10)).await;
    out.push(phase("demand shift (heavy <-> light)", &s, target(&peers)));

    // The lightest peer (now index 0) crashes; the rest's demand still exceeds L.
    let gone = peers.remove(0);
    let light = gone.demand();
    gone.crash();
    let s = record(&peers, LEASE_TTL + Duration::from_secs(9)).await;
    out.push(phase(
        &format!("crash of a peer (lease TTL {} s)", LEASE_TTL.as_secs()),
        &s,
        target(&peers),
    ));

    // Another light peer leaves cleanly: its lease is revoked at once.
    let gone = peers.remove(0);
    gone.leave().await;
    let s = record(&peers, Duration::from_secs(8)).await;
    out.push(phase("clean leave (lease revoked)", &s, target(&peers)));

    // A new peer joins with the crashed peer's demand.
    peers.push(start_peer(&cfg, n, peers.len(), light));
    let s = record(&peers, Duration::from_secs(8)).await;
    out.push(phase("a peer joins", &s, target(&peers)));

    for p in peers {
        p.leave().await;
    }
    out
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() { vec![3, 10] } else { sizes };
    println!("| sidecars | phase | use (admitted / min(L, demand)) | peak 1 s window / L | re-converged (+-3 %) after |");
    println!("|---:|---|---:|---:|---:|");
    for n in sizes {
        for p in run(n).await {
            let conv = p
                .converged_s
                .map_or("not within the phase".to_string(), |s| format!("{s:.1} s"));
            println!(
                "| {n} | {} | {:.1} % | {:.1} % | {conv} |",
                p.name, p.use_pct, p.peak_pct
            );
        }
    }
}
