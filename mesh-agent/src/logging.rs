//! Log setup: `RUST_LOG`-style filters, text for people or JSON lines for collectors.
//!
//! A line written while a sidecar handles a request ends with that request's `trace_id` and
//! `span_id` (JSON: two more fields), read from the task-local the listeners set
//! ([`trellis_proxy::telemetry::trace::logs`]), so a log line leads to its trace.

use std::fmt;
use std::sync::{Arc, OnceLock};

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, FormatEvent, FormatFields, Full, Json, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::reload::Handle;
use tracing_subscriber::EnvFilter;
use trellis_proxy::telemetry::trace::logs::{self, RequestIds};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Install the global subscriber. `default_filter` applies when `RUST_LOG` is unset.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: tracing-subscriber's default colours every line, which
    // leaves escape codes in journald, `kubectl logs` and files.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    // A second init (tests calling several commands in one process) is harmless.
    match format {
        LogFormat::Text => {
            let b = builder.event_format(text()).with_filter_reloading();
            let handle = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| set(&handle, f)));
            }
        }
        LogFormat::Json => {
            let b = builder.json().event_format(json()).with_filter_reloading();
            let handle = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| set(&handle, f)));
            }
        }
    }
}

/// Text lines as tracing-subscriber writes them by default, ending with the request's ids.
fn text() -> WithRequestIds<Full> {
    WithRequestIds(Format::default())
}

/// One JSON object a line, the event's fields at the top level, with the request's ids.
fn json() -> WithRequestIds<Json> {
    WithRequestIds(Format::default().json().flatten_event(true))
}

/// An event format that adds the ids of the request being handled, if any, to the line the
/// wrapped format writes. Nothing is read or added for an event no filter lets through, and
/// a line outside a request is written as the wrapped format writes it.
struct WithRequestIds<F>(Format<F>);

impl<S, N, F> FormatEvent<S, N> for WithRequestIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    Format<F>: FormatEvent<S, N>,
    F: Clone + AppendIds,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(ids) = logs::current() else {
            return self.0.format_event(ctx, writer, event);
        };
        // The wrapped format ends its line itself: write it aside, then splice the ids in
        // before the end. Colours as the layer's writer has them (a new writer has none).
        let mut line = String::new();
        let inner = self.0.clone().with_ansi(writer.has_ansi_escapes());
        inner.format_event(ctx, Writer::new(&mut line), event)?;
        F::append(&mut writer, &line, ids)
    }
}

/// How a format's finished line takes the ids.
trait AppendIds {
    fn append(w: &mut Writer<'_>, line: &str, ids: RequestIds) -> fmt::Result;
}

impl AppendIds for Full {
    /// `... trace_id=<32 hex> span_id=<16 hex>`, after the event's own fields.
    fn append(w: &mut Writer<'_>, line: &str, ids: RequestIds) -> fmt::Result {
        let line = line.strip_suffix('\n').unwrap_or(line);
        writeln!(
            w,
            "{line} trace_id={} span_id={}",
            ids.trace_id, ids.span_id
        )
    }
}

impl AppendIds for Json {
    /// Two more members of the line's object (hex strings, as OTLP/Jaeger/Tempo show them).
    fn append(w: &mut Writer<'_>, line: &str, ids: RequestIds) -> fmt::Result {
        let Some(object) = line.strip_suffix("}\n") else {
            return w.write_str(line);
        };
        let comma = if object.ends_with('{') { "" } else { "," };
        let (trace, span) = (ids.trace_id, ids.span_id);
        writeln!(
            w,
            r#"{object}{comma}"trace_id":"{trace}","span_id":"{span}"}}"#
        )
    }
}

type Reload = Box<dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync>;

/// The filter of the process-wide subscriber. A static because the subscriber itself is
/// process-wide; set once by [`init`], absent when something else installed the subscriber.
static RELOAD: OnceLock<Reload> = OnceLock::new();

fn set<L>(handle: &Handle<EnvFilter, L>, filter: Option<&str>) -> Result<String, String>
where
    L: 'static,
{
    if let Some(f) = filter {
        let new = EnvFilter::try_new(f).map_err(|e| e.to_string())?;
        handle.reload(new).map_err(|e| e.to_string())?;
    }
    handle
        .with_current(|f| f.to_string())
        .map_err(|e| e.to_string())
}

/// The `/log_level` control for the admin API, when [`init`] installed the subscriber.
pub fn control() -> Option<trellis_proxy::admin::LogLevelFn> {
    RELOAD.get()?;
    Some(Arc::new(|f| match RELOAD.get() {
        Some(r) => r(f),
        None => Err("no log subscriber".into()),
    }))
}

/// The lines this module's formats write, kept in memory: what tests read back.
#[cfg(any(test, feature = "testing"))]
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(any(test, feature = "testing"))]
impl Captured {
    /// A subscriber (no colours) that writes `format` lines passing `filter` here; install
    /// it with `tracing::dispatcher::set_default`.
    pub fn subscriber(&self, format: LogFormat, filter: &str) -> tracing::Dispatch {
        let to = self.clone();
        let builder = tracing_subscriber::fmt()
            .with_env_filter(EnvFilter::new(filter))
            .with_writer(move || to.clone())
            .with_ansi(false);
        match format {
            LogFormat::Text => builder.event_format(text()).finish().into(),
            LogFormat::Json => builder.json().event_format(json()).finish().into(),
        }
    }

