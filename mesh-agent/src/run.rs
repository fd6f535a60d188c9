//! `mesh-agent run`: one sidecar, configured from a file, fed by the file store, stopped by
//! SIGTERM/SIGINT or `POST /shutdown`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use trellis_policies::Registration;
use trellis_proxy::app::{Proxy, Running, StartError};
use trellis_proxy::config::Config;
use trellis_proxy::state::snapshot::Snapshot;

use crate::config::{AgentConfig, EtcdConfig};
use crate::dns::Dns;
use crate::etcd::discovery::Discovery;
use crate::etcd::ratelimit::{Coordinator, CoordinatorStatus};
use crate::etcd::registration::{self, RegistrationHandle};
use crate::store::{FileStore, SnapshotTx};

/// Build and start a sidecar for `config`, with its store.
pub async fn start(config: AgentConfig) -> Result<Running, StartError> {
    // The data plane checks its half again when it starts.
    config.validate()?;
    let (tx, rx) = watch::channel(None);
    if let Some(etcd) = config.store.etcd.clone() {
        return start_etcd(config, etcd, tx, rx).await;
    }
    match &config.store.file {
        Some(path) => {
            let mut proxy = new_proxy(&config, rx);
            let dns = Arc::new(Dns::new(&config.dns.nameservers, proxy.registry_mut()));
            let fs = FileStore::new(
                path.clone(),
                config.proxy.trust_domain.clone(),
                config.store.reload_interval,
                dns,
                proxy.registry_mut(),
            );
            let status = fs.status();
            proxy.dump_section(
                "store",
                Arc::new(move || {
                    let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    serde_json::to_value(s).unwrap_or_default()
                }),
            );
            let running = proxy.start().await?;
            tokio::spawn(fs.run(tx));
            Ok(running)
        }
        None => {
            tracing::warn!("no store configured: the outbound side has no services to route to");
            tx.send_replace(Some(Arc::new(Snapshot {
                source: "none".into(),
                ..Default::default()
            })));
            // Keep the sender alive for the sidecar's lifetime: dropping it is harmless (the
            // last snapshot stays) but would log a warning.
            let running = new_proxy(&config, rx).start().await?;
            std::mem::forget(tx);
            Ok(running)
        }
    }
}

/// A background task's handle, aborted before the proxy drains.
#[derive(Clone, Default)]
struct AbortSlot(Arc<Mutex<Option<tokio::task::AbortHandle>>>);

impl AbortSlot {
    fn hold(&self, task: tokio::task::JoinHandle<()>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
    }
}

/// A slot whose task `proxy` aborts before it drains.
fn abort_before_drain(proxy: &mut trellis_proxy::app::Proxy) -> AbortSlot {
    let slot = AbortSlot::default();
    let hook = slot.clone();
    proxy.before_drain(Box::new(move || {
        if let Some(h) = hook.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            h.abort();
        }
        Box::pin(async {})
    }));
    slot
}

