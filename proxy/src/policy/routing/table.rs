//! The compiled `HTTPRoute`s of one snapshot: per host, every match of every rule naming that
//! host, sorted once by precedence, so a request takes the first match that holds.
//!
//! Built off the request path with the route table (backends resolve to their [`Target`] here,
//! not per request) and swapped in with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, Uri};
use trellis_policies::{HttpRouteRule, HttpRouteSpec};

use super::actions::{DirectAction, HeaderOps, RedirectAction, RewriteAction};
use super::fault::FaultAction;
use super::matcher::Matcher;
use super::mirror::MirrorAction;
use crate::state::balance::rand::Rng;

/// All the HTTPRoutes of a snapshot, by host.
#[derive(Default)]
pub struct RoutingTable {
    hosts: HashMap<String, HostRoutes>,
    /// `*.example.com` routes, keyed by `.example.com`: a suffix match (Gateway API), the
    /// longest suffix first, looked up with slices of the request's host (no allocation).
    wildcards: HashMap<String, HostRoutes>,
    /// Some rule is an aggregate: the ingress looks for one before it opens a client span.
    aggregates: bool,
}

/// The routes of one host, most specific match first.
pub struct HostRoutes {
    /// The host, as the `service` label of requests answered without a backend.
    pub host: Arc<String>,
    /// The host is also a mesh service: requests no rule matches go to it as without routes.
    pub is_service: bool,
    /// A rule and the index of one of its matchers.
    entries: Vec<(Arc<Rule>, usize)>,
}

/// One compiled rule.
pub struct Rule {
    /// The `route` label.
    pub name: Arc<String>,
    /// The HTTPRoute it belongs to (its `metadata.name`): what a route's `CachePolicy` names.
    pub policy: Arc<str>,
    matchers: Vec<Matcher>,
    pub action: Action,
    pub request_headers: Option<HeaderOps>,
    pub response_headers: Option<HeaderOps>,
    pub rewrite: Option<RewriteAction>,
    pub fault: Option<FaultAction>,
    pub mirror: Option<MirrorAction>,
    pub timeout: Option<Duration>,
    /// JSON body transforms (forwarding rules only).
    pub transform: Option<Arc<crate::compose::Transform>>,
    /// gRPC-JSON transcoding of the backend's gRPC service (gateway tables only).
    pub transcode: Option<Arc<trellis_policies::compose::Transcoder>>,
    /// OpenAPI validation of the rule's requests (gateway tables only: sidecars do not validate).
    pub validation: Option<crate::validate::RuleValidation>,
    /// Draws for backend weights, faults and mirroring.
    pub(crate) rng: Rng,
}

pub enum Action {
    Forward {
        backends: Vec<Backend>,
        total: u64,
    },
    Redirect(RedirectAction),
    Direct(DirectAction),
    /// Answer with several mesh calls' merged answers (ingress only).
    Aggregate(Arc<crate::compose::Aggregate>),
}

/// A backend names its service; its route is looked up in the current route table for each
/// request, so that a change to the service's instances does not recompile the HTTPRoutes
/// (an ingress with a thousand routes would otherwise recompile them all on every change). A
/// service the mesh does not know answers 503 `unknown-service`, as a request addressed to it
/// directly would.
pub struct Backend {
    pub service: Arc<String>,
    weight: u64,
}

/// What the table says about a request.
pub enum Decision<'a> {
    /// No HTTPRoute names the host: route by `Host` as without routes.
    Unrouted,
    /// HTTPRoutes name the host, and no rule matches the request.
    NoMatch(&'a HostRoutes),
    /// The first match that holds; `prefix` is the length of the path prefix it matched.
    Matched {
        host: &'a HostRoutes,
        rule: &'a Arc<Rule>,
        prefix: usize,
    },
}

// === impl RoutingTable ===

