//! What is injected: defaults given as flags (`mesh-agent inject`, `mesh-agent injector`),
//! overridden per workload by `trellis.dev/*` annotations on the pod template, so one
//! injector serves workloads with different needs.

use std::time::Duration;

use serde_norway::{Mapping, Value};

use super::InjectError;

pub const INJECT: &str = "trellis.dev/inject";
pub const SERVICE: &str = "trellis.dev/service";
pub const INTERCEPTION: &str = "trellis.dev/interception";
pub const SKIP_INBOUND_PORTS: &str = "trellis.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "trellis.dev/skip-outbound-ports";
pub const SKIP_OUTBOUND_CIDRS: &str = "trellis.dev/skip-outbound-cidrs";
pub const LOG_LEVEL: &str = "trellis.dev/log-level";
pub const APP_PORT: &str = "trellis.dev/app-port";
pub const CERTS: &str = "trellis.dev/certs";
pub const CERTS_SECRET: &str = "trellis.dev/certs-secret";
pub const CPU_REQUEST: &str = "trellis.dev/cpu-request";
pub const MEMORY_REQUEST: &str = "trellis.dev/memory-request";
pub const CPU_LIMIT: &str = "trellis.dev/cpu-limit";
pub const MEMORY_LIMIT: &str = "trellis.dev/memory-limit";

/// How the app's traffic reaches the sidecar.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interception {
    /// The `trellis-init` container redirects the pod's TCP with iptables (needs NET_ADMIN).
    Transparent,
    /// No init container (restricted Pod Security Standard): the app uses the sidecar as its
    /// HTTP proxy (`HTTP_PROXY=http://127.0.0.1:15001`).
    Explicit,
}

/// Where the sidecar's certificate, key and trust bundle come from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Certs {
    /// A Secret per service (`<service>-certs`): `tls.crt`, `tls.key`, `ca.crt`.
    Secret,
    /// cert-manager's csi-driver: a key and certificate per pod, made on the node, with the
    /// service's SPIFFE ID, renewed by the driver (the sidecar re-reads the files).
    Csi,
}

/// Whether a pod without a `trellis.dev/inject` annotation is injected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// The CLI (the user asked) and namespaces labelled for injection: unless `disabled`.
    UnlessDisabled,
    /// Other namespaces, through the webhook: only with `trellis.dev/inject: enabled`.
    OnlyEnabled,
}

/// The injection's knobs; each has an annotation of the same name on the pod template.
#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// The mesh service (default: the `app.kubernetes.io/name` or `app` label).
    #[arg(long)]
    pub service: Option<String>,
    /// The sidecar image.
    #[arg(long, default_value = concat!("trellis/mesh-agent:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The init image (the Dockerfile's `init` target: the binary plus iptables).
    #[arg(long, default_value = concat!("trellis/mesh-agent-init:", env!("CARGO_PKG_VERSION")))]
    pub init_image: String,
    /// The ConfigMap holding the mesh-wide `sidecar.yaml` (its `service` is replaced by
    /// TRELLIS_SERVICE).
    #[arg(long, default_value = "trellis-sidecar")]
    pub config_map: String,
    #[arg(long, value_enum, default_value_t = Certs::Secret)]
    pub certs: Certs,
    /// The Secret with `tls.crt`, `tls.key` and `ca.crt` (default: `<service>-certs`).
    #[arg(long)]
    pub certs_secret: Option<String>,
    /// `--certs csi`: the cert-manager issuer signing the pods' certificates.
    #[arg(long, default_value = "trellis-ca")]
    pub csi_issuer: String,
    #[arg(long, default_value = "ClusterIssuer")]
    pub csi_issuer_kind: String,
    /// `--certs csi`: the trust domain of the SPIFFE IDs (the ConfigMap's `trust_domain`).
    #[arg(long, default_value = trellis_proxy::config::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// etcd endpoints, comma-separated (default: the ConfigMap's).
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// OTLP/gRPC collector for traces (OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    #[arg(long, value_enum, default_value_t = Interception::Transparent)]
    pub interception: Interception,
    /// Inbound ports left uncaptured, comma-separated (ports of the app's kubelet probes are
    /// added by themselves).
    #[arg(long, value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left uncaptured (server-speaks-first protocols).
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destination networks left uncaptured, `ip/prefix`, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<String>,
    /// The sidecar's log filter (RUST_LOG), e.g. `info` or `trellis_proxy=debug`.
    #[arg(long)]
    pub log_level: Option<String>,
    /// The app's port on loopback (TRELLIS_APP_ADDR; default: the ConfigMap's `inbound.app`).
    #[arg(long)]
    pub app_port: Option<u16>,
    #[arg(long, default_value = "50m")]
    pub cpu_request: String,
    #[arg(long, default_value = "32Mi")]
    pub memory_request: String,
    /// No CPU limit by default: a throttled sidecar adds latency to every request.
    #[arg(long)]
    pub cpu_limit: Option<String>,
    #[arg(long, default_value = "128Mi")]
    pub memory_limit: String,
    /// The ConfigMap's `drain.grace_period`: terminationGracePeriodSeconds gets room for it.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_grace: Duration,
}