/// etcd mode: discovery feeds the data plane; registration starts once the listeners are bound
/// and is revoked before draining.
async fn start_etcd(
    agent: AgentConfig,
    etcd: EtcdConfig,
    tx: SnapshotTx,
    rx: trellis_proxy::app::SnapshotRx,
) -> Result<Running, StartError> {
    let mut proxy = new_proxy(&agent, rx);
    let config = agent.proxy;
    let cache_file = etcd
        .cache_file
        .clone()
        .unwrap_or_else(|| default_cache_file(&config));
    let dns = Arc::new(Dns::new(&agent.dns.nameservers, proxy.registry_mut()));
    let ready = proxy.ready();
    let reg_metrics = registration::RegistrationMetrics::register(proxy.registry_mut());
    let spec_fetcher = agent.api_spec.clone().map(|a| {
        let metrics = crate::api_fetch::FetchMetrics::register(proxy.registry_mut());
        crate::api_fetch::SpecFetcher::new(
            a,
            etcd.clone(),
            &config.service,
            config.inbound.app,
            metrics,
        )
    });
    let portal = config
        .ingress
        .as_ref()
        .and_then(|i| i.portal.clone())
        .map(|p| crate::portal::PortalRefresher {
            failures: {
                let c = prometheus_client::metrics::counter::Counter::default();
                proxy.registry_mut().register(
                    "portal_refresh_failures",
                    "Failed reads of the developer portal's documents from etcd (the last ones read keep being served)",
                    c.clone(),
                );
                c
            },
            etcd: etcd.clone(),
            gateway: config.service.clone(),
            title: format!("{} APIs", config.service),
            portal: p,
            docs: proxy.portal_docs(),
        });
    let portal_app = config
        .ingress
        .as_ref()
        .and_then(|i| Some((i.portal.clone()?, i.certificates.clone())))
        .map(|(p, certs)| {
            let metrics = crate::portal_app::PortalMetrics::register(proxy.registry_mut());
            (p, certs, metrics, proxy.portal_docs())
        });
    // OpenAPI validation of the gateway's routes: its documents, compiled off the request path.
    let validators = config.ingress.as_ref().map(|_| {
        let metrics = crate::api_validators::LoaderMetrics::register(proxy.registry_mut());
        crate::api_validators::ValidatorLoader::new(
            etcd.clone(),
            config.service.clone(),
            proxy.api_validators(),
            metrics,
        )
    });
    let mut discovery = Discovery::new(
        etcd.clone(),
        config.trust_domain.clone(),
        &config.service,
        config.ingress.as_ref().map(|_| config.service.as_str()),
        cache_file,
        tx,
        ready.clone(),
        dns,
        proxy.registry_mut(),
    );
    if let Some(store) = discovery.on_demand() {
        proxy.on_demand(store);
    }
    discovery.set_usage(proxy.service_usage());
    // One etcd connection for discovery, registration and rate-limit sharing.
    let conn = crate::etcd::Connector::new(etcd.clone());
    discovery.set_connector(conn.clone());
    let applied = discovery.applied();
    let discovery_status = discovery.status();
    let registration: Arc<Mutex<Option<RegistrationHandle>>> = Arc::default();
    let reg_status = registration.clone();
    let limits = proxy.rate_limits();
    if etcd.registration.enabled {
        // Before the first snapshot: global limits start conservatively, then follow the table.
        limits.set_coordinated();
    }
    let coordinator_slot: Arc<Mutex<Option<Arc<Mutex<CoordinatorStatus>>>>> = Arc::default();
    let coordinator_status = coordinator_slot.clone();
    proxy.dump_section(
        "etcd",
        Arc::new(move || {
            let d = discovery_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let r = reg_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|h| h.status.lock().unwrap_or_else(|p| p.into_inner()).clone());
            let rl = coordinator_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone());
            serde_json::json!({ "discovery": d, "registration": r, "rate_limit_sharing": rl })
        }),
    );
    let hook_slot = registration.clone();
    proxy.before_drain(Box::new(move || {
        Box::pin(async move {
            let handle = hook_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(h) = handle {
                h.deregister().await;
            }
        })
    }));
    // The app's OpenAPI document and the portal's: read in the background, stopped before
    // draining.
    let fetch_slot = abort_before_drain(&mut proxy);
    let portal_slot = abort_before_drain(&mut proxy);
    let usage_slot = abort_before_drain(&mut proxy);
    let validators_slot = abort_before_drain(&mut proxy);
    let running = proxy.start().await?;
    if let Some(v) = validators {
        validators_slot.hold(tokio::spawn(v.run()));
    }
    tokio::spawn(discovery.run());
    if let Some(p) = portal {
        portal_slot.hold(tokio::spawn(p.run()));
    }
    if let (Some((p, certs, metrics, docs)), Some(ingress)) = (portal_app, running.bound.ingress) {
        let ledger = crate::portal_app::start(
            crate::portal_app::Settings {
                etcd: crate::etcd::Connector::new(etcd.clone()),
                gateway: config.service.clone(),
                portal: p,
                docs,
                metrics,
                ingress,
                certificates: certs,
            },
            running.bound.admin,
        );
        usage_slot.hold(tokio::spawn(ledger.run()));
    }
    if let Some(f) = spec_fetcher {
        fetch_slot.hold(tokio::spawn(f.run()));
    }
    if etcd.registration.enabled {
        let record = registration_record(&config, &etcd, running.bound.inbound);
        let health = etcd
            .registration
            .app_health_path
            .clone()
            .map(|p| (config.inbound.app, p));
        let (demand_tx, demand_rx) = watch::channel(Vec::new());
        let coordinator = Coordinator::new(
            conn.clone(),
            record.service.clone(),
            record.instance.clone(),
            limits,
            demand_tx,
        );
        *coordinator_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(coordinator.status());
        tokio::spawn(coordinator.run());
        let handle = registration::spawn(
            conn,
            record,
            health,
            applied,
            demand_rx,
            reg_metrics,
            Some(ready),
        );
        *registration.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }
    Ok(running)
}

