//! Why a token or a provider configuration was refused.

/// Why a token was refused. The `reason()` is a stable short token for metrics, logs and the
/// `trellis-error` cause; the response to the client says no more than "invalid token" (RFC 6750),
/// so nothing here helps an attacker tune a forgery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts, bad JSON, a `crit` header, a missing or non-numeric `exp`.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token expired")]
    Expired,
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// No configured provider has the token's `iss`.
    #[error("issuer not accepted")]
    WrongIssuer,
    #[error("audience not accepted")]
    WrongAudience,
    #[error("signature does not verify")]
    BadSignature,
    /// The key id is not in the provider's key set, even after a refetch (if one was allowed).
    #[error("unknown key id")]
    UnknownKid,
    /// `none`, an algorithm Trellis does not accept, or one that does not fit the named key
    /// (algorithm confusion).
    #[error("algorithm not accepted for this key")]
    UnsupportedAlg,
    /// The provider has never had a key set: its JWKS could not be fetched yet.
    #[error("JWKS unavailable")]
    JwksUnavailable,
}

/// Why an authenticator could not be built from its providers.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The spec breaks a rule; the message names the field.
    #[error("JWT provider {provider}: {message}")]
    InvalidProvider { provider: String, message: String },
    /// Two providers with one issuer: a token's `iss` must pick exactly one provider.
    #[error("JWT providers {first} and {second} have the same issuer {issuer}")]
    DuplicateIssuer {
        first: String,
        second: String,
        issuer: String,
    },
}

// === impl JwtError ===

impl JwtError {
    /// Every variant, in [`JwtError::index`] order.
    pub const ALL: [JwtError; 9] = [
        Self::Malformed(""),
        Self::Expired,
        Self::NotYetValid,
        Self::WrongIssuer,
        Self::WrongAudience,
        Self::BadSignature,
        Self::UnknownKid,
        Self::UnsupportedAlg,
        Self::JwksUnavailable,
    ];

    /// Stable short token for metrics labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::BadSignature => "bad_signature",
            Self::UnknownKid => "unknown_kid",
            Self::UnsupportedAlg => "unsupported_alg",
            Self::JwksUnavailable => "jwks_unavailable",
        }
    }

    /// Position in [`JwtError::ALL`], for per-reason counter arrays.
    pub(crate) fn index(&self) -> usize {
        match self {
            Self::Malformed(_) => 0,
            Self::Expired => 1,
            Self::NotYetValid => 2,
            Self::WrongIssuer => 3,
            Self::WrongAudience => 4,
            Self::BadSignature => 5,
            Self::UnknownKid => 6,
            Self::UnsupportedAlg => 7,
            Self::JwksUnavailable => 8,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_matches_all() {
        for (i, e) in JwtError::ALL.iter().enumerate() {
            assert_eq!(e.index(), i, "{}", e.reason());
        }
    }
}
