//! SPIFFE identities.
//!
//! Trellis names a workload `spiffe://<trust-domain>/service/<service>`: one identity per
//! service (not per instance), so that a client can check "the server I reached is an `orders`"
//! without knowing which instance it picked. The trust domain separates meshes that might share
//! a CA by accident.

use std::fmt;

/// The path segment that precedes the service name in a Trellis SPIFFE ID.
const SERVICE_SEGMENT: &str = "service";

/// A parsed `spiffe://` URI: a trust domain and a path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Why a string is not an acceptable SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeError {
    #[error("`{0}` is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    #[error("`{0}` has an invalid trust domain: use lowercase letters, digits, '.', '-', '_'")]
    TrustDomain(String),
    #[error(
        "`{0}` has an invalid path: it must be non-empty, '/'-separated segments of [A-Za-z0-9._-]"
    )]
    Path(String),
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parse and validate a SPIFFE ID per the SPIFFE spec (no query, fragment, port or userinfo).
    pub fn parse(s: &str) -> Result<Self, SpiffeError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeError::Scheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !valid_trust_domain(td) {
            return Err(SpiffeError::TrustDomain(s.to_string()));
        }
        if path.len() < 2 || !path[1..].split('/').all(valid_segment) {
            return Err(SpiffeError::Path(s.to_string()));
        }
        Ok(Self {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }

    /// The identity Trellis gives to every instance of `service` in `trust_domain`.
    pub fn for_service(trust_domain: &str, service: &str) -> Result<Self, SpiffeError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/{SERVICE_SEGMENT}/{service}"
        ))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The service name when the path has the Trellis form `/service/<name>`.
    pub fn service(&self) -> Option<&str> {
        let rest = self.path.strip_prefix('/')?.strip_prefix(SERVICE_SEGMENT)?;
        let name = rest.strip_prefix('/')?;
        (!name.is_empty() && !name.contains('/')).then_some(name)
    }
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn valid_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_service_identity() {
        let id = SpiffeId::parse("spiffe://trellis.local/service/orders").unwrap();
        assert_eq!(id.trust_domain(), "trellis.local");
        assert_eq!(id.service(), Some("orders"));
        assert_eq!(id.to_string(), "spiffe://trellis.local/service/orders");
        assert_eq!(
            SpiffeId::for_service("trellis.local", "orders").unwrap(),
            id
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "https://trellis.local/service/a",
            "spiffe://",
            "spiffe://Trellis/service/a",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/service//a",
            "spiffe://td/service/../a",
            "spiffe://td:80/service/a",
            "spiffe://td/service/a?x=1",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn non_trellis_path_has_no_service() {
        let id = SpiffeId::parse("spiffe://td/ns/default/sa/web").unwrap();
        assert_eq!(id.service(), None);
    }
}
