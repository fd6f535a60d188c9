//! How the attempt loop reaches an endpoint.

use std::future::Future;
use std::time::Duration;

use crate::http::mesh_h2::{MeshBody, SendError, Sender};
use http::{Request, Response};

use crate::error::ProxyError;
use crate::http::client_error;
use crate::state::pool::PeerPool;
use crate::state::snapshot::Endpoint;
use crate::RequestBody;

/// Connections to endpoints, as the attempt loop needs them: get one, send on it, forget it.
///
/// A strategy trait rather than [`PeerPool`] itself so that the loop's decisions (retry,
/// redial, reselect, per-try and overall timeouts) can be unit-tested against a scripted
/// connector under paused tokio time, without sockets, TLS or a peer sidecar, the way
/// linkerd2-proxy tests its retry policies against mock services. Timeouts stay in the loop,
/// not here, so that the tests exercise the real ones.
pub(crate) trait Connector: Send + Sync {
    /// A connection (or a handle on a multiplexed one) to one endpoint.
    type Conn: Send;
    /// The body of the responses it returns.
    type Body: Send;

    /// A connection to `ep`, made within `timeout` if there is none to reuse.
    fn connect(
        &self,
        ep: &Endpoint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Conn, ProxyError>> + Send;

    /// Send `req` on `conn`.
    fn send(
        &self,
        ep: &Endpoint,
        conn: Self::Conn,
        req: Request<RequestBody>,
    ) -> impl Future<Output = Sent<Self::Body>> + Send;

    /// Forget the pooled connection to `ep`: it handed a request back.
    fn invalidate(&self, ep: &Endpoint);
}

/// What became of a request given to a connection.
pub(crate) enum Sent<B> {
    Done(Result<Response<B>, ProxyError>),
    /// The connection was closing and handed the request back before writing any of it.
    HandedBack(Request<RequestBody>),
}

// === impl PeerPool as Connector ===

impl Connector for PeerPool {
    type Conn = Sender;
    type Body = MeshBody;

    fn connect(
        &self,
        ep: &Endpoint,
        timeout: Duration,
    ) -> impl Future<Output = Result<Self::Conn, ProxyError>> + Send {
        self.get(ep, timeout)
    }

    /// If the connection turns out to be closing before the request was written (a GOAWAY
    /// race), the request comes back unsent.
    async fn send(
        &self,
        ep: &Endpoint,
        conn: Self::Conn,
        req: Request<RequestBody>,
    ) -> Sent<MeshBody> {
        match conn.send(req).await {
            Ok(resp) => Sent::Done(Ok(resp)),
            Err(SendError::NotSent(req)) => Sent::HandedBack(*req),
            Err(e) => Sent::Done(Err(client_error::upstream(ep.addr, &e))),
        }
    }

    fn invalidate(&self, ep: &Endpoint) {
        PeerPool::invalidate(self, ep);
    }
}
