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
    /// Keyed `consumer @ service / route` (the HTTPRoute rule at the ingress; `default` where
    /// none routed: a sidecar's inbound side, or refused before routing).
    pub consumer_routes: BTreeMap<String, Usage>,
    /// Keyed `service / route` (requests routed by callers' sidecars and gateways).
    pub routes: BTreeMap<String, Usage>,
    /// Availability of each service as its own sidecars saw it (inbound): non-5xx / total.
    pub services: BTreeMap<String, ServiceAvailability>,
    /// Uptime over the last 24 h as a dashboard saw it (read through `--dashboard` only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub uptime: BTreeMap<String, Uptime>,
}

/// Uptime / observed time by minute, with the intervals down (unix ms, end exclusive).
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Uptime {
    pub ratio: Option<f64>,
    pub minutes_observed: u64,
    pub down: Vec<(u64, u64)>,
}

/// Output of `mesh-agent report`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    #[default]
    Table,
    Json,
    /// One row per consumer, route and service: `kind,key,requests,errors,refused,p50_ms,p90_ms,p99_ms,availability`.
    Csv,
}

/// Where the report reads from.
pub enum Source {
    /// Admin addresses (`host:port`), read directly: the sidecars of this host.
    Targets(Vec<String>),
    /// A dashboard (`http://host:9900`), which reads every instance of the mesh over mTLS.
    Dashboard { url: String, token: Option<String> },
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

/// The route of a consumer sample: sidecars from before the label read as `default`.
fn route_of(s: &Sample) -> &str {
    s.labels.get("route").map_or("default", String::as_str)
}

/// Build the report from samples (a window's deltas, or totals).
pub fn build(samples: &[Sample], window: Option<Duration>) -> Report {
    let mut consumers: BTreeMap<String, Acc> = BTreeMap::new();
    let mut consumer_routes: BTreeMap<String, Acc> = BTreeMap::new();
    let mut routes: BTreeMap<String, Acc> = BTreeMap::new();
    let mut services: BTreeMap<String, ServiceAvailability> = BTreeMap::new();
    let label = |s: &Sample, k: &str| s.labels.get(k).cloned().unwrap_or_default();
    // Requests routed by callers' sidecars and gateways (where HTTPRoutes apply).
    let routed = |s: &Sample| matches!(label(s, "direction").as_str(), "outbound" | "ingress");
    for s in samples {
        match s.name.as_str() {
            "trellis_consumer_requests_total" => {
                let key = format!("{} @ {}", label(s, "consumer"), label(s, "service"));
                let by_route = format!("{key} / {}", route_of(s));
                consumer_routes.entry(by_route).or_default().count(s);
                consumers.entry(key).or_default().count(s);
            }
            "trellis_consumer_request_duration_seconds_bucket" => {
                let key = format!("{} @ {}", label(s, "consumer"), label(s, "service"));
                let by_route = format!("{key} / {}", route_of(s));
                consumer_routes.entry(by_route).or_default().bucket(s);
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
        consumer_routes: consumer_routes
            .iter()
            .map(|(k, a)| (k.clone(), a.usage()))
            .collect(),
        routes: routes
            .iter()
            .filter(|(_, a)| a.requests > 0.0)
            .map(|(k, a)| (k.clone(), a.usage()))
            .collect(),
        services,
        uptime: BTreeMap::new(),
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

/// `GET url` (with the token as a bearer, if any): the body, or why not.
async fn fetch(url: &str, token: Option<&str>) -> Result<Bytes, ReportError> {
    let err = |message: String| ReportError::Scrape {
        target: url.to_string(),
        message,
    };
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::get(url);
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::new())
        .map_err(|e| err(format!("not a URL: {e}")))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| err("timed out after 30 s".into()))?
        .map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!("answered {}", resp.status())));
    }
    Ok(resp
        .into_body()
        .collect()
        .await
        .map_err(|e| err(e.to_string()))?
        .to_bytes())
}

/// Every sample the source has now.
pub async fn scrape(source: &Source) -> Result<Vec<Sample>, ReportError> {
    let mut all = Vec::new();
    match source {
        Source::Targets(targets) => {
            for t in targets {
                let body = fetch(&format!("http://{t}/metrics"), None).await?;
                all.extend(parse(&String::from_utf8_lossy(&body)));
            }
        }
        Source::Dashboard { url, token } => {
            let url = format!("{}/api/v1/prometheus/federate", url.trim_end_matches('/'));
            let body = fetch(&url, token.as_deref()).await?;
            // The per-instance `up` samples are the dashboard's, not usage.
            all.extend(
                parse(&String::from_utf8_lossy(&body))
                    .into_iter()
                    .filter(|s| s.name != "up"),
            );
        }
    }
    Ok(all)
}

