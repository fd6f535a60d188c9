//! The dashboard's HTTP side: the UI (one embedded page, no CDN, no build step) and the JSON
//! API it reads. On loopback without a token; elsewhere every path but `/healthz` needs the
//! token, as `Authorization: Bearer <token>` or the cookie `/login?token=...` sets.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::json;

use super::model::{Model, Stats, HISTORY_MS};

const INDEX: &str = include_str!("assets/index.html");
const COOKIE: &str = "trellis_dashboard_token";
const FEDERATE: &str = "/api/v1/prometheus/federate";
const SERVICES: &str = "/api/v1/services/";
/// Usage per consumer and route, with each consumer's quota (from etcd) and its use.
const CONSUMERS: &str = "/api/v1/consumers";
/// `/api/v1/services/NAME/policies`: read from etcd at request time.
const POLICIES: &str = "/policies";
/// `/api/v1/services/NAME/alerts`: the service's alert rules and their states, from etcd.
const ALERTS: &str = "/alerts";
/// Default window of the figures.
const DEFAULT_WINDOW: Duration = Duration::from_secs(300);

pub struct Api {
    model: Arc<Mutex<Model>>,
    /// Reads instances' metrics for the federation endpoint.
    reader: super::scrape::Reader,
    interval: Duration,
    concurrency: usize,
    token: Option<String>,
    policies: PolicyReader,
}

/// Reads a service's policies and their histories from etcd when its page asks: they are not
/// part of the model (which holds what sidecars report), and a read is a handful of gets.
pub struct PolicyReader {
    etcd: crate::etcd::Connector,
    keys: crate::etcd::keys::Keys,
}

impl PolicyReader {
    pub fn new(cfg: crate::config::EtcdConfig) -> Self {
        Self {
            keys: crate::etcd::keys::Keys::new(&cfg.prefix),
            etcd: crate::etcd::Connector::new(cfg),
        }
    }

    async fn read(
        &self,
        service: &str,
    ) -> Result<super::policies::ServicePolicies, crate::etcd::EtcdError> {
        let etcd = self.etcd.connect().await?;
        super::policies::read(&etcd, &self.keys, service).await
    }

    /// Every consumer's quota, read from etcd now.
    async fn quotas(&self) -> Result<BTreeMap<String, trellis_policies::Quota>, String> {
        let etcd = self.etcd.connect().await.map_err(|e| e.to_string())?;
        super::policies::quotas(&etcd, &self.keys)
            .await
            .map_err(|e| e.to_string())
    }

    /// The states of `service`'s alert rules (kept in etcd by whichever dashboard evaluates
    /// them), firing first; a rule never evaluated yet is listed as `inactive`.
    async fn alerts(
        &self,
        service: &str,
    ) -> Result<Vec<super::alerts::AlertState>, crate::etcd::EtcdError> {
        let etcd = self.etcd.connect().await?;
        let rules = super::alerts::rules(&etcd, &self.keys).await?;
        let mut states = super::alerts::states(&etcd, &self.keys).await?;
        let mut out: Vec<_> = rules
            .into_iter()
            .filter(|(_, spec)| spec.service == service)
            .map(|(name, _)| {
                states.remove(&name).unwrap_or(super::alerts::AlertState {
                    rule: name,
                    service: service.to_string(),
                    state: "inactive".into(),
                    ..Default::default()
                })
            })
            .collect();
        let rank = |s: &str| match s {
            "firing" => 0,
            "pending" => 1,
            _ => 2,
        };
        out.sort_by(|a, b| {
            rank(&a.state)
                .cmp(&rank(&b.state))
                .then(a.rule.cmp(&b.rule))
        });
        Ok(out)
    }
}

type Resp = Response<Full<Bytes>>;

// === impl Api ===

