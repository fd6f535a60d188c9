//! JWT verification against a set of providers (RFC 7519 with JWS compact serialisation).
//!
//! Order of checks: the header (algorithm accepted, no `crit`), the payload's `iss` (only to
//! pick the provider: nothing else in an unverified payload is trusted), the signature with the
//! key the header names, then the time and audience claims. A forged token therefore fails as
//! `bad_signature`, whatever its claims say.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{Map, Value};
use trellis_policies::{JwksSource, JwtProviderSpec, TokenSource};

use super::auth_metrics::{AuthMetrics, Verdicts, NO_PROVIDER};
use super::jwks::{Jwks, JwksStatus};
use super::key::Alg;
use super::{AuthError, JwtError};

/// Longest token accepted (base64 text); larger ones are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Verifies tokens for a fixed set of providers. Built from policy; replaced (not mutated)
/// when the policy changes. Cheap to share behind an `Arc`.
pub struct JwtAuthenticator {
    providers: Vec<Provider>,
    /// Distinct token sources, in provider order.
    sources: Vec<TokenSource>,
    unattributed: Verdicts,
    /// Tokens verified recently (see [`super::cache`]).
    cache: super::cache::TokenCache,
}

struct Provider {
    name: Arc<str>,
    issuer: Arc<str>,
    audiences: Vec<String>,
    clock_skew: Duration,
    forward: Vec<(String, HeaderName)>,
    forward_token: bool,
    jwks: Arc<Jwks>,
    verdicts: Verdicts,
}

/// What a verified token says, for authorization and the upstream request.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedToken {
    /// The provider's name in the policy.
    pub provider: Arc<str>,
    pub issuer: Arc<str>,
    pub subject: Option<String>,
    /// From `scope` (space-separated, RFC 8693) or `scp` (array or string).
    pub scopes: Vec<String>,
    pub claims: Map<String, Value>,
    /// The provider's `forward_claims` present in the token, ready to set on the request.
    pub forwarded_headers: Vec<(HeaderName, HeaderValue)>,
}

/// The JOSE header fields Trellis reads; borrowed from the decoded bytes when possible.
#[derive(Deserialize)]
struct JoseHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    /// Extensions the verifier must understand (RFC 7515 section 4.1.11); Trellis knows none.
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

// === impl JwtAuthenticator ===

impl JwtAuthenticator {
    /// Build from named provider specs. Each spec is validated; issuers must be distinct.
    /// Inline key sets are parsed now; remote ones start empty until [`Self::spawn_refresh`]
    /// (or the first token) fetches them.
    pub fn new(
        providers: Vec<(String, JwtProviderSpec)>,
        metrics: &AuthMetrics,
    ) -> Result<Self, AuthError> {
        let mut built: Vec<Provider> = Vec::with_capacity(providers.len());
        let mut sources: Vec<TokenSource> = Vec::new();
        for (name, spec) in providers {
            let invalid = |message: String| AuthError::InvalidProvider {
                provider: name.clone(),
                message,
            };
            spec.validate().map_err(invalid)?;
            if let Some(other) = built.iter().find(|p| *p.issuer == *spec.issuer) {
                return Err(AuthError::DuplicateIssuer {
                    first: other.name.to_string(),
                    second: name,
                    issuer: spec.issuer,
                });
            }
            if built.iter().any(|p| *p.name == *name) {
                return Err(invalid("duplicate provider name".into()));
            }
            let provider: Arc<str> = Arc::from(name.as_str());
            let jwks = match &spec.jwks {
                JwksSource::Inline(text) => Jwks::inline(provider.clone(), text),
                JwksSource::Uri(uri) => Jwks::remote(
                    provider.clone(),
                    uri,
                    spec.jwks_refresh,
                    spec.min_refresh_interval,
                ),
            }
            .map_err(|e| invalid(format!("jwks: {e}")))?;
            jwks.set_counters(metrics.fetch_counters(&name));
            let mut forward = Vec::with_capacity(spec.forward_claims.len());
            for (claim, header) in &spec.forward_claims {
                let header = HeaderName::from_bytes(header.as_bytes())
                    .map_err(|e| invalid(format!("forward_claims.{claim}: {e}")))?;
                forward.push((claim.clone(), header));
            }
            if !sources.contains(&spec.from) {
                sources.push(spec.from.clone());
            }
            built.push(Provider {
                verdicts: metrics.verdicts(&name),
                name: provider,
                issuer: Arc::from(spec.issuer.as_str()),
                audiences: spec.audiences,
                clock_skew: spec.clock_skew,
                forward,
                forward_token: spec.forward_token,
                jwks: Arc::new(jwks),
            });
        }
        Ok(Self {
            providers: built,
            sources,
            unattributed: metrics.verdicts(NO_PROVIDER),
            cache: Default::default(),
        })
    }

