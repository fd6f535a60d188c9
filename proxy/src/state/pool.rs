//! Connections to peer sidecars: one multiplexed HTTP/2-over-mTLS connection per
//! (endpoint address, expected identity), created on first use and replaced when it closes or
//! when the local certificate rotates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{Request, Response};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_policies::SpiffeId;

use crate::error::ProxyError;
use crate::http::mesh_h2::{self, Keepalive, Sender};
use crate::identity::{
    classify_io_error, describe_io_error, Alpn, IdentityStore, TlsContext, TlsFailure,
};
use crate::state::snapshot::Endpoint;
use crate::telemetry::metrics::{Metrics, OUTBOUND};
use crate::RequestBody;

/// Pings detect a dead peer on an otherwise idle pooled connection.
const H2_KEEPALIVE: Keepalive = Keepalive {
    interval: Duration::from_secs(20),
    timeout: Duration::from_secs(10),
};

/// The pooled connection to one peer (endpoint address and expected identity).
///
/// Why two fields: the request path only reads `ready` (one atomic load, no lock, no owned
/// key), while `connecting` makes concurrent first requests to a peer share one handshake
/// instead of racing to open several connections.
#[derive(Default)]
struct Slot {
    ready: ArcSwapOption<Pooled>,
    connecting: tokio::sync::Mutex<()>,
}

struct Pooled {
    send: Sender,
    generation: u64,
}

/// Slots by address; the few identities expected at one address (normally one) sit in a
/// small list, so a lookup borrows the endpoint's identity instead of cloning it into a key.
type Slots = HashMap<SocketAddr, Vec<(SpiffeId, Arc<Slot>)>>;

pub struct PeerPool {
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    /// Read on every request without a lock; replaced whole (copy on write) when a peer is
    /// added or forgotten, which happens once per peer connection, not per request.
    slots: ArcSwap<Slots>,
    /// Serialises the copy-on-write updates of `slots`.
    update: Mutex<()>,
}

// === impl PeerPool ===

impl PeerPool {
    pub fn new(tls: IdentityStore, metrics: Arc<Metrics>) -> Self {
        Self {
            tls,
            metrics,
            slots: ArcSwap::default(),
            update: Mutex::new(()),
        }
    }

    /// A sender on a live connection to `ep`, connecting if needed.
    pub async fn get(
        &self,
        ep: &Endpoint,
        connect_timeout: Duration,
    ) -> Result<Sender, ProxyError> {
        let slot = self.slot(ep);
        let generation = self.tls.load().generation();
        if let Some(send) = live(&slot, generation) {
            return Ok(send);
        }
        let _connecting = slot.connecting.lock().await;
        // Another request may have connected while this one waited.
        let tls = self.tls.load_full();
        if let Some(send) = live(&slot, tls.generation()) {
            return Ok(send);
        }
        // Dropping the old sender lets its connection finish in-flight streams and close.
        slot.ready.store(None);
        // Boxed: the TLS and HTTP/2 handshakes are large futures, awaited once per peer
        // connection, and would otherwise size every request's future.
        let send = Box::pin(self.connect(&tls, ep, connect_timeout)).await?;
        slot.ready.store(Some(Arc::new(Pooled {
            send: send.clone(),
            generation: tls.generation(),
        })));
        Ok(send)
    }

    async fn connect(
        &self,
        tls: &TlsContext,
        ep: &Endpoint,
        connect_timeout: Duration,
    ) -> Result<Sender, ProxyError> {
        let io = connect_tls(tls, ep, Alpn::H2, connect_timeout, &self.metrics).await?;
        let settings = mesh_h2::Settings {
            // One slow reader must not stall the connection every request to this peer shares.
            stream_window: crate::listeners::server::H2_STREAM_WINDOW,
            conn_window: crate::listeners::server::H2_CONN_WINDOW,
            keepalive: H2_KEEPALIVE,
        };
        Sender::handshake(io, settings, ep.addr)
            .await
            .map_err(|source| ProxyError::Handshake {
                addr: ep.addr,
                source: source.into(),
            })
    }