impl Api {
    pub fn new(
        model: Arc<Mutex<Model>>,
        reader: super::scrape::Reader,
        interval: Duration,
        concurrency: usize,
        token: Option<String>,
        policies: PolicyReader,
    ) -> Self {
        Self {
            model,
            reader,
            interval,
            concurrency,
            token,
            policies,
        }
    }

    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    async move {
                        if req.uri().path() == FEDERATE && this.authorized(&req) {
                            return Ok::<_, Infallible>(this.federate().await);
                        }
                        if let Some(name) = service_part(req.uri().path(), POLICIES) {
                            if this.authorized(&req) && req.method() == Method::GET {
                                return Ok(this.service_policies(name).await);
                            }
                        }
                        if req.uri().path() == CONSUMERS
                            && this.authorized(&req)
                            && req.method() == Method::GET
                        {
                            return Ok(this.consumers().await);
                        }
                        if let Some(name) = service_part(req.uri().path(), ALERTS) {
                            if this.authorized(&req) && req.method() == Method::GET {
                                return Ok(this.service_alerts(name).await);
                            }
                        }
                        Ok(this.handle(&req))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .header_read_timeout(Duration::from_secs(10))
                    .timer(hyper_util::rt::TokioTimer::new())
                    .serve_connection(TokioIo::new(tcp), svc);
                let _ = tokio::time::timeout(Duration::from_secs(300), conn).await;
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>) -> Resp {
        let path = req.uri().path();
        if path == "/healthz" {
            return text(StatusCode::OK, "ok\n");
        }
        if path == "/login" {
            return self.login(req);
        }
        if !self.authorized(req) {
            return text(StatusCode::UNAUTHORIZED, "token required\n");
        }
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
        }
        let window = window(req.uri().query());
        let Ok(model) = self.model.lock() else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "model unavailable\n");
        };
        let now = trellis_proxy::telemetry::route_metrics::unix_ms();
        match path {
            "/" | "/index.html" => page(),
            "/api/v1/overview" => json_ok(&self.overview(&model, now, window)),
            "/api/v1/prometheus/sd" => {
                json_ok(&super::prometheus::service_discovery(&members(&model)))
            }
            p if p.starts_with("/api/v1/scale/") => {
                scale(&model, &p["/api/v1/scale/".len()..], now, req.uri().query())
            }
            p => match p.strip_prefix(SERVICES) {
                Some(name) if model.services.contains_key(name) || has_instances(&model, name) => {
                    json_ok(&service(&model, name, now, window))
                }
                Some(_) => text(StatusCode::NOT_FOUND, "no such service\n"),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            },
        }
    }

    /// Every instance's metrics, read now (a Prometheus scrape of the whole mesh).
    async fn federate(&self) -> Resp {
        let members = match self.model.lock() {
            Ok(m) => members(&m),
            Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "model unavailable\n"),
        };
        let body = super::prometheus::federate(&self.reader, members, self.concurrency).await;
        let mut r = Response::new(Full::new(Bytes::from(body)));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    /// The policies applying to `name`, read from etcd now. An etcd failure is the answer
    /// (502 with its message), so the page can show it beside everything else.
    async fn service_policies(&self, name: &str) -> Resp {
        match self.policies.read(name).await {
            Ok(p) => json_ok(&p),
            Err(e) => text(StatusCode::BAD_GATEWAY, &format!("reading policies: {e}\n")),
        }
    }

    /// Usage per consumer, with the quotas read from etcd now; when they cannot be read, the
    /// usage still, each row saying why its quota is missing.
    async fn consumers(&self) -> Resp {
        let quotas = self.policies.quotas().await;
        let Ok(model) = self.model.lock() else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "model unavailable\n");
        };
        json_ok(&consumers(&model, quotas.as_ref().map_err(String::as_str)))
    }

    async fn service_alerts(&self, name: &str) -> Resp {
        match self.policies.alerts(name).await {
            Ok(a) => json_ok(&a),
            Err(e) => text(StatusCode::BAD_GATEWAY, &format!("reading alerts: {e}\n")),
        }
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let cookie = req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| {
                c.trim()
                    .strip_prefix(COOKIE)
                    .and_then(|c| c.strip_prefix('='))
            });
        [bearer, cookie]
            .into_iter()
            .flatten()
            .any(|given| same(given.as_bytes(), token.as_bytes()))
    }

    /// `/login?token=T`: set the cookie and go to the UI.
    fn login(&self, req: &Request<Incoming>) -> Resp {
        let given = req
            .uri()
            .query()
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix("token="));
        let ok = match (&self.token, given) {
            (None, _) => true,
            (Some(t), Some(g)) => same(g.as_bytes(), t.as_bytes()),
            (Some(_), None) => false,
        };
        if !ok {
            return text(StatusCode::UNAUTHORIZED, "wrong token\n");
        }
        let mut r = text(StatusCode::SEE_OTHER, "");
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/"));
        if let Some(cookie) = given.and_then(|g| {
            HeaderValue::from_str(&format!("{COOKIE}={g}; HttpOnly; SameSite=Strict; Path=/")).ok()
        }) {
            r.headers_mut().insert(header::SET_COOKIE, cookie);
        }
        r
    }

    fn overview(&self, m: &Model, now: u64, window: u64) -> serde_json::Value {
        let services: Vec<_> = service_names(m)
            .into_iter()
            .map(|name| {
                let instances: Vec<_> = m.instances.values().filter(|i| i.member.service == name).collect();
                let up = instances.iter().filter(|i| i.error.is_none() && i.last.is_some()).count();
                json!({
                    "name": name,
                    "instances": instances.len(),
                    "up": up,
                    "stats": m.services.get(&name).map(|s| Model::stats(s, now, window)).unwrap_or_default(),
                    "availability_1h": m.availability(&name, now, HISTORY_MS).ratio,
                    "ejected_endpoints": instances.iter().flat_map(|i| i.ejecting.values()).sum::<f64>(),
                })
            })
            .collect();
        // Edges that carried nothing in the window are left out (a call to a name that never
        // resolved stays in the hour's history, not on the map).
        let edges: Vec<_> = m
            .edges
            .iter()
            .map(|(edge, s)| (edge, Model::stats(s, now, window)))
            .filter(|(_, stats)| stats.requests > 0.0)
            .map(|((from, to), stats)| json!({"from": from, "to": to, "stats": stats}))
            .collect();
        json!({
            "now_ms": now,
            "interval_s": self.interval.as_secs_f64(),
            "window_s": window / 1000,
            "revision": m.revision,
            "refresh": m.refresh,
            "services": services,
            "edges": edges,
        })
    }
}

