//! Inbound access control: authentication (JWT, API keys, mTLS identity), consumers, and
//! authorization, applied by a service's sidecar before its rate limits and the app.
//!
//! The state is compiled from each snapshot and swapped in whole ([`AccessControl::update`]);
//! a request reads one consistent version. JWT authenticators survive snapshots whose JWT
//! providers did not change, so their cached key sets (and refresh tasks) are kept.
//!
//! What the app receives: `trellis-consumer` (the consumer's name) and any JWT claims the
//! provider forwards as headers; client-sent copies of these headers are removed first, so an
//! app can trust them. API keys in a header are removed before the app sees them.

mod audit;
mod authn;
pub(crate) mod authz;
mod consumers;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request};
use prometheus_client::registry::Registry;
use trellis_policies::JwtProviderSpec;

pub use audit::AccessMetrics;
pub use authz::DEFAULT_DENY;
pub use consumers::key_digest;

use crate::config::{AuthorizationConfig, AuthzDefault};
use crate::error::ProxyError;
use crate::http::headers::{has_name, CONSUMER_HEADER};
use crate::policy::auth::{AuthMetrics, JwtAuthenticator, VerifiedToken};
use crate::state::snapshot::Snapshot;
use authn::Authn;
use authz::Authz;
use consumers::ConsumerIndex;

/// Who is calling, as far as the sidecar could verify.
#[derive(Debug, Default)]
pub struct Principal {
    /// The peer's SPIFFE ID, verified by mTLS.
    pub identity: Option<Arc<str>>,
    /// The consumer its credential (API key, JWT subject or identity) belongs to.
    pub consumer: Option<Arc<str>>,
    /// Label of the API key used, for audit logs.
    pub key_id: Option<Arc<str>>,
    pub token: Option<Arc<VerifiedToken>>,
}

pub struct AccessControl {
    service: String,
    default: AuthzDefault,
    /// Peers whose `trellis-consumer` is believed (patterns as in authorization rules).
    consumer_from_peers: Vec<String>,
    state: ArcSwap<State>,
    metrics: AccessMetrics,
    jwt_metrics: AuthMetrics,
    /// Authenticators by policy name with the providers they were built from.
    jwt_cache: Mutex<HashMap<String, CachedJwt>>,
}

/// An authenticator and the providers it was built from.
type CachedJwt = (BTreeMap<String, JwtProviderSpec>, Arc<JwtAuthenticator>);

struct State {
    /// Every header any JWT provider in the mesh sets from a claim: removed from requests of
    /// callers not trusted to assert identities, on every path, so an app can trust them
    /// whichever policy (if any) covers the route.
    claim_headers: Vec<http::HeaderName>,
    authn: Vec<Authn>,
    consumers: ConsumerIndex,
    authz: Authz,
}

/// The union of every JWT provider's claim headers in the snapshot, whichever service its
/// policy is for.
fn claim_headers(snap: &Snapshot) -> Vec<http::HeaderName> {
    let mut names: Vec<http::HeaderName> = snap
        .authentication
        .values()
        .flat_map(|spec| spec.jwt.values())
        .flat_map(|p| p.forward_claims.values())
        .filter_map(|h| http::HeaderName::from_bytes(h.as_bytes()).ok())
        .collect();
    names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names
}

// === impl Principal ===

impl Principal {
    pub fn is_authenticated(&self) -> bool {
        self.identity.is_some() || self.consumer.is_some() || self.token.is_some()
    }
}

// === impl AccessControl ===

impl AccessControl {
    pub fn new(service: &str, config: &AuthorizationConfig, registry: &mut Registry) -> Arc<Self> {
        let default = config.default;
        Arc::new(Self {
            service: service.to_string(),
            default,
            consumer_from_peers: config.consumer_from_peers.clone(),
            state: ArcSwap::from_pointee(State {
                claim_headers: Vec::new(),
                authn: Vec::new(),
                consumers: ConsumerIndex::default(),
                authz: Authz::build(service, [], default),
            }),
            metrics: AccessMetrics::register(registry),
            jwt_metrics: AuthMetrics::register(registry),
            jwt_cache: Mutex::new(HashMap::new()),
        })
    }

