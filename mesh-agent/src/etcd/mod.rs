//! Coordination through etcd: registration under leases, one watch per sidecar over the mesh
//! prefix, validated policies, and the fail-static cache. Nothing here is on the request path:
//! the data plane only receives snapshots.

pub mod cache;
mod cache_writer;
pub mod discovery;
pub mod endpoints;
mod freshness;
pub mod keys;
pub mod on_demand;
pub mod ratelimit;
pub mod rbac;
pub mod registration;
pub mod scope;
pub mod state;
pub mod watches;

use std::time::Duration;

use crate::config::EtcdConfig;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The call failed; the message names every endpoint that was tried.
    #[error("etcd at {endpoints}: {source}")]
    Call {
        endpoints: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {endpoints}: no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        timeout: Duration,
    },
    #[error("etcd TLS: cannot read {path}: {source}")]
    TlsFile {
        path: String,
        source: std::io::Error,
    },
    #[error("etcd TLS: a client certificate needs its key and a key its certificate (set both store.etcd.cert and store.etcd.key, or --etcd-cert and --etcd-key)")]
    TlsIncomplete,
    /// etcd refused the user name or password (it does not say which).
    #[error(
        "etcd at {endpoints}: authentication failed for user `{user}`: wrong user name or password"
    )]
    AuthFailed { endpoints: String, user: String },
    /// Authentication is on and the request carried no user.
    #[error("etcd at {endpoints}: authentication is enabled and no etcd user was given: set store.etcd.username and store.etcd.password (--etcd-user, --etcd-password), or a client certificate whose common name is an etcd user")]
    AuthRequired { endpoints: String },
    /// The user is known but none of its roles allows the operation on those keys.
    #[error("etcd at {endpoints}: permission denied for {user}: its roles do not allow this operation on these keys (docs/etcd.md, \"Least privilege\", lists what each role may write)")]
    PermissionDenied { endpoints: String, user: String },
    /// The TLS handshake with etcd failed; `cause` says which side refused what.
    #[error("etcd at {endpoints}: TLS handshake failed: {cause}")]
    Tls { endpoints: String, cause: String },
    /// No member answered with a quorum behind it: each endpoint tried and why.
    #[error("no etcd member answered (a quorum is needed):{}", attempts.iter().map(|(e, why)| format!("\n  {e}: {why}")).collect::<String>())]
    Unreachable { attempts: Vec<(String, String)> },
}

// === impl EtcdError ===

impl EtcdError {
    /// A refusal that every member would repeat (credentials, permissions, TLS setup):
    /// trying another member cannot help, and the cause must reach the operator as is.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Self::AuthFailed { .. }
                | Self::AuthRequired { .. }
                | Self::PermissionDenied { .. }
                | Self::TlsFile { .. }
                | Self::TlsIncomplete
        )
    }

    /// A failure that says something about the member rather than the request: it cannot be
    /// reached, lost its quorum or leader, or went away mid-stream.
    pub fn is_member_fault(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Unreachable { .. } => true,
            Self::Call { source, .. } => match source {
                // gRPC UNKNOWN (2), DEADLINE_EXCEEDED (4), INTERNAL (13), UNAVAILABLE (14):
                // "leader changed", "no leader", "timed out", a member going away.
                etcd_client::Error::GRpcStatus(s) => {
                    matches!(s.code() as i32, 2 | 4 | 13 | 14)
                        && !s.message().contains("database space exceeded")
                }
                etcd_client::Error::LeaseKeepAliveError(m) => !m.contains("lease not found"),
                etcd_client::Error::TransportError(_)
                | etcd_client::Error::IoError(_)
                | etcd_client::Error::WatchError(_) => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// etcd's NOSPACE alarm: writes are refused until an operator frees space.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Call { source: etcd_client::Error::GRpcStatus(s), .. } if s.message().contains("database space exceeded"))
    }
}

/// One connection to etcd shared by a sidecar's registration, discovery and rate-limit
/// sharing. Each used to dial its own: three TCP connections, three sets of keepalive pings and
/// three reconnections after every etcd restart per sidecar; sharing one costs etcd a third.
/// A member fault seen by any user (a broken stream, a call without answer) marks the shared
/// connection failed, and the next session of any of them connects again (to another member
/// first); the others keep their streams until those fail by themselves.
#[derive(Clone)]
pub struct Connector {
    cfg: EtcdConfig,
    current: std::sync::Arc<tokio::sync::Mutex<Option<Etcd>>>,
}

