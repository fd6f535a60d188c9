//! `mesh-agent`: the Trellis sidecar binary. It wires the data plane (`trellis-proxy`) to its
//! configuration sources and provides the operator commands.

pub mod api;
pub mod api_delete;
pub mod api_fetch;
pub mod api_public;
pub mod api_validators;
pub mod apikey;
pub mod cache_purge;
pub mod cert;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod demo_app;
pub mod dns;
pub mod etcd;
pub mod inject;
pub mod iptables;
pub mod logging;
#[cfg(target_os = "linux")]
pub mod nofile;
pub mod policy;
pub mod portal;
pub mod portal_app;
pub mod run;
pub mod runtime;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod trim;
pub mod usage;
pub mod wait_ready;