    /// The service whose policies apply here.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Compile this service's policies from a snapshot. Must run inside a Tokio runtime (new
    /// JWT providers start their key refresh).
    pub fn update(&self, snap: &Snapshot) {
        let mut cache = self.jwt_cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut next_cache = HashMap::new();
        let mut authn = Vec::new();
        for (name, spec) in &snap.authentication {
            if spec.service != self.service {
                continue;
            }
            let jwt = if spec.jwt.is_empty() {
                None
            } else {
                match cache.remove(name) {
                    Some((providers, a)) if providers == spec.jwt => Some(a),
                    _ => {
                        let providers: Vec<_> = spec
                            .jwt
                            .iter()
                            .map(|(n, p)| (n.clone(), p.clone()))
                            .collect();
                        match JwtAuthenticator::new(providers, &self.jwt_metrics) {
                            Ok(a) => {
                                a.spawn_refresh();
                                Some(Arc::new(a))
                            }
                            Err(e) => {
                                tracing::error!(policy = %name, error = %e, "JWT providers unusable: tokens for this policy are refused");
                                None
                            }
                        }
                    }
                }
            };
            if let Some(a) = &jwt {
                next_cache.insert(name.clone(), (spec.jwt.clone(), a.clone()));
            }
            authn.push(Authn::new(name, spec, jwt, &self.service));
        }
        *cache = next_cache;
        let state = State {
            claim_headers: claim_headers(snap),
            authn,
            consumers: ConsumerIndex::build(&snap.consumers),
            authz: Authz::build(&self.service, &snap.authorization, self.default),
        };
        self.state.store(Arc::new(state));
    }

    /// Authenticate and authorize an inbound request; on success the request carries the
    /// consumer and forwarded-claim headers, and the principal goes on to the rate limits.
    pub async fn check<B>(
        &self,
        req: &mut Request<B>,
        peer: Option<&HeaderValue>,
    ) -> Result<Principal, ProxyError> {
        let state = self.state.load_full();
        let propagated = self.propagated_consumer(&state, req, peer);
        if state.authn.is_empty() && state.consumers.is_empty() && state.authz.is_empty() {
            // No policies here, but a consumer from upstream still keys rate limits.
            return Ok(Principal {
                consumer: propagated,
                ..Principal::default()
            });
        }
        let mut who = Principal {
            identity: peer.and_then(|p| p.to_str().ok()).map(Arc::from),
            ..Principal::default()
        };
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let refuser = Refuser {
            access: self,
            method: &method,
            path: &path,
        };
        if let Some(a) = state.authn.iter().find(|a| a.applies(&method, &path)) {
            authenticate(&state, a, req, &mut who, &refuser).await?;
        }
        if who.consumer.is_none() {
            who.consumer = propagated;
        }
        if who.consumer.is_none() {
            if let Some(c) = who
                .identity
                .as_deref()
                .and_then(|id| state.consumers.by_identity(id))
                .filter(|c| !c.disabled)
            {
                who.consumer = Some(c.name.clone());
            }
        }
        self.authorize(&state, &who, &method, &path)?;
        if let Some(c) = &who.consumer {
            if let Ok(v) = HeaderValue::from_str(c) {
                req.headers_mut().insert(CONSUMER_HEADER, v);
            }
        }
        Ok(who)
    }