// === impl Connector ===

impl Connector {
    pub fn new(cfg: EtcdConfig) -> Self {
        Self {
            cfg,
            current: Default::default(),
        }
    }

    pub fn cfg(&self) -> &EtcdConfig {
        &self.cfg
    }

    /// The shared connection, or a new one when there is none or it failed.
    pub async fn connect(&self) -> Result<Etcd, EtcdError> {
        let mut current = self.current.lock().await;
        if let Some(etcd) = current.as_ref() {
            if !etcd.has_failed() {
                return Ok(etcd.clone());
            }
        }
        *current = None;
        let etcd = Etcd::connect(&self.cfg).await?;
        *current = Some(etcd.clone());
        Ok(etcd)
    }
}

impl From<EtcdConfig> for Connector {
    fn from(cfg: EtcdConfig) -> Self {
        Self::new(cfg)
    }
}

/// A connected client plus what is needed to name it in errors.
#[derive(Clone)]
pub struct Etcd {
    pub client: Client,
    endpoints: String,
    /// Who we are to etcd, for errors: the user name, the client certificate, or neither.
    principal: String,
    /// With TLS, a connection etcd closes is most likely its `--client-cert-auth` refusing
    /// us (the TLS alert itself does not reach the error).
    tls: TlsMode,
    timeout: Duration,
    book: std::sync::Arc<endpoints::EndpointBook>,
    /// Set by the first member fault seen through this connection (shared by its clones).
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// A key every sidecar may read (the mesh prefix): what liveness probes read.
    probe_key: String,
}

/// The longest a member may take to accept a connection and answer the probe before the
/// next one is tried: failover within about 2 s even when the first member is paused.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// HTTP/2 keepalive pings on each etcd connection (etcd's server refuses pings more frequent
/// than its `--grpc-keepalive-min-time`, 5 s by default). A registered sidecar's lease
/// keepalive (every TTL/3, answered within TTL/3 + 2 s) already finds a paused or unreachable
/// member sooner, and marks the shared connection failed for every stream on it; the pings
/// are for client-only sidecars, and each costs the member as much as a lease keepalive, so
/// they are sparse.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// A member that does not answer a ping within this is dead to us (a paused or unreachable
/// member is left within about 10 + 2 s by a sidecar that does not register).
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The client options shared by every member's connection.
fn connect_options(cfg: &EtcdConfig) -> Result<ConnectOptions, EtcdError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(cfg.timeout.min(PROBE_TIMEOUT))
        .with_timeout(cfg.timeout)
        .with_keep_alive(KEEPALIVE_EVERY, cfg.timeout.min(KEEPALIVE_TIMEOUT))
        // A member that loses its leader cancels our watches and refuses our calls instead
        // of serving a stale view: how a partitioned member is left without probing it.
        .with_require_leader(true);
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        opts = opts
            .with_user(user.clone(), password.clone())
            .with_auto_token_refresh(true);
    }
    if cfg.cert.is_some() != cfg.key.is_some() {
        return Err(EtcdError::TlsIncomplete);
    }
    if cfg.ca.is_some() || cfg.cert.is_some() {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|source| EtcdError::TlsFile {
                path: p.display().to_string(),
                source,
            })
        };
        let mut tls = TlsOptions::new();
        if let Some(ca) = &cfg.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

fn tls_mode(cfg: &EtcdConfig, endpoint: &str) -> TlsMode {
    match (&cfg.cert, &cfg.ca) {
        (Some(_), _) => TlsMode::WithCert,
        (None, Some(_)) => TlsMode::WithoutCert,
        (None, None) if endpoint.starts_with("https://") => TlsMode::WithoutCert,
        (None, None) => TlsMode::Plain,
    }
}

// === impl Etcd ===