    /// Start the background JWKS refresh of every remote provider (first fetch now). The
    /// tasks end by themselves once this authenticator is dropped. Needs a Tokio runtime.
    pub fn spawn_refresh(&self) {
        for p in &self.providers {
            p.jwks.spawn_refresh();
        }
    }

    /// Fetch every remote key set once now (e.g. before reporting ready); `true` if all
    /// succeeded. Failures are logged and leave the previous sets in place.
    pub async fn refresh_all(&self) -> bool {
        let mut ok = true;
        for p in &self.providers {
            ok &= p.jwks.refresh().await;
        }
        ok
    }

    /// The token a request carries, looked up in each provider's `from` in policy order:
    /// the header value after its prefix (matched regardless of case), or the query parameter.
    pub fn token_from<'a>(&self, headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
        self.sources.iter().find_map(|source| match source {
            TokenSource::Header { name, prefix } => {
                let value = headers.get(name.as_str())?.to_str().ok()?;
                let token = match value.get(..prefix.len()) {
                    Some(head) if head.eq_ignore_ascii_case(prefix) => &value[prefix.len()..],
                    _ => return None,
                };
                Some(token.trim()).filter(|t| !t.is_empty())
            }
            TokenSource::Query { name } => uri.query()?.split('&').find_map(|pair| {
                pair.strip_prefix(name.as_str())?
                    .strip_prefix('=')
                    .filter(|t| !t.is_empty())
            }),
        })
    }

    /// Remove the token of a request verified by `provider` from every place this
    /// authenticator reads tokens, unless that provider forwards it (`forward_token`).
    pub fn hide_token(&self, provider: &str, headers: &mut HeaderMap, uri: &mut Uri) {
        if self
            .providers
            .iter()
            .any(|p| *p.name == *provider && p.forward_token)
        {
            return;
        }
        for source in &self.sources {
            match source {
                TokenSource::Header { name, .. } => {
                    headers.remove(name.as_str());
                }
                TokenSource::Query { name } => crate::http::headers::remove_query_param(uri, name),
            }
        }
    }

    /// Every header some provider may set from a claim: the request path removes these from
    /// the incoming request first, so a client cannot supply them itself.
    pub fn forwarded_header_names(&self) -> impl Iterator<Item = &HeaderName> {
        self.providers
            .iter()
            .flat_map(|p| p.forward.iter().map(|(_, h)| h))
    }

    /// Key set state per provider, for `/config_dump`.
    pub fn status(&self) -> Vec<JwksStatus> {
        self.providers.iter().map(|p| p.jwks.status()).collect()
    }

    /// Verify `token` (the compact JWS text, without any `Bearer ` prefix).
    /// Shared (`Arc`): a cached verdict is handed out without copying its claims.
    pub async fn authenticate(&self, token: &str) -> Result<Arc<VerifiedToken>, JwtError> {
        let key = super::cache::key(token);
        if let Some(t) = self.cache.get(&key) {
            if let Some(p) = self.providers.iter().find(|p| p.name == t.provider) {
                p.verdicts.record::<()>(&Ok(()));
            }
            return Ok(t);
        }
        let parsed = match Parsed::new(token) {
            Ok(p) => p,
            Err(e) => {
                self.unattributed.record::<()>(&Err(e));
                return Err(e);
            }
        };
        let Some(provider) = self.provider_for(&parsed.claims) else {
            let e = JwtError::WrongIssuer;
            self.unattributed.record::<()>(&Err(e));
            return Err(e);
        };
        // Boxed: verification may fetch the JWKS (a connection and a TLS handshake), a large
        // future that would otherwise size every authenticated request's, cache hits included.
        let result = Box::pin(provider.verify(parsed)).await.map(Arc::new);
        provider.verdicts.record(&result);
        if let Ok(t) = &result {
            // `exp` is required and checked: the token stays valid until exp + skew.
            if let Some(exp) = t.claims.get("exp").and_then(Value::as_f64) {
                self.cache
                    .put(key, t, exp + provider.clock_skew.as_secs_f64());
            }
        }
        result
    }

    /// Tokens in the verified-token cache (for `/config_dump` and tests).
    pub fn cached_tokens(&self) -> usize {
        self.cache.len()
    }

    fn provider_for(&self, claims: &Map<String, Value>) -> Option<&Provider> {
        let iss = claims.get("iss")?.as_str()?;
        self.providers.iter().find(|p| *p.issuer == *iss)
    }
}