    /// The consumer an earlier hop authenticated, believed only from a trusted mesh peer
    /// (mTLS-verified; its own outbound side strips the header from its app's requests).
    /// From anyone else the consumer header and every claim header are removed.
    fn propagated_consumer<B>(
        &self,
        state: &State,
        req: &mut Request<B>,
        peer: Option<&HeaderValue>,
    ) -> Option<Arc<str>> {
        let trusted = peer.and_then(|p| p.to_str().ok()).is_some_and(|id| {
            self.consumer_from_peers
                .iter()
                .any(|p| authz::identity_matches(p, id))
        });
        if !trusted {
            for h in &state.claim_headers {
                req.headers_mut().remove(h);
            }
            if has_name(req.headers(), &CONSUMER_HEADER) {
                req.headers_mut().remove(CONSUMER_HEADER);
            }
            return None;
        }
        req.headers()
            .get(CONSUMER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(Arc::<str>::from)
    }

    /// The authorization policies' verdict on `who`, audited either way.
    fn authorize(
        &self,
        state: &State,
        who: &Principal,
        method: &http::Method,
        path: &str,
    ) -> Result<(), ProxyError> {
        let verdict = state.authz.evaluate(who, method, path);
        let service = &self.service;
        if let Some(p) = &verdict.audit_denied_by {
            audit::authz_refused(&self.metrics, service, p, false, who, method, path);
        }
        if let Some(policy) = verdict.denied_by {
            audit::authz_refused(&self.metrics, service, &policy, true, who, method, path);
            return Err(ProxyError::Denied { policy });
        }
        Ok(())
    }

    /// Policies in force, key sets and consumer counts, for `/config_dump` (no key material).
    pub fn dump(&self) -> serde_json::Value {
        let s = self.state.load();
        let authn: Vec<serde_json::Value> = s
            .authn
            .iter()
            .map(|a| {
                serde_json::json!({
                    "policy": &*a.name,
                    "required": a.required,
                    "api_keys": a.accepts_api_keys(),
                    "jwt": a.jwt.as_ref().map(|j| serde_json::to_value(j.status()).unwrap_or_default()),
                })
            })
            .collect();
        serde_json::json!({
            "authentication": authn,
            "consumer_credentials": s.consumers.len(),
            "authorization_default": self.default,
        })
    }
}

/// Refusals of one request's authentication, audited with its method and path.
struct Refuser<'a> {
    access: &'a AccessControl,
    method: &'a http::Method,
    path: &'a str,
}

// === impl Refuser ===

impl Refuser<'_> {
    fn refuse(&self, who: &Principal, reason: &'static str, challenge: &HeaderValue) -> ProxyError {
        let a = self.access;
        audit::authn_refused(&a.metrics, &a.service, reason, who, self.method, self.path);
        ProxyError::Unauthenticated {
            reason,
            challenge: challenge.clone(),
        }
    }
}

/// Apply the authentication policy `a` that covers the request: its credentials (a JWT, an
/// API key) are verified and hidden from the app, and `who` learns its consumer.
async fn authenticate<B>(
    state: &State,
    a: &Authn,
    req: &mut Request<B>,
    who: &mut Principal,
    refuser: &Refuser<'_>,
) -> Result<(), ProxyError> {
    if let Some(jwt) = &a.jwt {
        for h in jwt.forwarded_header_names() {
            req.headers_mut().remove(h);
        }
    }
    if a.accepts_tokens() && a.jwt.is_none() {
        // Its providers could not be built: nothing it covers can be verified.
        return Err(refuser.refuse(who, "jwt_unavailable", &a.challenge));
    }
    let token = a
        .jwt
        .as_ref()
        .and_then(|j| j.token_from(req.headers(), req.uri()));
    let key = a
        .accepts_api_keys()
        .then(|| a.api_key(req.headers(), req.uri()))
        .flatten();
    if token.is_none() && key.is_none() {
        if a.required {
            return Err(refuser.refuse(who, "missing_credentials", &a.challenge));
        }
        refuser.access.metrics.authenticated("anonymous");
    }
    // Verified with the token borrowed from the request; headers change only after.
    let verified = match (token, &a.jwt) {
        (Some(token), Some(jwt)) => Some((jwt, jwt.authenticate(token).await)),
        _ => None,
    };
    if let Some((jwt, verified)) = verified {
        let t = verified.map_err(|e| refuser.refuse(who, e.reason(), &a.challenge_invalid))?;
        accept_token(state, a, jwt, t, req, who, refuser)?;
    }
    if let Some(key) = key {
        accept_api_key(state, a, &key, req, who, refuser)?;
    }
    if who.token.is_some() || who.consumer.is_some() {
        refuser.access.metrics.authenticated("ok");
    }
    Ok(())
}