impl Etcd {
    /// Connect to one live member of the cluster (see [`endpoints`]): the last member that
    /// answered first, recently failed members last. A member counts as live when it answers
    /// a linearizable read, which needs a quorum behind it. Refusals every member would repeat
    /// (wrong password, TLS setup) are returned at once; otherwise, when no member answers,
    /// the error names each endpoint tried and why.
    ///
    /// With a user name and password, etcd-client authenticates when connecting, so a wrong
    /// password is reported here (as [`EtcdError::AuthFailed`]); the token is refreshed
    /// automatically when etcd expires it (simple tokens live 5 minutes by default), so a
    /// long-lived watch or keepalive does not fail over it.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, EtcdError> {
        let book = endpoints::book(&cfg.endpoints);
        let opts = connect_options(cfg)?;
        let mut attempts = Vec::new();
        for endpoint in book.candidates() {
            match Self::connect_one(cfg, &endpoint, opts.clone(), book.clone()).await {
                Ok(etcd) => {
                    book.succeeded(&endpoint);
                    etcd.sync_members_if_due(cfg.auto_sync_interval).await;
                    return Ok(etcd);
                }
                Err(e) if e.is_refusal() => return Err(e),
                Err(e) => {
                    tracing::debug!(endpoint, error = %e, "etcd member unusable; trying the next");
                    book.failed(&endpoint);
                    attempts.push((endpoint, e.to_string()));
                }
            }
        }
        Err(EtcdError::Unreachable { attempts })
    }

    /// A client for `endpoint` alone, checked with a linearizable read of one key.
    async fn connect_one(
        cfg: &EtcdConfig,
        endpoint: &str,
        opts: ConnectOptions,
        book: std::sync::Arc<endpoints::EndpointBook>,
    ) -> Result<Self, EtcdError> {
        let principal = principal(cfg);
        let tls = tls_mode(cfg, endpoint);
        let endpoints = endpoint.to_string();
        let timeout = cfg.timeout.min(PROBE_TIMEOUT);
        let client = tokio::time::timeout(timeout, Client::connect([endpoint], Some(opts)))
            .await
            .map_err(|_| EtcdError::Timeout {
                endpoints: endpoints.clone(),
                timeout,
            })?
            .map_err(|source| classify(&endpoints, &principal, tls, source))?;
        let etcd = Self {
            client,
            endpoints,
            principal,
            tls,
            timeout: cfg.timeout,
            book,
            failed: Default::default(),
            probe_key: keys::Keys::new(&cfg.prefix).mesh(),
        };
        let probe = etcd.probe_key.clone();
        let mut c = etcd.client.clone();
        match tokio::time::timeout(timeout, c.get(probe, None)).await {
            Ok(Ok(_)) => Ok(etcd),
            Ok(Err(e)) => Err(classify(&etcd.endpoints, &etcd.principal, tls, e)),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: etcd.endpoints.clone(),
                timeout,
            }),
        }
    }

    /// [`Self::sync_members`] when `every` has passed since the last sync in this process
    /// (long-lived connections call it periodically).
    pub async fn sync_members_if_due(&self, every: Duration) {
        if self.book.sync_due(every) {
            self.sync_members().await;
        }
    }

    /// Learn the cluster's members (their client URLs) so a replaced member is found
    /// without a configuration change. Best effort: a refusal changes nothing.
    async fn sync_members(&self) {
        let mut c = self.client.clone();
        match tokio::time::timeout(self.timeout, c.member_list()).await {
            Ok(Ok(list)) => {
                let urls = list
                    .members()
                    .iter()
                    .flat_map(|m| m.client_urls().iter().cloned())
                    .collect();
                self.book.set_members_from(&self.endpoints, urls);
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read etcd's member list"),
            Err(_) => tracing::debug!("etcd's member list did not arrive in time"),
        }
    }

    /// The member this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoints
    }

    /// Record that this member failed (a broken stream, a call without answer), so the next
    /// connection tries the others first.
    pub fn mark_failed(&self) {
        self.failed
            .store(true, std::sync::atomic::Ordering::Release);
        self.book.failed(&self.endpoints);
    }

    /// A linearizable read of one key (a count, no values): the member answers with a quorum
    /// behind it.
    pub async fn probe(&self) -> Result<(), EtcdError> {
        let mut client = self.client.clone();
        let opts = etcd_client::GetOptions::new().with_count_only();
        self.call(client.get(self.probe_key.as_str(), Some(opts)))
            .await
            .map(|_| ())
    }

    /// Whether a member fault was seen through this connection.
    pub fn has_failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Name the endpoints in an error from a call, and its cause when it is one of the
    /// security refusals (authentication, permission, TLS).
    pub fn err(&self, source: etcd_client::Error) -> EtcdError {
        let e = classify(&self.endpoints, &self.principal, self.tls, source);
        if e.is_member_fault() {
            self.mark_failed();
        }
        e
    }

    /// Run one call with the configured timeout.
    pub async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => {
                self.mark_failed();
                Err(EtcdError::Timeout {
                    endpoints: self.endpoints.clone(),
                    timeout: self.timeout,
                })
            }
        }
    }
}

