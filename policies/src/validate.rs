//! Semantic checks on a parsed [`MeshDocument`]. Every problem is reported with the path of the
//! offending field, all at once, so an operator can fix a document in one pass.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::{MeshDocument, SpiffeId};

/// Largest accepted endpoint weight; keeps weighted-selection arithmetic far from overflow.
pub const MAX_WEIGHT: u32 = 10_000;
/// Longest accepted timeout in a policy: a larger value is almost certainly a unit mistake.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// One problem, located by the path of the field (e.g. `services.orders.endpoints[1].address`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub path: String,
    pub message: String,
}

/// All the problems found in one document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

/// Dot-separated labels of letters, digits and inner hyphens (RFC 1123), at most 63 bytes each
/// and 253 in all; uppercase letters only when `allow_upper`.
fn is_dns_name(name: &str, allow_upper: bool) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'-'
                        || (allow_upper && b.is_ascii_uppercase())
                })
        })
}

/// A service name is a DNS name (lowercase labels of [a-z0-9-], dot-separated), because apps
/// address services by `Host`.
pub fn validate_service_name(name: &str) -> Result<(), String> {
    if is_dns_name(name, false) {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid service name: use lowercase DNS labels ([a-z0-9-], separated by '.')"
        ))
    }
}

/// Split `ip:port`, `[v6]:port` or `host:port`; the host is an IP address or a DNS name.
pub fn parse_host_port(address: &str) -> Result<(String, u16), String> {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{address}`: `{port}` is not a port"))?;
    validate_host(host).map_err(|m| format!("`{address}`: {m}"))?;
    Ok((host.to_string(), port))
}

/// Health checks: a real path, a timeout within the interval, an interval that cannot flood.
pub fn validate_health_check(h: &crate::HealthCheckSpec) -> Result<(), String> {
    if h.http_path
        .as_ref()
        .is_some_and(|p| !p.starts_with('/') || p.contains(char::is_whitespace))
    {
        return Err("http_path must start with '/' and contain no spaces".into());
    }
    if h.interval < Duration::from_millis(50) || h.interval > MAX_TIMEOUT {
        return Err("interval must be between 50ms and 1h".into());
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        return Err("timeout must be greater than zero and at most the interval".into());
    }
    if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
        return Err("thresholds must be at least 1".into());
    }
    Ok(())
}

/// Sane bounds on retries.
pub fn validate_retries(r: &crate::RetrySpec) -> Result<(), String> {
    if r.attempts > 10 {
        return Err("attempts must be at most 10".into());
    }
    if !(0.0..=10.0).contains(&r.budget_ratio) {
        return Err("budget_ratio must be between 0 and 10".into());
    }
    if r.backoff_max < r.backoff_base {
        return Err("backoff_max must be at least backoff_base".into());
    }
    if r.per_try_timeout.is_some_and(|d| d.is_zero()) {
        return Err("per_try_timeout must be greater than zero".into());
    }
    if let Some(s) = r.retry_on_status.iter().find(|s| !(100..=599).contains(*s)) {
        return Err(format!("{s} is not an HTTP status"));
    }
    Ok(())
}

/// Ejection times must be ordered and the percentage a percentage.
pub fn validate_outlier(od: &crate::OutlierDetectionSpec) -> Result<(), String> {
    if od.max_ejection_percent > 100 {
        return Err("max_ejection_percent must be at most 100".into());
    }
    if od.base_ejection_time.is_zero() || od.max_ejection_time < od.base_ejection_time {
        return Err("need 0 < base_ejection_time <= max_ejection_time".into());
    }
    if od.max_ejection_time > MAX_TIMEOUT {
        return Err(format!(
            "max_ejection_time must be at most {}s",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(())
}

/// `hash_on` goes with consistent hashing, and only with it.
pub fn validate_load_balancer(lb: &crate::LoadBalancerSpec) -> Result<(), String> {
    use crate::{HashOn, LbAlgorithm};
    match (lb.algorithm, &lb.hash_on) {
        (LbAlgorithm::ConsistentHash, None) => {
            Err("consistent_hash needs `hash_on` (header, cookie or source_ip)".into())
        }
        (LbAlgorithm::ConsistentHash, Some(HashOn::Header(h) | HashOn::Cookie(h)))
            if h.is_empty() =>
        {
            Err("`hash_on` names an empty header or cookie".into())
        }
        (LbAlgorithm::ConsistentHash, Some(_)) => Ok(()),
        (_, Some(_)) => Err("`hash_on` only applies to algorithm consistent_hash".into()),
        (_, None) => Ok(()),
    }
}

/// An IP address or a DNS name.
pub fn validate_host(host: &str) -> Result<(), String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if is_dns_name(host.strip_suffix('.').unwrap_or(host), true) {
        Ok(())
    } else {
        Err(format!("`{host}` is neither an IP address nor a DNS name"))
    }
}

/// Check a document; `Ok` means every sidecar may apply it.
pub fn validate(doc: &MeshDocument) -> Result<(), ValidationErrors> {
    let mut errs = Vec::new();
    let mut push = |path: String, message: String| errs.push(ValidationError { path, message });

    for (name, route) in &doc.http_routes {
        if let Err(m) = route.validate(name) {
            let (field, message) = m.split_once(": ").unwrap_or(("", &m));
            push(format!("http_routes.{name}.{field}"), message.to_string());
        }
    }
    for (name, rl) in &doc.rate_limits {
        if let Err(m) = rl.validate() {
            push(format!("rate_limits.{name}"), m);
        }
    }
    for (name, cl) in &doc.concurrency_limits {
        if let Err(m) = cl.validate() {
            push(format!("concurrency_limits.{name}"), m);
        }
    }
    for (name, a) in &doc.authentication {
        if let Err(m) = a.validate() {
            push(format!("authentication.{name}"), m);
        }
    }
    for (name, c) in &doc.consumers {
        if let Err(m) = c.validate() {
            push(format!("consumers.{name}"), m);
        }
    }
    for (name, a) in &doc.authorization {
        if let Err(m) = a.validate() {
            push(format!("authorization.{name}"), m);
        }
    }
    for (name, c) in &doc.cache_policies {
        if let Err(m) = c.validate() {
            push(format!("cache_policies.{name}"), m);
        }
    }
    for (name, p) in &doc.cache_purges {
        if let Err(m) = p.validate() {
            push(format!("cache_purges.{name}"), m);
        }
    }
    for (name, svc) in &doc.services {
        let base = format!("services.{name}");
        if let Err(m) = validate_service_name(name) {
            push(base.clone(), m);
        }
        let mut seen = HashSet::new();
        for (i, ep) in svc.endpoints.iter().enumerate() {
            let p = format!("{base}.endpoints[{i}]");
            match parse_host_port(&ep.address) {
                Ok((_, 0)) => push(format!("{p}.address"), "port 0 is not routable".into()),
                Ok(_) => {
                    if !seen.insert(ep.address.clone()) {
                        push(
                            format!("{p}.address"),
                            format!("duplicate endpoint {}", ep.address),
                        );
                    }
                }
                Err(m) => push(format!("{p}.address"), m),
            }
            if let Some(id) = &ep.identity {
                if let Err(e) = SpiffeId::parse(id) {
                    push(format!("{p}.identity"), e.to_string());
                }
            }
            if ep.weight == 0 || ep.weight > MAX_WEIGHT {
                push(
                    format!("{p}.weight"),
                    format!("must be between 1 and {MAX_WEIGHT}, got {}", ep.weight),
                );
            }
        }
        if let Some(h) = &svc.policy.health_check {
            if let Err(m) = validate_health_check(h) {
                push(format!("{base}.policy.health_check"), m);
            }
        }
        if let Some(r) = &svc.policy.retries {
            if let Err(m) = validate_retries(r) {
                push(format!("{base}.policy.retries"), m);
            }
        }
        if let Some(od) = &svc.policy.outlier_detection {
            if let Err(m) = validate_outlier(od) {
                push(format!("{base}.policy.outlier_detection"), m);
            }
        }
        if let Some(lb) = &svc.policy.load_balancer {
            if let Err(m) = validate_load_balancer(lb) {
                push(format!("{base}.policy.load_balancer"), m);
            }
        }
        if let Some(ext) = &svc.external {
            if !svc.endpoints.is_empty() {
                push(
                    format!("{base}.external"),
                    "an external service has no endpoints: they come from DNS".into(),
                );
            }
            if let Err(m) = validate_host(&ext.host) {
                push(format!("{base}.external.host"), m);
            }
            if ext.port == 0 {
                push(
                    format!("{base}.external.port"),
                    "port 0 is not routable".into(),
                );
            }
        }
        for (field, value) in [
            ("connect_timeout", svc.policy.connect_timeout),
            ("request_timeout", svc.policy.request_timeout),
            ("stream_idle_timeout", svc.policy.stream_idle_timeout),
        ] {
            match value {
                Some(d) if d.is_zero() => push(
                    format!("{base}.policy.{field}"),
                    "must be greater than zero".into(),
                ),
                Some(d) if d > MAX_TIMEOUT => push(
                    format!("{base}.policy.{field}"),
                    format!("must be at most {}s", MAX_TIMEOUT.as_secs()),
                ),
                _ => {}
            }
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_mesh_yaml;

    fn errors(yaml: &str) -> Vec<ValidationError> {
        match parse_mesh_yaml(yaml) {
            Err(crate::PolicyError::Invalid(e)) => e.0,
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let errs = errors(
            r#"
services:
  Orders:
    endpoints:
      - address: not-an-address
      - address: 127.0.0.1:1
        weight: 0
        identity: http://x
      - address: 127.0.0.1:1
    policy:
      request_timeout: 0s
"#,
        );
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "services.Orders",
                "services.Orders.endpoints[0].address",
                "services.Orders.endpoints[1].identity",
                "services.Orders.endpoints[1].weight",
                "services.Orders.endpoints[2].address",
                "services.Orders.policy.request_timeout",
            ]
        );
    }

    #[test]
    fn endpoint_addresses_are_ip_or_host_with_port() {
        assert_eq!(parse_host_port("10.0.0.1:80"), Ok(("10.0.0.1".into(), 80)));
        assert_eq!(parse_host_port("[::1]:8080"), Ok(("::1".into(), 8080)));
        assert_eq!(
            parse_host_port("Api.Example.com:443"),
            Ok(("Api.Example.com".into(), 443))
        );
        for bad in [
            "example.com",
            "example.com:http",
            "exa mple.com:80",
            "-a.com:80",
            ":80",
            "a..b:80",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
        assert!(validate_host("example.com.").is_ok());
        assert!(validate_host("under_score.com").is_err());
    }

    #[test]
    fn service_names_are_dns_names() {
        assert!(validate_service_name("orders").is_ok());
        assert!(validate_service_name("orders.shop-1").is_ok());
        for bad in ["", "Orders", "-a", "a-", "a..b", "a_b"] {
            assert!(validate_service_name(bad).is_err(), "{bad}");
        }
    }
}
