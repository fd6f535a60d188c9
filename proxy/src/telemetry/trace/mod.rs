//! Distributed tracing: a server span for each inbound request, a client span for each
//! outbound request, following the OpenTelemetry HTTP semantic conventions, exported over
//! OTLP/gRPC. Context arrives and leaves in W3C or B3 headers ([`propagation`]).
//!
//! Each sidecar owns its tracer provider (no global one): several sidecars can share a
//! process, each with its own resource (`service.name`, `service.instance.id`, identity).
//! Requests without context start a trace with the configured probability; requests with
//! context follow their parent's decision. Unsampled requests still carry a context onward,
//! so the next hop does not make an independent (and inconsistent) decision.

pub mod export;
pub mod logs;
pub mod propagation;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use crate::config::TracingConfig;
use propagation::Format;

pub struct Tracing {
    tracer: Option<SdkTracer>,
    /// Kept so the provider (and its processor) lives as long as the sidecar.
    _provider: Option<SdkTracerProvider>,
    flush: Arc<Notify>,
    flushed: Arc<Notify>,
}

/// One request's span. Dropping it ends the span, so it is held until the response body ends.
pub struct RequestSpan {
    /// Only a recording span is kept, and boxed: an SDK span is about 300 bytes, and this
    /// value travels with every response (in `Streamed`), copied at each layer it passes. A
    /// span that is not sampled records nothing and ends as a no-op, so nothing is lost by
    /// dropping it at once; its context (below) still propagates.
    span: Option<Box<Span>>,
    server: bool,
    /// The endpoint of the last attempt and the retries made (kept for the access log even
    /// when the span is not recorded).
    pub endpoint: Option<SocketAddr>,
    pub retries: u32,
    context: Option<(SpanContext, Option<Format>)>,
}

/// Who this sidecar is, for the resource attributes.
pub struct Identity<'a> {
    pub service: &'a str,
    pub instance: &'a str,
    pub spiffe_id: &'a str,
}

// === impl Tracing ===

impl Tracing {
    /// Tracing off: no spans; trace headers pass through untouched.
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self {
            tracer: None,
            _provider: None,
            flush: Arc::new(Notify::new()),
            flushed: Arc::new(Notify::new()),
        })
    }

    /// Build the provider and spawn the export task (needs a tokio runtime). A collector that
    /// cannot be configured (bad endpoint) turns tracing off with an error log.
    pub fn start(cfg: &TracingConfig, who: Identity<'_>, registry: &mut Registry) -> Arc<Self> {
        if !cfg.enabled {
            return Self::disabled();
        }
        let metrics = export::ExportMetrics::register(registry);
        let mut builder = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(cfg.export_timeout);
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let mut exporter = match builder.build() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "tracing disabled: cannot configure the OTLP exporter");
                return Self::disabled();
            }
        };
        // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (read by the default detectors) win
        // over the sidecar's own service name.
        let service_name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| who.service.to_string());
        let resource = Resource::builder()
            .with_service_name(service_name)
            .with_attributes([
                KeyValue::new("service.instance.id", who.instance.to_string()),
                KeyValue::new("trellis.identity", who.spiffe_id.to_string()),
            ])
            .build();
        exporter.set_resource(&resource);
        let (queue, rx) = export::Queue::new(cfg, metrics.clone());
        let flush = Arc::new(Notify::new());
        let flushed = Arc::new(Notify::new());
        tokio::spawn(export::run(
            exporter,
            rx,
            cfg.clone(),
            metrics,
            flush.clone(),
            flushed.clone(),
        ));
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sampling,
            ))))
            .with_span_processor(queue)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("trellis");
        Arc::new(Self {
            tracer: Some(tracer),
            _provider: Some(provider),
            flush,
            flushed,
        })
    }

    /// Export what is queued now and wait (at most `limit`) until that export has ended:
    /// the spans of the last requests before a shutdown.
    pub async fn flush(&self, limit: std::time::Duration) {
        if self.tracer.is_none() {
            return;
        }
        let done = self.flushed.notified();
        tokio::pin!(done);
        done.as_mut().enable();
        self.flush.notify_one();
        let _ = tokio::time::timeout(limit, done).await;
    }

    /// The server span of an inbound request from `client` (verified identity `peer`).
    pub fn server(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        peer: Option<&HeaderValue>,
        client: SocketAddr,
        scheme: &'static str,
    ) -> RequestSpan {
        let Some(tracer) = &self.tracer else {
            return RequestSpan::none();
        };
        let parent = propagation::extract(headers);
        let mut span = start(tracer, SpanKind::Server, method, parent.as_ref());
        if span.is_recording() {
            let mut attrs = vec![
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
                KeyValue::new("url.scheme", scheme),
                KeyValue::new("client.address", client.ip().to_string()),
                KeyValue::new("client.port", i64::from(client.port())),
            ];
            if let Some(host) = headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
            {
                attrs.push(KeyValue::new("server.address", host.to_string()));
            }
            if let Some(id) = peer.and_then(|v| v.to_str().ok()) {
                attrs.push(KeyValue::new("trellis.peer.identity", id.to_string()));
            }
            span.set_attributes(attrs);
        }
        RequestSpan::new(span, true, parent.map(|p| p.1))
    }

    /// The client span of an outbound request to `service`.
    /// Whether spans are made at all (a tracer is configured): a caller that must look
    /// something up only for the span asks first.
    pub fn active(&self) -> bool {
        self.tracer.is_some()
    }

    pub fn client(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        service: &str,
    ) -> RequestSpan {
        let Some(tracer) = &self.tracer else {
            return RequestSpan::none();
        };
        let parent = propagation::extract(headers);
        let mut span = start(tracer, SpanKind::Client, method, parent.as_ref());
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
                KeyValue::new("server.address", service.to_string()),
                KeyValue::new("peer.service", service.to_string()),
            ]);
        }
        RequestSpan::new(span, false, parent.map(|p| p.1))
    }
}

