//! A minimal certificate authority for `mesh-agent cert` and tests: an ECDSA P-256 root whose
//! URI SAN is the trust domain (`spiffe://<td>`, as the SPIFFE spec allows for signing
//! certificates), issuing short-lived leaves with one SPIFFE URI SAN and both server and client
//! auth, because every sidecar is both.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use trellis_policies::SpiffeId;

/// Leaves are valid from slightly in the past so that small clock skew between hosts does not
/// make a fresh certificate "not yet valid".
const BACKDATE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("CA certificate: {0}")]
    BadCa(String),
    #[error("invalid trust domain `{0}`")]
    TrustDomain(String),
    #[error(transparent)]
    Write(#[from] crate::atomic_file::AtomicWriteError),
}

pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A freshly issued leaf certificate and its private key, PEM-encoded.
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

// === impl CertificateAuthority ===

impl CertificateAuthority {
    /// Create a new self-signed root for `trust_domain`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        // Reuse the SPIFFE parser to validate the trust domain.
        SpiffeId::parse(&format!("spiffe://{trust_domain}/x"))
            .map_err(|_| CaError::TrustDomain(trust_domain.into()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(DnType::CommonName, format!("Trellis CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Load a CA written by [`CertificateAuthority::write`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let trust_domain = ca_trust_domain(cert_pem)?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CaError::BadCa(format!("private key: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::BadCa(e.to_string()))?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem_of(&issuer),
            trust_domain,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issue a leaf for `service` in this CA's trust domain, valid for `ttl` from now.
    pub fn issue_service(&self, service: &str, ttl: Duration) -> Result<IssuedCert, CaError> {
        let id = SpiffeId::for_service(&self.trust_domain, service)
            .map_err(|e| CaError::BadCa(e.to_string()))?;
        let now = SystemTime::now();
        self.issue(&id, now - BACKDATE, now + ttl)
    }

    /// Issue a leaf for any SPIFFE ID and validity window (tests use this for expired,
    /// not-yet-valid and foreign-trust-domain certificates).
    pub fn issue(
        &self,
        id: &SpiffeId,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            id.service().unwrap_or(id.path()).to_string(),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issue a certificate for a TLS server outside the mesh that is reached by host name or
    /// IP address (etcd, in tests and small setups that reuse the mesh CA for it): DNS and IP
    /// SANs instead of a SPIFFE ID, server and client auth (etcd members also dial each other
    /// and, with `--client-cert-auth`, themselves). The first host is the common name.
    pub fn issue_for_hosts(&self, hosts: &[&str], ttl: Duration) -> Result<IssuedCert, CaError> {
        let first = hosts
            .first()
            .ok_or_else(|| CaError::BadCa("a host certificate needs at least one host".into()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*h).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ttl).into();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Write `ca.pem` and `ca-key.pem` (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), CaError> {
        write_file(&dir.join("ca.pem"), &self.cert_pem, false)?;
        write_file(&dir.join("ca-key.pem"), &self.key_pem, true)
    }
}

// === impl IssuedCert ===

impl IssuedCert {
    /// Write `<name>.pem` and `<name>-key.pem` (mode 0600) into `dir`, each atomically, so a
    /// sidecar watching them never reads a half-written file.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(), CaError> {
        write_file(&dir.join(format!("{name}.pem")), &self.cert_pem, false)?;
        write_file(&dir.join(format!("{name}-key.pem")), &self.key_pem, true)
    }
}

fn key_pem_of(issuer: &Issuer<'static, KeyPair>) -> String {
    issuer.key().serialize_pem()
}

fn ca_trust_domain(cert_pem: &str) -> Result<String, CaError> {
    use x509_parser::extensions::GeneralName;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CaError::BadCa(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CaError::BadCa(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CaError::BadCa(e.to_string()))?
        .ok_or_else(|| CaError::BadCa("no subjectAltName with the trust domain".into()))?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => u
                .strip_prefix("spiffe://")
                .map(|td| td.trim_end_matches('/').to_string()),
            _ => None,
        })
        .ok_or_else(|| CaError::BadCa("no spiffe://<trust-domain> URI SAN".into()))
}

/// Certificates are public (0644); private keys are 0600 from the moment they exist. Both are
/// replaced atomically ([`crate::atomic_file`]), so a sidecar re-reading them never sees half a
/// file.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CaError> {
    let mode = if private {
        crate::atomic_file::PRIVATE_MODE
    } else {
        0o644
    };
    crate::atomic_file::write_atomic(path, contents.as_bytes(), mode).map_err(CaError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    #[test]
    fn issues_leaves_with_the_service_spiffe_id_and_round_trips_through_pem() {
        let ca = CertificateAuthority::generate("example.org", Duration::from_secs(3600)).unwrap();
        let reloaded = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(reloaded.trust_domain(), "example.org");
        let leaf = reloaded
            .issue_service("orders", Duration::from_secs(60))
            .unwrap();
        let der = CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap();
        let id = super::super::spiffe_id_from_cert(&der).unwrap();
        assert_eq!(id.to_string(), "spiffe://example.org/service/orders");
    }

    #[test]
    fn rejects_bad_trust_domain() {
        assert!(CertificateAuthority::generate("Bad Domain", Duration::from_secs(1)).is_err());
    }
}