/// A data plane with this process's log filter behind `/log_level`.
fn new_proxy(config: &AgentConfig, rx: trellis_proxy::app::SnapshotRx) -> Proxy {
    let mut proxy = data_plane(config, rx);
    if let Some(control) = crate::logging::control() {
        proxy.log_level_control(control);
    }
    proxy
}

/// A data plane for the data plane's half of `config`. Its `/config_dump` shows the whole file
/// under `config`, the agent's `store` and `dns` included (the etcd password never: it is not
/// serialized).
pub(crate) fn data_plane(config: &AgentConfig, rx: trellis_proxy::app::SnapshotRx) -> Proxy {
    let mut proxy = Proxy::new(config.proxy.clone(), rx);
    let whole = serde_json::to_value(config).unwrap_or_default();
    proxy.dump_section("config", Arc::new(move || whole.clone()));
    proxy
}

/// What this instance registers: the advertised (or bound) inbound address and its identity.
pub fn registration_record(
    config: &Config,
    etcd: &EtcdConfig,
    bound_inbound: std::net::SocketAddr,
) -> Registration {
    let reg = &etcd.registration;
    let address = reg
        .address
        .unwrap_or_else(|| advertised(bound_inbound, &etcd.endpoints));
    let instance = reg
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), bound_inbound.port()));
    Registration {
        service: config.service.clone(),
        instance,
        address: address.to_string(),
        identity: format!(
            "spiffe://{}/service/{}",
            config.trust_domain, config.service
        ),
        weight: reg.weight,
        zone: reg.zone.clone().or_else(|| config.zone.clone()),
        metadata: reg.metadata.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ttl_seconds: etcd.lease_ttl.as_secs() as i64,
        draining: false,
    }
}

/// The address peers should dial when none is configured: the bound one, or for a wildcard
/// listener the local address this host uses to reach etcd (the interface peers share with
/// it: a container's or VM's own IP), found with a connected UDP socket, which sends nothing.
fn advertised(bound: SocketAddr, etcd_endpoints: &[String]) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let found = etcd_endpoints.iter().find_map(|e| {
        let host_port = e.split_once("://").map_or(e.as_str(), |(_, rest)| rest);
        let host_port = host_port.trim_end_matches('/');
        let target = host_port.to_socket_addrs().ok()?.next()?;
        let any: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = std::net::UdpSocket::bind(any).ok()?;
        sock.connect(target).ok()?;
        Some(sock.local_addr().ok()?.ip())
    });
    match found {
        Some(ip) => {
            tracing::info!(%ip, "advertising the address this host reaches etcd from (set registration.address or TRELLIS_ADVERTISE_ADDR to override)");
            SocketAddr::new(ip, bound.port())
        }
        None => {
            tracing::warn!(%bound, "inbound listens on a wildcard address and no address to advertise was found: set registration.address or TRELLIS_ADVERTISE_ADDR");
            bound
        }
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().replace(['/', ' '], "-"))
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn default_cache_file(config: &Config) -> PathBuf {
    std::env::temp_dir().join(format!(
        "trellis-{}-{}.cache.json",
        config.service,
        config.inbound.listen.port()
    ))
}

/// Run until a signal or `/shutdown`, then drain.
pub async fn run(config: AgentConfig) -> Result<(), StartError> {
    let running = start(config).await?;
    tracing::info!(
        inbound = %running.bound.inbound,
        outbound = %running.bound.outbound,
        admin = %running.bound.admin,
        "sidecar started"
    );
    // Startup code's pages are unmapped once ready: what stays resident is what runs.
    tokio::spawn(crate::trim::after_ready(running.ready.clone()));
    let handle = running.shutdown_handle();
    tokio::spawn(async move {
        wait_for_signal().await;
        handle.shutdown();
    });
    running.wait().await;
    Ok(())
}

/// SIGTERM or SIGINT.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the sidecar");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_advertises_the_address_etcd_is_reached_from() {
        let bound: SocketAddr = "0.0.0.0:15006".parse().expect("addr");
        let endpoints = vec!["http://127.0.0.1:2379".to_string()];
        assert_eq!(
            advertised(bound, &endpoints),
            "127.0.0.1:15006".parse::<SocketAddr>().expect("addr")
        );
        // A concrete listen address is advertised as is.
        let concrete: SocketAddr = "127.0.0.2:7000".parse().expect("addr");
        assert_eq!(advertised(concrete, &endpoints), concrete);
        // Nothing to go by: the bound address, with a warning.
        assert_eq!(advertised(bound, &["http://[bad".to_string()]), bound);
    }
}
