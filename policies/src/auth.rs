//! JWT authentication providers: who may issue the tokens a sidecar or ingress accepts, where
//! their signing keys come from, and where a request carries its token.
//!
//! A provider is identified by its `issuer`: a verifier picks the provider from the token's
//! `iss` claim, so two providers of one authenticator must not share an issuer. Keys come from
//! a JWKS document, fetched from a URL (and refreshed) or given inline (symmetric `oct` keys,
//! tests). Validation here is pure; fetching and verification live in the data plane.

use std::collections::BTreeMap;
use std::time::Duration;

use humantime_serde::re::humantime;
use serde::{Deserialize, Serialize};

/// Default tolerance on `exp` and `nbf` for clocks that disagree.
pub const DEFAULT_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Largest accepted `clock_skew`: more would keep expired tokens alive for long.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);
/// Default period of the background JWKS refresh.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(600);
/// Bounds of `jwks_refresh`: often enough to pick up rotations, rarely enough to spare the
/// identity provider.
pub const MIN_JWKS_REFRESH: Duration = Duration::from_secs(10);
pub const MAX_JWKS_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Default least time between two fetches triggered by tokens with unknown key ids.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Lower bound of `min_refresh_interval`: tokens with made-up key ids must not turn the
/// sidecar into a load generator against the identity provider.
pub const MIN_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Most claims one provider may forward as headers.
pub const MAX_FORWARDED_CLAIMS: usize = 16;

/// One JWT issuer and how to verify its tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderSpec {
    /// Exact value of the `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one. Any audience when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    /// Tolerance applied to `exp` and `nbf`.
    #[serde(default = "default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Claim name -> request header (lower-case) set to the claim's value for the upstream.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub forward_claims: BTreeMap<String, String>,
    /// Where the token is read from; `Authorization: Bearer <token>` by default.
    #[serde(default)]
    pub from: TokenSource,
    /// Pass the verified token on to the app (as Envoy's `jwt_authn` `forward`). Off by
    /// default: the app gets the claims it needs as headers, and a bearer credential does not
    /// spread into app logs or onward calls.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_token: bool,
    /// Period of the background refresh of a fetched JWKS.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub jwks_refresh: Duration,
    /// Least time between two fetches caused by a token whose `kid` is not in the cached set.
    #[serde(default = "default_min_refresh_interval", with = "humantime_serde")]
    pub min_refresh_interval: Duration,
}

/// Where the JWKS comes from: `{ uri: https://... }` or `{ inline: '{"keys": [...]}' }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "JwksSourceRepr", into = "JwksSourceRepr")]
pub enum JwksSource {
    /// An `http` or `https` URL serving the JWKS document.
    Uri(String),
    /// The JWKS JSON text itself.
    Inline(String),
}

/// Where a request carries its token: `{ header: NAME, prefix: "..." }` or `{ query: NAME }`.
/// The default is the `authorization` header with the `Bearer ` prefix (matched without
/// regard to case, as HTTP auth schemes are).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "TokenSourceRepr", into = "TokenSourceRepr")]
pub enum TokenSource {
    /// A request header (lower-case name); `prefix` is stripped and must be present.
    Header { name: String, prefix: String },
    /// A query parameter.
    Query { name: String },
}

/// The wire form of [`JwksSource`]: a map with exactly one of the two fields, like
/// [`crate::PathMatch`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JwksSourceRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    inline: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenSourceRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    query: Option<String>,
}

fn default_clock_skew() -> Duration {
    DEFAULT_CLOCK_SKEW
}

fn default_jwks_refresh() -> Duration {
    DEFAULT_JWKS_REFRESH
}

fn default_min_refresh_interval() -> Duration {
    DEFAULT_MIN_REFRESH_INTERVAL
}

// === impl JwtProviderSpec ===

