//! Policy documents as operators write them (`apiVersion`/`kind`/`metadata`/`spec`, one or more
//! per YAML file) and the registration record each sidecar writes for its instance.
//!
//! Both are validated here so that `mesh-agent policy validate`, `policy apply` and every
//! sidecar receiving them from etcd run the same checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::{validate_service_name, MAX_TIMEOUT, MAX_WEIGHT};
use crate::{ConcurrencyLimitSpec, ExternalSpec, RateLimitSpec, ServicePolicy, SpiffeId};

/// The only API version this build understands.
pub const API_VERSION: &str = "trellis.dev/v1";

/// A policy document, with its spec still untyped: the kind decides its schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// A policy whose spec has been checked against its kind's schema.
#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    /// Request routing for the hosts the spec names (see `docs/routing.md`).
    HttpRoute {
        name: String,
        spec: Box<crate::HttpRouteSpec>,
    },
    /// Timeouts for calls to one service. `metadata.name` is the service's name.
    ServicePolicy {
        service: String,
        policy: Box<ServicePolicy>,
    },
    /// A destination outside the mesh, called by apps as `metadata.name`.
    ExternalService {
        service: String,
        external: ExternalSpec,
    },
    /// A rate limit on a service's inbound traffic, named by `metadata.name`.
    RateLimit { name: String, spec: RateLimitSpec },
    /// A concurrency limit on a service's inbound traffic.
    ConcurrencyLimit {
        name: String,
        spec: ConcurrencyLimitSpec,
    },
    /// Credentials a service's inbound requests must carry.
    Authentication {
        name: String,
        spec: crate::AuthenticationSpec,
    },
    /// A consumer, named by `metadata.name`: its credentials and quota.
    Consumer {
        name: String,
        spec: crate::ConsumerSpec,
    },
    /// Allow or deny rules on a service's inbound requests.
    Authorization {
        name: String,
        spec: crate::AuthorizationSpec,
    },
    /// Response caching on a service's inbound side, named by `metadata.name`.
    CachePolicy {
        name: String,
        spec: Box<crate::CachePolicySpec>,
    },
    /// The latest purge of a service's cached responses; `metadata.name` is the service.
    CachePurge {
        name: String,
        spec: crate::CachePurgeSpec,
    },
    /// An alert on one service, evaluated by a dashboard (sidecars do not hold it).
    AlertRule {
        name: String,
        spec: crate::AlertRuleSpec,
    },
    /// An OpenAPI document for one service and version. Not stored under the policies: the
    /// CLI writes it once per content hash (`mesh-agent api`, docs/api-specs.md), so sidecars
    /// never receive it.
    ApiSpec {
        name: String,
        spec: Box<crate::ApiSpecSpec>,
        /// The document, parsed and checked.
        document: serde_json::Value,
        summary: crate::SpecSummary,
    },
}

/// The spec of a `ServicePolicy`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicePolicySpec {
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    stream_idle_timeout: Option<Duration>,
    #[serde(default)]
    load_balancer: Option<crate::LoadBalancerSpec>,
    #[serde(default)]
    outlier_detection: Option<crate::OutlierDetectionSpec>,
    #[serde(default)]
    circuit_breaker: Option<crate::CircuitBreakerSpec>,
    #[serde(default)]
    retries: Option<crate::RetrySpec>,
    #[serde(default)]
    health_check: Option<crate::HealthCheckSpec>,
}

/// Why a document was refused; the message names the document and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{doc}: {message}")]
pub struct DocumentError {
    /// `Kind/name`, or the position in the file when the document could not be read at all.
    pub doc: String,
    pub message: String,
}

pub const KINDS: &[&str] = &[
    "ServicePolicy",
    "HTTPRoute",
    "ExternalService",
    "RateLimitPolicy",
    "ConcurrencyLimitPolicy",
    "AuthenticationPolicy",
    "Consumer",
    "AuthorizationPolicy",
    "AlertRule",
    "ApiSpec",
    "CachePolicy",
    "CachePurge",
];

// === impl PolicyDocument ===

