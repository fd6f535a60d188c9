//! The end-to-end harness: a PKI in a temp dir, sidecars started in-process on loopback ports,
//! a test backend (HTTP/1.1, h2c, gRPC framing, WebSocket, streaming), and clients.

pub mod backend;
pub mod browser;
pub mod cdp;
pub mod client;
pub mod crash;
pub mod disk;
pub mod dns;
pub mod otlp;

pub mod paced;
pub mod web;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_agent::config::AgentConfig;
use tempfile::TempDir;
use tokio::sync::watch;
use trellis_proxy::app::{Proxy, Running};
use trellis_proxy::config::Config;
use trellis_proxy::identity::CertificateAuthority;
use trellis_proxy::state::snapshot::Snapshot;
use trellis_proxy::testing;

pub use trellis_proxy::testing::TRUST_DOMAIN;

/// Install a log subscriber once (RUST_LOG controls it; default warn).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A CA and the identity files of some services, in a temp dir.
pub struct Pki {
    pub dir: TempDir,
    pub ca: CertificateAuthority,
}

impl Pki {
    pub fn new(services: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = testing::ca();
        for s in services {
            testing::write_identity(&ca, dir.path(), s).expect("write identity");
        }
        Self { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn spiffe(service: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/service/{service}")
    }
}

/// A sidecar running in this process, fed snapshots directly.
pub struct Sidecar {
    pub running: Running,
    pub snapshots: watch::Sender<Option<Arc<Snapshot>>>,
}

impl Sidecar {
    /// Start a sidecar for `service` with identity files in `pki`, forwarding inbound to `app`.
    pub async fn start(
        pki: &Pki,
        service: &str,
        app: SocketAddr,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut cfg = testing::config(service, pki.path(), app);
        tweak(&mut cfg);
        Self::start_with(cfg).await
    }

    pub async fn start_with(cfg: Config) -> Self {
        let (snapshots, rx) = watch::channel(None);
        let running = Proxy::new(cfg, rx).start().await.expect("sidecar starts");
        Self { running, snapshots }
    }

    pub fn set_snapshot(&self, snapshot: Arc<Snapshot>) {
        self.snapshots.send_replace(Some(snapshot));
    }

    /// Route `services` (name -> inbound addresses) and wait until ready.
    pub async fn route(&self, services: &[(&str, &[SocketAddr])]) {
        self.set_snapshot(testing::snapshot(services, next_version()));
        self.wait_ready().await;
    }

    /// Send `snapshot` and wait until the data plane routes with it.
    pub async fn apply(&self, snapshot: Arc<Snapshot>) {
        let version = snapshot.version;
        self.set_snapshot(snapshot);
        let mut applied = self.running.applied.clone();
        tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|v| *v == version))
            .await
            .expect("snapshot applied within 10 s")
            .expect("sidecar running");
    }

    pub async fn wait_ready(&self) {
        let ready = &self.running.ready;
        eventually(Duration::from_secs(10), || ready.is_ready()).await;
    }

    pub fn outbound(&self) -> SocketAddr {
        self.running.bound.outbound
    }
    pub fn inbound(&self) -> SocketAddr {
        self.running.bound.inbound
    }
    pub fn admin(&self) -> SocketAddr {
        self.running.bound.admin
    }
}

/// A loopback port that refuses connections for as long as this lives: a bound socket that does
/// not listen. Why not a listener's port after dropping it: the kernel hands that port to the
/// next socket bound to port 0, another test's listener running in parallel, and the "app that
/// is down" then answers (a flaky 502 test under load).
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind a loopback port");
        let addr = socket.local_addr().expect("its address");
        Self {
            _socket: socket,
            addr,
        }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        Self::new()
    }
}

