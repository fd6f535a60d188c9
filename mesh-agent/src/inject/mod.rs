//! Sidecar injection for Kubernetes: `mesh-agent inject` / `uninject` rewrite manifests, and
//! `mesh-agent injector` applies the same change to pods through a mutating admission webhook.
//!
//! One function ([`pod::inject`]) changes a pod template; the CLI walks the workloads of a
//! manifest to their templates ([`manifest`]) and the webhook turns the change into a JSONPatch
//! ([`patch`]), so both produce the same pod. What is injected reproduces
//! `examples/kubernetes/deployment.yaml` ([`sidecar`]).
//!
//! Injection records what it replaced in the `trellis.dev/injected` annotation, so that
//! `uninject` restores the input exactly and injecting twice changes nothing (an injected
//! template is uninjected first, then injected again with the current options).

pub mod cli;
pub mod manifest;
pub mod options;
pub mod patch;
pub mod pod;
pub mod review;
pub mod sidecar;
pub mod webhook;
pub mod yaml;

/// The sidecar container's name (a native sidecar: an init container restarted always).
pub const SIDECAR_NAME: &str = "mesh-agent";
/// The iptables init container's name.
pub const INIT_NAME: &str = "trellis-init";
/// Volumes the injection adds, in the order it adds them.
pub const VOLUMES: [&str; 3] = [
    sidecar::CONFIG_VOLUME,
    sidecar::CERTS_VOLUME,
    sidecar::CACHE_VOLUME,
];
/// Marks an injected template and holds what to restore on `uninject`.
pub const INJECTED_ANNOTATION: &str = "trellis.dev/injected";

/// Why a manifest or pod is refused. Nothing is changed when one is returned.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("the input is neither YAML nor JSON: {0}")]
    Parse(String),
    #[error("{what}: not a Kubernetes object (a mapping with `apiVersion` and `kind`)")]
    NotAnObject { what: String },
    #[error(
        "{what}: hostNetwork pods share the node's network: the sidecar's ports and iptables \
         rules would apply to the whole node, so it is not injected (remove hostNetwork, or \
         annotate the pod template with trellis.dev/inject: disabled)"
    )]
    HostNetwork { what: String },
    #[error(
        "{what}: {field} already has an entry named {name:?}, the name the injection uses, and \
         the template is not marked {INJECTED_ANNOTATION}; rename it"
    )]
    NameTaken {
        what: String,
        field: String,
        name: String,
    },
    #[error("{what}: annotation {key}: {message}")]
    Annotation {
        what: String,
        key: String,
        message: String,
    },
    #[error("{what}: {option} (--{option} or annotation trellis.dev/{option}): {message}")]
    Option {
        what: String,
        option: String,
        message: String,
    },
    #[error(
        "{what}: no service name: set the trellis.dev/service annotation on the pod template, \
         --service, or an `app.kubernetes.io/name` or `app` label"
    )]
    NoService { what: String },
    #[error("{what}: {message}")]
    Malformed { what: String, message: String },
}