impl PolicyDocument {
    /// `Kind/name`, the document's identity in messages and in etcd keys.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind, self.metadata.name)
    }

    /// Check the envelope and the spec against the kind's schema and rules.
    pub fn validate(&self) -> Result<Policy, DocumentError> {
        let err = |message: String| DocumentError {
            doc: self.id(),
            message,
        };
        if self.api_version != API_VERSION {
            return Err(err(format!(
                "apiVersion `{}` is not supported; use `{API_VERSION}`",
                self.api_version
            )));
        }
        validate_name(&self.metadata.name).map_err(|m| err(format!("metadata.name: {m}")))?;
        match self.kind.as_str() {
            "ServicePolicy" => {
                validate_service_name(&self.metadata.name)
                    .map_err(|m| err(format!("metadata.name: {m}")))?;
                let spec: ServicePolicySpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                for (field, v) in [
                    ("connect_timeout", spec.connect_timeout),
                    ("request_timeout", spec.request_timeout),
                ] {
                    match v {
                        Some(d) if d.is_zero() => {
                            return Err(err(format!("spec.{field}: must be greater than zero")))
                        }
                        Some(d) if d > MAX_TIMEOUT => {
                            return Err(err(format!(
                                "spec.{field}: must be at most {}s",
                                MAX_TIMEOUT.as_secs()
                            )))
                        }
                        _ => {}
                    }
                }
                if let Some(h) = &spec.health_check {
                    crate::validate::validate_health_check(h)
                        .map_err(|m| err(format!("spec.health_check: {m}")))?;
                }
                if let Some(r) = &spec.retries {
                    crate::validate::validate_retries(r)
                        .map_err(|m| err(format!("spec.retries: {m}")))?;
                }
                if let Some(od) = &spec.outlier_detection {
                    crate::validate::validate_outlier(od)
                        .map_err(|m| err(format!("spec.outlier_detection: {m}")))?;
                }
                if let Some(lb) = &spec.load_balancer {
                    crate::validate::validate_load_balancer(lb)
                        .map_err(|m| err(format!("spec.load_balancer: {m}")))?;
                }
                Ok(Policy::ServicePolicy {
                    service: self.metadata.name.clone(),
                    policy: Box::new(ServicePolicy {
                        connect_timeout: spec.connect_timeout,
                        request_timeout: spec.request_timeout,
                        stream_idle_timeout: spec.stream_idle_timeout,
                        load_balancer: spec.load_balancer.clone(),
                        outlier_detection: spec.outlier_detection.clone(),
                        circuit_breaker: spec.circuit_breaker.clone(),
                        retries: spec.retries.clone(),
                        health_check: spec.health_check.clone(),
                    }),
                })
            }
            "HTTPRoute" => {
                let spec: crate::HttpRouteSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate(&self.metadata.name)
                    .map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::HttpRoute {
                    name: self.metadata.name.clone(),
                    spec: Box::new(spec),
                })
            }
            "ExternalService" => {
                validate_service_name(&self.metadata.name)
                    .map_err(|m| err(format!("metadata.name: {m}")))?;
                let spec: ExternalSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                crate::validate::validate_host(&spec.host)
                    .map_err(|m| err(format!("spec.host: {m}")))?;
                if spec.port == 0 {
                    return Err(err("spec.port: port 0 is not routable".into()));
                }
                Ok(Policy::ExternalService {
                    service: self.metadata.name.clone(),
                    external: spec,
                })
            }
            "RateLimitPolicy" => {
                let spec: RateLimitSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::RateLimit {
                    name: self.metadata.name.clone(),
                    spec,
                })
            }
            "ConcurrencyLimitPolicy" => {
                let spec: ConcurrencyLimitSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::ConcurrencyLimit {
                    name: self.metadata.name.clone(),
                    spec,
                })
            }
            "AuthenticationPolicy" => {
                let spec: crate::AuthenticationSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::Authentication {
                    name: self.metadata.name.clone(),
                    spec,
                })
            }
            "Consumer" => {
                let spec: crate::ConsumerSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::Consumer {
                    name: self.metadata.name.clone(),
                    spec,
                })
            }
            "AuthorizationPolicy" => {
                let spec: crate::AuthorizationSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::Authorization {
                    name: self.metadata.name.clone(),
                    spec,
                })
            }
            "CachePolicy" => {
                let spec: crate::CachePolicySpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::CachePolicy {
                    name: self.metadata.name.clone(),
                    spec: Box::new(spec),
                })
            }
            "CachePurge" => {
                let spec: crate::CachePurgeSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                if spec.service != self.metadata.name {
                    return Err(err(format!(
                        "spec.service: a purge is stored under its service's name (`{}`)",
                        spec.service
                    )));
                }
                Ok(Policy::CachePurge {
                    name: self.metadata.name.clone(),
                    spec,
                })
            }
            "AlertRule" => {
                let spec: crate::AlertRuleSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::AlertRule {
                    name: self.metadata.name.clone(),
                    spec,
                })
            }
            "ApiSpec" => {
                let spec: crate::ApiSpecSpec = serde_json::from_value(self.spec.clone())
                    .map_err(|e| err(format!("spec: {e}")))?;
                let (document, summary) = spec.validate().map_err(|m| err(format!("spec.{m}")))?;
                Ok(Policy::ApiSpec {
                    name: self.metadata.name.clone(),
                    spec: Box::new(spec),
                    document,
                    summary,
                })
            }
            other => Err(err(format!(
                "unknown kind `{other}`; known kinds: {}",
                KINDS.join(", ")
            ))),
        }
    }
}

