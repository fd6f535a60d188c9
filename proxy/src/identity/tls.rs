//! Loading an identity from PEM files and building the rustls configurations from it.
//!
//! A [`TlsContext`] is immutable: a certificate rotation builds a new one and swaps it in, so
//! connections already established keep their configuration and nothing in flight is dropped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use trellis_policies::SpiffeId;

use super::verify::{
    classify_rustls_error, spiffe_id_from_cert, SpiffeClientVerifier, SpiffeServerVerifier,
};

/// The three files an identity is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// ALPN offered when connecting to a peer sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Alpn {
    /// The normal sidecar-to-sidecar protocol.
    H2,
    /// Only for HTTP/1.1 upgrade requests (WebSocket), which HTTP/2 cannot carry.
    Http11,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found ({message})")]
    NoKey { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error("certificate {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    #[error("certificate is for {got}, but this sidecar is {want}")]
    WrongIdentity { got: SpiffeId, want: SpiffeId },
    #[error("certificate is not trusted by the bundle ({reason}): {message}")]
    Untrusted {
        reason: &'static str,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Everything needed to speak mTLS as one workload, built from one version of the files.
pub struct TlsContext {
    id: SpiffeId,
    /// Unix time at which the leaf expires.
    not_after: i64,
    generation: u64,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    server: Arc<ServerConfig>,
    /// Client configurations per expected peer identity, built on first use. Only consulted when
    /// a new connection is made, never per request.
    clients: Mutex<HashMap<(SpiffeId, Alpn), Arc<ClientConfig>>>,
}

// === impl TlsContext ===

impl TlsContext {
    /// Read and check the files: parseable, key matches leaf, leaf chains to the bundle and is
    /// currently valid, and its SPIFFE ID is `expected`.
    pub fn load(
        files: &IdentityFiles,
        expected: &SpiffeId,
        generation: u64,
    ) -> Result<Self, IdentityError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| IdentityError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        Self::from_pem(
            &read(&files.cert)?,
            &read(&files.key)?,
            &read(&files.bundle)?,
            files,
            expected,
            generation,
        )
    }

    /// Like [`TlsContext::load`] on contents already read (`files` only names them in errors).
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        bundle_pem: &[u8],
        files: &IdentityFiles,
        expected: &SpiffeId,
        generation: u64,
    ) -> Result<Self, IdentityError> {
        let provider = super::crypto_provider();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| IdentityError::Certificate {
                path: files.cert.clone(),
                message: e.to_string(),
            })?;
        let leaf = chain.first().ok_or_else(|| IdentityError::NoCertificate {
            path: files.cert.clone(),
        })?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| IdentityError::NoKey {
            path: files.key.clone(),
            message: e.to_string(),
        })?;

        let mut roots = RootCertStore::empty();
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(bundle_pem) {
            let cert = cert.map_err(|e| IdentityError::Bundle {
                path: files.bundle.clone(),
                message: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| IdentityError::Bundle {
                path: files.bundle.clone(),
                message: e.to_string(),
            })?;
            count += 1;
        }
        if count == 0 {
            return Err(IdentityError::Bundle {
                path: files.bundle.clone(),
                message: "no CA certificate found".into(),
            });
        }
        let roots = Arc::new(roots);

        let id = spiffe_id_from_cert(leaf).map_err(|message| IdentityError::Certificate {
            path: files.cert.clone(),
            message,
        })?;
        if &id != expected {
            return Err(IdentityError::WrongIdentity {
                got: id,
                want: expected.clone(),
            });
        }
        let signing_key = provider.key_provider.load_private_key(key.clone_key())?;
        // `Unknown` (the key type cannot tell) is not a mismatch; only a proven mismatch fails.
        if let Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
            CertifiedKey::new(chain.clone(), signing_key).keys_match()
        {
            return Err(IdentityError::KeyMismatch);
        }
        let parsed = ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| IdentityError::Untrusted {
            reason: classify_rustls_error(&e).reason(),
            message: e.to_string(),
        })?;
        let not_after = not_after(leaf).map_err(|message| IdentityError::Certificate {
            path: files.cert.clone(),
            message,
        })?;

        let inner = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| IdentityError::Bundle {
                path: files.bundle.clone(),
                message: e.to_string(),
            })?;
        let verifier = Arc::new(SpiffeClientVerifier {
            inner,
            trust_domain: id.trust_domain().to_string(),
        });
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        Ok(Self {
            id,
            not_after,
            generation,
            chain,
            key,
            roots,
            provider,
            server: Arc::new(server),
            clients: Mutex::new(HashMap::new()),
        })
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.id
    }

    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// Increases with every successful reload; pooled connections from older generations are
    /// retired.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client configuration that accepts only a server presenting `expected`.
    pub fn client_config(
        &self,
        expected: &SpiffeId,
        alpn: Alpn,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let key = (expected.clone(), alpn);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cfg) = clients.get(&key) {
            return Ok(cfg.clone());
        }
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots.clone(),
            expected: expected.clone(),
            algs: self.provider.signature_verification_algorithms,
        });
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = match alpn {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
        };
        let cfg = Arc::new(cfg);
        clients.insert(key, cfg.clone());
        Ok(cfg)
    }
}

pub(crate) fn not_after(der: &CertificateDer<'_>) -> Result<i64, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| e.to_string())?;
    Ok(cert.validity().not_after.timestamp())
}
