//! JWS/JWT tokens (`proxy/src/auth/jwt.rs`): the token's extraction from a request, its
//! split and base64url/JSON decoding, the header checks, provider choice by `iss`, the
//! signature, and the claims checks.
//!
//! Input: a mode byte, then either a raw token (as a client sends it, via the
//! `Authorization` header or the `access_token` query parameter) or `header\0payload`, the
//! JSON of a token the target signs with the HS256 key of a configured provider, so that the
//! claims checks after the signature (time, audience, forwarded claims) are reached too.

use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderMap, HeaderValue, Uri};
use trellis_proxy::policy::auth::{AuthMetrics, JwtAuthenticator, JwtError};

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"eyJ",
    b".",
    b"\"alg\":",
    b"\"HS256\"",
    b"\"RS256\"",
    b"\"ES256\"",
    b"\"EdDSA\"",
    b"\"none\"",
    b"\"kid\":",
    b"\"crit\":[]",
    b"\"iss\":\"https://hs.test\"",
    b"\"iss\":\"https://rsa.test\"",
    b"\"exp\":",
    b"\"nbf\":",
    b"\"aud\":",
    b"\"sub\":",
    b"\"scope\":",
    b"\"scp\":",
    b"\"tenant\":",
    b"4102444800",
    b"1e308",
    b"-1e308",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"null",
    b"\\u0000",
    b"\\n",
];

/// The HS256 secret of provider `hs` (also in the seed corpus).
pub const HS_SECRET: &[u8] = b"trellis-fuzz-hs256-secret-0123456789abcdef";

/// Two providers: `hs` (HS256 inline key, audience `api`, two forwarded claims) and `rsa`
/// (the test fixture's RSA key); a query parameter as a second token source.
pub fn authenticator() -> &'static JwtAuthenticator {
    static A: OnceLock<JwtAuthenticator> = OnceLock::new();
    A.get_or_init(|| {
        let hs_jwks = serde_json::json!({"keys": [{
            "kty": "oct", "kid": "hs", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(HS_SECRET),
        }]});
        let rsa_jwks = serde_json::json!({"keys": [serde_json::from_str::<serde_json::Value>(
            include_str!("../../../proxy/tests/fixtures/jwt_rsa_test_key.jwk.json"),
        ).unwrap_or_default()]});
        let spec =
            |v: serde_json::Value| serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        let providers = vec![
            (
                "hs".to_string(),
                spec(serde_json::json!({
                    "issuer": "https://hs.test",
                    "audiences": ["api"],
                    "jwks": {"inline": hs_jwks.to_string()},
                    "forward_claims": {"sub": "x-jwt-sub", "tenant": "x-tenant"},
                })),
            ),
            (
                "rsa".to_string(),
                spec(serde_json::json!({
                    "issuer": "https://rsa.test",
                    "jwks": {"inline": rsa_jwks.to_string()},
                    "from": {"query": "access_token"},
                })),
            ),
        ];
        let metrics = AuthMetrics::register(&mut prometheus_client::registry::Registry::default());
        JwtAuthenticator::new(providers, &metrics).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Run a future that never waits (inline key sets need no I/O) to completion.
pub fn now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

pub fn sign(header: &[u8], payload: &[u8]) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HS_SECRET);
    let sig = ring::hmac::sign(&key, message.as_bytes());
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

pub fn run(data: &[u8]) -> u64 {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let auth = authenticator();
    let token = if mode & 1 == 1 {
        let parts = crate::split(rest, 2);
        sign(parts[0], parts.get(1).copied().unwrap_or_default())
    } else {
        // As a client sends it: a header (any prefix case) or a query parameter.
        let mut headers = HeaderMap::new();
        let uri = if mode & 2 == 0 {
            let Ok(v) = HeaderValue::from_bytes(rest) else {
                return 1;
            };
            headers.insert("authorization", v);
            Uri::from_static("/")
        } else {
            let Ok(u) = Uri::try_from(rest) else {
                return 2;
            };
            u
        };
        match auth.token_from(&headers, &uri) {
            Some(t) => t.to_string(),
            None => return 3,
        }
    };
    let Some(result) = now(auth.authenticate(&token)) else {
        panic!("an inline key set made authenticate wait");
    };
    match result {
        Ok(t) => {
            // Accepted means: a configured provider, and a token that verifies.
            assert!(
                *t.provider == *"hs" || *t.provider == *"rsa",
                "unknown provider {}",
                t.provider
            );
            assert!(t.claims.contains_key("exp"), "accepted without exp");
            for (name, value) in &t.forwarded_headers {
                assert!(name == "x-jwt-sub" || name == "x-tenant", "{name}");
                assert!(value.to_str().is_ok());
            }
            outcome(&format!(
                "ok {} {}",
                t.provider,
                crate::count(t.forwarded_headers.len())
            ))
        }
        Err(JwtError::Malformed(why)) => outcome(why),
        Err(e) => outcome(e.reason()),
    }
}
