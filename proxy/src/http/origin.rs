//! Plain HTTP/1.1 to origins outside the mesh: services with an external host, and the
//! pass-through of intercepted connections to their original destination. No mTLS and no
//! identity: the far end is not a mesh member.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::error::ProxyError;
use crate::http::body::Streamed;
use crate::http::client_error;
use crate::http::headers::strip_hop_by_hop;
use crate::http::rewrite::{self, Host, RequestTarget};
use crate::ResponseBody;

/// The pooled HTTP/1.1 client to origins outside the mesh (by address).
#[derive(Clone)]
pub struct ExternalClient(hyper_util::client::legacy::Client<HttpConnector, OriginBody>);

/// The client's body as it arrives, or one the edge read ahead to validate it.
type OriginBody = Either<Incoming, http_body_util::Full<bytes::Bytes>>;

/// How a request to an origin outside the mesh is sent.
pub struct Origin<'a> {
    pub addr: SocketAddr,
    pub host: Host<'a>,
    pub request_timeout: Duration,
    pub stream_idle: Duration,
}

// === impl ExternalClient ===

impl ExternalClient {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .set_host(false)
                .build(connector);
        Self(client)
    }

    /// Rewrite `req` for `origin` (HTTP/1.1, absolute URI to its address) and send it.
    pub async fn forward(
        &self,
        origin: Origin<'_>,
        mut req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Origin {
            addr,
            host,
            request_timeout,
            stream_idle,
        } = origin;
        rewrite::to_origin_h1(&mut req, RequestTarget::Addr(addr), host, false)?;
        let req = match crate::http::read_ahead::take(&mut req) {
            Some(body) => req.map(|_| Either::Right(http_body_util::Full::new(body))),
            None => req.map(Either::Left),
        };
        let mut resp = tokio::time::timeout(request_timeout, self.0.request(req))
            .await
            .map_err(|_| client_error::response_timeout(addr, request_timeout))?
            .map_err(|e| client_error::from_pooled(addr, &e))?;
        strip_hop_by_hop(resp.headers_mut(), false);
        Ok(resp.map(|b| Either::Left(Streamed::new(b).idle_timeout(stream_idle))))
    }
}