impl RoutingTable {
    /// Compile the `specs` (already validated) bound to `gateway` ([`trellis_policies::MESH_GATEWAY`]
    /// for the outbound side, or an ingress's service name); `route` resolves a service name
    /// to its route. A policy that does not compile (which validation rules out) is skipped
    /// and logged.
    pub fn build(
        specs: &BTreeMap<String, HttpRouteSpec>,
        gateway: &str,
        is_service: impl Fn(&str) -> bool,
    ) -> Self {
        let mut hosts: HashMap<String, HostRoutes> = HashMap::new();
        let mut aggregates = false;
        for (policy, spec) in specs.iter().filter(|(_, s)| s.binds(gateway)) {
            let owner: Arc<str> = Arc::from(policy.as_str());
            let rules: Result<Vec<Arc<Rule>>, String> = spec
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    Rule::compile(owner.clone(), spec.rule_name(policy, i), r)
                        .map(|mut rule| {
                            if gateway == trellis_policies::MESH_GATEWAY {
                                rule.validation = None;
                            }
                            Arc::new(rule)
                        })
                        .map_err(|m| format!("rules[{i}]: {m}"))
                })
                .collect();
            let rules = match rules {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(policy = %policy, error = %e, "HTTPRoute skipped: it does not compile");
                    continue;
                }
            };
            aggregates |= rules
                .iter()
                .any(|r| matches!(r.action, Action::Aggregate(_)));
            for host in &spec.hosts {
                let entry = hosts.entry(host.clone()).or_insert_with(|| HostRoutes {
                    host: Arc::new(host.clone()),
                    is_service: is_service(host),
                    entries: Vec::new(),
                });
                for rule in &rules {
                    for i in 0..rule.matchers.len() {
                        entry.entries.push((rule.clone(), i));
                    }
                }
            }
        }
        for h in hosts.values_mut() {
            // Stable: equal precedence keeps policy name order, then rule and match order.
            h.entries
                .sort_by_key(|(rule, i)| std::cmp::Reverse(rule.matchers[*i].precedence()));
        }
        let wildcard_keys: Vec<String> = hosts
            .keys()
            .filter(|h| h.starts_with("*."))
            .cloned()
            .collect();
        let mut wildcards = HashMap::new();
        for k in wildcard_keys {
            if let Some(r) = hosts.remove(&k) {
                wildcards.insert(k[1..].to_string(), r);
            }
        }
        Self {
            hosts,
            wildcards,
            aggregates,
        }
    }

    /// Whether some rule is an aggregate.
    pub fn has_aggregates(&self) -> bool {
        self.aggregates
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.wildcards.is_empty()
    }

    /// The routes of `host`, case-insensitively: an exact host first, then the longest
    /// matching `*.` suffix.
    pub fn host(&self, host: &str) -> Option<&HostRoutes> {
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.lookup(&host.to_ascii_lowercase());
        }
        self.lookup(host)
    }

    fn lookup(&self, host: &str) -> Option<&HostRoutes> {
        if let Some(h) = self.hosts.get(host) {
            return Some(h);
        }
        if self.wildcards.is_empty() {
            return None;
        }
        host.match_indices('.')
            .find_map(|(i, _)| self.wildcards.get(&host[i..]))
    }

    /// Route a request: independent of the listener, so the outbound path and an ingress use
    /// the same function. Allocation-free.
    pub fn decide(
        &self,
        host: &str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Decision<'_> {
        let Some(routes) = self.host(host) else {
            return Decision::Unrouted;
        };
        let (path, query) = (uri.path(), uri.query());
        for (rule, i) in &routes.entries {
            if let Some(prefix) = rule.matchers[*i].matches(method, path, query, headers) {
                return Decision::Matched {
                    host: routes,
                    rule,
                    prefix,
                };
            }
        }
        Decision::NoMatch(routes)
    }

    /// Hosts and their rules in precedence order, for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        let wildcards = self.wildcards.values().map(|r| (r.host.as_str(), r));
        for (host, r) in self
            .hosts
            .iter()
            .map(|(h, r)| (h.as_str(), r))
            .chain(wildcards)
        {
            let order: Vec<&str> = r
                .entries
                .iter()
                .map(|(rule, _)| rule.name.as_str())
                .collect();
            out.insert(
                host.to_string(),
                serde_json::json!({ "is_service": r.is_service, "match_order": order }),
            );
        }
        serde_json::Value::Object(out)
    }
}

