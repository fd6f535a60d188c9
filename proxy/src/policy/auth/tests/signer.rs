//! Test token issuers: a private key of each algorithm, its public JWK, and signing.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{json, Value};

const RSA_PKCS8_PEM: &str = include_str!("../../../../tests/fixtures/jwt_rsa_test_key.pem");
const RSA_JWK: &str = include_str!("../../../../tests/fixtures/jwt_rsa_test_key.jwk.json");

pub(in crate::policy::auth) struct Signer {
    pub kid: String,
    pub alg: &'static str,
    key: Key,
    jwk: Value,
}

enum Key {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Hmac(Vec<u8>),
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

// === impl Signer ===

impl Signer {
    /// The fixture RSA key under id `kid`.
    pub fn rsa(kid: &str) -> Self {
        let body: String = RSA_PKCS8_PEM
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = STANDARD.decode(body).expect("fixture PEM is base64");
        let key = RsaKeyPair::from_pkcs8(&der).expect("fixture is a PKCS#8 RSA key");
        let mut jwk: Value = serde_json::from_str(RSA_JWK).expect("fixture JWK");
        jwk["kid"] = json!(kid);
        Self {
            kid: kid.into(),
            alg: "RS256",
            key: Key::Rsa(key),
            jwk,
        }
    }

    pub fn ec(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("generate P-256");
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("P-256 key");
        let point = key.public_key().as_ref();
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        });
        Self {
            kid: kid.into(),
            alg: "ES256",
            key: Key::Ec(key),
            jwk,
        }
    }

    pub fn ed(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("generate Ed25519");
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("Ed25519 key");
        let jwk = json!({
            "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA",
            "x": b64(key.public_key().as_ref()),
        });
        Self {
            kid: kid.into(),
            alg: "EdDSA",
            key: Key::Ed(key),
            jwk,
        }
    }

    /// An HS256 key with a random 32-byte secret.
    pub fn hmac(kid: &str) -> Self {
        let mut secret = vec![0u8; 32];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut secret).expect("random");
        Self::hmac_with(kid, secret)
    }

    pub fn hmac_with(kid: &str, secret: Vec<u8>) -> Self {
        let jwk = json!({"kty": "oct", "kid": kid, "k": b64(&secret)});
        Self {
            kid: kid.into(),
            alg: "HS256",
            key: Key::Hmac(secret),
            jwk,
        }
    }

    /// The public JWK (for `oct`, the secret itself).
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// A token with header `{alg, kid, typ}`.
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": self.alg, "kid": self.kid, "typ": "JWT"});
        self.sign_with_header(&header, claims)
    }

    pub fn sign_with_header(&self, header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self.raw_sign(message.as_bytes());
        format!("{message}.{}", b64(&sig))
    }

    fn raw_sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .expect("RSA sign");
                sig
            }
            Key::Ec(k) => k.sign(&rng, message).expect("ECDSA sign").as_ref().to_vec(),
            Key::Ed(k) => k.sign(message).as_ref().to_vec(),
            Key::Hmac(secret) => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                ring::hmac::sign(&key, message).as_ref().to_vec()
            }
        }
    }
}

/// A JWKS document holding the signers' public keys.
pub(in crate::policy::auth) fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()}).to_string()
}

/// A token signed with HMAC-SHA256 where the secret is `secret` (e.g. an RSA public key's
/// bytes, for the algorithm-confusion attack), with the given header.
pub(in crate::policy::auth) fn hs256_with_secret(
    secret: &[u8],
    header: &Value,
    claims: &Value,
) -> String {
    Signer::hmac_with("x", secret.to_vec()).sign_with_header(header, claims)
}
