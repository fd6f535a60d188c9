//! Wiring the ingress gateway, when configured: its certificates (reloaded, their expiry
//! exported), its TLS and plain HTTP listeners, served until the inbound side drains.

use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::inputs::ProxyInputs;
use super::{Bound, StartError};
use crate::drain;
use crate::http::headers::TrustedProxies;
use crate::listeners::ingress::{self, certs, Edge, Ingress};
use crate::listeners::outbound::Outbound;

/// The ingress's sockets.
pub(super) struct IngressListeners {
    pub tls: Option<TcpListener>,
    pub http: Option<TcpListener>,
}

/// Start the ingress if configured; its certificates' resolver, for `/config_dump`.
pub(super) fn start(
    inputs: &ProxyInputs,
    outbound: &Arc<Outbound>,
    registry: &mut Registry,
    listeners: IngressListeners,
    bound: &Bound,
    drain: &drain::Watcher,
) -> Result<Option<Arc<certs::Resolver>>, StartError> {
    let cfg = &inputs.cfg;
    let (Some(ing), Some(listener)) = (&cfg.ingress, listeners.tls) else {
        return Ok(None);
    };
    let sni =
        certs::SniCerts::load(&ing.certificates).map_err(|e| StartError::Ingress(e.to_string()))?;
    let resolver = certs::Resolver::new(sni);
    registry.register_collector(Box::new(certs::ExpiryCollector(resolver.clone())));
    certs::spawn_reloader(
        resolver.clone(),
        ing.certificates.clone(),
        cfg.identity.reload_interval,
        inputs.metrics.clone(),
    );
    let server_config =
        ingress::server_config(resolver.clone()).map_err(|e| StartError::Ingress(e.to_string()))?;
    let edge = Edge {
        certs: resolver.clone(),
        tls: server_config,
        trusted_proxies: TrustedProxies::parse(&ing.trusted_proxies)
            .map_err(|m| StartError::Ingress(format!("trusted_proxies: {m}")))?,
        https_port: bound.ingress.map_or(443, |a| a.port()),
        portal: ing
            .portal
            .as_ref()
            .map(|p| ingress::portal::Portal::new(p, inputs.portal.clone())),
    };
    let ingress = Ingress::new(
        outbound.clone(),
        inputs.access_control.clone(),
        inputs.rate_limits.clone(),
        inputs.metrics.clone(),
        cfg.limits.clone(),
        edge,
    );
    let ingress = Arc::new(ingress.with_cache(inputs.cache.clone()));
    // Outside clients stop with the inbound listener: first in the drain order.
    tokio::spawn(ingress.clone().serve_tls(listener, drain.clone()));
    if let (Some(h), Some(l)) = (&ing.http, listeners.http) {
        tokio::spawn(ingress.serve_http(l, drain.clone(), h.redirect_to_https));
    }
    Ok(Some(resolver))
}
