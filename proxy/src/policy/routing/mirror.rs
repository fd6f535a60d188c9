//! Request mirroring: a fire-and-forget copy of a request to another mesh service, whose
//! response is read and dropped.
//!
//! Only requests without a body are mirrored (GET, HEAD, DELETE, ... with an empty body): the
//! app's body streams to the main backend exactly once, and buffering it for a copy would
//! delay the main request and hold memory for a side channel. The copy runs in its own task,
//! after the main request was handed on, bounded in time and in number (at most
//! [`MAX_IN_FLIGHT`] per sidecar; beyond that a copy is skipped), so a slow or failing mirror
//! never changes the main request's latency or result.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};

use super::fault::Chance;
use crate::http::headers::PEER_IDENTITY_HEADER;
use crate::state::balance::rand::Rng;
use crate::state::pool::PeerPool;
use crate::state::target::Target;
use crate::telemetry::trace::logs;
use crate::RequestBody;

/// Mirrored requests in flight at once in this process.
pub const MAX_IN_FLIGHT: usize = 256;
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// A mirror names its service; its route is looked up when a copy is sent (nothing is
/// mirrored to a service the mesh does not know).
pub struct MirrorAction {
    pub service: Arc<String>,
    chance: Chance,
}

/// Releases a mirror's slot when its task ends.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

// === impl MirrorAction ===

impl MirrorAction {
    pub fn new(service: Arc<String>, percent: f64) -> Self {
        Self {
            service,
            chance: Chance::percent(percent),
        }
    }

    /// Copy `req` (as it will be forwarded: after header modifiers and rewrites) to the mirror
    /// service if it has no body and this request is in the mirrored share. Returns whether a
    /// copy was started.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn maybe_spawn<B: Body>(
        &self,
        req: &Request<B>,
        route: Option<&Arc<Target>>,
        rng: &Rng,
        pool: &Arc<PeerPool>,
        client: IpAddr,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> bool {
        let Some(route) = route else {
            return false;
        };
        if route.service.external_host.is_some()
            || !req.body().is_end_stream()
            || !self.chance.draw(rng)
        {
            return false;
        }
        if IN_FLIGHT.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
            IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(service = %self.service, "mirror skipped: too many in flight");
            return false;
        }
        let slot = Slot;
        let Some(copy) = copy(req) else {
            return false;
        };
        let Some((ep, _)) = route.pick(&copy, client) else {
            return false;
        };
        let ep = ep.clone();
        let pool = pool.clone();
        let service = self.service.clone();
        // Its lines name the request it copies.
        tokio::spawn(logs::inherit(async move {
            let _slot = slot;
            let send = async {
                let resp = pool
                    .request(&ep, connect_timeout, copy)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    frame.map_err(|e| e.to_string())?;
                }
                Ok::<_, String>(())
            };
            match tokio::time::timeout(timeout, send).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%service, error = %e, "mirrored request failed"),
                Err(_) => tracing::debug!(%service, "mirrored request timed out"),
            }
        }));
        true
    }
}

/// The request as the peer sidecar should receive it, with an empty body.
fn copy<B>(req: &Request<B>) -> Option<Request<RequestBody>> {
    let mut out = Request::new(Either::Right(Full::new(Bytes::new())));
    *out.method_mut() = req.method().clone();
    *out.uri_mut() = req.uri().clone();
    *out.version_mut() = req.version();
    *out.headers_mut() = req.headers().clone();
    out.headers_mut().remove(PEER_IDENTITY_HEADER);
    crate::http::rewrite::to_mesh_h2(&mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::headers::ORIG_PROTO_HEADER;
    use http::Version;

    #[test]
    fn copy_is_h2_to_the_same_authority_without_hop_by_hop_or_identity() {
        let req = Request::get("/a?b=1")
            .header("host", "orders:8080")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header(PEER_IDENTITY_HEADER, "forged")
            .header("x-keep", "1")
            .body(())
            .unwrap();
        let c = copy(&req).unwrap();
        assert_eq!(c.uri(), "https://orders:8080/a?b=1");
        assert_eq!(c.version(), Version::HTTP_2);
        assert_eq!(c.headers()[ORIG_PROTO_HEADER], "HTTP/1.1");
        assert_eq!(c.headers()["x-keep"], "1");
        for gone in ["host", "connection", "x-hop", PEER_IDENTITY_HEADER.as_str()] {
            assert!(!c.headers().contains_key(gone), "{gone}");
        }
        assert!(c.body().is_end_stream());
    }
}
