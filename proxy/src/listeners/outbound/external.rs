//! Services outside the mesh (a service with `external_host`): HTTP/1.1 to one of its DNS
//! records, `Host` set to the external host.

use http::{Request, Response};
use hyper::body::Incoming;

use super::endpoints::Endpoints;
use super::resolve::Resolved;
use super::Outbound;
use crate::error::ProxyError;
use crate::http::origin::Origin;
use crate::http::rewrite::Host;
use crate::ResponseBody;

impl Outbound {
    /// Send to endpoint `i` of an external service; the outcome feeds outlier detection.
    pub(super) async fn forward_external(
        &self,
        endpoints: Endpoints<'_>,
        i: usize,
        host: &str,
        req: Request<Incoming>,
        resolved: &Resolved,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let origin = Origin {
            addr: endpoints.route.service.endpoints[i].addr,
            host: Host::Set(host),
            request_timeout: resolved.request_timeout,
            stream_idle: self.defaults.stream_idle,
        };
        let result = self.external.forward(origin, req).await;
        endpoints.outcome(i, result.as_ref().map(|r| r.status().as_u16()));
        result
    }
}