/// Each service's uptime over 24 h, as the dashboard has it.
async fn uptime(url: &str, token: Option<&str>) -> Result<BTreeMap<String, Uptime>, ReportError> {
    let base = url.trim_end_matches('/');
    let json = |b: Bytes| serde_json::from_slice::<serde_json::Value>(&b).unwrap_or_default();
    let overview = json(fetch(&format!("{base}/api/v1/overview"), token).await?);
    let mut out = BTreeMap::new();
    for name in overview["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
    {
        let s = json(fetch(&format!("{base}/api/v1/services/{name}"), token).await?);
        let a = &s["availability"]["24h"];
        let mut starts: Vec<u64> = a["down"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_u64())
            .collect();
        starts.sort_unstable();
        out.insert(
            name.to_string(),
            Uptime {
                ratio: a["ratio"].as_f64(),
                minutes_observed: a["minutes"].as_u64().unwrap_or(0),
                down: intervals(&starts),
            },
        );
    }
    Ok(out)
}

/// Consecutive down minutes joined into intervals `[start, end)`.
fn intervals(starts: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &m in starts {
        match out.last_mut() {
            Some(last) if last.1 == m => last.1 = m + 60_000,
            _ => out.push((m, m + 60_000)),
        }
    }
    out
}

/// Scrape, wait `window` and scrape again (deltas), or scrape once (totals).
pub async fn report(source: &Source, window: Option<Duration>) -> Result<Report, ReportError> {
    let first = scrape(source).await?;
    let samples = match window {
        Some(w) => {
            tokio::time::sleep(w).await;
            delta(&first, &scrape(source).await?)
        }
        None => first,
    };
    let mut r = build(&samples, window);
    if let Source::Dashboard { url, token } = source {
        r.uptime = uptime(url, token.as_deref()).await?;
    }
    Ok(r)
}

/// The report as CSV, one row per consumer, route and service.
pub fn render_csv(r: &Report) -> String {
    let mut out =
        String::from("kind,key,requests,errors,refused,p50_ms,p90_ms,p99_ms,availability\n");
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
    for (kind, rows) in [
        ("consumer", &r.consumers),
        ("consumer_route", &r.consumer_routes),
        ("route", &r.routes),
    ] {
        for (k, u) in rows {
            out.push_str(&format!(
                "{kind},{},{},{},{},{},{},{},\n",
                csv_field(k),
                u.requests,
                u.errors,
                u.refused,
                opt(u.p50_ms),
                opt(u.p90_ms),
                opt(u.p99_ms)
            ));
        }
    }
    for (k, a) in &r.services {
        let up = r.uptime.get(k).and_then(|u| u.ratio);
        out.push_str(&format!(
            "service,{},{},{},,,,,{}\n",
            csv_field(k),
            a.requests,
            a.requests - a.successful,
            opt(up.or(a.availability))
        ));
    }
    out
}

/// A CSV field, quoted when it holds a separator, a quote or a line break.
fn csv_field(v: &str) -> String {
    if v.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", v.replace('"', "\"\""))
    } else {
        v.to_string()
    }
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
        ("consumer @ service / route", &r.consumer_routes),
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
    if !r.uptime.is_empty() {
        out.push_str(&format!(
            "\n{:<36} {:>12} {:>9}  down (UTC)\n",
            "service (uptime, 24 h)", "uptime", "minutes"
        ));
        for (k, u) in &r.uptime {
            let down: Vec<String> = u
                .down
                .iter()
                .map(|(a, b)| format!("{}-{}", hhmm(*a), hhmm(*b)))
                .collect();
            out.push_str(&format!(
                "{k:<36} {:>12} {:>9}  {}\n",
                u.ratio.map_or("-".into(), |v| format!("{:.3}%", 100.0 * v)),
                u.minutes_observed,
                if down.is_empty() {
                    "none".into()
                } else {
                    down.join(", ")
                }
            ));
        }
    }
    out
}

fn hhmm(ms: u64) -> String {
    let m = (ms / 60_000) % (24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumers_routes_and_availability_from_samples() {
        let text = r#"
trellis_consumer_requests_total{service="gw",consumer="acme",route="list",status_code="200"} 6
trellis_consumer_requests_total{service="gw",consumer="acme",route="get",status_code="200"} 2
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
        // Per route too; a sample without the label (an older sidecar) is `default`.
        assert_eq!(r.consumer_routes["acme @ gw / list"].requests, 6.0);
        assert_eq!(r.consumer_routes["acme @ gw / get"].requests, 2.0);
        assert_eq!(r.consumer_routes["acme @ gw / default"].requests, 2.0);
        assert!(render_csv(&r).contains("consumer_route,acme @ gw / list,6,"));
        assert_eq!(r.services["orders"].availability, Some(0.99));
        let table = render_table(&r);
        assert!(table.contains("acme @ gw"), "{table}");
        assert!(table.contains("99.000%"), "{table}");
    }

    #[test]
    fn down_minutes_join_into_intervals_and_csv_quotes_what_it_must() {
        assert_eq!(
            intervals(&[0, 60_000, 180_000]),
            vec![(0, 120_000), (180_000, 240_000)]
        );
        let mut r = Report::default();
        r.consumers.insert(
            "a,b @ gw".into(),
            Usage {
                requests: 2.0,
                ..Default::default()
            },
        );
        let csv = render_csv(&r);
        assert!(csv.contains("consumer,\"a,b @ gw\",2,"), "{csv}");
    }

    #[test]
    fn deltas_restart_from_zero_when_a_counter_went_down() {
        let a = parse("x_total{k=\"1\"} 10\ny_total 5\n");
        let b = parse("x_total{k=\"1\"} 15\ny_total 2\nz_total 1\n");
        let d: Vec<f64> = delta(&a, &b).iter().map(|s| s.value).collect();
        assert_eq!(d, [5.0, 2.0, 1.0]);
    }
}
