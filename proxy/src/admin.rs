//! The admin API (loopback by default): `/live`, `/ready`, `/metrics`, `/config_dump`, and
//! `POST /shutdown` so that jobs can stop their sidecar.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::config::Limits;
use crate::listeners::protocol::http_builders;
use crate::listeners::server::{accept_loop, serve_connection, Activity, ConnTimeouts};
use crate::readiness::Ready;
use crate::{drain, ResponseBody};

/// Produces the JSON for `/config_dump`.
pub type DumpFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

pub struct Admin {
    pub ready: Ready,
    pub registry: Arc<Registry>,
    pub dump: DumpFn,
    pub shutdown: Arc<tokio::sync::watch::Sender<bool>>,
    pub log_level: Option<LogLevelFn>,
}

/// Reads (`None`) or replaces (`Some(filter)`) the process's log filter; returns the filter in
/// force, or why the new one was refused. Injected by the binary, which owns the subscriber.
pub type LogLevelFn = Arc<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

// === impl Admin ===

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher) {
        let limits = Limits::default();
        let builder = Arc::new(http_builders(&limits));
        // Its failures are logged, not counted: the admin listener has no metrics of its own.
        let errors = prometheus_client::metrics::counter::Counter::default();
        accept_loop(
            listener,
            64,
            drain,
            "admin",
            errors,
            move |tcp, _client, drain| {
                let this = self.clone();
                let builder = builder.clone();
                let timeouts = ConnTimeouts::from(&limits);
                async move {
                    let activity = Activity::new();
                    let act = activity.clone();
                    let svc = service_fn(move |req| {
                        let this = this.clone();
                        let guard = act.begin();
                        async move {
                            let resp = this.handle(req);
                            drop(guard);
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    serve_connection(&builder, tcp, svc, activity, timeouts, &drain).await;
                }
            },
        )
        .await;
    }

    /// `GET /log_level`: the filter in force. `POST /log_level?filter=<RUST_LOG syntax>` (e.g.
    /// `info,trellis_proxy=debug`): replace it at runtime.
    fn log_level(&self, req: &Request<Incoming>) -> Response<ResponseBody> {
        let Some(control) = &self.log_level else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "log level control is not available in this process\n".into(),
            );
        };
        let wanted = req.uri().query().and_then(|q| {
            q.split('&').find_map(|kv| {
                kv.strip_prefix("filter=")
                    .or_else(|| kv.strip_prefix("level="))
            })
        });
        if req.method() == Method::POST && wanted.is_none() {
            return text(
                StatusCode::BAD_REQUEST,
                "POST /log_level?filter=<filter>, e.g. filter=info,trellis_proxy=debug\n".into(),
            );
        }
        let decoded = wanted.map(|w| w.replace("%2C", ",").replace("%3D", "="));
        match control(decoded.as_deref()) {
            Ok(now) => {
                if decoded.is_some() {
                    tracing::warn!(filter = %now, "log filter changed through the admin API");
                }
                text(StatusCode::OK, format!("{now}\n"))
            }
            Err(e) => text(StatusCode::BAD_REQUEST, format!("invalid filter: {e}\n")),
        }
    }

    fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n".into()),
            (&Method::GET, "/ready") => {
                let pending = self.ready.pending();
                let detail = self
                    .ready
                    .detail()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default();
                if pending.is_empty() {
                    text(StatusCode::OK, format!("ready{detail}\n"))
                } else {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: waiting for {}{detail}\n", pending.join(", ")),
                    )
                }
            }
            (&Method::GET, "/metrics") => {
                let mut r = text(
                    StatusCode::OK,
                    crate::telemetry::metrics::encode(&self.registry),
                );
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            (&Method::GET, "/config_dump") => {
                let body = serde_json::to_string_pretty(&(self.dump)())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
                let mut r = text(StatusCode::OK, body + "\n");
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            (&Method::GET | &Method::POST, "/log_level") => self.log_level(&req),
            (&Method::POST, "/shutdown") => {
                tracing::info!("shutdown requested through the admin API");
                self.shutdown.send_replace(true);
                text(StatusCode::OK, "shutting down\n".into())
            }
            (_, "/live" | "/ready" | "/metrics" | "/config_dump" | "/shutdown" | "/log_level") => {
                text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed\n".into(),
                )
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /live /ready /metrics /config_dump /log_level, POST /shutdown\n"
                    .into(),
            ),
        }
    }
}

fn text(status: StatusCode, body: String) -> Response<ResponseBody> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
