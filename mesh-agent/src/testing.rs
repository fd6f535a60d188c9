//! Test helpers (feature `testing`): real etcd processes on free loopback ports with temporary
//! data directories, single members or a 3-member cluster, killed on drop; optionally serving
//! clients over TLS with client-certificate authentication ([`EtcdCluster::start_tls`]) and with
//! etcd's authentication enabled ([`EtcdCluster::enable_auth`]).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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

/// TLS material for an etcd that serves clients over TLS and requires a client certificate
/// (`--client-cert-auth`): a CA of its own (made with the project's CA code, so the test
/// exercises the same certificates `mesh-agent cert` writes), a server certificate for
/// `127.0.0.1` and `localhost`, and client certificates on demand. With auth enabled, etcd
/// takes the user name from a client certificate's common name, which for these certificates
/// is the name they were issued for.
pub struct EtcdTls {
    dir: tempfile::TempDir,
    ca: trellis_proxy::identity::CertificateAuthority,
}

// === impl EtcdTls ===

impl EtcdTls {
    /// A fresh CA and server certificate in a temporary directory.
    pub fn generate() -> Self {
        use trellis_proxy::identity::CertificateAuthority;
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = CertificateAuthority::generate("etcd.trellis.test", Duration::from_secs(3600))
            .expect("etcd CA");
        ca.write(dir.path()).expect("write the etcd CA");
        ca.issue_for_hosts(&["127.0.0.1", "localhost"], Duration::from_secs(3600))
            .expect("etcd server certificate")
            .write(dir.path(), "server")
            .expect("write the etcd server certificate");
        Self { dir, ca }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA clients trust the server with (and the server trusts clients with).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A client certificate and key whose common name is `user` (written once, reused).
    pub fn client(&self, user: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("client-{user}.pem"));
        let key = self.dir.path().join(format!("client-{user}-key.pem"));
        if !cert.exists() {
            self.ca
                .issue_service(user, Duration::from_secs(3600))
                .expect("etcd client certificate")
                .write(self.dir.path(), &format!("client-{user}"))
                .expect("write the etcd client certificate");
        }
        (cert, key)
    }

    /// Point `cfg` at this CA and, with `user`, a client certificate for that user.
    pub fn configure(&self, cfg: &mut crate::config::EtcdConfig, user: Option<&str>) {
        cfg.ca = Some(self.ca_path());
        match user {
            Some(u) => {
                let (cert, key) = self.client(u);
                cfg.cert = Some(cert);
                cfg.key = Some(key);
            }
            None => {
                cfg.cert = None;
                cfg.key = None;
            }
        }
    }
}

/// Start `etcd` as `cmd` says, its stderr (its log) into `log`.
fn spawn_etcd(cmd: &mut Command, log: std::fs::File) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd must be installed (apt-get install etcd-server)")
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
    /// Clients are served over TLS with client certificates required.
    tls: Option<Arc<EtcdTls>>,
    /// Extra command-line flags (e.g. `--quota-backend-bytes`).
    extra_args: Vec<String>,
    /// `new` for a founding member, `existing` for one added to a running cluster.
    cluster_state: &'static str,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl EtcdMember {
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn spawn(&mut self) {
        let log =
            std::fs::File::create(self.data_dir.with_extension("log")).expect("etcd log file");
        let mut cmd = Command::new("etcd");
        if let Some(tls) = &self.tls {
            let path = |name: &str| tls.dir().join(name).display().to_string();
            cmd.args([
                "--cert-file",
                &path("server.pem"),
                "--key-file",
                &path("server-key.pem"),
                "--trusted-ca-file",
                &path("ca.pem"),
                "--client-cert-auth",
            ]);
        }
        let child = cmd
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
                self.cluster_state,
                "--heartbeat-interval",
                "10",
                "--election-timeout",
                "100",
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{}", self.metrics_port),
            ])
            .args(&self.extra_args);
        self.child = Some(spawn_etcd(child, log));
    }

    /// Stop the member abruptly (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freeze the process (SIGSTOP) without closing its sockets: what a long GC pause or a
    /// stalled VM looks like to its peers and clients.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Let a paused member run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Start it again with the same data and ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_healthy(Duration::from_secs(20)).await;
    }

    /// Poll `GET /health` until etcd says it is healthy (it needs a leader). A TLS member is
    /// asked on its plain-HTTP metrics port, which serves `/health` too.
    pub async fn wait_healthy(&self, limit: Duration) {
        assert!(
            self.healthy_within(limit).await,
            "etcd {} not healthy within {limit:?}",
            self.name
        );
    }

    /// Whether `GET /health` says healthy within `limit`.
    async fn healthy_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let port = match self.tls {
            Some(_) => self.metrics_port,
            None => self.client_port,
        };
        loop {
            if health(port).await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
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
    tls: Option<Arc<EtcdTls>>,
    _dir: tempfile::TempDir,
}

/// The user [`EtcdCluster::enable_auth`] creates with etcd's `root` role.
pub const ROOT_USER: &str = "root";

