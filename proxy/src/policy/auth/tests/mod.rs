//! Tests of JWT verification with real keys of each algorithm, and of JWKS fetching against a
//! loopback HTTP server.
//!
//! EC and Ed25519 keys are generated per run with ring; the RSA key is a fixed 2048-bit test
//! key (`proxy/tests/fixtures/jwt_rsa_test_key.*`, made once with `openssl genrsa`), since
//! ring cannot generate RSA keys.

mod https;
mod jwks_server;
mod signer;
mod verify;

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use trellis_policies::{JwksSource, JwtProviderSpec, TokenSource};

use super::{AuthMetrics, JwtAuthenticator};

pub(super) const ISSUER: &str = "https://idp.test";
pub(super) const AUDIENCE: &str = "orders";

pub(super) fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Claims of a token valid for five minutes.
pub(super) fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "exp": now() + 300,
        "iat": now(),
        "scope": "read write",
        "tenant": "acme",
    })
}

/// A provider for [`ISSUER`] with the given JWKS, audience [`AUDIENCE`], forwarding `sub`
/// and `tenant`.
pub(super) fn provider(jwks: JwksSource) -> JwtProviderSpec {
    JwtProviderSpec {
        issuer: ISSUER.into(),
        audiences: vec![AUDIENCE.into()],
        jwks,
        clock_skew: std::time::Duration::from_secs(60),
        forward_claims: [("sub", "x-user"), ("tenant", "x-tenant")]
            .into_iter()
            .map(|(c, h)| (c.to_string(), h.to_string()))
            .collect(),
        from: TokenSource::default(),
        forward_token: false,
        jwks_refresh: std::time::Duration::from_secs(600),
        min_refresh_interval: std::time::Duration::from_secs(1),
    }
}

pub(super) fn authenticator(spec: JwtProviderSpec) -> JwtAuthenticator {
    JwtAuthenticator::new(vec![("main".into(), spec)], &AuthMetrics::default())
        .expect("valid provider")
}