    /// Send `req` to `ep` on its pooled connection (made if needed): for the pool's own
    /// callers outside the attempt loop (health checks, mirrored copies), which do not retry.
    pub async fn request(
        &self,
        ep: &Endpoint,
        connect_timeout: Duration,
        req: Request<RequestBody>,
    ) -> Result<Response<mesh_h2::MeshBody>, ProxyError> {
        let send = self.get(ep, connect_timeout).await?;
        send.send(req)
            .await
            .map_err(|e| crate::http::client_error::upstream(ep.addr, &e))
    }

    /// Forget the connection to `ep` (after it refused a request), so the next call reconnects.
    pub fn invalidate(&self, ep: &Endpoint) {
        self.modify(|slots| {
            if let Some(list) = slots.get_mut(&ep.addr) {
                list.retain(|(id, _)| *id != ep.identity);
                if list.is_empty() {
                    slots.remove(&ep.addr);
                }
            }
        });
    }

    /// Drop connections to peers that are no longer endpoints.
    pub fn retain(&self, keep: impl Fn(SocketAddr, &SpiffeId) -> bool) {
        self.modify(|slots| {
            slots.retain(|addr, list| {
                list.retain(|(id, _)| keep(*addr, id));
                !list.is_empty()
            });
        });
    }

    pub fn len(&self) -> usize {
        self.slots.load().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot of `ep`, created on first use. The hit path takes no lock and clones nothing
    /// but an `Arc`.
    fn slot(&self, ep: &Endpoint) -> Arc<Slot> {
        if let Some(slot) = find(&self.slots.load(), ep) {
            return slot;
        }
        self.modify(|slots| {
            // Another request may have created it since the lock-free miss.
            if let Some(slot) = find(slots, ep) {
                return slot;
            }
            let slot = Arc::new(Slot::default());
            slots
                .entry(ep.addr)
                .or_default()
                .push((ep.identity.clone(), slot.clone()));
            slot
        })
    }

    /// Copy, change and publish the slot map, one writer at a time.
    fn modify<R>(&self, change: impl FnOnce(&mut Slots) -> R) -> R {
        let _writer = self.update.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots = Slots::clone(&self.slots.load());
        let result = change(&mut slots);
        self.slots.store(Arc::new(slots));
        result
    }
}

fn find(slots: &Slots, ep: &Endpoint) -> Option<Arc<Slot>> {
    slots
        .get(&ep.addr)?
        .iter()
        .find(|(id, _)| *id == ep.identity)
        .map(|(_, slot)| slot.clone())
}

/// The slot's sender if its connection is open and made with the current certificate.
fn live(slot: &Slot, generation: u64) -> Option<Sender> {
    let guard = slot.ready.load();
    let pooled = guard.as_ref()?;
    (!pooled.send.is_closed() && pooled.generation == generation).then(|| pooled.send.clone())
}

/// TCP connect and mTLS handshake to `ep`, accepting only a server that presents `ep.identity`.
/// The whole exchange is bounded by `timeout`.
pub async fn connect_tls(
    tls: &TlsContext,
    ep: &Endpoint,
    alpn: Alpn,
    timeout: Duration,
    metrics: &Metrics,
) -> Result<TlsStream<TcpStream>, ProxyError> {
    let addr = ep.addr;
    let config = tls
        .client_config(&ep.identity, alpn)
        .map_err(|e| ProxyError::Tls {
            addr,
            reason: TlsFailure::Other,
            message: e.to_string(),
        })?;
    let name = ep
        .identity
        .service()
        .and_then(|s| ServerName::try_from(s.to_string()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()));
    let attempt = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ProxyError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = TlsConnector::from(config).connect(name, tcp).await.map_err(|e| {
            let reason = classify_io_error(&e);
            let message = describe_io_error(&e);
            metrics.tls_failure(OUTBOUND, reason.reason());
            tracing::warn!(peer = %addr, expected = %ep.identity, %reason, error = %message, "mTLS handshake with peer failed");
            ProxyError::Tls { addr, reason, message }
        })?;
        metrics.tls_handshake(OUTBOUND);
        Ok(tls)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ProxyError::ConnectTimeout { addr, timeout })?
}