/// A fresh snapshot version (every snapshot a test sends gets its own, so `apply` can wait for it).
pub fn next_version() -> u64 {
    static VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A service with one endpoint (`inbound`) and retries off, so that every answer a caller gets
/// is the inbound sidecar's own (limits, access control).
pub fn unretried_service(inbound: SocketAddr) -> trellis_policies::ServiceSpec {
    use trellis_policies::{EndpointSpec, RetrySpec, ServicePolicy, ServiceSpec};
    ServiceSpec {
        endpoints: vec![EndpointSpec {
            address: inbound.to_string(),
            identity: None,
            weight: 1,
            zone: None,
        }],
        policy: ServicePolicy {
            retries: Some(RetrySpec {
                attempts: 0,
                ..RetrySpec::default()
            }),
            ..ServicePolicy::default()
        },
        external: None,
    }
}

/// A snapshot with one service: its endpoints (inbound address, weight) and policy.
pub fn service_snapshot(
    service: &str,
    endpoints: &[(SocketAddr, u32)],
    policy: trellis_policies::ServicePolicy,
) -> Arc<Snapshot> {
    use trellis_policies::{EndpointSpec, MeshDocument, ServiceSpec};
    let endpoints = endpoints
        .iter()
        .map(|(a, weight)| EndpointSpec {
            address: a.to_string(),
            identity: None,
            weight: *weight,
            zone: None,
        })
        .collect();
    let mut doc = MeshDocument::default();
    doc.services.insert(
        service.into(),
        ServiceSpec {
            endpoints,
            policy,
            external: None,
        },
    );
    snapshot_of(&doc)
}

/// A snapshot of `doc` in the test trust domain, with a fresh version.
pub fn snapshot_of(doc: &trellis_policies::MeshDocument) -> Arc<Snapshot> {
    Arc::new(
        Snapshot::from_document(doc, TRUST_DOMAIN, next_version(), "test".into())
            .expect("valid test snapshot"),
    )
}

/// The standard two-sidecar mesh: `client` sidecar -> mTLS -> `echo` sidecar -> backend.
pub struct Mesh {
    pub pki: Pki,
    pub backend: backend::Backend,
    pub client: Sidecar,
    pub server: Sidecar,
}

impl Mesh {
    pub async fn start() -> Self {
        Self::start_with(|_| {}, |_| {}).await
    }

    pub async fn start_with(
        client_cfg: impl FnOnce(&mut Config),
        server_cfg: impl FnOnce(&mut Config),
    ) -> Self {
        init_logs();
        let pki = Pki::new(&["client", "echo"]);
        let backend = backend::Backend::start().await;
        let server = Sidecar::start(&pki, "echo", backend.addr, server_cfg).await;
        let client = Sidecar::start(&pki, "client", backend.addr, client_cfg).await;
        server.route(&[]).await;
        client.route(&[("echo", &[server.inbound()])]).await;
        Self {
            pki,
            backend,
            client,
            server,
        }
    }
}

/// Poll `cond` every 10 ms until it holds; panic after `limit`.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Resident set size of this process in bytes (Linux).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Start a sidecar in etcd mode (registration on, 2 s lease, cache file in `pki`'s dir).
pub async fn etcd_sidecar(
    pki: &Pki,
    service: &str,
    app: SocketAddr,
    endpoints: Vec<String>,
    tweak: impl FnOnce(&mut AgentConfig),
) -> Running {
    let mut cfg = etcd_sidecar_config(pki, service, app, endpoints);
    tweak(&mut cfg);
    mesh_agent::run::start(cfg)
        .await
        .expect("etcd sidecar starts")
}

/// The configuration [`etcd_sidecar`] starts with.
pub fn etcd_sidecar_config(
    pki: &Pki,
    service: &str,
    app: SocketAddr,
    endpoints: Vec<String>,
) -> AgentConfig {
    let mut cfg = mesh_agent::testing::config(service, pki.path(), app);
    let mut etcd = mesh_agent::config::EtcdConfig::new(endpoints);
    etcd.lease_ttl = Duration::from_secs(2);
    etcd.timeout = Duration::from_secs(1);
    etcd.cache_file = Some(pki.path().join(format!("{service}.cache.json")));
    cfg.store.etcd = Some(etcd);
    cfg
}

/// Poll an async condition every 20 ms; panic with `what` after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` instances of `echo` (a backend behind its own sidecar each) and a `client` sidecar.
pub struct Instances {
    pub pki: Pki,
    pub backends: Vec<backend::Backend>,
    pub servers: Vec<Sidecar>,
    pub client: Sidecar,
}

impl Instances {
    pub async fn start(n: usize) -> Self {
        init_logs();
        let pki = Pki::new(&["client", "echo"]);
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for _ in 0..n {
            let b = backend::Backend::start().await;
            let s = Sidecar::start(&pki, "echo", b.addr, |_| {}).await;
            s.route(&[]).await;
            backends.push(b);
            servers.push(s);
        }
        let client = Sidecar::start(&pki, "client", backends[0].addr, |_| {}).await;
        Self {
            pki,
            backends,
            servers,
            client,
        }
    }

    /// Requests each backend has served.
    pub fn counts(&self) -> Vec<u64> {
        self.backends
            .iter()
            .map(|b| b.requests.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }
}

/// Closed-loop traffic: one worker per client, each sending `GET uri` back to back until stopped
/// (or for 30 s at most), counting 200s and everything else.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicU64>,
    failed: Arc<std::sync::atomic::AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(clients: Vec<client::HttpClient>, uri: &'static str) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let workers = clients
            .into_iter()
            .map(|c| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let req = http::Request::get(uri)
                            .body(client::empty())
                            .expect("request");
                        match client::send(&c, req).await {
                            Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            Ok(r) => {
                                eprintln!("failed: {} {} {}", r.status, r.cause(), r.body);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                            Err(e) => {
                                eprintln!("failed: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            workers,
        }
    }

    /// Successful requests so far.
    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop the workers; `(ok, failed)`.
    pub async fn stop(self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("load worker");
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
