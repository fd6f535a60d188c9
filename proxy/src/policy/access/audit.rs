//! Authentication and authorization decisions: counted, and refusals written as audit events.
//!
//! Audit events go to the `trellis::audit` log target as structured fields (JSON with
//! `--log-format json`), one per refused request and per request an audit-mode policy would
//! refuse. They name the caller (identity, consumer, JWT subject), the request (method,
//! path without query) and the reason or policy; never a credential.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::Principal;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthnLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    policy: String,
    decision: &'static str,
}

#[derive(Clone, Default)]
pub struct AccessMetrics {
    authn: Family<AuthnLabels, Counter>,
    authz: Family<AuthzLabels, Counter>,
}

// === impl AccessMetrics ===

impl AccessMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "authentications",
            "Inbound authentication outcomes: ok, anonymous, or the refusal reason (missing_credentials, invalid_api_key, consumer_disabled, expired, bad_signature, ...)",
            m.authn.clone(),
        );
        registry.register(
            "authorization_decisions",
            "Inbound authorization refusals by policy: denied, or audit_denied (an audit-mode policy would have denied)",
            m.authz.clone(),
        );
        m
    }

    pub fn authenticated(&self, result: &'static str) {
        self.authn.get_or_create(&AuthnLabels { result }).inc();
    }

    fn authz(&self, policy: &str, decision: &'static str) {
        self.authz
            .get_or_create(&AuthzLabels {
                policy: policy.to_string(),
                decision,
            })
            .inc();
    }
}

/// A request refused for its credentials.
pub fn authn_refused(
    m: &AccessMetrics,
    service: &str,
    reason: &'static str,
    who: &Principal,
    method: &http::Method,
    path: &str,
) {
    m.authenticated(reason);
    tracing::info!(
        target: "trellis::audit",
        event = "authn_denied",
        service,
        reason,
        identity = who.identity.as_deref().unwrap_or(""),
        consumer = who.consumer.as_deref().unwrap_or(""),
        key_id = who.key_id.as_deref().unwrap_or(""),
        %method,
        path,
        "request refused: not authenticated"
    );
}

/// A request refused (or, in audit mode, that would be refused) by an authorization policy.
pub fn authz_refused(
    m: &AccessMetrics,
    service: &str,
    policy: &str,
    enforced: bool,
    who: &Principal,
    method: &http::Method,
    path: &str,
) {
    let (decision, event) = if enforced {
        ("denied", "authz_denied")
    } else {
        ("audit_denied", "authz_audit_denied")
    };
    m.authz(policy, decision);
    tracing::info!(
        target: "trellis::audit",
        event,
        service,
        policy,
        identity = who.identity.as_deref().unwrap_or(""),
        consumer = who.consumer.as_deref().unwrap_or(""),
        subject = who.token.as_ref().and_then(|t| t.subject.as_deref()).unwrap_or(""),
        %method,
        path,
        "{}",
        if enforced { "request denied by authorization policy" } else { "audit: authorization policy would deny this request" }
    );
}
