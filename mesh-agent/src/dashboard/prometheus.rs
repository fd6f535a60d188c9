//! For users who already run Prometheus: the dashboard as one scrape target for the whole mesh
//! (federation) and as an HTTP service discovery source.
//!
//! - `GET /api/v1/prometheus/federate`: on each scrape, every registered instance's metrics,
//!   read over mTLS with bounded concurrency, relabelled with `mesh_service`, `mesh_instance`
//!   (and `mesh_zone`), plus `up{mesh_service,mesh_instance}` 1 or 0 per instance, so that the
//!   rules in `examples/prometheus/` work unchanged. Scrape it with `honor_labels: true`.
//! - `GET /api/v1/prometheus/sd`: Prometheus HTTP SD groups, one per instance, for setups that
//!   scrape sidecars' admin ports on a private network (relabel `__address__` to the admin port).

use std::fmt::Write as _;

use futures_util::StreamExt;
use serde_json::json;
use trellis_proxy::identity::SpiffeId;
use trellis_proxy::telemetry::exposition::{self, Escaped};

use super::fleet::Member;
use super::scrape::Reader;

/// The federation text for `members` (Prometheus text format 0.0.4, samples untyped).
pub async fn federate(reader: &Reader, members: Vec<Member>, concurrency: usize) -> String {
    let reads = futures_util::stream::iter(members)
        .map(|m| {
            let reader = reader.clone();
            async move {
                let text = fetch(&reader, &m).await;
                (m, text)
            }
        })
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut out = String::new();
    for (m, read) in reads {
        let labels = instance_labels(&m);
        let up = match read.and_then(|text| relabel(&text, &labels, &mut out)) {
            Ok(()) => 1,
            Err(e) => {
                tracing::debug!(instance = %m.instance, error = %e, "federation read failed");
                0
            }
        };
        let _ = writeln!(out, "up{{{labels}}} {up}");
    }
    out
}

/// Append every sample of `text` to `out` with the instance's `labels` first.
fn relabel(text: &str, labels: &str, out: &mut String) -> Result<(), String> {
    let e = exposition::parse(text).map_err(|e| e.to_string())?;
    for s in e.samples {
        let _ = write!(out, "{}{{{labels}", s.name);
        for (k, v) in &s.labels {
            let _ = write!(out, ",{k}=\"{}\"", Escaped(v));
        }
        let _ = writeln!(out, "}} {}", exposition::format_value(s.value));
    }
    Ok(())
}

/// The instance's metrics text.
async fn fetch(reader: &Reader, m: &Member) -> Result<String, String> {
    let addr = m
        .address
        .parse()
        .map_err(|_| format!("registered address {:?} is not ip:port", m.address))?;
    let id = SpiffeId::parse(&m.identity).map_err(|e| e.to_string())?;
    let body = reader
        .get(addr, &id, "metrics")
        .await
        .map_err(|e| e.to_string())?;
    String::from_utf8(body.to_vec()).map_err(|e| e.to_string())
}

fn instance_labels(m: &Member) -> String {
    let mut l = format!(
        "mesh_service=\"{}\",mesh_instance=\"{}\"",
        Escaped(&m.service),
        Escaped(&m.instance)
    );
    if let Some(zone) = &m.zone {
        let _ = write!(l, ",mesh_zone=\"{}\"", Escaped(zone));
    }
    l
}

/// HTTP SD groups: the registered (inbound) address as the target, who it is as labels.
pub fn service_discovery(members: &[Member]) -> serde_json::Value {
    members
        .iter()
        .map(|m| {
            json!({
                "targets": [m.address],
                "labels": {
                    "__meta_trellis_service": m.service,
                    "__meta_trellis_instance": m.instance,
                    "__meta_trellis_zone": m.zone.clone().unwrap_or_default(),
                    "__meta_trellis_identity": m.identity,
                },
            })
        })
        .collect()
}