    pub fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("log capture").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[cfg(any(test, feature = "testing"))]
impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log capture").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceId};

    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn ids() -> Option<RequestIds> {
        Some(RequestIds {
            trace_id: TraceId::from_hex(TRACE).unwrap(),
            span_id: SpanId::from_hex(SPAN).unwrap(),
        })
    }

    /// One event inside a request's scope, one outside; the two lines written.
    fn two_lines(format: LogFormat) -> (String, String) {
        let captured = Captured::default();
        let _default = tracing::dispatcher::set_default(&captured.subscriber(format, "info"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(logs::scope(ids(), async {
            tracing::warn!(error = "refused", "inbound request failed");
        }));
        tracing::info!(listener = "outbound", "stopped accepting connections");
        let lines = captured.lines();
        assert_eq!(lines.len(), 2, "{lines:#?}");
        (lines[0].clone(), lines[1].clone())
    }

    #[test]
    fn text_lines_in_a_request_end_with_its_ids() {
        let (inside, outside) = two_lines(LogFormat::Text);
        assert!(
            inside.ends_with(&format!(
                "inbound request failed error=\"refused\" trace_id={TRACE} span_id={SPAN}"
            )),
            "{inside}"
        );
        assert!(inside.contains(" WARN "), "{inside}");
        assert!(!outside.contains("trace_id"), "{outside}");
        assert!(
            outside.ends_with("stopped accepting connections listener=\"outbound\""),
            "{outside}"
        );
    }

    #[test]
    fn json_lines_in_a_request_have_its_ids_as_fields() {
        let (inside, outside) = two_lines(LogFormat::Json);
        let inside: serde_json::Value = serde_json::from_str(&inside).expect(&inside);
        assert_eq!(inside["message"], "inbound request failed");
        assert_eq!(inside["error"], "refused");
        assert_eq!(inside["level"], "WARN");
        assert_eq!(inside["trace_id"], TRACE);
        assert_eq!(inside["span_id"], SPAN);
        let outside: serde_json::Value = serde_json::from_str(&outside).expect(&outside);
        assert_eq!(outside["message"], "stopped accepting connections");
        assert!(outside.get("trace_id").is_none(), "{outside}");
        assert!(outside.get("span_id").is_none(), "{outside}");
    }

    #[test]
    fn coloured_text_keeps_its_colours_and_gets_the_ids() {
        let captured = Captured::default();
        let to = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || to.clone())
            .with_ansi(true)
            .event_format(text())
            .finish();
        let _default = tracing::subscriber::set_default(subscriber);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(logs::scope(ids(), async { tracing::warn!("failed") }));
        let line = &captured.lines()[0];
        assert!(line.contains('\u{1b}'), "{line:?}");
        assert!(
            line.ends_with(&format!("trace_id={TRACE} span_id={SPAN}")),
            "{line:?}"
        );
    }
}