/// Names are used in etcd keys: lowercase DNS-label characters only.
pub(crate) fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid name: lowercase letters, digits, '-' and '.'"
        ))
    }
}

/// Run a YAML parse, turning a panic of the parser into an error. serde_norway panics on some
/// malformed input instead of returning an error (a merge key aliasing its own unclosed
/// anchor, `x &a [<<: *a`: "unexpected end of mapping", found by fuzzing); a policy file or a
/// mesh file must be refused with a message, not bring the process down.
pub(crate) fn yaml_guard<T>(parse: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).unwrap_or_else(|_| {
        Err("malformed YAML: the parser failed on this text (check anchors, aliases and merge keys)".into())
    })
}

/// Parse every document of a (multi-document) YAML text. Each entry is the document or why it
/// could not be read; `origin` names the file in errors. A YAML syntax error ends the list: the
/// rest of the stream cannot be read past it.
pub fn parse_documents(text: &str, origin: &str) -> Vec<Result<PolicyDocument, DocumentError>> {
    let mut out = Vec::new();
    let mut last_error: Option<String> = None;
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value =
            match yaml_guard(|| serde_json::Value::deserialize(de).map_err(|e| e.to_string())) {
                Ok(serde_json::Value::Null) => continue,
                Ok(v) => v,
                Err(message) => {
                    // After a syntax error the YAML parser stays where it failed and the document
                    // iterator yields that same error again, forever (found by fuzzing: the list
                    // grew until the process ran out of memory). A type error in one document
                    // (e.g. a non-string key) carries its own position and does not repeat.
                    if last_error.as_deref() == Some(message.as_str()) {
                        break;
                    }
                    last_error = Some(message.clone());
                    out.push(Err(DocumentError {
                        doc: format!("{origin} document {}", i + 1),
                        message,
                    }));
                    continue;
                }
            };
        out.push(
            serde_json::from_value::<PolicyDocument>(value).map_err(|e| DocumentError {
                doc: format!("{origin} document {}", i + 1),
                message: e.to_string(),
            }),
        );
    }
    out
}

/// What a sidecar writes about its instance, under its lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub service: String,
    pub instance: String,
    /// The inbound (mTLS) address peers connect to.
    pub address: String,
    pub identity: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The sidecar's version.
    pub version: String,
    /// Lease TTL in seconds (for `mesh-agent status`).
    pub ttl_seconds: i64,
    /// Written just before a graceful deregistration: peers drop the instance at once. A
    /// registration that vanishes without it (an expired or revoked lease) may be kept for a
    /// grace period while its endpoint still answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

fn one() -> u32 {
    1
}

// === impl Registration ===

