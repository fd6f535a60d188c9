//! Connections to peer sidecars: one multiplexed HTTP/2-over-mTLS connection per
//! (endpoint address, expected identity), created on first use and replaced when it closes or
//! when the local certificate rotates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_policies::SpiffeId;

use crate::error::ProxyError;
use crate::identity::{
    classify_io_error, describe_io_error, Alpn, IdentityStore, TlsContext, TlsFailure,
};
use crate::state::snapshot::Endpoint;
use crate::telemetry::metrics::{Metrics, OUTBOUND};
use crate::RequestBody;

/// Pings detect a dead peer on an otherwise idle pooled connection.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    addr: SocketAddr,
    identity: SpiffeId,
}

struct Pooled {
    send: http2::SendRequest<RequestBody>,
    generation: u64,
}

/// A slot is locked while its connection is being made, so concurrent first requests to a
/// peer share one handshake instead of racing to open several connections.
type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

pub struct PeerPool {
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

// === impl PeerPool ===

impl PeerPool {
    pub fn new(tls: IdentityStore, metrics: Arc<Metrics>) -> Self {
        Self {
            tls,
            metrics,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A sender on a live connection to `ep`, connecting if needed.
    pub async fn get(
        &self,
        ep: &Endpoint,
        connect_timeout: Duration,
    ) -> Result<http2::SendRequest<RequestBody>, ProxyError> {
        let slot = self.slot(ep);
        let mut guard = slot.lock().await;
        let tls = self.tls.load_full();
        if let Some(p) = guard.as_ref() {
            if !p.send.is_closed() && p.generation == tls.generation() {
                return Ok(p.send.clone());
            }
        }
        // Dropping the old sender lets its connection finish in-flight streams and close.
        *guard = None;
        let io = connect_tls(&tls, ep, Alpn::H2, connect_timeout, &self.metrics).await?;
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // One slow reader must not stall the connection every request to this peer shares.
            .initial_stream_window_size(crate::listeners::server::H2_STREAM_WINDOW)
            .initial_connection_window_size(crate::listeners::server::H2_CONN_WINDOW)
            .keep_alive_interval(H2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ProxyError::Handshake {
                addr: ep.addr,
                source,
            })?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %addr, error = %e, "peer connection closed with error");
            }
        });
        *guard = Some(Pooled {
            send: send.clone(),
            generation: tls.generation(),
        });
        Ok(send)
    }

    /// Forget the connection to `ep` (after it refused a request), so the next call reconnects.
    pub fn invalidate(&self, ep: &Endpoint) {
        self.lock().remove(&PoolKey {
            addr: ep.addr,
            identity: ep.identity.clone(),
        });
    }

    /// Drop connections to peers that are no longer endpoints.
    pub fn retain(&self, keep: impl Fn(SocketAddr, &SpiffeId) -> bool) {
        self.lock().retain(|k, _| keep(k.addr, &k.identity));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, ep: &Endpoint) -> Slot {
        let mut slots = self.lock();
        // Lookup by borrowed parts would need a custom key type; a peer's key is small and this
        // is one hash lookup on an uncontended lock.
        slots
            .entry(PoolKey {
                addr: ep.addr,
                identity: ep.identity.clone(),
            })
            .or_default()
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
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