/// `/api/v1/scale/NAME`: what KEDA's `metrics-api` scaler reads (`valueLocation: rps`,
/// `in_flight`, `p99_ms`, `error_ratio` or `instances_up`), over `?window=` (default 1 min:
/// scaling reacts to now). `in_flight` is not windowed: it is the requests being served at
/// the instances' last reads, the figure concurrency-based scaling wants.
fn scale(m: &Model, name: &str, now: u64, query: Option<&str>) -> Resp {
    if !has_instances(m, name) && !m.services.contains_key(name) {
        return text(StatusCode::NOT_FOUND, "no such service\n");
    }
    let window = query
        .filter(|q| q.contains("window="))
        .map_or(60_000, |q| window(Some(q)));
    let stats = m
        .services
        .get(name)
        .map(|s| Model::stats(s, now, window))
        .unwrap_or_default();
    let up = m
        .instances
        .values()
        .filter(|i| i.member.service == name && i.error.is_none() && i.last.is_some())
        .count();
    json_ok(&json!({
        "service": name,
        "window_s": window / 1000,
        "rps": stats.rps,
        "in_flight": m.in_flight(name),
        "p99_ms": stats.p99_ms.unwrap_or(0.0),
        "error_ratio": stats.error_ratio.unwrap_or(0.0),
        "instances_up": up,
    }))
}

/// `NAME` of `/api/v1/services/NAME{part}` (`part`: [`POLICIES`], [`ALERTS`]).
fn service_part<'a>(path: &'a str, part: &str) -> Option<&'a str> {
    path.strip_prefix(SERVICES)?
        .strip_suffix(part)
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// The instances of the last fleet read.
fn members(m: &Model) -> Vec<super::fleet::Member> {
    m.instances.values().map(|i| i.member.clone()).collect()
}

fn has_instances(m: &Model, name: &str) -> bool {
    m.instances.values().any(|i| i.member.service == name)
}

fn service_names(m: &Model) -> Vec<String> {
    let mut names: Vec<String> = m.services.keys().cloned().collect();
    names.extend(m.instances.values().map(|i| i.member.service.clone()));
    names.sort();
    names.dedup();
    names
}

