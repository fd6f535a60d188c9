//! Request authentication building blocks: JWT verification against JWKS key sets.
//!
//! [`JwtAuthenticator`] is built from the policy's JWT providers and replaced when they
//! change. On the request path the caller takes the token with
//! [`JwtAuthenticator::token_from`], verifies it with [`JwtAuthenticator::authenticate`], and on
//! success sets [`VerifiedToken::forwarded_headers`] (after removing any client-sent copies,
//! [`JwtAuthenticator::forwarded_header_names`]); on failure it answers 401 with the
//! [`JwtError::reason`] only in metrics and logs.
//!
//! Verification with a known key never waits on I/O: key sets are cached behind `arc-swap`
//! and refreshed in the background (see [`jwks`]). Accepted algorithms are RS256, ES256, EdDSA
//! (Ed25519) and HS256, each bound to its key type so that no token can choose how its key
//! is used.

mod auth_metrics;
mod cache;
mod error;
mod fetch;
pub mod jwks;
mod jwt;
mod key;

pub use auth_metrics::{AuthMetrics, NO_PROVIDER};
pub use error::{AuthError, JwtError};
pub use fetch::{FetchError, FETCH_TIMEOUT, MAX_JWKS_BYTES};
pub use jwks::JwksStatus;
pub use jwt::{JwtAuthenticator, VerifiedToken, MAX_TOKEN_LEN};
pub use key::Alg;

#[cfg(test)]
mod tests;
