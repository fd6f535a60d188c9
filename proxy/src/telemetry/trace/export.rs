//! Getting finished spans out without ever slowing traffic: a bounded queue that drops (and
//! counts) when full, and one task that exports batches over OTLP with a timeout.
//!
//! The SDK's `BatchSpanProcessor` does the same but runs its own thread per sidecar and does not
//! expose how many spans it dropped; several sidecars share a process in tests and the count is
//! a metric we promise, so this small processor runs on the sidecar's runtime instead.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, Notify};

use crate::config::TracingConfig;

#[derive(Clone, Debug)]
pub struct ExportMetrics {
    pub exported: Counter,
    /// By reason: `queue_full` (the exporter is behind) or `export_failed` (collector down,
    /// slow or refusing).
    pub dropped: Family<[(&'static str, &'static str); 1], Counter>,
}

impl ExportMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            exported: Counter::default(),
            dropped: Family::default(),
        };
        registry.register(
            "trace_spans_exported",
            "Spans delivered to the OTLP collector",
            m.exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped instead of delaying traffic, by reason (queue_full, export_failed)",
            m.dropped.clone(),
        );
        m
    }

    fn drop_n(&self, reason: &'static str, n: u64) {
        self.dropped.get_or_create(&[("reason", reason)]).inc_by(n);
    }
}

/// The span processor: `on_end` never blocks.
#[derive(Debug)]
pub struct Queue {
    tx: mpsc::Sender<SpanData>,
    metrics: ExportMetrics,
}

// === impl Queue ===

impl Queue {
    pub fn new(cfg: &TracingConfig, metrics: ExportMetrics) -> (Self, mpsc::Receiver<SpanData>) {
        let (tx, rx) = mpsc::channel(cfg.queue_size);
        (Self { tx, metrics }, rx)
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.metrics.drop_n("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Export what the queue receives: a batch when `batch_size` spans are waiting or
/// `flush_interval` has passed (or `flush` is notified), each call bounded by `export_timeout`.
pub async fn run<E: SpanExporter>(
    exporter: E,
    mut rx: mpsc::Receiver<SpanData>,
    cfg: TracingConfig,
    metrics: ExportMetrics,
    flush: Arc<Notify>,
    flushed: Arc<Notify>,
) {
    let mut batch = Vec::with_capacity(cfg.batch_size);
    let mut failures = 0u64;
    loop {
        let deadline = tokio::time::sleep(cfg.flush_interval);
        tokio::pin!(deadline);
        let mut closed = false;
        let mut flushing = false;
        while batch.len() < cfg.batch_size {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => batch.push(s),
                    None => { closed = true; break; }
                },
                _ = &mut deadline => break,
                _ = flush.notified() => {
                    // Take everything already queued.
                    while let Ok(s) = rx.try_recv() {
                        batch.push(s);
                    }
                    flushing = true;
                    break;
                }
            }
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let spans = std::mem::replace(&mut batch, Vec::with_capacity(cfg.batch_size));
            match tokio::time::timeout(cfg.export_timeout, exporter.export(spans)).await {
                Ok(Ok(())) => {
                    metrics.exported.inc_by(n);
                    failures = 0;
                }
                outcome => {
                    metrics.drop_n("export_failed", n);
                    failures += 1;
                    // One line per outage, then every 100th failure: a missing collector must
                    // not flood the log.
                    if failures == 1 || failures.is_multiple_of(100) {
                        let why = match outcome {
                            Ok(Err(e)) => e.to_string(),
                            _ => format!("no answer within {:?}", cfg.export_timeout),
                        };
                        tracing::warn!(spans = n, failures, error = %why, "trace export failed; spans dropped");
                    }
                }
            }
        }
        if flushing {
            flushed.notify_waiters();
        }
        if closed {
            return;
        }
    }
}
