//! Keeps the ingress's developer portal up to date: every [`REFRESH`], the public view of the
//! mesh's APIs is read from etcd (`api_public::view`) and, when it changed, published to the
//! data plane whole (`PortalDocs`). The request path only reads what was published.
//!
//! When etcd cannot be read, or holds something that does not parse, the last published
//! documents keep being served; the failure is counted
//! (`trellis_portal_refresh_failures_total`) and logged once per distinct message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use trellis_proxy::config::PortalConfig;
use trellis_proxy::listeners::ingress::portal::{PortalContent, PortalDocs};

use crate::api::ApiError;
use crate::api_public::{combined, view, Request};
use crate::config::EtcdConfig;
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;

/// How often the documents are read again.
pub const REFRESH: Duration = Duration::from_secs(10);

/// Publishes the portal's documents for `gateway` into `docs` until the task is dropped.
pub struct PortalRefresher {
    pub etcd: EtcdConfig,
    pub gateway: String,
    pub portal: PortalConfig,
    pub docs: PortalDocs,
    pub title: String,
    /// Refreshes that failed (etcd unreachable, a document that does not read back).
    pub failures: prometheus_client::metrics::counter::Counter,
}

// === impl PortalRefresher ===

impl PortalRefresher {
    pub async fn run(self) {
        let mut conn: Option<Etcd> = None;
        let mut last_error = String::new();
        loop {
            match self.refresh(&mut conn).await {
                Ok(()) => last_error.clear(),
                Err(e) => {
                    self.failures.inc();
                    // A broken connection is made again next time.
                    conn = None;
                    let message = e.to_string();
                    if message != last_error {
                        tracing::warn!(error = %message, "portal: cannot read the API documents; serving the last ones read");
                        last_error = message;
                    }
                }
            }
            tokio::time::sleep(REFRESH).await;
        }
    }

    async fn refresh(&self, conn: &mut Option<Etcd>) -> Result<(), ApiError> {
        let etcd = match conn {
            Some(e) => e,
            None => conn.insert(Etcd::connect(&self.etcd).await?),
        };
        let req = Request {
            gateway: &self.gateway,
            public_url: self.portal.public_url.as_deref(),
            service: None,
            title: &self.title,
        };
        let v = view(etcd, &Keys::new(&self.etcd.prefix), &req).await?;
        let content = content(&req, &v.apis)?;
        if **self.docs.docs.load() != content {
            tracing::info!(apis = v.apis.len(), notes = ?v.notes, "portal: API documents updated");
            self.docs.docs.store(Arc::new(content));
        }
        Ok(())
    }
}

/// The bytes the portal serves for `apis`.
pub fn content(
    req: &Request<'_>,
    apis: &[trellis_policies::PublicApi],
) -> Result<PortalContent, ApiError> {
    let (all, _) = combined(req, apis);
    let catalog: Vec<_> = apis
        .iter()
        .map(|a| {
            let info = a.document.get("info");
            json!({
                "service": a.service,
                "version": a.version,
                "title": info.and_then(|i| i.get("title")),
                "description": info.and_then(|i| i.get("description")),
                "paths": a.document.get("paths").and_then(|p| p.as_object()).map_or(0, |p| p.len()),
                "document": format!("/apis/{}/openapi.json", a.service),
            })
        })
        .collect();
    let mut by_service = BTreeMap::new();
    for a in apis {
        by_service.insert(
            a.service.clone(),
            Bytes::from(serde_json::to_vec(&a.document)?),
        );
    }
    Ok(PortalContent {
        combined: Bytes::from(serde_json::to_vec(&all)?),
        catalog: Bytes::from(serde_json::to_vec(&catalog)?),
        apis: by_service,
    })
}
