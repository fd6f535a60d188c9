//! Server certificates of the ingress, chosen by the client's SNI name: exact names first,
//! then `*.example.com` wildcards (one label, as browsers match them), then the first
//! certificate as the default. Re-read when the files change, like the identity: a bad new
//! version is refused, counted, and the current certificates keep serving.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::ServerCertificate;
use crate::telemetry::metrics::{Metrics, ResultLabels};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no usable PEM private key: {message}")]
    Key { path: PathBuf, message: String },
    #[error("{cert}: key does not match the certificate, or is unsupported: {message}")]
    Mismatch { cert: PathBuf, message: String },
}

/// Certificates by name.
#[derive(Debug)]
pub struct SniCerts {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    /// Each configured certificate's first host name and expiry (Unix seconds), for
    /// `/config_dump` and `trellis_ingress_cert_expiry_timestamp_seconds`.
    expiry: Vec<(String, i64)>,
}

/// The rustls resolver: the current [`SniCerts`], swapped whole on reload.
#[derive(Debug)]
pub struct Resolver(ArcSwap<SniCerts>);

fn load_one(c: &ServerCertificate) -> Result<Arc<CertifiedKey>, CertError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| CertError::Read {
            path: path.clone(),
            source,
        })
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(&c.cert)?)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(CertError::NoCertificate {
            path: c.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&c.key)?).map_err(|e| CertError::Key {
        path: c.key.clone(),
        message: e.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider)
        .map(Arc::new)
        .map_err(|e| CertError::Mismatch {
            cert: c.cert.clone(),
            message: e.to_string(),
        })
}

// === impl SniCerts ===

impl SniCerts {
    /// Load every certificate; any failure refuses the whole set.
    pub fn load(certs: &[ServerCertificate]) -> Result<Self, CertError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        let mut expiry = Vec::with_capacity(certs.len());
        for c in certs {
            let key = load_one(c)?;
            let not_after = key
                .cert
                .first()
                .and_then(|leaf| crate::identity::not_after(leaf).ok())
                .unwrap_or(0);
            expiry.push((c.hosts.first().cloned().unwrap_or_default(), not_after));
            default.get_or_insert_with(|| key.clone());
            for h in &c.hosts {
                let h = h.to_ascii_lowercase();
                match h.strip_prefix("*.") {
                    Some(parent) => wildcard.insert(parent.to_string(), key.clone()),
                    None => exact.insert(h, key.clone()),
                };
            }
        }
        let Some(default) = default else {
            return Err(CertError::NoCertificate {
                path: PathBuf::from("ingress.certificates"),
            });
        };
        Ok(Self {
            exact,
            wildcard,
            default,
            expiry,
        })
    }

    pub fn lookup(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        // rustls hands the SNI name lower-cased and without a trailing dot.
        if let Some(k) = self.exact.get(name) {
            return k.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }

    /// Whether the certificate chosen for `sni` (as the handshake chose it) was configured
    /// for `host` (exactly or by a wildcard): otherwise the request is misdirected (421),
    /// since a client that trusts this connection for one name must not reach another.
    pub fn covers(&self, sni: Option<&str>, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let explicit = self.exact.get(host).or_else(|| {
            host.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        });
        explicit.is_some_and(|k| Arc::ptr_eq(k, &self.lookup(sni)))
    }
}

// === impl Resolver ===

impl Resolver {
    pub fn new(certs: SniCerts) -> Arc<Self> {
        Arc::new(Self(ArcSwap::from_pointee(certs)))
    }
}

impl Resolver {
    /// See [`SniCerts::covers`], with the certificates in use now.
    pub fn covers(&self, sni: Option<&str>, host: &str) -> bool {
        self.0.load().covers(sni, host)
    }

    /// `(first host name, not-after Unix seconds)` of each certificate in use.
    pub fn expiry(&self) -> Vec<(String, i64)> {
        self.0.load().expiry.clone()
    }
}

/// `trellis_ingress_cert_expiry_timestamp_seconds{host}`, read from the certificates in use.
#[derive(Debug)]
pub struct ExpiryCollector(pub Arc<Resolver>);

impl prometheus_client::collector::Collector for ExpiryCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        let family = Family::<Vec<(&'static str, String)>, Gauge>::default();
        for (host, not_after) in self.0.expiry() {
            family.get_or_create(&vec![("host", host)]).set(not_after);
        }
        let e = encoder.encode_descriptor(
            "ingress_cert_expiry_timestamp_seconds",
            "Expiry of each ingress server certificate in use, by its first host name",
            None,
            family.metric_type(),
        )?;
        family.encode(e)
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().lookup(hello.server_name()))
    }
}

/// Poll the certificate files every `interval`; swap in each complete, valid new set.
pub fn spawn_reloader(
    resolver: Arc<Resolver>,
    certs: Vec<ServerCertificate>,
    interval: Duration,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let read_all = || {
            certs
                .iter()
                .map(|c| (std::fs::read(&c.cert).ok(), std::fs::read(&c.key).ok()))
                .collect::<Vec<_>>()
        };
        let mut last = read_all();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let now = read_all();
            if now == last {
                continue;
            }
            last = now;
            let result = match SniCerts::load(&certs) {
                Ok(set) => {
                    resolver.0.store(Arc::new(set));
                    tracing::info!("ingress certificates reloaded");
                    "ok"
                }
                Err(e) => {
                    tracing::error!(error = %e, "rejected new ingress certificate files; keeping the current ones");
                    "error"
                }
            };
            metrics
                .cert_reloads
                .get_or_create(&ResultLabels { result })
                .inc();
        }
    })
}