#[derive(Serialize)]
struct SeriesPoint {
    t_ms: u64,
    rps: f64,
    error_ratio: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

fn service(m: &Model, name: &str, now: u64, window: u64) -> serde_json::Value {
    let series: Vec<SeriesPoint> = m
        .services
        .get(name)
        .into_iter()
        .flatten()
        .map(|p| SeriesPoint {
            t_ms: p.t_ms,
            rps: if p.seconds > 0.0 {
                p.requests / p.seconds
            } else {
                0.0
            },
            error_ratio: (p.requests > 0.0).then(|| p.errors / p.requests),
            p50_ms: p.latency.quantile(0.5).map(|v| v * 1000.0),
            p99_ms: p.latency.quantile(0.99).map(|v| v * 1000.0),
        })
        .collect();
    let edge = |(from, to): &(String, String), s| json!({"from": from, "to": to, "stats": Model::stats(s, now, window)});
    let callers: Vec<_> = m
        .edges
        .iter()
        .filter(|((_, to), _)| to == name)
        .map(|(k, s)| edge(k, s))
        .collect();
    let callees: Vec<_> = m
        .edges
        .iter()
        .filter(|((from, _), _)| from == name)
        .map(|(k, s)| edge(k, s))
        .collect();
    let instances: Vec<_> = m
        .instances
        .values()
        .filter(|i| i.member.service == name)
        .collect();
    let rate_limits: Vec<_> = m
        .rate_limits
        .iter()
        .filter(|((s, _), _)| s == name)
        .map(|((_, policy), (allowed, limited, peers))| json!({"policy": policy, "allowed": allowed, "limited": limited, "peers": peers}))
        .collect();
    let stats: Stats = m
        .services
        .get(name)
        .map(|s| Model::stats(s, now, window))
        .unwrap_or_default();
    json!({
        "name": name,
        "window_s": window / 1000,
        "stats": stats,
        "in_flight": m.in_flight(name),
        "series": series,
        "instances": instances,
        "availability": {
            "1h": m.availability(name, now, HISTORY_MS),
            "24h": m.availability(name, now, super::model::AVAILABILITY_MS),
            // The rule the page explains next to the figure: a minute is down when at least
            // this share of its requests failed (5xx), or when no instance answered a read.
            "down_error_ratio": super::model::DOWN_ERROR_RATIO,
        },
        "callers": callers,
        "callees": callees,
        "rate_limits": rate_limits,
        "consumers": consumers(m, Ok(&BTreeMap::new())).into_iter().filter(|c| c.service == name).collect::<Vec<_>>(),
    })
}

/// One consumer's use of one service: totals since this dashboard started (`requests`,
/// `errors`, `by_status`, as before routes were counted), the same per HTTPRoute rule, and its
/// quota with the use of its last period.
#[derive(Serialize)]
struct ConsumerUse {
    service: String,
    consumer: String,
    requests: f64,
    errors: f64,
    /// Answered 429 (refused by its quota or another rate limit).
    limited: f64,
    by_status: BTreeMap<u16, f64>,
    routes: Vec<RouteUse>,
    /// `None`: no quota (or it could not be read: see `quota_error`).
    quota: Option<QuotaUse>,
    quota_error: Option<String>,
}

#[derive(Serialize)]
struct RouteUse {
    route: String,
    requests: f64,
    errors: f64,
    limited: f64,
    by_status: BTreeMap<u16, f64>,
}

/// A quota and its use in the last period up to the last read (see [`Model::period_use`]).
#[derive(Serialize)]
struct QuotaUse {
    /// Requests allowed per period.
    requests: u32,
    per: trellis_policies::Per,
    period_s: u32,
    burst: Option<u32>,
    /// Admitted in the period: what used the budget.
    used: f64,
    /// Refused (429) in the period.
    refused: f64,
    /// Requests counted in the period, refused ones included.
    requests_in_period: f64,
}

fn sum_where(by_status: &BTreeMap<u16, f64>, keep: impl Fn(u16) -> bool) -> f64 {
    by_status
        .iter()
        .filter(|(s, _)| keep(**s))
        .map(|(_, n)| n)
        .sum()
}

fn consumers(
    m: &Model,
    quotas: Result<&BTreeMap<String, trellis_policies::Quota>, &str>,
) -> Vec<ConsumerUse> {
    let mut out: Vec<ConsumerUse> = Vec::new();
    for ((service, consumer, route), by_status) in &m.consumers {
        let r = RouteUse {
            route: route.clone(),
            requests: by_status.values().sum(),
            errors: sum_where(by_status, |s| s >= 500),
            limited: sum_where(by_status, |s| s == 429),
            by_status: by_status.clone(),
        };
        // Sorted by (service, consumer, route): a consumer's routes are adjacent.
        let c = match out.last_mut() {
            Some(c) if &c.service == service && &c.consumer == consumer => c,
            _ => {
                out.push(ConsumerUse {
                    service: service.clone(),
                    consumer: consumer.clone(),
                    requests: 0.0,
                    errors: 0.0,
                    limited: 0.0,
                    by_status: BTreeMap::new(),
                    routes: Vec::new(),
                    quota: None,
                    quota_error: None,
                });
                out.last_mut().expect("just pushed")
            }
        };
        c.requests += r.requests;
        c.errors += r.errors;
        c.limited += r.limited;
        for (s, n) in by_status {
            *c.by_status.entry(*s).or_default() += n;
        }
        c.routes.push(r);
    }
    for c in &mut out {
        match quotas {
            Ok(q) => {
                c.quota = q.get(&c.consumer).map(|q| {
                    let period_s = q.limit.per.seconds();
                    let u = m.period_use(&c.service, &c.consumer, u64::from(period_s) * 1000);
                    QuotaUse {
                        requests: q.limit.requests,
                        per: q.limit.per,
                        period_s,
                        burst: q.burst,
                        used: u.used,
                        refused: u.refused,
                        requests_in_period: u.requests,
                    }
                })
            }
            Err(e) => c.quota_error = Some(format!("reading quotas: {e}")),
        }
    }
    out
}

/// `?window=5m` (at most the hour kept).
fn window(query: Option<&str>) -> u64 {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("window="))
        .and_then(|w| humantime::parse_duration(w).ok())
        .unwrap_or(DEFAULT_WINDOW)
        .as_millis()
        .clamp(1_000, u128::from(HISTORY_MS)) as u64
}

/// Equal in time that does not depend on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn page() -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(INDEX.as_bytes())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Everything is embedded: nothing may load from elsewhere.
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
        ),
    );
    r
}

fn json_ok<T: Serialize>(v: &T) -> Resp {
    match serde_json::to_vec(v) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
