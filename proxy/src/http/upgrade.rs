//! HTTP/1.1 upgrades (WebSocket). HTTP/2 cannot carry them without RFC 8441, so, like Linkerd,
//! an upgrade request gets its own mTLS connection with ALPN `http/1.1`; after the 101 the two
//! sides' upgraded streams are joined byte for byte.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::error::ProxyError;
use crate::http::client_error;
use crate::http::headers::strip_hop_by_hop;
use crate::http::rewrite::{self, Host, RequestTarget};
use crate::identity::{Alpn, TlsContext};
use crate::state::pool::connect_tls;
use crate::state::snapshot::Endpoint;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::trace::logs;
use crate::ResponseBody;

/// Forward an upgrade request from the app to a peer sidecar, on a connection of its own.
pub(crate) async fn outbound(
    tls: &TlsContext,
    ep: &Endpoint,
    mut req: Request<Incoming>,
    connect_timeout: Duration,
    request_timeout: Duration,
    metrics: &Metrics,
) -> Result<Response<ResponseBody>, ProxyError> {
    let client_side = hyper::upgrade::on(&mut req);
    let io = connect_tls(tls, ep, Alpn::Http11, connect_timeout, metrics).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|source| ProxyError::Handshake {
            addr: ep.addr,
            source: source.into(),
        })?;
    // This connection serves the one request: its lines name it.
    tokio::spawn(logs::inherit(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection to peer ended with error");
        }
    }));
    rewrite::to_origin_h1(&mut req, RequestTarget::Origin, Host::Requested, true)?;
    let resp = tokio::time::timeout(request_timeout, send.send_request(req))
        .await
        .map_err(|_| client_error::response_timeout(ep.addr, request_timeout))?
        .map_err(|e| client_error::upstream(ep.addr, &e))?;
    Ok(finish(client_side, resp))
}

/// Join the two sides once the upstream agreed to switch protocols; otherwise pass the
/// response through as a normal one.
pub(crate) fn finish(
    client_side: OnUpgrade,
    mut resp: Response<Incoming>,
) -> Response<ResponseBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = hyper::upgrade::on(&mut resp);
        strip_hop_by_hop(resp.headers_mut(), true);
        tokio::spawn(logs::inherit(async move {
            match tokio::try_join!(client_side, upstream_side) {
                Ok((a, b)) => {
                    let (mut a, mut b) = (TokioIo::new(a), TokioIo::new(b));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                        tracing::debug!(error = %e, "upgraded stream ended with error");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        }));
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    resp.map(|b| Either::Left(crate::http::body::Streamed::new(b)))
}
