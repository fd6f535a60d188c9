//! `mesh-agent report`: API usage from the sidecars' and gateways' own metrics, per consumer,
//! per route and per service, over a window (two scrapes, the window apart) or since each
//! process started.
//!
//! Reading `/metrics` directly needs no Prometheus server and no central component; with a
//! Prometheus in place, the same figures come from `increase()` and `histogram_quantile()` on
//! the series documented in docs/metrics.md.

mod prom;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

pub use prom::{parse, quantile, Sample};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{target}: {message}")]
    Scrape { target: String, message: String },
}

/// One row: requests and their outcome and latency.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Usage {
    pub requests: f64,
    /// 5xx answers.
    pub errors: f64,
    /// 401, 403 and 429 answers: refused by policy.
    pub refused: f64,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Report {
    /// Seconds covered; `None`: totals since each process started.
    pub window_seconds: Option<f64>,
    /// Keyed `consumer @ service`.
    pub consumers: BTreeMap<String, Usage>,
    /// Keyed `service / route` (requests routed by callers' sidecars and gateways).
    pub routes: BTreeMap<String, Usage>,
    /// Availability of each service as its own sidecars saw it (inbound): non-5xx / total.
    pub services: BTreeMap<String, ServiceAvailability>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct ServiceAvailability {
    pub requests: f64,
    pub successful: f64,
    pub availability: Option<f64>,
}

/// Counters and buckets per row, before percentiles.
#[derive(Default)]
struct Acc {
    requests: f64,
    errors: f64,
    refused: f64,
    /// Bucket bound (bits of the f64, for ordering) -> cumulative count.
    buckets: BTreeMap<u64, f64>,
}

fn code(s: &Sample) -> u16 {
    s.labels
        .get("status_code")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

impl Acc {
    fn count(&mut self, s: &Sample) {
        let c = code(s);
        self.requests += s.value;
        if c >= 500 {
            self.errors += s.value;
        } else if matches!(c, 401 | 403 | 429) {
            self.refused += s.value;
        }
    }

    fn bucket(&mut self, s: &Sample) {
        let le = match s.labels.get("le").map(String::as_str) {
            Some("+Inf") => f64::INFINITY,
            Some(v) => match v.parse::<f64>() {
                Ok(v) => v,
                Err(_) => return,
            },
            None => return,
        };
        // Positive floats order like their bit patterns.
        *self.buckets.entry(le.to_bits()).or_default() += s.value;
    }

    fn usage(&self) -> Usage {
        let buckets: Vec<(f64, f64)> = self
            .buckets
            .iter()
            .map(|(b, c)| (f64::from_bits(*b), *c))
            .collect();
        let ms = |q| quantile(q, &buckets).map(|s| (s * 1000.0 * 100.0).round() / 100.0);
        Usage {
            requests: self.requests,
            errors: self.errors,
            refused: self.refused,
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
        }
    }
}

/// Build the report from samples (a window's deltas, or totals).
pub fn build(samples: &[Sample], window: Option<Duration>) -> Report {
    let mut consumers: BTreeMap<String, Acc> = BTreeMap::new();
    let mut routes: BTreeMap<String, Acc> = BTreeMap::new();
    let mut services: BTreeMap<String, ServiceAvailability> = BTreeMap::new();
    let label = |s: &Sample, k: &str| s.labels.get(k).cloned().unwrap_or_default();
    // Requests routed by callers' sidecars and gateways (where HTTPRoutes apply).
    let routed = |s: &Sample| matches!(label(s, "direction").as_str(), "outbound" | "ingress");
    for s in samples {
        match s.name.as_str() {
            "trellis_consumer_requests_total" => {
                let key = format!("{} @ {}", label(s, "consumer"), label(s, "service"));
                consumers.entry(key).or_default().count(s);
            }
            "trellis_consumer_request_duration_seconds_bucket" => {
                let key = format!("{} @ {}", label(s, "consumer"), label(s, "service"));
                consumers.entry(key).or_default().bucket(s);
            }
            "trellis_requests_total" if routed(s) => {
                let key = format!("{} / {}", label(s, "service"), label(s, "route"));
                routes.entry(key).or_default().count(s);
            }
            "trellis_request_duration_seconds_bucket" if routed(s) => {
                let key = format!("{} / {}", label(s, "service"), label(s, "route"));
                routes.entry(key).or_default().bucket(s);
            }
            "trellis_requests_total" if label(s, "direction") == "inbound" => {
                let a = services.entry(label(s, "service")).or_default();
                a.requests += s.value;
                if code(s) < 500 {
                    a.successful += s.value;
                }
            }
            _ => {}
        }
    }
    for a in services.values_mut() {
        a.availability = (a.requests > 0.0).then(|| a.successful / a.requests);
    }
    Report {
        window_seconds: window.map(|w| w.as_secs_f64()),
        consumers: consumers
            .iter()
            .map(|(k, a)| (k.clone(), a.usage()))
            .collect(),
        routes: routes
            .iter()
            .filter(|(_, a)| a.requests > 0.0)
            .map(|(k, a)| (k.clone(), a.usage()))
            .collect(),
        services,
    }
}

/// `after - before` for every series of `after` (counters and buckets only grow; a series
/// that went down belongs to a restarted process and counts from zero).
pub fn delta(before: &[Sample], after: &[Sample]) -> Vec<Sample> {
    let old: BTreeMap<(&str, &BTreeMap<String, String>), f64> = before
        .iter()
        .map(|s| ((s.name.as_str(), &s.labels), s.value))
        .collect();
    after
        .iter()
        .map(|s| {
            let prev = old
                .get(&(s.name.as_str(), &s.labels))
                .copied()
                .unwrap_or(0.0);
            let value = if s.value >= prev {
                s.value - prev
            } else {
                s.value
            };
            Sample { value, ..s.clone() }
        })
        .collect()
}

/// Read `/metrics` from each admin address (`host:port`).
pub async fn scrape(targets: &[String]) -> Result<Vec<Sample>, ReportError> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut all = Vec::new();
    for t in targets {
        let err = |message: String| ReportError::Scrape {
            target: t.clone(),
            message,
        };
        let uri: http::Uri = format!("http://{t}/metrics")
            .parse()
            .map_err(|e| err(format!("not a host:port: {e}")))?;
        let resp = tokio::time::timeout(Duration::from_secs(5), client.get(uri))
            .await
            .map_err(|_| err("timed out after 5 s".into()))?
            .map_err(|e| err(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(err(format!("/metrics answered {}", resp.status())));
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| err(e.to_string()))?
            .to_bytes();
        all.extend(parse(&String::from_utf8_lossy(&body)));
    }
    Ok(all)
}

/// Scrape, wait `window` and scrape again (deltas), or scrape once (totals).
pub async fn report(targets: &[String], window: Option<Duration>) -> Result<Report, ReportError> {
    let first = scrape(targets).await?;
    let samples = match window {
        Some(w) => {
            tokio::time::sleep(w).await;
            delta(&first, &scrape(targets).await?)
        }
        None => first,
    };
    Ok(build(&samples, window))
}

/// The report as aligned tables.
pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    match r.window_seconds {
        Some(w) => out.push_str(&format!("usage over the last {w:.0} s\n")),
        None => out.push_str("usage since each sidecar started\n"),
    }
    let fmt_ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let pct = |n: f64, d: f64| {
        if d > 0.0 {
            format!("{:.1}%", 100.0 * n / d)
        } else {
            "-".into()
        }
    };
    for (title, rows) in [
        ("consumer @ service", &r.consumers),
        ("service / route", &r.routes),
    ] {
        out.push_str(&format!(
            "\n{title:<36} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8}\n",
            "requests", "errors", "refused", "p50 ms", "p90 ms", "p99 ms"
        ));
        if rows.is_empty() {
            out.push_str("(none)\n");
        }
        for (k, u) in rows.iter() {
            out.push_str(&format!(
                "{k:<36} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8}\n",
                u.requests,
                pct(u.errors, u.requests),
                pct(u.refused, u.requests),
                fmt_ms(u.p50_ms),
                fmt_ms(u.p90_ms),
                fmt_ms(u.p99_ms)
            ));
        }
    }
    out.push_str(&format!(
        "\n{:<36} {:>9} {:>12}\n",
        "service (inbound)", "requests", "availability"
    ));
    if r.services.is_empty() {
        out.push_str("(none)\n");
    }
    for (k, a) in &r.services {
        out.push_str(&format!(
            "{k:<36} {:>9} {:>12}\n",
            a.requests,
            a.availability
                .map_or("-".into(), |v| format!("{:.3}%", 100.0 * v))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_routes_and_availability_from_samples() {
        let text = r#"
trellis_consumer_requests_total{service="gw",consumer="acme",status_code="200"} 8
trellis_consumer_requests_total{service="gw",consumer="acme",status_code="429"} 1
trellis_consumer_requests_total{service="gw",consumer="acme",status_code="503"} 1
trellis_consumer_request_duration_seconds_bucket{service="gw",consumer="acme",status_code="200",le="0.001"} 4
trellis_consumer_request_duration_seconds_bucket{service="gw",consumer="acme",status_code="200",le="0.002"} 8
trellis_consumer_request_duration_seconds_bucket{service="gw",consumer="acme",status_code="200",le="+Inf"} 8
trellis_consumer_request_duration_seconds_bucket{service="gw",consumer="acme",status_code="503",le="0.001"} 0
trellis_consumer_request_duration_seconds_bucket{service="gw",consumer="acme",status_code="503",le="0.002"} 2
trellis_consumer_request_duration_seconds_bucket{service="gw",consumer="acme",status_code="503",le="+Inf"} 2
trellis_requests_total{direction="outbound",service="orders",route="canary",status_code="200"} 5
trellis_requests_total{direction="inbound",service="orders",route="default",status_code="200"} 99
trellis_requests_total{direction="inbound",service="orders",route="default",status_code="502"} 1
"#;
        let r = build(&parse(text), None);
        let acme = &r.consumers["acme @ gw"];
        assert_eq!((acme.requests, acme.errors, acme.refused), (10.0, 1.0, 1.0));
        // 10 observations: 4 <= 1 ms, 6 in (1, 2] ms; the median is at 1.17 ms.
        assert_eq!(acme.p50_ms, Some(1.17));
        assert_eq!(r.routes["orders / canary"].requests, 5.0);
        assert_eq!(r.services["orders"].availability, Some(0.99));
        let table = render_table(&r);
        assert!(table.contains("acme @ gw"), "{table}");
        assert!(table.contains("99.000%"), "{table}");
    }

    #[test]
    fn deltas_restart_from_zero_when_a_counter_went_down() {
        let a = parse("x_total{k=\"1\"} 10\ny_total 5\n");
        let b = parse("x_total{k=\"1\"} 15\ny_total 2\nz_total 1\n");
        let d: Vec<f64> = delta(&a, &b).iter().map(|s| s.value).collect();
        assert_eq!(d, [5.0, 2.0, 1.0]);
    }
}
