//! JWKS documents (`proxy/src/auth/jwks.rs` `parse_set`, `proxy/src/auth/key.rs`): the JSON
//! document, each JWK's fields and key material (RSA modulus and exponent, EC points, Ed25519
//! keys, HMAC secrets), and key selection by `kid` and algorithm when a token is verified
//! against the set.
//!
//! Input: the document, as fetched from a provider's `jwks_uri` (bytes, not necessarily
//! UTF-8: a non-UTF-8 document must be refused cleanly, here through its lossy text).

use std::sync::OnceLock;

use trellis_proxy::policy::auth::{AuthMetrics, JwtAuthenticator, JwtError};

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"{\"keys\":[",
    b"]}",
    b"\"kty\":",
    b"\"RSA\"",
    b"\"EC\"",
    b"\"OKP\"",
    b"\"oct\"",
    b"\"crv\":",
    b"\"P-256\"",
    b"\"P-384\"",
    b"\"Ed25519\"",
    b"\"X25519\"",
    b"\"alg\":",
    b"\"RS256\"",
    b"\"ES256\"",
    b"\"EdDSA\"",
    b"\"HS256\"",
    b"\"use\":\"enc\"",
    b"\"use\":\"sig\"",
    b"\"kid\":\"k1\"",
    b"\"n\":",
    b"\"e\":\"AQAB\"",
    b"\"x\":",
    b"\"y\":",
    b"\"k\":",
    b"\"AA\"",
    b"\"____\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"null",
    b"\\u0000",
];

/// Tokens verified against every key set that loads: HS256 with and without `kid`, and an
/// RS256, ES256 and EdDSA token with junk signatures (each takes its algorithm's path).
fn tokens() -> &'static [String] {
    static T: OnceLock<Vec<String>> = OnceLock::new();
    T.get_or_init(|| {
        let payload = br#"{"iss":"https://jwks.test","exp":4102444800,"sub":"s"}"#;
        let mut out = vec![
            super::jwt::sign(br#"{"alg":"HS256","kid":"k1"}"#, payload),
            super::jwt::sign(br#"{"alg":"HS256"}"#, payload),
        ];
        for header in [
            &br#"{"alg":"RS256","kid":"k1"}"#[..],
            br#"{"alg":"ES256"}"#,
            br#"{"alg":"EdDSA","kid":"k1"}"#,
        ] {
            let t = super::jwt::sign(header, payload);
            let (m, _) = t.rsplit_once('.').unwrap_or_default();
            out.push(format!("{m}.{}", "A".repeat(86)));
        }
        out
    })
}

pub fn run(data: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(data);
    let spec = serde_json::from_value(serde_json::json!({
        "issuer": "https://jwks.test",
        "jwks": {"inline": text},
    }));
    let spec = match spec {
        Ok(s) => s,
        Err(e) => return outcome(&e.to_string()),
    };
    let metrics = AuthMetrics::default();
    let auth = match JwtAuthenticator::new(vec![("p".to_string(), spec)], &metrics) {
        Ok(a) => a,
        Err(e) => return outcome(&e.to_string()),
    };
    let status = auth.status();
    assert_eq!(status.len(), 1);
    assert!(!status[0].keys.is_empty(), "a loaded set has a key");
    assert!(status[0].keys.len() <= trellis_proxy::policy::auth::jwks::MAX_KEYS);
    let mut label = format!("keys {} ", crate::count(status[0].keys.len()));
    for t in tokens() {
        let Some(r) = super::jwt::now(auth.authenticate(t)) else {
            panic!("an inline key set made authenticate wait");
        };
        label.push_str(match r {
            Ok(_) => "ok ",
            Err(JwtError::Malformed(m)) => m,
            Err(e) => e.reason(),
        });
    }
    outcome(&label)
}