impl EtcdCluster {
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, None, &[]).await
    }

    /// `n` members serving clients over TLS and requiring a client certificate signed by
    /// their CA ([`EtcdCluster::tls`]). Peers talk plain HTTP among themselves (loopback).
    pub async fn start_tls(n: usize) -> Self {
        Self::start_with(n, Some(Arc::new(EtcdTls::generate())), &[]).await
    }

    /// `n` members started with `args` added to each command line.
    pub async fn start_with_args(n: usize, args: &[&str]) -> Self {
        Self::start_with(n, None, args).await
    }

    /// The index of the member that is the raft leader now (asked of each live member).
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_secs(1),
                etcd_client::Client::connect([m.endpoint()], None),
            )
            .await
            else {
                continue;
            };
            if let Ok(Ok(st)) = tokio::time::timeout(Duration::from_secs(1), c.status()).await {
                let me = st.header().map_or(0, |h| h.member_id());
                if st.leader() == me && me != 0 {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Replace member `i` with a new one on new ports and a new name (`member add` and a
    /// start with `--initial-cluster-state existing`, then the old member stopped and
    /// `member remove`d): what an operator does when a machine is lost. Clients configured
    /// with the old list must find the new member.
    pub async fn replace(&mut self, i: usize) {
        let old = self.members[i].endpoint();
        let mut c = etcd_client::Client::connect(self.endpoints(), None)
            .await
            .expect("connect to the cluster");
        let (client_port, peer_port) = (free_port(), free_port());
        let name = format!("{}-r", self.members[i].name);
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        // etcd refuses reconfiguration ("unhealthy cluster") until its leader has been
        // connected to every voting member for 5 s: retry for a while.
        let deadline = Instant::now() + Duration::from_secs(20);
        let added = loop {
            match c.member_add([peer_url.clone()], None).await {
                Ok(a) => break a,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "member add refused; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("member add: {e}"),
            }
        };
        let initial_cluster = added
            .member_list()
            .iter()
            .map(|m| {
                let n = if m.name().is_empty() {
                    name.as_str()
                } else {
                    m.name()
                };
                format!("{n}={}", m.peer_urls().first().cloned().unwrap_or_default())
            })
            .collect::<Vec<_>>()
            .join(",");
        let data_dir = self.members[i].data_dir.with_file_name(&name);
        let mut m = EtcdMember {
            name,
            client_port,
            peer_port,
            metrics_port: free_port(),
            data_dir,
            initial_cluster,
            tls: None,
            extra_args: self.members[i].extra_args.clone(),
            cluster_state: "existing",
            child: None,
            _dir: None,
        };
        m.spawn();
        m.wait_healthy(Duration::from_secs(60)).await;
        let old_id = c
            .member_list()
            .await
            .expect("member list")
            .members()
            .iter()
            .find(|m| m.client_urls().contains(&old))
            .map(|m| m.id())
            .expect("the member to replace is listed");
        self.members[i].kill();
        // A client of the live members only: etcd-client keeps waiting on a dead one.
        let mut live: Vec<String> = self
            .members
            .iter()
            .enumerate()
            .filter(|(j, m)| *j != i && m.child.is_some())
            .map(|(_, m)| m.endpoint())
            .collect();
        live.push(m.endpoint());
        let mut c = etcd_client::Client::connect(live, None)
            .await
            .expect("connect to the live members");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let removed = tokio::time::timeout(Duration::from_secs(2), c.member_remove(old_id))
                .await
                .unwrap_or_else(|_| {
                    Err(etcd_client::Error::InvalidArgs(
                        "member remove timed out".into(),
                    ))
                });
            match removed {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "member remove refused; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("member remove: {e}"),
            }
        }
        self.members[i] = m;
    }

    /// Start `n` members; on ports chosen afresh if they do not come up (a port picked free
    /// can be taken by a parallel test before etcd binds it).
    async fn start_with(n: usize, tls: Option<Arc<EtcdTls>>, args: &[&str]) -> Self {
        for _ in 0..2 {
            if let Some(c) = Self::try_start(n, tls.clone(), args, Duration::from_secs(30)).await {
                return c;
            }
        }
        Self::try_start(n, tls, args, Duration::from_secs(60))
            .await
            .expect("etcd cluster healthy within 60 s")
    }

    async fn try_start(
        n: usize,
        tls: Option<Arc<EtcdTls>>,
        args: &[&str],
        limit: Duration,
    ) -> Option<Self> {
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
                tls: tls.clone(),
                extra_args: args.iter().map(|a| a.to_string()).collect(),
                cluster_state: "new",
                child: None,
                _dir: None,
            })
            .collect();
        for m in &mut members {
            m.spawn();
        }
        for m in &members {
            if !m.healthy_within(limit).await {
                tracing::warn!(member = %m.name, "etcd member not healthy; starting the cluster again on other ports");
                return None;
            }
        }
        Some(Self {
            members,
            tls,
            _dir: dir,
        })
    }

    pub fn tls(&self) -> Option<&EtcdTls> {
        self.tls.as_deref()
    }

    /// A client configuration for this cluster (1 s timeout), with TLS the CA and a client
    /// certificate for `cert_user` (`None`: no client certificate), and credentials if given.
    pub fn config(
        &self,
        cert_user: Option<&str>,
        credentials: Option<(&str, &str)>,
    ) -> crate::config::EtcdConfig {
        let mut c = crate::config::EtcdConfig::new(self.endpoints());
        c.timeout = Duration::from_secs(1);
        if let Some(tls) = &self.tls {
            tls.configure(&mut c, cert_user);
        }
        if let Some((user, password)) = credentials {
            c.username = Some(user.to_string());
            c.password = Some(password.to_string());
        }
        c
    }

    /// Turn on etcd's authentication: user `root` with `root_password` and the `root` role,
    /// then `auth enable`. From then on every request needs a user (a password, or with TLS a
    /// client certificate whose common name is the user).
    pub async fn enable_auth(&self, root_password: &str) {
        let cfg = self.config(Some(ROOT_USER), None);
        let etcd = crate::etcd::Etcd::connect(&cfg)
            .await
            .expect("connect to etcd to enable auth");
        let mut c = etcd.client.clone();
        etcd.call(c.user_add(ROOT_USER, root_password, None))
            .await
            .expect("add the root user");
        etcd.call(c.user_grant_role(ROOT_USER, "root"))
            .await
            .expect("grant the root role");
        etcd.call(c.auth_enable()).await.expect("auth enable");
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(EtcdMember::endpoint).collect()
    }

    /// The endpoints of members that are running (not killed).
    pub fn live_endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(EtcdMember::endpoint)
            .collect()
    }

    pub fn endpoint(&self) -> String {
        self.members[0].endpoint()
    }
}

