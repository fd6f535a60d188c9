//! `/config_dump`: the configuration and everything the data plane derived from it, read
//! when asked, never on the request path.

use std::sync::Arc;

use super::inputs::ProxyInputs;
use crate::admin::DumpFn;
use crate::listeners::inbound::app_protocol::AppKnowledge;
use crate::listeners::ingress::certs::Resolver;
use crate::readiness::Ready;

/// What the dump reads besides the inputs.
pub(super) struct Extra {
    pub app_speaks: Arc<AppKnowledge>,
    pub ready: Ready,
    pub ingress_certs: Option<Arc<Resolver>>,
    /// Sections the agent added.
    pub sections: Vec<(&'static str, DumpFn)>,
}

pub(super) fn config_dump(inputs: &ProxyInputs, extra: Extra) -> DumpFn {
    let cfg = inputs.cfg.clone();
    let snapshot = inputs.routes.clone();
    let tls = inputs.tls.clone();
    let pool = inputs.pool.clone();
    let limits = inputs.rate_limits.clone();
    let access_control = inputs.access_control.clone();
    let cache = inputs.cache.clone();
    let Extra {
        app_speaks,
        ready,
        ingress_certs,
        sections,
    } = extra;
    Arc::new(move || {
        let t = tls.load();
        let mut v = serde_json::json!({
            "config": cfg,
            "identity": {
                "spiffe_id": t.identity().to_string(),
                "not_after_unix": t.not_after(),
                "generation": t.generation(),
            },
            // What `inbound.app_protocol: auto` found the app to speak.
            "app_speaks": app_speaks.dump(),
            "snapshot": &*snapshot.load().snapshot,
            "load_balancers": snapshot.load().dump(),
            "routing": snapshot.load().routing.dump(),
            // The only hosts the ingress routes (empty without an ingress).
            "gateway_routing": snapshot.load().gateway_routing.dump(),
            "limits": limits.dump(),
            "access": access_control.dump(),
            // The inbound response cache: applied policies, bytes held, disk tiers.
            "cache": cache.dump(),
            "ingress_certificates": ingress_certs.as_ref().map(|r| {
                r.expiry()
                    .into_iter()
                    .map(|(host, not_after)| serde_json::json!({"host": host, "not_after_unix": not_after}))
                    .collect::<Vec<_>>()
            }),
            "peer_connections": pool.len(),
            "ready": { "pending": ready.pending() },
        });
        for (name, f) in &sections {
            v[*name] = f();
        }
        v
    }) as DumpFn
}