/// The span name (the method, per the HTTP conventions), without allocating for the usual ones.
fn span_name(m: &Method) -> std::borrow::Cow<'static, str> {
    let known = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
    ];
    const NAMES: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];
    match known.iter().position(|k| k == m) {
        Some(i) => std::borrow::Cow::Borrowed(NAMES[i]),
        None => std::borrow::Cow::Owned(m.as_str().to_string()),
    }
}

fn start(
    tracer: &SdkTracer,
    kind: SpanKind,
    method: &Method,
    parent: Option<&(SpanContext, Format)>,
) -> Span {
    let cx = match parent {
        Some((sc, _)) => Context::new().with_remote_span_context(sc.clone()),
        None => Context::new(),
    };
    let builder = tracer.span_builder(span_name(method)).with_kind(kind);
    tracer.build_with_context(builder, &cx)
}

// === impl RequestSpan ===

impl RequestSpan {
    /// No span: tracing is off.
    pub fn none() -> Self {
        Self {
            span: None,
            server: false,
            endpoint: None,
            retries: 0,
            context: None,
        }
    }

    fn new(span: Span, server: bool, arrived_as: Option<Format>) -> Self {
        let sc = span.span_context().clone();
        Self {
            span: span.is_recording().then(|| Box::new(span)),
            server,
            endpoint: None,
            retries: 0,
            context: Some((sc, arrived_as)),
        }
    }

    /// Make this span the parent of the forwarded request.
    pub fn inject(&self, headers: &mut HeaderMap) {
        if let Some((sc, arrived_as)) = &self.context {
            propagation::inject(headers, sc, *arrived_as);
        }
    }

    /// The ids log lines written while handling the request carry ([`logs::scope`]).
    pub fn ids(&self) -> Option<logs::RequestIds> {
        self.context.as_ref().map(|(sc, _)| logs::RequestIds {
            trace_id: sc.trace_id(),
            span_id: sc.span_id(),
        })
    }

    pub fn trace_id(&self) -> Option<String> {
        self.context
            .as_ref()
            .map(|(sc, _)| sc.trace_id().to_string())
    }

    fn recording(&mut self) -> Option<&mut Span> {
        self.span.as_deref_mut().filter(|s| s.is_recording())
    }

    /// Whether there is a span to end (the request is traced and sampled).
    pub fn is_open(&self) -> bool {
        self.span.is_some()
    }

    /// The endpoint the (last) attempt went to, its expected identity, and retries made.
    pub fn upstream(
        &mut self,
        endpoint: SocketAddr,
        identity: &dyn std::fmt::Display,
        retries: u32,
    ) {
        self.endpoint = Some(endpoint);
        self.retries = retries;
        if let Some(s) = self.recording() {
            s.set_attributes([
                KeyValue::new("network.peer.address", endpoint.ip().to_string()),
                KeyValue::new("network.peer.port", i64::from(endpoint.port())),
                KeyValue::new("trellis.upstream.identity", identity.to_string()),
                KeyValue::new("http.request.resend_count", i64::from(retries)),
            ]);
        }
    }

    /// The HTTPRoute rule that routed the request (`http.route`).
    pub fn route(&mut self, name: &str) {
        if let Some(s) = self.recording() {
            s.set_attribute(KeyValue::new("http.route", name.to_string()));
        }
    }

    /// The response status; `cause` is the sidecar's `trellis-error` when it answered itself,
    /// `cache_status` the response cache's answer (`X-Cache-Status`) when one applied.
    /// Server spans are errors on 5xx, client spans on 4xx and 5xx (semantic conventions).
    pub fn respond<'a>(
        &mut self,
        status: u16,
        cause: Option<&'static str>,
        cache_status: impl FnOnce() -> Option<&'a str>,
    ) {
        let threshold = if self.server { 500 } else { 400 };
        // Looked up only for a span that records (a header lookup per request otherwise).
        let Some(s) = self.recording() else { return };
        if let Some(cache) = cache_status() {
            s.set_attribute(KeyValue::new("trellis.cache.status", cache.to_string()));
        }
        s.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(cause) = cause {
            s.set_attribute(KeyValue::new("error.type", cause));
        }
        if status >= threshold {
            s.set_status(Status::error(cause.unwrap_or("")));
            if cause.is_none() {
                s.set_attribute(KeyValue::new("error.type", status.to_string()));
            }
        }
    }
}

impl std::fmt::Debug for RequestSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestSpan({:?})", self.trace_id())
    }
}
