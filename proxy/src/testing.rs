//! Helpers for tests (feature `testing`): identities on disk, loopback configurations and
//! snapshots built from plain lists.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use trellis_policies::{EndpointSpec, MeshDocument, ServiceSpec};

use crate::config::Config;
use crate::identity::{CaError, CertificateAuthority};
use crate::state::snapshot::Snapshot;

pub const TRUST_DOMAIN: &str = "trellis.test";

/// A CA for [`TRUST_DOMAIN`], valid for a day.
pub fn ca() -> CertificateAuthority {
    CertificateAuthority::generate(TRUST_DOMAIN, Duration::from_secs(86_400))
        .expect("generate test CA")
}

/// Write `ca.pem` plus a 1 h leaf for `service` into `dir`.
pub fn write_identity(ca: &CertificateAuthority, dir: &Path, service: &str) -> Result<(), CaError> {
    ca.write(dir)?;
    ca.issue_service(service, Duration::from_secs(3600))?
        .write(dir, service)
}

/// A configuration for `service` with every listener on a free loopback port, the app at
/// `app`, identity files in `dir`, and short reload intervals.
pub fn config(service: &str, dir: &Path, app: SocketAddr) -> Config {
    let mut cfg = Config::new(service, dir);
    cfg.trust_domain = TRUST_DOMAIN.to_string();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    cfg.inbound.listen = any;
    cfg.outbound.listen = any;
    cfg.admin.listen = any;
    cfg.inbound.app = app;
    cfg.identity.reload_interval = Duration::from_millis(100);
    cfg.drain.grace_period = Duration::from_secs(5);
    // Spans are created and context propagated on every test request, but none is sampled
    // (and nothing exported) unless a test turns sampling up and points at its collector.
    cfg.tracing.sampling = 0.0;
    cfg.tracing.endpoint = Some("http://127.0.0.1:9".into());
    cfg
}

/// A snapshot with the given services and their inbound endpoints.
pub fn snapshot(services: &[(&str, &[SocketAddr])], version: u64) -> Arc<Snapshot> {
    let mut doc = MeshDocument::default();
    for (name, addrs) in services {
        let endpoints = addrs
            .iter()
            .map(|a| EndpointSpec {
                address: a.to_string(),
                identity: None,
                weight: 1,
                zone: None,
            })
            .collect();
        doc.services.insert(
            name.to_string(),
            ServiceSpec {
                endpoints,
                ..Default::default()
            },
        );
    }
    Arc::new(
        Snapshot::from_document(&doc, TRUST_DOMAIN, version, "test".into())
            .expect("valid test snapshot"),
    )
}
