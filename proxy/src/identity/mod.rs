//! Workload identity: SPIFFE X.509 certificates, the verifiers that check peers against them,
//! a small CA for `mesh-agent cert`, and hot reload of the files.

mod ca;
mod reload;
mod tls;
mod verify;

pub use ca::{CaError, CertificateAuthority, IssuedCert};
pub use reload::{spawn_reloader, IdentityStore};
pub(crate) use tls::not_after;
pub use tls::{Alpn, IdentityError, IdentityFiles, TlsContext};
pub use trellis_policies::SpiffeId;
pub use verify::{
    classify_io_error, classify_rustls_error, describe_io_error, spiffe_id_from_cert, TlsFailure,
};

/// The one crypto provider Trellis uses. Passing it explicitly avoids rustls' process-default
/// lookup, which panics when more than one provider is compiled in.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