/// The options for one pod template, annotations applied, service resolved.
#[derive(Clone, Debug)]
pub struct Settings {
    pub opts: Options,
    pub service: String,
    pub certs_secret: String,
}

/// Parses [`Options`] alone (for tests and callers that build options from flags).
#[derive(clap::Parser)]
#[command(no_binary_name = true)]
struct OptionsOnly {
    #[command(flatten)]
    options: Options,
}

impl Options {
    /// Options from flags (`["--service", "orders"]`), defaults for the rest.
    pub fn from_flags<I, T>(flags: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        <OptionsOnly as clap::Parser>::try_parse_from(flags)
            .map(|o| o.options)
            .map_err(|e| e.to_string())
    }

    /// The settings for a template with these `metadata`, or `None` when the gate or a
    /// `trellis.dev/inject: disabled` annotation says not to inject.
    pub fn resolve(
        &self,
        meta: Option<&Mapping>,
        gate: Gate,
        what: &str,
    ) -> Result<Option<Settings>, InjectError> {
        let ann = Annotations::of(meta, what)?;
        if !ann.enabled(gate)? {
            return Ok(None);
        }
        let mut opts = self.clone();
        opts.apply_text(&ann)?;
        opts.apply_parsed(&ann)?;
        opts.validate(what)?;
        let service = opts.service_of(meta, what)?;
        let certs_secret = opts
            .certs_secret
            .clone()
            .unwrap_or_else(|| format!("{service}-certs"));
        Ok(Some(Settings {
            opts,
            service,
            certs_secret,
        }))
    }

    /// The service: the option, else the template's labels. It must make a valid SPIFFE ID.
    fn service_of(&self, meta: Option<&Mapping>, what: &str) -> Result<String, InjectError> {
        let bad = |option: &str, message: String| InjectError::Option {
            what: what.into(),
            option: option.into(),
            message,
        };
        let service = self
            .service
            .clone()
            .or_else(|| label(meta, "app.kubernetes.io/name"))
            .or_else(|| label(meta, "app"))
            .ok_or_else(|| InjectError::NoService { what: what.into() })?;
        trellis_policies::validate_service_name(&service).map_err(|m| bad("service", m))?;
        if self.certs == Certs::Csi {
            trellis_policies::SpiffeId::for_service(&self.trust_domain, &service)
                .map_err(|e| bad("trust-domain", e.to_string()))?;
        }
        Ok(service)
    }

    /// Annotations replace the flags' values: those taken as they are...
    fn apply_text(&mut self, ann: &Annotations) -> Result<(), InjectError> {
        for (key, field) in [
            (SERVICE, &mut self.service),
            (CERTS_SECRET, &mut self.certs_secret),
            (LOG_LEVEL, &mut self.log_level),
            (CPU_LIMIT, &mut self.cpu_limit),
        ] {
            if let Some(v) = ann.get(key)? {
                *field = Some(v.to_string());
            }
        }
        for (key, field) in [
            (CPU_REQUEST, &mut self.cpu_request),
            (MEMORY_REQUEST, &mut self.memory_request),
            (MEMORY_LIMIT, &mut self.memory_limit),
        ] {
            if let Some(v) = ann.get(key)? {
                *field = v.to_string();
            }
        }
        Ok(())
    }

    /// ...and those parsed (a choice, ports).
    fn apply_parsed(&mut self, ann: &Annotations) -> Result<(), InjectError> {
        if let Some(v) = ann.get(CERTS)? {
            self.certs = ann.choice(CERTS, v)?;
        }
        if let Some(v) = ann.get(INTERCEPTION)? {
            self.interception = ann.choice(INTERCEPTION, v)?;
        }
        if let Some(v) = ann.get(APP_PORT)? {
            self.app_port = Some(ann.port(APP_PORT, v)?);
        }
        for (key, field) in [
            (SKIP_INBOUND_PORTS, &mut self.skip_inbound_ports),
            (SKIP_OUTBOUND_PORTS, &mut self.skip_outbound_ports),
        ] {
            if let Some(v) = ann.get(key)? {
                *field = list(v)
                    .map(|p| ann.port(key, p))
                    .collect::<Result<_, _>>()?;
            }
        }
        if let Some(v) = ann.get(SKIP_OUTBOUND_CIDRS)? {
            self.skip_outbound_cidrs = list(v).map(str::to_string).collect();
        }
        Ok(())
    }

