//! Telemetry over the mesh: this sidecar's metrics and summary, served on its mTLS inbound
//! listener to the peers named in `telemetry.readers`, so that a dashboard on another host
//! can read them without any admin port leaving loopback.
//!
//! The paths live under `/.well-known/trellis/` (RFC 8615 reserves `/.well-known/` for
//! site-wide metadata, so no app route is taken). Every request there is answered by the
//! sidecar: a reader gets the data, anyone else 403 (`trellis-error: denied`), whatever the
//! app serves. Reads are not app traffic and are not counted as requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use prometheus_client::registry::Registry;

use crate::error::ProxyError;
use crate::policy::access::authz::identity_matches;
use crate::telemetry::exposition;
use crate::telemetry::metrics::{Metrics, INBOUND};
use crate::telemetry::route_metrics::unix_ms;
use crate::telemetry::summary::Summary;
use crate::ResponseBody;

/// Where the sidecar answers for itself on the inbound listener.
pub const PREFIX: &str = "/.well-known/trellis/";

/// The allow-list's name, in the `denied` refusal and its log line.
const POLICY: &str = "telemetry.readers";

pub struct Telemetry {
    service: String,
    /// SPIFFE IDs (a trailing `*` matches a prefix); empty: nobody.
    readers: Vec<String>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Unix seconds of the last refusal logged: one line per second at most, so that a
    /// stranger probing in a loop cannot flood the log.
    last_logged: AtomicU64,
}

// === impl Telemetry ===

impl Telemetry {
    pub fn new(
        service: &str,
        readers: &[String],
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            service: service.to_string(),
            readers: readers.to_vec(),
            registry,
            metrics,
            last_logged: AtomicU64::new(0),
        }
    }

    /// Whether `req` is for the sidecar rather than the app.
    pub fn wants<B>(req: &Request<B>) -> bool {
        req.uri().path().starts_with(PREFIX)
    }

    /// Answer a request under [`PREFIX`] from `peer` (its verified identity; `None` on a
    /// plaintext connection).
    pub fn serve<B>(
        &self,
        req: &Request<B>,
        peer: Option<&HeaderValue>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let id = peer.and_then(|p| p.to_str().ok());
        let allowed = id.is_some_and(|id| self.readers.iter().any(|r| identity_matches(r, id)));
        if !allowed {
            return self.refuse(id, client);
        }
        if req.method() != Method::GET {
            return body(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "GET only\n".into(),
            );
        }
        match &req.uri().path()[PREFIX.len()..] {
            "metrics" => body(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                crate::telemetry::metrics::encode(&self.registry),
            ),
            "summary" => self.summary(),
            _ => body(
                StatusCode::NOT_FOUND,
                "text/plain",
                "telemetry paths: metrics, summary\n".into(),
            ),
        }
    }

    fn summary(&self) -> Response<ResponseBody> {
        let text = crate::telemetry::metrics::encode(&self.registry);
        let summary = match exposition::parse(&text) {
            Ok(e) => Summary::from_exposition(&self.service, unix_ms(), &e),
            Err(e) => {
                // Our own registry's text: a failure is a bug, reported rather than hidden.
                tracing::error!(error = %e, "could not read back this sidecar's metrics");
                return body(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                );
            }
        };
        match serde_json::to_string(&summary) {
            Ok(json) => body(StatusCode::OK, "application/json", json),
            Err(e) => body(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        }
    }

    fn refuse(&self, id: Option<&str>, client: SocketAddr) -> Response<ResponseBody> {
        let e = ProxyError::Denied {
            policy: Arc::from(POLICY),
        };
        self.metrics.proxy_error(INBOUND, e.cause());
        let now = unix_ms() / 1000;
        if self.last_logged.swap(now, Ordering::Relaxed) != now {
            tracing::warn!(
                peer = id.unwrap_or("none (plaintext)"),
                %client,
                "telemetry read refused: the peer is not in telemetry.readers"
            );
        }
        e.into_response_for(false)
    }
}

fn body(status: StatusCode, content_type: &'static str, text: String) -> Response<ResponseBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(text))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
