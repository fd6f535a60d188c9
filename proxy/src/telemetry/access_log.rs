//! Access logs: one line per proxied request, JSON (default) or text, to stdout or a file.
//!
//! Lines are formatted on the request's task and handed to one writer thread through a bounded
//! queue; a full queue drops the line and counts it, so a slow disk never slows traffic. A file
//! is followed through rotation and a full disk ([`super::log_file`]).
//! Errors are always logged; successes are sampled (`access_log.sample`) or left out
//! (`errors_only`), which bounds the volume.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{AccessLogConfig, AccessLogFormat};
use crate::state::balance::rand::Rng;

/// Lines waiting for the writer; beyond it lines are dropped (and counted).
const QUEUE: usize = 8192;

pub struct AccessLog {
    tx: Option<mpsc::Sender<String>>,
    cfg: AccessLogConfig,
    rng: Rng,
    dropped: Counter,
}

/// One request, as logged.
#[derive(Serialize)]
pub struct Record<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub direction: &'static str,
    /// inbound: this sidecar's service; outbound: the destination service.
    pub service: &'a str,
    /// The HTTPRoute rule that routed the request; `default` when none did.
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: Option<&'a str>,
    pub status: u16,
    /// The sidecar's own decision or failure (`trellis-error`): rate-limited, breaker-*,
    /// connect-failed, ...; null when the app answered.
    pub cause: Option<&'static str>,
    /// How the response cache answered (`X-Cache-Status`: HIT, MISS, STALE, REVALIDATED,
    /// BYPASS, EXPIRED), here or at a sidecar upstream; absent when no cache policy applied.
    /// Not in `cause`, which names the sidecar's own refusals and failures: a cached answer
    /// is neither, and `errors_only` logs would fill with every hit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'a str>,
    /// Request start to response headers.
    pub duration_ms: f64,
    pub client: SocketAddr,
    /// inbound: the caller's verified SPIFFE ID.
    pub peer_identity: Option<&'a str>,
    /// outbound: the endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    pub retries: u32,
    pub request_bytes: Option<u64>,
    pub response_bytes: Option<u64>,
    pub trace_id: Option<String>,
}

// === impl AccessLog ===

impl AccessLog {
    /// Start the writer thread when enabled.
    pub fn start(cfg: &AccessLogConfig, registry: &mut Registry) -> Arc<Self> {
        let dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the writer fell behind",
            dropped.clone(),
        );
        let lost = Counter::default();
        registry.register(
            "access_log_lost_lines",
            "Access log lines lost because writing them failed (a full disk, a file that cannot be opened)",
            lost.clone(),
        );
        let tx = cfg.enabled.then(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            let path = cfg.path.clone();
            let spawned = std::thread::Builder::new()
                .name("trellis-access-log".into())
                .spawn(move || write(path, lost, rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the access log writer: no access log");
            }
            tx
        });
        Arc::new(Self {
            tx,
            cfg: cfg.clone(),
            rng: Rng::new(),
            dropped,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Whether a request with this outcome is logged (checked before building the record).
    pub fn wants(&self, status: u16, cause: Option<&str>) -> bool {
        if self.tx.is_none() {
            return false;
        }
        if status >= 400 || cause.is_some() {
            return true;
        }
        if self.cfg.errors_only {
            return false;
        }
        self.cfg.sample >= 1.0 || (self.rng.next() as f64 / u64::MAX as f64) < self.cfg.sample
    }

    pub fn log(&self, r: &Record<'_>) {
        let Some(tx) = &self.tx else { return };
        let line = match self.cfg.format {
            AccessLogFormat::Json => serde_json::to_string(r).unwrap_or_default(),
            AccessLogFormat::Text => text(r),
        };
        if tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// How a request ended, for [`AccessLog::finish`].
pub struct Outcome<'a, B> {
    pub direction: &'static str,
    pub service: &'a str,
    pub response: &'a http::Response<B>,
    pub cause: Option<&'static str>,
    pub elapsed: Duration,
    pub client: SocketAddr,
    pub peer_identity: Option<&'a str>,
    pub span: &'a crate::telemetry::trace::RequestSpan,
}

impl AccessLog {
    /// Log the request (`info` is `Some` only when logging is on) if its outcome is wanted.
    pub fn finish<B>(&self, info: Option<RequestInfo>, o: Outcome<'_, B>) {
        let Some(info) = info else { return };
        let status = o.response.status().as_u16();
        if !self.wants(status, o.cause) {
            return;
        }
        self.log(&Record {
            time: now(),
            direction: o.direction,
            service: o.service,
            route: info
                .route
                .as_deref()
                .map_or(crate::policy::routing::DEFAULT_ROUTE, String::as_str),
            method: info.method.as_str(),
            path: &info.path,
            authority: info.authority.as_deref(),
            status,
            cause: o.cause,
            cache: cache_status(o.response.headers()),
            duration_ms: millis(o.elapsed),
            client: o.client,
            peer_identity: o.peer_identity,
            upstream: o.span.endpoint,
            retries: o.span.retries,
            request_bytes: info.request_bytes,
            response_bytes: content_length(o.response.headers()),
            trace_id: o.span.trace_id(),
        });
    }
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// What is kept of a request for its log line (only when logging is on).
pub struct RequestInfo {
    pub method: http::Method,
    pub path: String,
    pub authority: Option<String>,
    pub request_bytes: Option<u64>,
    /// Set by the listener once an HTTPRoute rule routed the request.
    pub route: Option<Arc<String>>,
}

impl RequestInfo {
    pub fn of<B>(req: &http::Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            authority: crate::http::headers::request_authority(req).map(str::to_string),
            request_bytes: content_length(req.headers()),
            route: None,
        }
    }
}

/// The response cache's answer, when the response carries one.
pub fn cache_status(h: &http::HeaderMap) -> Option<&str> {
    h.get(crate::cache::CACHE_STATUS)?.to_str().ok()
}

pub fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// `time direction service "METHOD path" status cause duration upstream retries trace route`,
/// then `cache=STATUS` when the response cache answered.
fn text(r: &Record<'_>) -> String {
    let dash = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let mut line = format!(
        "{} {} {} \"{} {}\" {} {} {}ms client={} peer={} upstream={} retries={} bytes={} trace={} route={}",
        r.time,
        r.direction,
        r.service,
        r.method,
        r.path,
        r.status,
        r.cause.unwrap_or("-"),
        r.duration_ms,
        r.client,
        r.peer_identity.unwrap_or("-"),
        dash(r.upstream.map(|u| u.to_string())),
        r.retries,
        dash(r.response_bytes.map(|b| b.to_string())),
        dash(r.trace_id.clone()),
        r.route,
    );
    if let Some(cache) = r.cache {
        line.push_str(" cache=");
        line.push_str(cache);
    }
    line
}

/// The writer thread: take a line, then whatever else is queued (up to 64 KiB), write once;
/// ends when the access log is dropped.
fn write(path: Option<std::path::PathBuf>, lost: Counter, mut rx: mpsc::Receiver<String>) {
    let mut file = path.map(|p| super::log_file::LogFile::open(p, lost.clone()));
    let mut buf = Vec::with_capacity(64 * 1024);
    while let Some(line) = rx.blocking_recv() {
        let mut lines = 1;
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        while buf.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(l) => {
                    buf.extend_from_slice(l.as_bytes());
                    buf.push(b'\n');
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        match file.as_mut() {
            Some(f) => f.append(&buf, lines),
            None => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
                    // stdout closed or full: counted, not logged (stderr is often the same).
                    lost.inc_by(lines);
                }
            }
        }
        buf.clear();
    }
}