    /// Values that would make an invalid pod or a sidecar that does not start.
    fn validate(&self, what: &str) -> Result<(), InjectError> {
        let bad = |option: &str, message: String| InjectError::Option {
            what: what.into(),
            option: option.into(),
            message,
        };
        for (option, q) in [
            ("cpu-request", Some(&self.cpu_request)),
            ("memory-request", Some(&self.memory_request)),
            ("cpu-limit", self.cpu_limit.as_ref()),
            ("memory-limit", Some(&self.memory_limit)),
        ] {
            if let Some(q) = q.filter(|q| !is_quantity(q)) {
                return Err(bad(option, format!("{q:?} is not a Kubernetes quantity")));
            }
        }
        let rules = crate::iptables::Rules {
            exclude_outbound_cidrs: self.skip_outbound_cidrs.clone(),
            ..Default::default()
        };
        rules
            .validate(crate::iptables::Family::V4)
            .map_err(|e| bad("skip-outbound-cidrs", e.to_string()))?;
        if let Some(l) = self.log_level.as_ref().filter(|l| !is_token(l)) {
            return Err(bad("log-level", format!("{l:?}: one word, no spaces")));
        }
        Ok(())
    }
}

/// The `trellis.dev/*` annotations of one template.
struct Annotations<'a> {
    map: Option<&'a Mapping>,
    what: &'a str,
}

impl<'a> Annotations<'a> {
    fn of(meta: Option<&'a Mapping>, what: &'a str) -> Result<Self, InjectError> {
        let map = match meta.and_then(|m| m.get("annotations")) {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(m)) => Some(m),
            Some(_) => {
                return Err(InjectError::Malformed {
                    what: what.into(),
                    message: "metadata.annotations is not a mapping".into(),
                })
            }
        };
        Ok(Self { map, what })
    }

    /// A string annotation (Kubernetes only has strings; anything else is a mistake).
    fn get(&self, key: &str) -> Result<Option<&'a str>, InjectError> {
        match self.map.and_then(|m| m.get(key)) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim())),
            Some(_) => Err(self.bad(key, "must be a string (quote it)".into())),
        }
    }

    /// `trellis.dev/inject`, or the gate's default.
    fn enabled(&self, gate: Gate) -> Result<bool, InjectError> {
        match self.get(INJECT)? {
            Some("enabled" | "true") => Ok(true),
            Some("disabled" | "false") => Ok(false),
            Some(other) => Err(self.bad(INJECT, format!("{other:?} is not enabled or disabled"))),
            None => Ok(gate == Gate::UnlessDisabled),
        }
    }

    /// One of a flag's values (`transparent`, `csi`...).
    fn choice<T: clap::ValueEnum>(&self, key: &str, v: &str) -> Result<T, InjectError> {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|x| x.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        T::from_str(v, false)
            .map_err(|_| self.bad(key, format!("{v:?} is not one of {}", names.join(", "))))
    }

    fn port(&self, key: &str, v: &str) -> Result<u16, InjectError> {
        v.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| self.bad(key, format!("{v:?} is not a port")))
    }

    fn bad(&self, key: &str, message: String) -> InjectError {
        InjectError::Annotation {
            what: self.what.into(),
            key: key.into(),
            message,
        }
    }
}

fn label(meta: Option<&Mapping>, key: &str) -> Option<String> {
    meta?.get("labels")?.get(key)?.as_str().map(str::to_string)
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A Kubernetes resource quantity: a decimal number with an optional suffix
/// (`m`, `k`, `M`..., `Ki`, `Mi`..., or an exponent).
pub fn is_quantity(q: &str) -> bool {
    let num_end = q
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || (*i == 0 && (*c == '+' || *c == '-'))))
        .map_or(q.len(), |(i, _)| i);
    let (num, suffix) = q.split_at(num_end);
    let digits = num.trim_start_matches(['+', '-']);
    let number = digits.chars().any(|c| c.is_ascii_digit()) && digits.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
            | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.trim_start_matches(['+', '-']))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number && suffix_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["50m", "32Mi", "1", "0.5", "1e3", "2Gi", ".5"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "50 m", "1.2.3", "32MB", "abc", "1e"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
}