/// How an [`EtcdGrpcProxy`] answers `MemberList`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyMembers {
    /// etcd's defaults: no `--advertise-client-url` given, so etcd 3.4 answers with its
    /// default `127.0.0.1:23790`, whatever the proxy listens on.
    Default,
    /// `--advertise-client-url` explicitly empty: the member list is forwarded to the cluster
    /// and names the real members.
    Forwarded,
    /// `--advertise-client-url 127.0.0.1:<port>` and `--resolver-prefix <prefix>`: the
    /// proxy registers itself under the prefix and answers with every proxy registered there.
    Registered(String),
}

/// etcd's own gRPC proxy (`etcd grpc-proxy start`) in front of a cluster, on a free loopback
/// port, killed on drop.
pub struct EtcdGrpcProxy {
    pub port: u16,
    cluster: Vec<String>,
    members: ProxyMembers,
    log: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl EtcdGrpcProxy {
    /// A proxy for the members at `cluster` (client URLs), healthy (it answers `/health`,
    /// which needs the cluster) before this returns. A port taken by a parallel test before
    /// the proxy binds it is replaced by another.
    pub async fn start(cluster: Vec<String>, members: ProxyMembers) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut p = Self {
            port: free_port(),
            cluster,
            members,
            log: dir.path().join("grpc-proxy.log"),
            dir,
            child: None,
        };
        for attempt in 0..3 {
            p.spawn();
            if p.healthy_within(Duration::from_secs(20)).await {
                return p;
            }
            tracing::warn!(attempt, log = %p.log(), "etcd grpc-proxy not healthy; trying another port");
            p.kill();
            p.port = free_port();
        }
        panic!("etcd grpc-proxy not healthy: {}", p.log());
    }

    /// The URL clients use (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("grpc-proxy log file");
        let mut cmd = Command::new("etcd");
        cmd.args([
            "grpc-proxy",
            "start",
            "--endpoints",
            &self.cluster.join(","),
            "--listen-addr",
            &format!("127.0.0.1:{}", self.port),
            "--data-dir",
            &self.dir.path().join("data").display().to_string(),
        ]);
        match &self.members {
            ProxyMembers::Default => {}
            ProxyMembers::Forwarded => {
                cmd.arg("--advertise-client-url=");
            }
            ProxyMembers::Registered(prefix) => {
                // Without a scheme, as etcd's documentation writes it.
                cmd.args([
                    "--advertise-client-url",
                    &format!("127.0.0.1:{}", self.port),
                    "--resolver-prefix",
                    prefix,
                    "--resolver-ttl",
                    "5",
                ]);
            }
        }
        self.child = Some(spawn_etcd(&mut cmd, log));
    }

    async fn healthy_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if !self.is_running() {
                return false;
            }
            if health(self.port).await {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process is still running (it has not exited or crashed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// What the proxy wrote to stderr (its log), for assertions and failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop the proxy abruptly (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Prometheus metrics of the proxy (served on its client port).
    pub async fn metrics(&self) -> String {
        http_get(self.port, "/metrics").await.unwrap_or_default()
    }
}

impl Drop for EtcdGrpcProxy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// [`trellis_proxy::testing::config`] with the agent's half: no store yet, a short store
/// reload interval.
pub fn config(service: &str, dir: &Path, app: std::net::SocketAddr) -> crate::config::AgentConfig {
    let mut cfg = crate::config::AgentConfig::new(service, dir);
    cfg.proxy = trellis_proxy::testing::config(service, dir, app);
    cfg.store.reload_interval = Duration::from_millis(100);
    cfg
}