// === impl Rule ===

impl Rule {
    fn compile(policy: Arc<str>, name: String, r: &HttpRouteRule) -> Result<Self, String> {
        let matchers = if r.matches.is_empty() {
            vec![Matcher::any()]
        } else {
            r.matches
                .iter()
                .map(Matcher::compile)
                .collect::<Result<_, _>>()?
        };
        let action = if let Some(d) = &r.direct_response {
            Action::Direct(DirectAction::compile(d)?)
        } else if let Some(rd) = &r.redirect {
            Action::Redirect(RedirectAction::compile(rd)?)
        } else if let Some(a) = &r.aggregate {
            let a = crate::compose::Aggregate::compile(a).map_err(|m| format!("aggregate.{m}"))?;
            Action::Aggregate(Arc::new(a))
        } else {
            let backends: Vec<Backend> = r
                .backends
                .iter()
                .map(|b| Backend {
                    service: Arc::new(b.service.clone()),
                    weight: u64::from(b.weight),
                })
                .collect();
            let total = backends.iter().map(|b| b.weight).sum();
            if total == 0 {
                return Err("backends: no weight above 0".into());
            }
            Action::Forward { backends, total }
        };
        Ok(Self {
            name: Arc::new(name),
            policy,
            matchers,
            action,
            request_headers: r
                .request_headers
                .as_ref()
                .map(HeaderOps::compile)
                .transpose()?,
            response_headers: r
                .response_headers
                .as_ref()
                .map(HeaderOps::compile)
                .transpose()?,
            rewrite: r.rewrite.as_ref().map(RewriteAction::compile).transpose()?,
            fault: r.fault.as_ref().map(FaultAction::compile).transpose()?,
            mirror: r
                .mirror
                .as_ref()
                .map(|m| MirrorAction::new(Arc::new(m.service.clone()), m.percent)),
            timeout: r.timeout,
            transform: r
                .transform
                .as_ref()
                .map(|t| crate::compose::Transform::compile(t).map(Arc::new))
                .transpose()
                .map_err(|m| format!("transform.{m}"))?,
            transcode: r
                .grpc_transcode
                .as_ref()
                .map(|t| t.compile().map(Arc::new))
                .transpose()
                .map_err(|m| format!("grpc_transcode.{m}"))?,
            validation: r
                .validation
                .as_ref()
                .map(crate::validate::RuleValidation::new),
            rng: Rng::new(),
        })
    }

