//! Binding every listener before anything serves, so that a port in use fails the start.

use std::net::SocketAddr;

use tokio::net::TcpListener;

use super::StartError;
use crate::config::Config;

/// The addresses the listeners actually bound (port 0 in the config picks a free port).
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// The ingress TLS listener and its plain HTTP listener, when configured.
    pub ingress: Option<SocketAddr>,
    pub ingress_http: Option<SocketAddr>,
}

/// The bound sockets, not yet served.
pub(super) struct Listeners {
    pub inbound: TcpListener,
    pub outbound: TcpListener,
    pub admin: TcpListener,
    pub ingress: Option<TcpListener>,
    pub ingress_http: Option<TcpListener>,
}

// === impl Listeners ===

impl Listeners {
    pub async fn bind(cfg: &Config) -> Result<Self, StartError> {
        let inbound = bind("inbound", cfg.inbound.listen).await?;
        let outbound = bind("outbound", cfg.outbound.listen).await?;
        let admin = bind("admin", cfg.admin.listen).await?;
        let (ingress, ingress_http) = match &cfg.ingress {
            Some(ing) => {
                let http = match &ing.http {
                    Some(h) => Some(bind("ingress http", h.listen).await?),
                    None => None,
                };
                (Some(bind("ingress", ing.listen).await?), http)
            }
            None => (None, None),
        };
        Ok(Self {
            inbound,
            outbound,
            admin,
            ingress,
            ingress_http,
        })
    }

    /// The bound addresses; each listener's error names its own configured address.
    pub fn bound(&self, cfg: &Config) -> Result<Bound, StartError> {
        let ingress_http = cfg.ingress.as_ref().and_then(|i| i.http.as_ref());
        Ok(Bound {
            inbound: local(&self.inbound, "inbound", cfg.inbound.listen)?,
            outbound: local(&self.outbound, "outbound", cfg.outbound.listen)?,
            admin: local(&self.admin, "admin", cfg.admin.listen)?,
            ingress: match (&self.ingress, &cfg.ingress) {
                (Some(l), Some(ing)) => Some(local(l, "ingress", ing.listen)?),
                _ => None,
            },
            ingress_http: match (&self.ingress_http, ingress_http) {
                (Some(l), Some(http)) => Some(local(l, "ingress http", http.listen)?),
                _ => None,
            },
        })
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local(l: &TcpListener, what: &'static str, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    l.local_addr()
        .map_err(|source| StartError::Bind { what, addr, source })
}