/// A token split and decoded, not yet verified.
struct Parsed<'t> {
    /// `header.payload`, the signed text.
    message: &'t str,
    alg: Alg,
    kid: Option<String>,
    signature: Vec<u8>,
    claims: Map<String, Value>,
}

// === impl Parsed ===

impl<'t> Parsed<'t> {
    fn new(token: &'t str) -> Result<Self, JwtError> {
        use JwtError::Malformed;
        if token.len() > MAX_TOKEN_LEN {
            return Err(Malformed("too long"));
        }
        let (message, signature) = token.rsplit_once('.').ok_or(Malformed("not a JWS"))?;
        let (header, payload) = message.split_once('.').ok_or(Malformed("not a JWS"))?;
        if payload.contains('.') {
            return Err(Malformed("not a JWS"));
        }
        let header = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| Malformed("header is not base64url"))?;
        let header: JoseHeader<'_> =
            serde_json::from_slice(&header).map_err(|_| Malformed("header is not JSON"))?;
        if header.crit.is_some() {
            return Err(Malformed("crit header"));
        }
        let alg = Alg::from_name(&header.alg).ok_or(JwtError::UnsupportedAlg)?;
        let claims = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| Malformed("payload is not base64url"))?;
        let claims: Map<String, Value> = serde_json::from_slice(&claims)
            .map_err(|_| Malformed("payload is not a JSON object"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| Malformed("signature is not base64url"))?;
        Ok(Self {
            message,
            alg,
            kid: header.kid.map(Cow::into_owned),
            signature,
            claims,
        })
    }
}

// === impl Provider ===

impl Provider {
    async fn verify(&self, token: Parsed<'_>) -> Result<VerifiedToken, JwtError> {
        self.jwks
            .verify(
                token.kid.as_deref(),
                token.alg,
                token.message.as_bytes(),
                &token.signature,
            )
            .await?;
        let claims = token.claims;
        self.check_time(&claims, SystemTime::now())?;
        self.check_audience(&claims)?;
        Ok(VerifiedToken {
            provider: self.name.clone(),
            issuer: self.issuer.clone(),
            subject: claims.get("sub").and_then(Value::as_str).map(str::to_owned),
            scopes: scopes(&claims),
            forwarded_headers: self.forwarded(&claims),
            claims,
        })
    }

    /// `exp` is required: a token that never expires is a password.
    fn check_time(&self, claims: &Map<String, Value>, now: SystemTime) -> Result<(), JwtError> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let skew = self.clock_skew.as_secs_f64();
        let exp = claims
            .get("exp")
            .ok_or(JwtError::Malformed("no exp"))?
            .as_f64()
            .ok_or(JwtError::Malformed("exp is not a number"))?;
        if now >= exp + skew {
            return Err(JwtError::Expired);
        }
        if let Some(nbf) = claims.get("nbf") {
            let nbf = nbf
                .as_f64()
                .ok_or(JwtError::Malformed("nbf is not a number"))?;
            if now + skew < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        Ok(())
    }

    fn check_audience(&self, claims: &Map<String, Value>) -> Result<(), JwtError> {
        if self.audiences.is_empty() {
            return Ok(());
        }
        let accepted = |a: &Value| {
            a.as_str()
                .is_some_and(|a| self.audiences.iter().any(|x| x == a))
        };
        let ok = match claims.get("aud") {
            Some(Value::Array(auds)) => auds.iter().any(accepted),
            Some(aud) => accepted(aud),
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(JwtError::WrongAudience)
        }
    }

    /// Strings as they are; other JSON values in compact JSON. A value that cannot be a
    /// header (control or non-ASCII characters) is left out rather than failing the request.
    fn forwarded(&self, claims: &Map<String, Value>) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        for (claim, header) in &self.forward {
            let Some(value) = claims.get(claim) else {
                continue;
            };
            let text = match value {
                Value::String(s) => Cow::Borrowed(s.as_str()),
                other => Cow::Owned(other.to_string()),
            };
            // `HeaderValue::from_str` takes bytes 0x80-0xFF (obs-text), so a non-ASCII claim
            // would reach the app as raw UTF-8 in a header (found by fuzzing): refuse it here.
            let value = if text.is_ascii() {
                HeaderValue::from_str(&text).ok()
            } else {
                None
            };
            match value {
                Some(v) => out.push((header.clone(), v)),
                None => tracing::debug!(
                    provider = %self.name,
                    claim,
                    "claim not forwardable as a header"
                ),
            }
        }
        out
    }
}

fn scopes(claims: &Map<String, Value>) -> Vec<String> {
    let split = |s: &str| s.split_ascii_whitespace().map(str::to_owned).collect();
    match claims.get("scope").or_else(|| claims.get("scp")) {
        Some(Value::String(s)) => split(s),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}