    /// A backend drawn by weight (the only backend without a draw).
    pub fn backend(&self) -> Option<&Backend> {
        let Action::Forward { backends, total } = &self.action else {
            return None;
        };
        if backends.len() == 1 {
            return backends.first();
        }
        let mut x = ((u128::from(self.rng.next()) * u128::from(*total)) >> 64) as u64;
        for b in backends {
            if x < b.weight {
                return Some(b);
            }
            x -= b.weight;
        }
        backends.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> RoutingTable {
        let specs: BTreeMap<String, HttpRouteSpec> = serde_norway::from_str(yaml).unwrap();
        for (name, s) in &specs {
            s.validate(name).unwrap();
        }
        RoutingTable::build(&specs, trellis_policies::MESH_GATEWAY, |_| false)
    }

    fn pick(t: &RoutingTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let uri: Uri = uri.parse().unwrap();
        match t.decide("orders", &method.parse().unwrap(), &uri, &h) {
            Decision::Matched { rule, .. } => rule.name.to_string(),
            Decision::NoMatch(_) => "no-match".into(),
            Decision::Unrouted => "unrouted".into(),
        }
    }

    #[test]
    fn wildcard_hosts_match_suffixes_after_exact_hosts() {
        let t = table(
            r#"
w:
  hosts: ["*.example.com", "*.eu.example.com", api.example.com]
  rules: [{name: any, direct_response: {status: 200}}]
x:
  hosts: [api.example.com]
  rules: [{name: exact, matches: [{path: {prefix: /}}], direct_response: {status: 200}}]
"#,
        );
        let host = |h: &str| t.host(h).map(|r| r.host.to_string());
        assert_eq!(host("api.example.com").as_deref(), Some("api.example.com"));
        assert_eq!(host("shop.example.com").as_deref(), Some("*.example.com"));
        assert_eq!(host("a.b.example.com").as_deref(), Some("*.example.com"));
        // The longest suffix wins.
        assert_eq!(
            host("shop.eu.example.com").as_deref(),
            Some("*.eu.example.com")
        );
        assert_eq!(host("Shop.Example.COM").as_deref(), Some("*.example.com"));
        assert_eq!(host("example.com"), None);
        assert_eq!(host("example.org"), None);
    }

    #[test]
    fn precedence_spans_policies_and_rules() {
        // Rules are written in the reverse of their precedence, across two policies.
        let t = table(
            r#"
a:
  hosts: [orders]
  rules:
    - {name: any, direct_response: {status: 200}}
    - {name: prefix-api, matches: [{path: {prefix: /api}}], direct_response: {status: 200}}
    - {name: regex, matches: [{path: {regex: '/api/v[0-9]+/.*'}}], direct_response: {status: 200}}
b:
  hosts: [orders]
  rules:
    - {name: prefix-api-post, matches: [{path: {prefix: /api}, method: POST}], direct_response: {status: 200}}
    - {name: prefix-api-hdr, matches: [{path: {prefix: /api}, headers: [{name: x-beta, present: true}]}], direct_response: {status: 200}}
    - {name: prefix-api-v1, matches: [{path: {prefix: /api/v1}}], direct_response: {status: 200}}
    - {name: exact, matches: [{path: {exact: /api/v1/login}}], direct_response: {status: 200}}
"#,
        );
        assert_eq!(pick(&t, "GET", "/api/v1/login", &[]), "exact");
        assert_eq!(pick(&t, "GET", "/api/v1/other", &[]), "regex");
        assert_eq!(pick(&t, "GET", "/api/v1", &[]), "prefix-api-v1");
        assert_eq!(
            pick(&t, "POST", "/api/x", &[("x-beta", "1")]),
            "prefix-api-post"
        );
        assert_eq!(
            pick(&t, "GET", "/api/x", &[("x-beta", "1")]),
            "prefix-api-hdr"
        );
        assert_eq!(pick(&t, "GET", "/api/x", &[]), "prefix-api");
        assert_eq!(pick(&t, "GET", "/", &[]), "any");
        let mut h = HeaderMap::new();
        h.insert("x", "1".parse().unwrap());
        assert!(matches!(
            t.decide("payments", &Method::GET, &"/".parse().unwrap(), &h),
            Decision::Unrouted
        ));
        assert!(matches!(
            t.decide("ORDERS", &Method::GET, &"/".parse().unwrap(), &h),
            Decision::Matched { .. }
        ));
    }

    #[test]
    fn no_match_and_default_names() {
        let t = table(
            "web:\n  hosts: [orders]\n  rules:\n    - {matches: [{path: {exact: /a}}], direct_response: {status: 200}}\n",
        );
        assert_eq!(pick(&t, "GET", "/a", &[]), "web-0");
        assert_eq!(pick(&t, "GET", "/b", &[]), "no-match");
    }

    #[test]
    fn weighted_backends_split_within_a_binomial_bound() {
        let t = table(
            "w:\n  hosts: [orders]\n  rules:\n    - backends: [{service: v1, weight: 90}, {service: v2, weight: 10}, {service: off, weight: 0}]\n",
        );
        let Decision::Matched { rule, .. } = t.decide(
            "orders",
            &Method::GET,
            &"/".parse().unwrap(),
            &HeaderMap::new(),
        ) else {
            panic!("matched")
        };
        let n = 100_000;
        let mut v2 = 0;
        for _ in 0..n {
            match rule.backend().unwrap().service.as_str() {
                "v2" => v2 += 1,
                "v1" => {}
                other => panic!("weight 0 backend chosen: {other}"),
            }
        }
        // sd = sqrt(100000 * 0.1 * 0.9) ~ 95; 5 sd.
        assert!((10_000i64 - v2).abs() < 475, "{v2}");
    }
}
