//! The runtime inputs every listener is built from, in one bundle (as ztunnel's
//! `ProxyInputs`): built once by [`super::Proxy::start`], so that a listener's constructor
//! takes what it needs from one place instead of a growing argument list.

use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::identity::IdentityStore;
use crate::listeners::inbound::telemetry::Telemetry;
use crate::listeners::inbound::Inbound;
use crate::listeners::outbound::Outbound;
use crate::policy::access::AccessControl;
use crate::policy::ratelimit::RateLimits;
use crate::state::discover::OnDemand;
use crate::state::pool::PeerPool;
use crate::state::target::TargetTable;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::Tracing;

pub(super) struct ProxyInputs {
    pub cfg: Config,
    /// This sidecar's identity, swapped on rotation.
    pub tls: IdentityStore,
    pub metrics: Arc<Metrics>,
    /// The routing view of the latest snapshot.
    pub routes: Arc<ArcSwap<TargetTable>>,
    pub pool: Arc<PeerPool>,
    pub tracing: Arc<Tracing>,
    pub access_log: Arc<AccessLog>,
    pub rate_limits: Arc<RateLimits>,
    pub access_control: Arc<AccessControl>,
    /// The developer portal's documents, published by the agent.
    pub portal: crate::listeners::ingress::portal::PortalDocs,
    /// OpenAPI validation of the gateway's routes (used when an ingress is configured).
    pub validation: Arc<crate::validate::EdgeValidation>,
    /// The inbound response cache (applied by each snapshot).
    pub cache: Arc<crate::cache::ResponseCache>,
    /// Learns services the snapshots do not hold (scoped discovery).
    pub on_demand: Option<OnDemand>,
}

// === impl ProxyInputs ===

impl ProxyInputs {
    /// The inbound listener; `registry` (complete by now) is what it serves to the
    /// telemetry readers.
    pub fn inbound(&self, registry: Arc<Registry>) -> Arc<Inbound> {
        let telemetry = Telemetry::new(
            &self.cfg.service,
            &self.cfg.telemetry.readers,
            registry,
            self.metrics.clone(),
        );
        let inbound = Inbound::new(
            &self.cfg,
            self.tls.clone(),
            self.metrics.clone(),
            self.rate_limits.clone(),
            self.access_control.clone(),
            self.tracing.clone(),
            self.access_log.clone(),
        );
        self.cache.set_revalidator(crate::cache::app_revalidator(
            self.cfg.inbound.app,
            self.cfg.timeouts.request,
        ));
        Arc::new(
            inbound
                .with_telemetry(telemetry)
                .with_cache(self.cache.clone()),
        )
    }

    pub fn outbound(&self) -> Arc<Outbound> {
        let outbound = Outbound::new(
            &self.cfg,
            self.routes.clone(),
            self.pool.clone(),
            self.tls.clone(),
            self.metrics.clone(),
            self.tracing.clone(),
            self.access_log.clone(),
        );
        let validation = self.cfg.ingress.is_some().then(|| self.validation.clone());
        Arc::new(
            outbound
                .with_on_demand(self.on_demand.clone())
                .with_validation(validation),
        )
    }
}
