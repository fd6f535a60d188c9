//! `mesh-agent injector`: the mutating admission webhook.