impl JwtProviderSpec {
    /// Check the semantic rules; the message starts with the offending field's name.
    pub fn validate(&self) -> Result<(), String> {
        if self.issuer.trim().is_empty() || self.issuer.trim() != self.issuer {
            return Err("issuer: must be non-empty without surrounding spaces".into());
        }
        if let Some(a) = self.audiences.iter().find(|a| a.trim().is_empty()) {
            return Err(format!("audiences: `{a}` is empty"));
        }
        self.jwks.validate().map_err(|m| format!("jwks.{m}"))?;
        if self.clock_skew > MAX_CLOCK_SKEW {
            return Err(format!(
                "clock_skew: at most {}",
                humantime::format_duration(MAX_CLOCK_SKEW)
            ));
        }
        if self.forward_claims.len() > MAX_FORWARDED_CLAIMS {
            return Err(format!(
                "forward_claims: at most {MAX_FORWARDED_CLAIMS} claims"
            ));
        }
        for (claim, header) in &self.forward_claims {
            if claim.is_empty() {
                return Err("forward_claims: a claim name is empty".into());
            }
            validate_forwarded_header(header)
                .map_err(|m| format!("forward_claims.{claim}: {m}"))?;
        }
        self.from.validate().map_err(|m| format!("from.{m}"))?;
        if self.jwks_refresh < MIN_JWKS_REFRESH || self.jwks_refresh > MAX_JWKS_REFRESH {
            return Err(format!(
                "jwks_refresh: must be between {} and {}",
                humantime::format_duration(MIN_JWKS_REFRESH),
                humantime::format_duration(MAX_JWKS_REFRESH)
            ));
        }
        if self.min_refresh_interval < MIN_MIN_REFRESH_INTERVAL
            || self.min_refresh_interval > self.jwks_refresh
        {
            return Err(format!(
                "min_refresh_interval: must be between {} and jwks_refresh",
                humantime::format_duration(MIN_MIN_REFRESH_INTERVAL)
            ));
        }
        Ok(())
    }
}

/// A lower-case header name (RFC 9110 token) that a token holder may not use to impersonate
/// the mesh: not `authorization`, `host`, a pseudo or hop-by-hop header, nor `trellis-*`
/// (internal headers the sidecars trust).
fn validate_forwarded_header(name: &str) -> Result<(), String> {
    if !is_header_name(name) {
        return Err(format!("`{name}` is not a lower-case header name"));
    }
    const RESERVED: &[&str] = &[
        "authorization",
        "host",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "cookie",
        "x-forwarded-for",
        "forwarded",
    ];
    if RESERVED.contains(&name) || name.starts_with("trellis-") {
        return Err(format!("`{name}` is reserved"));
    }
    Ok(())
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

// === impl JwksSource ===

impl JwksSource {
    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Uri(uri) => validate_http_url(uri).map_err(|m| format!("uri: {m}")),
            Self::Inline(text) => {
                let v: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| format!("inline: not JSON: {e}"))?;
                match v.get("keys") {
                    Some(serde_json::Value::Array(keys)) if !keys.is_empty() => Ok(()),
                    _ => Err("inline: must be a JWKS object with a non-empty `keys` array".into()),
                }
            }
        }
    }
}

/// `http://` or `https://`, a non-empty authority, no spaces or fragment. The data plane
/// parses it fully; this catches the mistakes an operator makes.
fn validate_http_url(uri: &str) -> Result<(), String> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
        .ok_or_else(|| format!("`{uri}` must start with http:// or https://"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("`{uri}` has no host (or has user info)"));
    }
    if uri.contains(|c: char| c.is_whitespace() || c.is_control() || c == '#') {
        return Err(format!("`{uri}` contains spaces or a fragment"));
    }
    Ok(())
}

impl TryFrom<JwksSourceRepr> for JwksSource {
    type Error = String;

    fn try_from(r: JwksSourceRepr) -> Result<Self, String> {
        match (r.uri, r.inline) {
            (Some(u), None) => Ok(Self::Uri(u)),
            (None, Some(i)) => Ok(Self::Inline(i)),
            _ => Err("jwks: set exactly one of `uri` and `inline`".into()),
        }
    }
}

impl From<JwksSource> for JwksSourceRepr {
    fn from(s: JwksSource) -> Self {
        match s {
            JwksSource::Uri(u) => Self {
                uri: Some(u),
                ..Default::default()
            },
            JwksSource::Inline(i) => Self {
                inline: Some(i),
                ..Default::default()
            },
        }
    }
}

// === impl TokenSource ===

impl Default for TokenSource {
    fn default() -> Self {
        Self::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
        }
    }
}

impl TokenSource {
    fn validate(&self) -> Result<(), String> {
        match self {
            Self::Header { name, .. } if !is_header_name(name) => {
                Err(format!("header: `{name}` is not a lower-case header name"))
            }
            Self::Query { name } if name.is_empty() || name.contains(['&', '=', '#', ' ']) => {
                Err(format!("query: `{name}` is not a query parameter name"))
            }
            _ => Ok(()),
        }
    }
}

impl TryFrom<TokenSourceRepr> for TokenSource {
    type Error = String;

    fn try_from(r: TokenSourceRepr) -> Result<Self, String> {
        match (r.header, r.query, r.prefix) {
            (Some(name), None, prefix) => Ok(Self::Header {
                name,
                prefix: prefix.unwrap_or_default(),
            }),
            (None, Some(name), None) => Ok(Self::Query { name }),
            (None, Some(_), Some(_)) => Err("from: `prefix` only applies to `header`".into()),
            _ => Err("from: set exactly one of `header` and `query`".into()),
        }
    }
}

