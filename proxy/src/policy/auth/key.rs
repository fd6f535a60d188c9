//! One verification key from a JWKS, bound to exactly one JWS algorithm.
//!
//! Binding the algorithm to the key (from the JWK's `kty`/`crv`, and its `alg` when present) is
//! what prevents algorithm confusion: a token says which algorithm it was signed with, and a
//! key only ever verifies with its own. An `HS256` token naming an RSA key's `kid` never gets
//! the RSA modulus used as an HMAC secret.
//!
//! The signature primitives are ring's (the crypto library rustls already uses here); this
//! file only maps JWK fields to ring's public-key types.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

/// Smallest accepted RSA modulus, in bytes (2048 bits; ring refuses smaller ones anyway).
const MIN_RSA_BYTES: usize = 256;
/// Smallest accepted HMAC secret: RFC 7518 section 3.2 requires a key as long as the hash.
const MIN_HMAC_BYTES: usize = 32;

/// The JWS algorithms Trellis accepts. `none` and everything else is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    RS256,
    ES256,
    EdDSA,
    HS256,
}

/// A key ready to verify signatures of one algorithm.
pub(crate) struct VerifyingKey {
    pub(crate) kid: Option<Arc<str>>,
    pub(crate) alg: Alg,
    material: Material,
}

enum Material {
    Rsa(RsaPublicKeyComponents<Vec<u8>>),
    /// Uncompressed SEC1 point, as ring expects for ECDSA P-256.
    Ec(Vec<u8>),
    Ed(Vec<u8>),
    Hmac(ring::hmac::Key),
}

/// The JWK fields Trellis reads (RFC 7517/7518/8037); others are ignored.
#[derive(Deserialize)]
pub(crate) struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    k: Option<String>,
}

/// Why a JWK was skipped (logged with its `kid`; other keys of the set still load).
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("key is for encryption (`use: {0}`)")]
    NotForSignatures(String),
    #[error("unsupported key type or curve `{0}`")]
    UnsupportedType(String),
    #[error("`alg: {alg}` does not fit a `{kty}` key or is not supported")]
    AlgMismatch { alg: String, kty: String },
    #[error("missing or invalid field `{0}`")]
    Field(&'static str),
    #[error("key too short: {0}")]
    TooShort(&'static str),
}

// === impl Alg ===

impl Alg {
    /// The algorithm a JWS header names, if accepted.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Self::RS256),
            "ES256" => Some(Self::ES256),
            "EdDSA" => Some(Self::EdDSA),
            "HS256" => Some(Self::HS256),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
            Self::HS256 => "HS256",
        }
    }
}

// === impl VerifyingKey ===

impl VerifyingKey {
    pub(crate) fn from_jwk(jwk: &RawJwk) -> Result<Self, KeyError> {
        if let Some(u) = jwk.use_.as_deref().filter(|u| *u != "sig") {
            return Err(KeyError::NotForSignatures(u.to_string()));
        }
        let (alg, material) = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
            ("RSA", _) => {
                let n = b64_field(&jwk.n, "n")?;
                let e = b64_field(&jwk.e, "e")?;
                if n.len() < MIN_RSA_BYTES {
                    return Err(KeyError::TooShort("RSA modulus under 2048 bits"));
                }
                (Alg::RS256, Material::Rsa(RsaPublicKeyComponents { n, e }))
            }
            ("EC", Some("P-256")) => {
                let x = b64_field(&jwk.x, "x")?;
                let y = b64_field(&jwk.y, "y")?;
                if x.len() != 32 || y.len() != 32 {
                    return Err(KeyError::Field("x/y"));
                }
                let mut point = Vec::with_capacity(65);
                point.push(0x04);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                (Alg::ES256, Material::Ec(point))
            }
            ("OKP", Some("Ed25519")) => {
                let x = b64_field(&jwk.x, "x")?;
                if x.len() != 32 {
                    return Err(KeyError::Field("x"));
                }
                (Alg::EdDSA, Material::Ed(x))
            }
            ("oct", _) => {
                let k = b64_field(&jwk.k, "k")?;
                if k.len() < MIN_HMAC_BYTES {
                    return Err(KeyError::TooShort("HMAC secret under 256 bits"));
                }
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &k);
                (Alg::HS256, Material::Hmac(key))
            }
            (kty, crv) => {
                return Err(KeyError::UnsupportedType(match crv {
                    Some(c) => format!("{kty}/{c}"),
                    None => kty.to_string(),
                }))
            }
        };
        if let Some(declared) = jwk.alg.as_deref() {
            if Alg::from_name(declared) != Some(alg) {
                return Err(KeyError::AlgMismatch {
                    alg: declared.to_string(),
                    kty: jwk.kty.clone(),
                });
            }
        }
        Ok(Self {
            kid: jwk.kid.as_deref().map(Arc::from),
            alg,
            material,
        })
    }

    /// Does `signature` sign `message` (the token's `header.payload` text) under this key?
    /// The caller has already checked that the token's algorithm is `self.alg`.
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        match &self.material {
            Material::Rsa(k) => k
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, signature)
                .is_ok(),
            Material::Ec(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, signature)
                    .is_ok()
            }
            Material::Ed(x) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, signature)
                .is_ok(),
            // Constant-time comparison inside ring.
            Material::Hmac(k) => ring::hmac::verify(k, message, signature).is_ok(),
        }
    }
}

fn b64_field(value: &Option<String>, name: &'static str) -> Result<Vec<u8>, KeyError> {
    value
        .as_deref()
        .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
        .filter(|v| !v.is_empty())
        .ok_or(KeyError::Field(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk(json: serde_json::Value) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_jwk(&serde_json::from_value(json).expect("jwk shape"))
    }

    #[test]
    fn algorithm_comes_from_the_key_type() {
        let k = jwk(serde_json::json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode([7u8; 32])}));
        assert_eq!(k.expect("oct").alg, Alg::HS256);
        let k = jwk(serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "kid": "ed"
        }))
        .expect("okp");
        assert_eq!((k.alg, k.kid.as_deref()), (Alg::EdDSA, Some("ed")));
    }

    #[test]
    fn refuses_keys_that_do_not_fit() {
        let short = serde_json::json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode([7u8; 16])});
        assert!(matches!(jwk(short), Err(KeyError::TooShort(_))));
        let wrong_alg = serde_json::json!({
            "kty": "oct", "alg": "RS256", "k": URL_SAFE_NO_PAD.encode([7u8; 32])
        });
        assert!(matches!(jwk(wrong_alg), Err(KeyError::AlgMismatch { .. })));
        let p384 = serde_json::json!({"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA"});
        assert!(matches!(jwk(p384), Err(KeyError::UnsupportedType(_))));
        let enc = serde_json::json!({"kty": "RSA", "use": "enc", "n": "AA", "e": "AQAB"});
        assert!(matches!(jwk(enc), Err(KeyError::NotForSignatures(_))));
        let secret = URL_SAFE_NO_PAD.encode([7u8; 32]);
        let none = serde_json::json!({"kty": "oct", "alg": "none", "k": secret});
        assert!(matches!(jwk(none), Err(KeyError::AlgMismatch { .. })));
    }
}