/// How this client talks to etcd, which decides what a closed connection most likely means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TlsMode {
    Plain,
    WithoutCert,
    WithCert,
}

/// How this client identifies itself, as errors name it.
fn principal(cfg: &EtcdConfig) -> String {
    match (&cfg.username, &cfg.cert) {
        (Some(u), _) => format!("user `{u}`"),
        (None, Some(cert)) => format!(
            "the client certificate {} (etcd's user is its common name)",
            cert.display()
        ),
        (None, None) => "an anonymous client".to_string(),
    }
}

/// Turn an etcd-client error into a specific [`EtcdError`]. etcd reports authentication and
/// permission problems as gRPC statuses with fixed messages; TLS failures surface as transport
/// errors whose cause is only in the source chain (rustls' alert or verifier error), so the
/// chain is searched for the known causes and turned into advice naming the setting to fix.
fn classify(
    endpoints: &str,
    principal: &str,
    tls: TlsMode,
    source: etcd_client::Error,
) -> EtcdError {
    let endpoints = endpoints.to_string();
    if let etcd_client::Error::GRpcStatus(status) = &source {
        let msg = status.message();
        if msg.contains("authentication failed") {
            let user = principal
                .strip_prefix("user `")
                .and_then(|u| u.strip_suffix('`'))
                .unwrap_or(principal)
                .to_string();
            return EtcdError::AuthFailed { endpoints, user };
        }
        if msg.contains("user name is empty") {
            return EtcdError::AuthRequired { endpoints };
        }
        if msg.contains("permission denied") {
            return EtcdError::PermissionDenied {
                endpoints,
                user: principal.to_string(),
            };
        }
    }
    if let Some(cause) = tls_cause(&source, tls) {
        return EtcdError::Tls { endpoints, cause };
    }
    EtcdError::Call { endpoints, source }
}

/// The TLS problem behind a transport error, in words that name the setting to fix.
fn tls_cause(err: &etcd_client::Error, tls: TlsMode) -> Option<String> {
    let mut chain = err.to_string();
    let mut next: Option<&dyn std::error::Error> = std::error::Error::source(err);
    while let Some(e) = next {
        chain.push_str(": ");
        chain.push_str(&e.to_string());
        next = e.source();
    }
    let lower = chain.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(&needle.to_ascii_lowercase());
    // etcd (Go, TLS 1.3) verifies the client's certificate after the client considers the
    // handshake done; its refusal (alert `bad_certificate` even for a missing certificate)
    // reaches us as that alert or, when the connection is gone first, as a closed connection.
    let closed = has("connection closed")
        || has("canceled")
        || has("connection reset")
        || has("broken pipe");
    let advice = if has("CertificateRequired")
        || has("certificate required")
        || (tls == TlsMode::WithoutCert && (closed || has("BadCertificate")))
    {
        "etcd closed the connection and no client certificate is configured; etcd started with --client-cert-auth requires one: set store.etcd.cert and store.etcd.key (--etcd-cert, --etcd-key)"
    } else if tls == TlsMode::WithCert && (closed || has("BadCertificate")) {
        "etcd refused our client certificate (or closed the connection right after the handshake, which is how it refuses one): it must be signed by a CA in etcd's --trusted-ca-file and be valid now; check store.etcd.cert"
    } else if has("UnknownIssuer") || has("BadSignature") {
        "etcd's server certificate is not signed by a CA in store.etcd.ca (--etcd-ca)"
    } else if has("NotValidForName") || has("not valid for name") {
        "etcd's server certificate does not name the host or IP address of the endpoint"
    } else if has("BadCertificate") || has("UnknownCA") || has("unknown ca") {
        "etcd refused our client certificate: it is not signed by a CA etcd trusts (--trusted-ca-file)"
    } else if has("CertificateExpired") || has("expired") && has("certificate") {
        "a certificate has expired (ours or etcd's)"
    } else if has("InvalidContentType") || has("corrupt message") {
        "the endpoint does not speak TLS: use an http:// endpoint, or enable TLS on etcd"
    } else if has("invalid peer certificate") || has("tls handshake") || has("AlertReceived") {
        "the handshake was refused"
    } else {
        return None;
    };
    Some(format!("{advice} ({chain})"))
}

