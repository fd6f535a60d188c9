//! Peer verification on both sides of an mTLS connection, and the mapping of every failure to
//! a precise reason for logs, metrics and the `trellis-error` header.
//!
//! Chain validation is delegated to webpki; on top of it, the server checks that the client's
//! SPIFFE ID is in our trust domain, and the client checks that the server's SPIFFE ID is exactly
//! the identity expected for the destination (a valid chain alone would let any mesh member
//! impersonate any service).

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use trellis_policies::SpiffeId;

/// Why a TLS handshake with a peer failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    Expired,
    NotYetValid,
    /// The chain does not lead to a CA in our trust bundle.
    UnknownCa,
    WrongTrustDomain,
    /// The SPIFFE ID is not the one expected for the destination service.
    WrongIdentity,
    MissingSpiffeId,
    NoClientCert,
    /// Our certificate was refused by the peer (it sent an alert).
    PeerRejected,
    /// Plaintext on a port that requires mTLS.
    Plaintext,
    Timeout,
    Other,
}

/// A SPIFFE check that failed after the chain was found valid.
#[derive(Debug)]
enum SpiffeCheck {
    Missing(String),
    WrongTrustDomain { got: SpiffeId, want: String },
    WrongIdentity { got: SpiffeId, want: SpiffeId },
}

// === impl TlsFailure ===

impl TlsFailure {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::UnknownCa => "unknown_ca",
            Self::WrongTrustDomain => "wrong_trust_domain",
            Self::WrongIdentity => "wrong_identity",
            Self::MissingSpiffeId => "missing_spiffe_id",
            Self::NoClientCert => "no_client_cert",
            Self::PeerRejected => "peer_rejected",
            Self::Plaintext => "plaintext",
            Self::Timeout => "timeout",
            Self::Other => "handshake_error",
        }
    }

    /// `trellis-error` header value.
    pub fn cause(self) -> &'static str {
        match self {
            Self::Expired => "tls-expired",
            Self::NotYetValid => "tls-not-yet-valid",
            Self::UnknownCa => "tls-unknown-ca",
            Self::WrongTrustDomain => "tls-wrong-trust-domain",
            Self::WrongIdentity => "tls-wrong-identity",
            Self::MissingSpiffeId => "tls-missing-spiffe-id",
            Self::NoClientCert => "tls-no-client-cert",
            Self::PeerRejected => "tls-peer-rejected",
            Self::Plaintext => "tls-plaintext",
            Self::Timeout => "tls-timeout",
            Self::Other => "tls-handshake-failed",
        }
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// Classify a rustls error.
pub fn classify_rustls_error(err: &rustls::Error) -> TlsFailure {
    match err {
        rustls::Error::InvalidCertificate(cert_err) => match cert_err {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                TlsFailure::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsFailure::NotYetValid
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                TlsFailure::UnknownCa
            }
            CertificateError::Other(OtherError(inner)) => match inner.downcast_ref::<SpiffeCheck>()
            {
                Some(SpiffeCheck::Missing(_)) => TlsFailure::MissingSpiffeId,
                Some(SpiffeCheck::WrongTrustDomain { .. }) => TlsFailure::WrongTrustDomain,
                Some(SpiffeCheck::WrongIdentity { .. }) => TlsFailure::WrongIdentity,
                None => TlsFailure::Other,
            },
            _ => TlsFailure::Other,
        },
        rustls::Error::NoCertificatesPresented => TlsFailure::NoClientCert,
        rustls::Error::AlertReceived(_) => TlsFailure::PeerRejected,
        _ => TlsFailure::Other,
    }
}

/// Classify an I/O error from a tokio-rustls handshake.
pub fn classify_io_error(err: &std::io::Error) -> TlsFailure {
    match err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(e) => classify_rustls_error(e),
        None if err.kind() == std::io::ErrorKind::TimedOut => TlsFailure::Timeout,
        None => TlsFailure::Other,
    }
}

/// A readable description of a handshake error: our SPIFFE checks print as
/// "peer is spiffe://td/service/x, expected spiffe://td/service/y" instead of rustls' debug form.
pub fn describe_io_error(err: &std::io::Error) -> String {
    let rustls_err = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) =
        rustls_err
    {
        if let Some(check) = inner.downcast_ref::<SpiffeCheck>() {
            return format!("invalid peer certificate: {check}");
        }
    }
    err.to_string()
}

/// The SPIFFE ID of a certificate: its single `spiffe://` URI SAN.
pub fn spiffe_id_from_cert(der: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or_else(|| "certificate has no subjectAltName".to_string())?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(uri), None) => SpiffeId::parse(uri).map_err(|e| e.to_string()),
        (None, _) => Err("certificate has no spiffe:// URI SAN".into()),
        (Some(_), Some(_)) => Err("certificate has more than one spiffe:// URI SAN".into()),
    }
}

/// A chain whose signature does not verify under any of our anchors comes from a CA we do
/// not know. webpki reports `BadSignature` when a foreign CA has the same name as ours (two
/// `cert init` runs for one trust domain), which rustls sends as a `decrypt_error` alert;
/// the peer's operator should read `unknown_ca`, as for any other foreign CA.
fn chain_error(e: rustls::Error) -> rustls::Error {
    match e {
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        }
        other => other,
    }
}

fn spiffe_error(check: SpiffeCheck) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(check))))
}

impl fmt::Display for SpiffeCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(why) => write!(f, "no SPIFFE ID: {why}"),
            Self::WrongTrustDomain { got, want } => {
                write!(f, "peer {got} is not in trust domain {want}")
            }
            Self::WrongIdentity { got, want } => write!(f, "peer is {got}, expected {want}"),
        }
    }
}

impl std::error::Error for SpiffeCheck {}

/// Server side: webpki chain validation, then "the client is in our trust domain".
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) trust_domain: String,
}

// === impl SpiffeClientVerifier ===

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(chain_error)?;
        let id =
            spiffe_id_from_cert(end_entity).map_err(|e| spiffe_error(SpiffeCheck::Missing(e)))?;
        if id.trust_domain() != self.trust_domain {
            return Err(spiffe_error(SpiffeCheck::WrongTrustDomain {
                got: id,
                want: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side: chain validation against our bundle, then "the server is exactly `expected`".
/// The DNS name is ignored: mesh peers are named by SPIFFE ID, not by host name.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) expected: SpiffeId,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

// === impl SpiffeServerVerifier ===

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )
        .map_err(chain_error)?;
        let id =
            spiffe_id_from_cert(end_entity).map_err(|e| spiffe_error(SpiffeCheck::Missing(e)))?;
        if id.trust_domain() != self.expected.trust_domain() {
            return Err(spiffe_error(SpiffeCheck::WrongTrustDomain {
                got: id,
                want: self.expected.trust_domain().to_string(),
            }));
        }
        if id != self.expected {
            return Err(spiffe_error(SpiffeCheck::WrongIdentity {
                got: id,
                want: self.expected.clone(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
