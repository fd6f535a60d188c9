//! The Trellis policy model: serde types for the mesh state a sidecar consumes (services, their
//! endpoints and per-service policy) plus schema and semantic validation.
//!
//! This crate has no async and no I/O beyond parsing text, so the CLI (`policy validate`), the
//! file store and every sidecar run exactly the same checks on exactly the same types.

mod access;
mod alerts;
mod api_diff;
mod api_public;
mod api_spec;
mod api_validation;
mod auth;
mod cache;
pub mod compose;
mod document;
mod http_route;
mod limits;
mod mesh;
mod spiffe;
mod targets;
mod validate;

pub use access::{
    ApiKeySource, ApiKeySpec, AuthenticationSpec, AuthorizationSpec, AuthzAction, AuthzFrom,
    AuthzMode, AuthzRule, AuthzTo, ConsumerSpec, JwtSubject, Quota,
};
pub use alerts::{AlertRuleSpec, AlertSignal, MAX_ALERT_WINDOW};
pub use api_diff::{diff as diff_api, ApiChange, ChangeKind, MAX_SCHEMA_NODES};
pub use api_public::{
    combined as combined_public_api, public_apis, public_path, Gateway, PublicApi, RouteInput,
    SpecInput,
};
pub use api_spec::{
    canonical_bytes, follow_ref, parse_document as parse_openapi,
    validate_document as validate_openapi, validate_version as validate_api_version, ApiSpecSpec,
    SpecError, SpecSummary, MAX_DEPTH as MAX_SPEC_DEPTH, MAX_REF_HOPS, MAX_SPEC_BYTES,
};
pub use api_validation::{
    ApiRef, RequestMode, ResponseMode, RouteValidation, DEFAULT_VALIDATION_BODY,
    MAX_VALIDATION_BODY,
};
pub use auth::{JwksSource, JwtProviderSpec, TokenSource};
pub use cache::{
    CacheDiskSpec, CacheKeySpec, CachePolicySpec, CachePurgeSpec, CacheRouteRef, MAX_CACHE_BYTES,
    MAX_CACHE_TTL, MIN_CACHE_BYTES,
};
pub use document::{
    parse_documents, DocumentError, Metadata, Policy, PolicyDocument, Registration, API_VERSION,
    KINDS,
};
pub use http_route::{
    compile_regex, BackendRef, DirectResponse, Fault, FaultAbort, FaultDelay, HeaderModifier,
    HttpPathMatch, HttpRouteMatch, HttpRouteRule, HttpRouteSpec, Mirror, Redirect, Rewrite,
    ValueMatch, MESH as MESH_GATEWAY,
};
pub use limits::{
    ConcurrencyLimitSpec, Limit, LimitKey, PathMatch, Per, RateLimitSpec, RouteMatch, Scope,
};
pub use mesh::{
    AllEjected, CircuitBreakerSpec, EndpointSpec, ExternalSpec, HashOn, HealthCheckSpec,
    LbAlgorithm, LoadBalancerSpec, MeshDocument, OutlierDetectionSpec, RetrySpec, ServicePolicy,
    ServiceSpec,
};
pub use spiffe::{SpiffeError, SpiffeId};
pub use validate::{
    parse_host_port, validate, validate_health_check, validate_host, validate_load_balancer,
    validate_outlier, validate_retries, validate_service_name, ValidationError, ValidationErrors,
    MAX_TIMEOUT, MAX_WEIGHT,
};

/// Why a mesh document could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The text is not valid YAML, or does not fit the schema (unknown field, wrong type).
    /// The message names the field and the line and column.
    #[error("{0}")]
    Parse(String),
    /// The document parsed but breaks a semantic rule.
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

/// Parse and validate a mesh document from YAML text.
pub fn parse_mesh_yaml(text: &str) -> Result<MeshDocument, PolicyError> {
    let doc: MeshDocument = if text.trim().is_empty() {
        MeshDocument::default()
    } else {
        document::yaml_guard(|| serde_norway::from_str(text).map_err(|e| e.to_string()))
            .map_err(PolicyError::Parse)?
    };
    validate(&doc)?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_valid_document() {
        let doc = parse_mesh_yaml(
            r#"
services:
  orders:
    endpoints:
      - address: 127.0.0.1:15006
        identity: spiffe://trellis.local/service/orders
        weight: 3
        zone: a
    policy:
      request_timeout: 2s
"#,
        )
        .expect("valid");
        let orders = &doc.services["orders"];
        assert_eq!(orders.endpoints[0].weight, 3);
        assert_eq!(
            orders.policy.request_timeout,
            Some(std::time::Duration::from_secs(2))
        );
    }

    #[test]
    fn empty_text_is_an_empty_mesh() {
        assert!(parse_mesh_yaml("  \n")
            .expect("empty ok")
            .services
            .is_empty());
    }

    #[test]
    fn unknown_field_is_named_with_its_position() {
        let err = parse_mesh_yaml("services:\n  orders:\n    endpoint: []\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `endpoint`"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn wrong_type_is_rejected() {
        let err = parse_mesh_yaml("services:\n  orders:\n    endpoints: 5\n").unwrap_err();
        assert!(matches!(err, PolicyError::Parse(_)), "{err}");
    }
}