impl Registration {
    /// Checks on a registration read from etcd; `service` and `instance` come from its key.
    pub fn validate(&self, service: &str, instance: &str) -> Result<(), String> {
        if self.service != service || self.instance != instance {
            return Err(format!(
                "registration for {}/{} stored under {service}/{instance}",
                self.service, self.instance
            ));
        }
        validate_service_name(service)?;
        let addr: SocketAddr = self
            .address
            .parse()
            .map_err(|e| format!("address `{}`: {e}", self.address))?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(format!("address `{addr}` is not routable"));
        }
        let id = SpiffeId::parse(&self.identity).map_err(|e| e.to_string())?;
        if id.service() != Some(service) {
            return Err(format!(
                "identity {id} is not the identity of service {service}"
            ));
        }
        if self.weight == 0 || self.weight > MAX_WEIGHT {
            return Err(format!("weight must be between 1 and {MAX_WEIGHT}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yaml_syntax_error_ends_the_document_list() {
        // Fuzzing regression: the YAML document iterator repeats a syntax error forever, and
        // the list grew until the process ran out of memory.
        for text in ["a: [unclosed", "kind: x\n---\nb: {c\n---\nd: 1\n"] {
            let docs = parse_documents(text, "f");
            assert!(docs.len() <= 2, "{text:?}: {} entries", docs.len());
            assert!(docs.last().is_some_and(|d| d.is_err()), "{text:?}");
        }
    }

    #[test]
    fn a_yaml_parser_panic_is_a_clean_error() {
        // Fuzzing regression: serde_norway panics ("unexpected end of mapping") on a merge key
        // aliasing its own unclosed anchor.
        let docs = parse_documents("x &a [<<: *a", "f");
        assert!(!docs.is_empty() && docs.len() <= 3, "{docs:?}");
        assert!(docs.iter().all(|d| d.is_err()), "{docs:?}");
        assert!(
            docs.iter().any(|d| d
                .as_ref()
                .is_err_and(|e| e.message.contains("malformed YAML"))),
            "{docs:?}"
        );
        assert!(crate::parse_mesh_yaml("x &a [<<: *a").is_err());
    }

    #[test]
    fn multi_document_file_with_good_and_bad_documents() {
        let docs = parse_documents(
            r#"
apiVersion: trellis.dev/v1
kind: ServicePolicy
metadata: {name: payments}
spec: {request_timeout: 2s}
---
apiVersion: trellis.dev/v1
kind: ServicePolicy
metadata: {name: orders}
spec: {request_timout: 2s}
---
apiVersion: trellis.dev/v1
kind: Nope
metadata: {name: x}
spec: {}
---
kind: ServicePolicy
"#,
            "p.yaml",
        );
        assert_eq!(docs.len(), 4);
        let good = docs[0].as_ref().unwrap().validate().unwrap();
        assert_eq!(
            good,
            Policy::ServicePolicy {
                service: "payments".into(),
                policy: Box::new(ServicePolicy {
                    request_timeout: Some(Duration::from_secs(2)),
                    connect_timeout: None,
                    stream_idle_timeout: None,
                    load_balancer: None,
                    outlier_detection: None,
                    circuit_breaker: None,
                    retries: None,
                    health_check: None,
                })
            }
        );
        let e = docs[1]
            .as_ref()
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("ServicePolicy/orders: spec: unknown field `request_timout`"),
            "{e}"
        );
        let e = docs[2]
            .as_ref()
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown kind `Nope`"), "{e}");
        let e = docs[3].as_ref().unwrap_err().to_string();
        assert!(e.starts_with("p.yaml document 4: missing field"), "{e}");
    }

    #[test]
    fn load_balancer_policies() {
        let doc = |spec: &str| {
            let yaml = format!("apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {{name: a}}\nspec: {spec}\n");
            parse_documents(&yaml, "t").remove(0).unwrap().validate()
        };
        let ok = doc("{load_balancer: {algorithm: consistent_hash, hash_on: {header: x-user}}}")
            .unwrap();
        let Policy::ServicePolicy { policy, .. } = ok else {
            panic!()
        };
        let lb = policy.load_balancer.unwrap();
        assert_eq!(lb.algorithm, crate::LbAlgorithm::ConsistentHash);
        assert_eq!(lb.hash_on, Some(crate::HashOn::Header("x-user".into())));
        assert!(doc("{load_balancer: {algorithm: peak_ewma, zone_aware: true}}").is_ok());
        assert!(
            doc("{load_balancer: {algorithm: consistent_hash, hash_on: {source_ip: true}}}")
                .is_ok()
        );
        let e =
            doc("{load_balancer: {algorithm: consistent_hash, hash_on: {header: a, cookie: b}}}")
                .unwrap_err()
                .to_string();
        assert!(e.contains("exactly one"), "{e}");
        let e = doc("{load_balancer: {algorithm: consistent_hash}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs `hash_on`"), "{e}");
        let e = doc("{load_balancer: {algorithm: random, hash_on: {source_ip: true}}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only applies"), "{e}");
        let e = doc("{load_balancer: {algorithm: fastest}}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant `fastest`"), "{e}");
    }

    #[test]
    fn registration_checks() {
        let r = Registration {
            service: "orders".into(),
            instance: "a".into(),
            address: "127.0.0.1:15006".into(),
            identity: "spiffe://td/service/orders".into(),
            weight: 1,
            zone: None,
            metadata: BTreeMap::new(),
            version: "0.1.0".into(),
            ttl_seconds: 10,
            draining: false,
        };
        assert!(r.validate("orders", "a").is_ok());
        assert!(r.validate("orders", "b").is_err());
        let wrong_id = Registration {
            identity: "spiffe://td/service/payments".into(),
            ..r.clone()
        };
        assert!(wrong_id
            .validate("orders", "a")
            .unwrap_err()
            .contains("not the identity"));
        let unspecified = Registration {
            address: "0.0.0.0:1".into(),
            ..r
        };
        assert!(unspecified.validate("orders", "a").is_err());
    }
}
