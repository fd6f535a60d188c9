//! SPIFFE IDs (`policies/src/spiffe.rs` `SpiffeId::parse`), as found in registrations, policies
//! and peer certificates, and the certificate path itself (`proxy/src/identity/verify.rs`
//! `spiffe_id_from_cert`: X.509 DER, subjectAltName, the single `spiffe://` URI).
//!
//! Input: a mode byte, then an ID (even modes) or a DER certificate (odd modes).

use rustls_pki_types::CertificateDer;
use trellis_policies::{SpiffeError, SpiffeId};
use trellis_proxy::identity::spiffe_id_from_cert;

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"spiffe://",
    b"trellis.local",
    b"/service/",
    b"orders",
    b"/",
    b"//",
    b"/.",
    b"/..",
    b"%2F",
    b"?",
    b"#",
    b"@",
    b":8080",
    b"SPIFFE://",
    b"\xc3\xa9",
    b"\x00",
    b"\x30\x82",
    b"\x06\x03\x55\x1d\x11",
    b"\x86",
    b"\xa0",
];

pub fn run(data: &[u8]) -> u64 {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    if mode & 1 == 1 {
        return match spiffe_id_from_cert(&CertificateDer::from(rest)) {
            Ok(id) => {
                check(&id);
                outcome("cert ok")
            }
            Err(e) => outcome(e.split('`').next().unwrap_or_default()),
        };
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return 1;
    };
    match SpiffeId::parse(text) {
        Ok(id) => {
            assert_eq!(
                id.to_string(),
                text,
                "an accepted ID prints as it was written"
            );
            check(&id);
            outcome(if id.service().is_some() {
                "service"
            } else {
                "other"
            })
        }
        // The messages echo the input: label by kind only.
        Err(SpiffeError::Scheme(_)) => outcome("scheme"),
        Err(SpiffeError::TrustDomain(_)) => outcome("trust domain"),
        Err(SpiffeError::Path(_)) => outcome("path"),
    }
}

/// What every accepted ID satisfies.
fn check(id: &SpiffeId) {
    let again = SpiffeId::parse(&id.to_string());
    assert_eq!(
        again.as_ref(),
        Ok(id),
        "an accepted ID parses again to itself"
    );
    assert!(!id.trust_domain().is_empty());
    assert!(id.path().starts_with('/'));
    if let Some(service) = id.service() {
        let built = SpiffeId::for_service(id.trust_domain(), service);
        assert_eq!(built.as_ref(), Ok(id), "service() and for_service() agree");
    }
}
