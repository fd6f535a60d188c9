//! Coordination through etcd: registration under leases, one watch per sidecar over the mesh
//! prefix, validated policies, and the fail-static cache. Nothing here is on the request path:
//! the data plane only receives snapshots.

pub mod cache;
pub mod discovery;
mod freshness;
pub mod keys;
pub mod ratelimit;
pub mod rbac;
pub mod registration;
pub mod state;

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use trellis_proxy::config::EtcdConfig;

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
}

// === impl Etcd ===

impl Etcd {
    /// Create a client. etcd-client connects lazily, so this succeeds without a server; the
    /// first call reports an unreachable cluster.
    ///
    /// With a user name and password, etcd-client authenticates here, so a wrong password is
    /// reported by `connect` (as [`EtcdError::AuthFailed`]); the token is refreshed
    /// automatically when etcd expires it (simple tokens live 5 minutes by default), so a
    /// long-lived watch or keepalive does not fail over it.
    pub async fn connect(cfg: &EtcdConfig) -> Result<Self, EtcdError> {
        let endpoints = cfg.endpoints.join(", ");
        let principal = principal(cfg);
        let tls = match (&cfg.cert, &cfg.ca) {
            (Some(_), _) => TlsMode::WithCert,
            (None, Some(_)) => TlsMode::WithoutCert,
            (None, None) if cfg.endpoints.iter().any(|e| e.starts_with("https://")) => {
                TlsMode::WithoutCert
            }
            (None, None) => TlsMode::Plain,
        };
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.timeout)
            .with_timeout(cfg.timeout)
            .with_keep_alive(Duration::from_secs(5), cfg.timeout);
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
        let client = tokio::time::timeout(cfg.timeout, Client::connect(&cfg.endpoints, Some(opts)))
            .await
            .map_err(|_| EtcdError::Timeout {
                endpoints: endpoints.clone(),
                timeout: cfg.timeout,
            })?
            .map_err(|source| classify(&endpoints, &principal, tls, source))?;
        Ok(Self {
            client,
            endpoints,
            principal,
            tls,
            timeout: cfg.timeout,
        })
    }

    /// Name the endpoints in an error from a call, and its cause when it is one of the
    /// security refusals (authentication, permission, TLS).
    pub fn err(&self, source: etcd_client::Error) -> EtcdError {
        classify(&self.endpoints, &self.principal, self.tls, source)
    }

    /// Run one call with the configured timeout.
    pub async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|e| self.err(e)),
            Err(_) => Err(EtcdError::Timeout {
                endpoints: self.endpoints.clone(),
                timeout: self.timeout,
            }),
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

/// Exponential backoff from 100 ms to 5 s with +-25 % jitter, so sidecars that lost etcd at the
/// same moment do not come back in lockstep.
/// An idle watch is probed this often with a progress request...
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// ...and declared dead when nothing arrives for this long. (The Rust client does not fail
/// over: a watch served by a dying member just goes quiet.)
pub const WATCH_SILENCE_LIMIT: Duration = Duration::from_secs(6);

/// Keeps a watch honest: `tick` fires every [`PROGRESS_EVERY`]; `check` then asks etcd for a
/// progress notification when the watch has been idle, or fails it after
/// [`WATCH_SILENCE_LIMIT`] of silence. Call `heard` on every message.
pub struct WatchLiveness {
    probe: tokio::time::Interval,
    last_heard: std::time::Instant,
}

// === impl WatchLiveness ===

impl WatchLiveness {
    pub fn new() -> Self {
        let mut probe = tokio::time::interval(PROGRESS_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            probe,
            last_heard: std::time::Instant::now(),
        }
    }

    pub async fn tick(&mut self) {
        self.probe.tick().await;
    }

    pub fn heard(&mut self) {
        self.last_heard = std::time::Instant::now();
    }

    pub async fn check(
        &self,
        etcd: &Etcd,
        stream: &mut etcd_client::WatchStream,
    ) -> Result<(), EtcdError> {
        let silent = self.last_heard.elapsed();
        if silent > WATCH_SILENCE_LIMIT {
            return Err(EtcdError::Timeout {
                endpoints: etcd.endpoints.clone(),
                timeout: WATCH_SILENCE_LIMIT,
            });
        }
        if silent >= PROGRESS_EVERY {
            stream.request_progress().await.map_err(|e| etcd.err(e))?;
        }
        Ok(())
    }
}

impl Default for WatchLiveness {
    fn default() -> Self {
        Self::new()
    }
}

pub fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let jitter = (nanos % (base / 2 + 1)) as i64 - (base / 4) as i64;
    Duration::from_millis((base as i64 + jitter).max(10) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(0) <= Duration::from_millis(125));
        for a in 0..20 {
            let b = backoff(a);
            assert!(
                b >= Duration::from_millis(10) && b <= Duration::from_millis(6250),
                "{a}: {b:?}"
            );
        }
        assert!(backoff(10) >= Duration::from_millis(3750));
    }
}