/// A verified token: its consumer (unless disabled), its forwarded claims, the token hidden.
fn accept_token<B>(
    state: &State,
    a: &Authn,
    jwt: &JwtAuthenticator,
    t: Arc<VerifiedToken>,
    req: &mut Request<B>,
    who: &mut Principal,
    refuser: &Refuser<'_>,
) -> Result<(), ProxyError> {
    if let Some(c) = t
        .subject
        .as_deref()
        .and_then(|s| state.consumers.by_subject(&t.issuer, s))
    {
        if c.disabled {
            return Err(refuser.refuse(who, "consumer_disabled", &a.challenge_invalid));
        }
        who.consumer = Some(c.name.clone());
    }
    for (h, v) in &t.forwarded_headers {
        req.headers_mut().insert(h.clone(), v.clone());
    }
    let mut uri = std::mem::take(req.uri_mut());
    jwt.hide_token(&t.provider, req.headers_mut(), &mut uri);
    *req.uri_mut() = uri;
    who.token = Some(t);
    Ok(())
}

/// An API key: its consumer (unless disabled or unknown), the key hidden.
fn accept_api_key<B>(
    state: &State,
    a: &Authn,
    key: &[u8],
    req: &mut Request<B>,
    who: &mut Principal,
    refuser: &Refuser<'_>,
) -> Result<(), ProxyError> {
    match state.consumers.by_api_key(key) {
        Some(c) if c.disabled => {
            who.key_id = c.key_id.clone();
            Err(refuser.refuse(who, "consumer_disabled", &a.challenge))
        }
        Some(c) => {
            who.key_id = c.key_id.clone();
            who.consumer = Some(c.name.clone());
            let mut uri = std::mem::take(req.uri_mut());
            a.hide_api_key(req.headers_mut(), &mut uri);
            *req.uri_mut() = uri;
            Ok(())
        }
        None => Err(refuser.refuse(who, "invalid_api_key", &a.challenge)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn consumer_seen(access: &AccessControl, peer: Option<&'static str>) -> Option<String> {
        let mut req = Request::get("/x")
            .header(CONSUMER_HEADER, "acme")
            .body(())
            .expect("request");
        let peer = peer.map(HeaderValue::from_static);
        let who = access
            .check(&mut req, peer.as_ref())
            .await
            .expect("admitted");
        assert_eq!(
            who.consumer.as_deref(),
            req.headers()
                .get(CONSUMER_HEADER)
                .and_then(|v| v.to_str().ok())
        );
        who.consumer.map(|c| c.to_string())
    }

    #[tokio::test]
    async fn the_consumer_header_is_believed_only_from_trusted_peers() {
        let gateway = "spiffe://td/service/gateway";
        let other = "spiffe://td/service/other";
        let mut registry = Registry::default();
        let mut config = AuthorizationConfig::default();
        // Default: no peer is believed, and never a caller without an mTLS identity.
        let closed = AccessControl::new("orders", &config, &mut registry);
        assert_eq!(consumer_seen(&closed, Some(other)).await, None);
        assert_eq!(consumer_seen(&closed, None).await, None);
        config.consumer_from_peers = vec!["*".to_string()];
        let open = AccessControl::new("orders", &config, &mut Registry::default());
        assert_eq!(
            consumer_seen(&open, Some(other)).await.as_deref(),
            Some("acme")
        );
        assert_eq!(consumer_seen(&open, None).await, None);
        config.consumer_from_peers = vec![gateway.to_string()];
        let strict = AccessControl::new("orders", &config, &mut Registry::default());
        assert_eq!(
            consumer_seen(&strict, Some(gateway)).await.as_deref(),
            Some("acme")
        );
        assert_eq!(consumer_seen(&strict, Some(other)).await, None);
    }
}