impl From<TokenSource> for TokenSourceRepr {
    fn from(s: TokenSource) -> Self {
        match s {
            TokenSource::Header { name, prefix } => Self {
                header: Some(name),
                prefix: (!prefix.is_empty()).then_some(prefix),
                query: None,
            },
            TokenSource::Query { name } => Self {
                query: Some(name),
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> Result<JwtProviderSpec, String> {
        let s: JwtProviderSpec = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn parses_with_defaults() {
        let s = spec("issuer: https://idp.example\njwks: { uri: https://idp.example/jwks }\n")
            .expect("valid");
        assert_eq!(s.jwks, JwksSource::Uri("https://idp.example/jwks".into()));
        assert_eq!(s.clock_skew, DEFAULT_CLOCK_SKEW);
        assert_eq!(s.jwks_refresh, DEFAULT_JWKS_REFRESH);
        assert_eq!(s.min_refresh_interval, DEFAULT_MIN_REFRESH_INTERVAL);
        assert_eq!(s.from, TokenSource::default());
        assert!(s.audiences.is_empty());
    }

    #[test]
    fn parses_every_field() {
        let s = spec(
            r#"
issuer: https://idp.example
audiences: [orders, payments]
jwks: { inline: '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}' }
clock_skew: 30s
forward_claims: { sub: x-user, tenant: x-tenant }
from: { query: access_token }
jwks_refresh: 1m
min_refresh_interval: 2s
"#,
        )
        .expect("valid");
        assert_eq!(
            s.from,
            TokenSource::Query {
                name: "access_token".into()
            }
        );
        assert_eq!(s.forward_claims["tenant"], "x-tenant");
        assert_eq!(s.clock_skew, Duration::from_secs(30));
        let back = serde_norway::to_string(&s).expect("serializes");
        assert_eq!(
            serde_norway::from_str::<JwtProviderSpec>(&back).expect("round trip"),
            s
        );
    }

    #[test]
    fn custom_header_has_no_prefix_unless_given() {
        let s = spec("issuer: i\njwks: { uri: http://127.0.0.1:1/k }\nfrom: { header: x-token }\n")
            .expect("valid");
        assert_eq!(
            s.from,
            TokenSource::Header {
                name: "x-token".into(),
                prefix: String::new()
            }
        );
    }

    #[test]
    fn rejections_name_the_field() {
        let base = "issuer: i\njwks: { uri: https://idp/jwks }\n";
        for (extra, field) in [
            ("clock_skew: 11m\n", "clock_skew"),
            ("jwks_refresh: 1s\n", "jwks_refresh"),
            ("min_refresh_interval: 100ms\n", "min_refresh_interval"),
            (
                "forward_claims: { sub: Authorization }\n",
                "forward_claims.sub",
            ),
            (
                "forward_claims: { sub: trellis-peer-identity }\n",
                "forward_claims.sub",
            ),
            ("from: { header: 'X Token' }\n", "from.header"),
            ("audiences: ['']\n", "audiences"),
        ] {
            let err = spec(&format!("{base}{extra}")).unwrap_err();
            assert!(err.starts_with(field), "{extra}: {err}");
        }
        let err = spec("issuer: i\njwks: { uri: ftp://idp/jwks }\n").unwrap_err();
        assert!(err.starts_with("jwks.uri"), "{err}");
        let err = spec("issuer: i\njwks: { inline: '{\"keys\": []}' }\n").unwrap_err();
        assert!(err.starts_with("jwks.inline"), "{err}");
        let err = spec("issuer: ''\njwks: { uri: https://idp/jwks }\n").unwrap_err();
        assert!(err.starts_with("issuer"), "{err}");
    }

    #[test]
    fn schema_errors_are_explicit() {
        let err = spec("issuer: i\njwks: { uri: https://a/k, inline: x }\n").unwrap_err();
        assert!(err.contains("exactly one of `uri` and `inline`"), "{err}");
        let err = spec("issuer: i\njwks: { url: https://a/k }\n").unwrap_err();
        assert!(err.contains("unknown field `url`"), "{err}");
        let err = spec("issuer: i\njwks: { uri: https://a/k }\nissuers: []\n").unwrap_err();
        assert!(err.contains("unknown field `issuers`"), "{err}");
        let err = spec("issuer: i\njwks: { uri: https://a/k }\nfrom: { query: t, prefix: x }\n")
            .unwrap_err();
        assert!(err.contains("`prefix` only applies"), "{err}");
    }
}
