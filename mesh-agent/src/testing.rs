//! Test helpers (feature `testing`): real etcd processes on free loopback ports with temporary
//! data directories, single members or a 3-member cluster, killed on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free port *below* the kernel's ephemeral range (32768-60999 by default). A killed etcd
/// is restarted on the same ports; an ephemeral port could meanwhile be handed to any parallel
/// test binding port 0, and the restart would fail to bind. Ports outside that range are only
/// taken by explicit choice.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
    for _ in 0..1000 {
        let k = seed.wrapping_add(NEXT.fetch_add(7919, Ordering::Relaxed));
        let port = 20_000 + (k % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-31999");
}

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// Prometheus metrics of this member (`/metrics`).
    pub metrics_port: u16,
    data_dir: PathBuf,
    initial_cluster: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let log =
            std::fs::File::create(self.data_dir.with_extension("log")).expect("etcd log file");
        let child = Command::new("etcd")
            .args([
                "--name",
                &self.name,
                "--data-dir",
                &self.data_dir.display().to_string(),
                "--listen-client-urls",
                &self.endpoint(),
                "--advertise-client-urls",
                &self.endpoint(),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_port),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", self.peer_port),
                "--initial-cluster",
                &self.initial_cluster,
                "--initial-cluster-state",
                "new",
                "--heartbeat-interval",
                "10",
                "--election-timeout",
                "100",
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.metrics_port),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd must be installed (apt-get install etcd-server)");
        self.child = Some(child);
    }

    /// Stop the member abruptly (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again with the same data and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_healthy(Duration::from_secs(20)).await;
    }

    /// Poll `GET /health` until etcd says it is healthy (it needs a leader).
    pub async fn wait_healthy(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if health(self.client_port).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd {} not healthy within {limit:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET a path from a member's port (metrics or client) as text.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

async fn health(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out.contains("\"health\":\"true\""))
    };
    tokio::time::timeout(Duration::from_millis(500), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// A cluster of `n` members (1 for most tests, 3 for failover tests).
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    pub async fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("n{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members: Vec<EtcdMember> = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| EtcdMember {
                name: format!("n{i}"),
                client_port: *c,
                peer_port: *p,
                metrics_port: free_port(),
                data_dir: dir.path().join(format!("n{i}")),
                initial_cluster: initial_cluster.clone(),
                child: None,
                _dir: None,
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        for m in &members {
            m.wait_healthy(Duration::from_secs(30)).await;
        }
        Self { members, _dir: dir }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    pub fn endpoint(&self) -> String {
        self.members[0].endpoint()
    }
}
