//! One compiled `AuthenticationPolicy`: which requests it covers and the credentials it
//! accepts (JWT providers, API keys).

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method, Uri};
use trellis_policies::{ApiKeySource, AuthenticationSpec, RouteMatch};

use crate::policy::auth::JwtAuthenticator;

pub struct Authn {
    pub name: Arc<str>,
    pub spec: AuthenticationSpec,
    route: Option<RouteMatch>,
    /// `None` when the policy has no JWT providers, or its authenticator could not be built
    /// (then tokens are refused: fail closed).
    pub jwt: Option<Arc<JwtAuthenticator>>,
    api_key_header: Option<HeaderName>,
    api_key_query: Option<String>,
    pub required: bool,
    /// `WWW-Authenticate` of a 401: `Bearer realm="<service>"` when tokens are accepted, else
    /// `ApiKey realm="<service>"`.
    pub challenge: HeaderValue,
    /// The same with `error="invalid_token"` (RFC 6750), for a token that failed.
    pub challenge_invalid: HeaderValue,
}

// === impl Authn ===

impl Authn {
    pub fn new(
        name: &str,
        spec: &AuthenticationSpec,
        jwt: Option<Arc<JwtAuthenticator>>,
        service: &str,
    ) -> Self {
        let (header, query) = match &spec.api_keys {
            Some(ApiKeySource { header, query }) => (
                header
                    .as_deref()
                    .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                query.clone(),
            ),
            None => (None, None),
        };
        let scheme = if spec.jwt.is_empty() {
            "ApiKey"
        } else {
            "Bearer"
        };
        let challenge = HeaderValue::from_str(&format!("{scheme} realm=\"{service}\""))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer"));
        let challenge_invalid = HeaderValue::from_str(&format!(
            "{scheme} realm=\"{service}\", error=\"invalid_token\""
        ))
        .unwrap_or_else(|_| challenge.clone());
        Self {
            name: Arc::from(name),
            spec: spec.clone(),
            route: spec.route.clone(),
            jwt,
            api_key_header: header,
            api_key_query: query,
            required: spec.required,
            challenge,
            challenge_invalid,
        }
    }

    pub fn applies(&self, method: &Method, path: &str) -> bool {
        self.route
            .as_ref()
            .is_none_or(|r| r.matches(method.as_str(), path))
    }

    pub fn accepts_tokens(&self) -> bool {
        !self.spec.jwt.is_empty()
    }

    pub fn accepts_api_keys(&self) -> bool {
        self.spec.api_keys.is_some()
    }

    /// The API key a request carries, if this policy reads one.
    pub fn api_key(&self, headers: &http::HeaderMap, uri: &Uri) -> Option<Vec<u8>> {
        if let Some(h) = &self.api_key_header {
            return headers
                .get(h)
                .map(|v| v.as_bytes().trim_ascii().to_vec())
                .filter(|k| !k.is_empty());
        }
        let name = self.api_key_query.as_deref()?;
        uri.query()?.split('&').find_map(|pair| {
            let v = pair.strip_prefix(name)?.strip_prefix('=')?;
            (!v.is_empty()).then(|| v.as_bytes().to_vec())
        })
    }

    /// Remove the API key from the request before it goes to the app: the app gets the
    /// consumer's name instead, and keys do not spread into app logs.
    pub fn hide_api_key(&self, headers: &mut http::HeaderMap, uri: &mut Uri) {
        if let Some(h) = &self.api_key_header {
            headers.remove(h);
        }
        if let Some(q) = &self.api_key_query {
            crate::http::headers::remove_query_param(uri, q);
        }
    }
}