/// How often a watch's silence is checked (a local timer: it costs etcd nothing).
pub const LIVENESS_TICK: Duration = Duration::from_secs(2);
/// A watch silent this long is asked for a progress notification...
pub const PROGRESS_AFTER: Duration = Duration::from_secs(60);
/// ...and, when that is not answered within this (etcd 3.4's gRPC proxy ignores progress
/// requests), the connection is checked with a read instead.
pub const PROGRESS_ANSWER: Duration = Duration::from_secs(5);

/// Keeps a watch honest without costing etcd anything at rest. A dead member is found by the
/// connection, not by probing each watch: a killed member resets it at once, a paused or
/// unreachable one misses the registration's lease keepalive (which marks the shared
/// connection failed, seen here at the next tick) or the HTTP/2 keepalive pings (every 10 s,
/// one per connection), and a member cut off from its quorum cancels the watch itself because
/// every call carries etcd's "require leader" flag (after about 3 election timeouts). What is
/// left, a stream that stays open yet delivers nothing, is caught by asking for a progress
/// notification after [`PROGRESS_AFTER`] of silence (etcd also sends one every 10 minutes to
/// watches created with `progress_notify`); a request nobody answers (a 3.4 proxy) is followed
/// by a linearizable read on the same connection, whose failure ends the session. Call
/// `heard` on every message.
pub struct WatchLiveness {
    probe: tokio::time::Interval,
    last_heard: std::time::Instant,
    asked: Option<std::time::Instant>,
}

// === impl WatchLiveness ===

impl WatchLiveness {
    pub fn new() -> Self {
        let mut probe = tokio::time::interval(LIVENESS_TICK);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            probe,
            last_heard: std::time::Instant::now(),
            asked: None,
        }
    }

    pub async fn tick(&mut self) {
        self.probe.tick().await;
    }

    pub fn heard(&mut self) {
        self.last_heard = std::time::Instant::now();
        self.asked = None;
    }

    pub async fn check(
        &mut self,
        etcd: &Etcd,
        stream: &mut etcd_client::WatchStream,
    ) -> Result<(), EtcdError> {
        if etcd.has_failed() {
            // Another user of this connection (the registration's keepalive, a read) saw the
            // member fail: one probe serves every stream on the connection.
            return Err(EtcdError::Unreachable {
                attempts: vec![(
                    etcd.endpoint().to_string(),
                    "another stream on this connection found the member failed".into(),
                )],
            });
        }
        match self.asked {
            None if self.last_heard.elapsed() >= PROGRESS_AFTER => {
                self.asked = Some(std::time::Instant::now());
                stream.request_progress().await.map_err(|e| etcd.err(e))?;
            }
            Some(at) if at.elapsed() >= PROGRESS_ANSWER => {
                // No progress answer: is the connection (and a quorum behind it) alive?
                etcd.probe().await?;
                self.heard();
            }
            _ => {}
        }
        Ok(())
    }
}

impl Default for WatchLiveness {
    fn default() -> Self {
        Self::new()
    }
}

/// Exponential backoff from 100 ms to 2 s with +-50 % jitter. The cap bounds how long a fleet
/// stays away after etcd comes back (within about 3 s); the wide jitter spreads the fleet's
/// reconnections over that window instead of one burst (sidecars that lost etcd at the same
/// moment would otherwise come back in lockstep).
pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(5)).min(2_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let jitter = (nanos % (base + 1)) as i64 - (base / 2) as i64;
    Duration::from_millis((base as i64 + jitter).max(10) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(0) <= Duration::from_millis(150));
        for a in 0..20 {
            let b = backoff(a);
            assert!(
                b >= Duration::from_millis(10) && b <= Duration::from_millis(3000),
                "{a}: {b:?}"
            );
        }
        assert!(backoff(10) >= Duration::from_millis(1000));
    }
}
