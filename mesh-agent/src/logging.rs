//! Log setup: `RUST_LOG`-style filters, text for people or JSON lines for collectors.

use std::sync::{Arc, OnceLock};

use tracing_subscriber::reload::Handle;
use tracing_subscriber::EnvFilter;

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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests calling several commands in one process) is harmless.
    match format {
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let handle = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| set(&handle, f)));
            }
        }
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_filter_reloading();
            let handle = b.reload_handle();
            if b.try_init().is_ok() {
                let _ = RELOAD.set(Box::new(move |f| set(&handle, f)));
            }
        }
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
