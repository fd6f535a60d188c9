//! The outbound listener: the app's plain HTTP/1.1 or h2c calls to mesh services, addressed by
//! `Host`/`:authority` or in absolute form (`HTTP_PROXY`), forwarded over pooled HTTP/2 + mTLS
//! to a peer sidecar.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::balance::OutlierEvent;
use crate::breaker::Breaker;
use crate::config::{Config, Limits, ORIG_PROTO_HEADER, PEER_IDENTITY_HEADER};
use crate::error::ProxyError;
use crate::headers::{
    append_forwarded, is_upgrade, request_authority, request_host, strip_hop_by_hop,
};
use crate::identity::IdentityStore;
use crate::metrics::{ConnectionGuard, Metrics, OUTBOUND, UNKNOWN_SERVICE};
use crate::pool::PeerPool;
use crate::route::{Choice, Route, RouteTable};
use crate::server::{accept_loop, http_builder, serve_connection, Activity, ConnTimeouts};
use crate::snapshot::Endpoint;
use crate::{drain, upgrade, ResponseBody};

/// Plain HTTP/1.1 to destinations outside the mesh, pooled by endpoint address.
type ExternalClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Incoming,
>;

pub struct Outbound {
    external: ExternalClient,
    routes: Arc<ArcSwap<RouteTable>>,
    pool: Arc<PeerPool>,
    tls: IdentityStore,
    metrics: Arc<Metrics>,
    limits: Limits,
    connect_timeout: Duration,
    request_timeout: Duration,
    unknown: Arc<String>,
}

// === impl Outbound ===

impl Outbound {
    pub fn new(
        config: &Config,
        routes: Arc<ArcSwap<RouteTable>>,
        pool: Arc<PeerPool>,
        tls: IdentityStore,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeouts.connect));
        connector.set_nodelay(true);
        let external =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .set_host(false)
                .build(connector);
        Self {
            external,
            routes,
            pool,
            tls,
            metrics,
            limits: config.limits.clone(),
            connect_timeout: config.timeouts.connect,
            request_timeout: config.timeouts.request,
            unknown: Arc::new(UNKNOWN_SERVICE.to_string()),
        }
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: drain::Watcher) {
        let builder = Arc::new(http_builder(&self.limits));
        let max = self.limits.max_connections;
        accept_loop(listener, max, drain, OUTBOUND, move |tcp, client, drain| {
            let this = self.clone();
            let builder = builder.clone();
            async move {
                let _conn = ConnectionGuard::new(&this.metrics, OUTBOUND);
                let activity = Activity::new();
                let timeouts = ConnTimeouts::from(&this.limits);
                let act = activity.clone();
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    let guard = act.begin();
                    async move {
                        let resp = this.handle(req, client).await;
                        drop(guard);
                        Ok::<_, Infallible>(resp)
                    }
                });
                serve_connection(&builder, tcp, svc, activity, timeouts, &drain).await;
            }
        })
        .await;
    }

    async fn handle(&self, req: Request<Incoming>, client: SocketAddr) -> Response<ResponseBody> {
        let start = Instant::now();
        let (service, result) = self.route(req, client).await;
        let resp = result.unwrap_or_else(|e| {
            self.metrics.proxy_error(OUTBOUND, e.cause());
            tracing::debug!(error = %e, cause = e.cause(), "outbound request failed");
            e.into_response()
        });
        self.metrics.record_request(
            OUTBOUND,
            &service,
            resp.status().as_u16(),
            start.elapsed().as_secs_f64(),
        );
        resp
    }

    /// Pick the destination and forward; returns the service label with the outcome.
    async fn route(
        &self,
        req: Request<Incoming>,
        client: SocketAddr,
    ) -> (Arc<String>, Result<Response<ResponseBody>, ProxyError>) {
        let Some(host) = request_host(&req) else {
            return (self.unknown.clone(), Err(ProxyError::MissingAuthority));
        };
        let table = self.routes.load();
        let Some(route) = table.route(host).cloned() else {
            return (
                self.unknown.clone(),
                Err(ProxyError::UnknownService(host.to_string())),
            );
        };
        drop(table);
        let result = self.forward(&route, req, client).await;
        (route.service.name.clone(), result)
    }

    async fn forward(
        &self,
        route: &Route,
        mut req: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let svc = &route.service;
        let ip = client.ip();
        let overflow = |breaker: Breaker| {
            self.metrics.outlier_event(&svc.name, breaker.label());
            ProxyError::BreakerOpen {
                service: svc.name.to_string(),
                breaker,
            }
        };
        // Held until the response headers arrive (or the request fails).
        let _request = route
            .counters
            .request(route.max_requests)
            .ok_or_else(|| overflow(Breaker::MaxRequests))?;
        let mut i = self.choose(route, &req, ip, None)?;
        let ep = &svc.endpoints[i];
        let connect_timeout = svc.connect_timeout.unwrap_or(self.connect_timeout);
        let request_timeout = svc.request_timeout.unwrap_or(self.request_timeout);
        let authority = request_authority(&req).ok_or(ProxyError::MissingAuthority)?;

        let headers = req.headers_mut();
        // The app must not be able to claim an identity; only the far side sets this header.
        headers.remove(PEER_IDENTITY_HEADER);
        headers.remove(ORIG_PROTO_HEADER);
        append_forwarded(headers, client.ip(), "http");

        if let Some(host) = &svc.external_host {
            let result = self.forward_external(ep, host, req, request_timeout).await;
            self.outcome(route, i, result.as_ref().map(|r| r.status().as_u16()));
            return result;
        }

        if is_upgrade(&req) {
            let tls = self.tls.load_full();
            return upgrade::outbound(
                &tls,
                ep,
                req,
                &authority,
                connect_timeout,
                request_timeout,
                &self.metrics,
            )
            .await;
        }

        let orig = req.version();
        let headers = req.headers_mut();
        strip_hop_by_hop(headers, false);
        headers.remove(header::HOST);
        if orig != Version::HTTP_2 {
            let v = if orig == Version::HTTP_10 {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            headers.insert(ORIG_PROTO_HEADER, HeaderValue::from_static(v));
        }
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        *req.uri_mut() = Uri::builder()
            .scheme("https")
            .authority(authority.as_str())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::MissingAuthority)?;
        *req.version_mut() = Version::HTTP_2;

        // Connect first: a connect-level failure leaves the request untouched, so it can go to
        // another endpoint whatever its method (the failed peer never saw it).
        let pending = route
            .counters
            .pending(route.max_pending)
            .ok_or_else(|| overflow(Breaker::MaxPending))?;
        let sender = match self.pool.get(ep, connect_timeout).await {
            Ok(sender) => sender,
            Err(e) => {
                self.outcome(route, i, Err(&e));
                let j = match self.choose(route, &req, ip, Some(i)) {
                    Ok(j) if j != i => j,
                    _ => return Err(e),
                };
                i = j;
                match self.pool.get(&svc.endpoints[j], connect_timeout).await {
                    Ok(sender) => sender,
                    Err(e) => {
                        self.outcome(route, j, Err(&e));
                        return Err(e);
                    }
                }
            }
        };
        drop(pending);
        let ep = &svc.endpoints[i];
        let stats = &route.stats[i];
        // Counted in flight (least request, peak-EWMA) until the response headers arrive.
        let _in_flight = stats.start();
        let started = std::time::Instant::now();
        let result = self
            .send(ep, sender, req, connect_timeout, request_timeout)
            .await;
        stats.observe_rtt(started.elapsed());
        self.outcome(route, i, result.as_ref().map(|r| r.status().as_u16()));
        let mut resp = result?;
        strip_hop_by_hop(resp.headers_mut(), false);
        Ok(resp.map(Either::Left))
    }

    /// A destination outside the mesh: HTTP/1.1 to one of its DNS records, `Host` set to the
    /// external host. No mTLS and no identity: the far end is not a mesh member.
    async fn forward_external(
        &self,
        ep: &Endpoint,
        host: &str,
        mut req: Request<Incoming>,
        request_timeout: Duration,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        strip_hop_by_hop(req.headers_mut(), false);
        if let Ok(h) = HeaderValue::from_str(host) {
            req.headers_mut().insert(header::HOST, h);
        }
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(ep.addr.to_string())
            .path_and_query(pq)
            .build()
            .map_err(|_| ProxyError::MissingAuthority)?;
        *req.version_mut() = Version::HTTP_11;
        let mut resp = tokio::time::timeout(request_timeout, self.external.request(req))
            .await
            .map_err(|_| ProxyError::ResponseTimeout {
                addr: ep.addr,
                timeout: request_timeout,
            })?
            .map_err(|e| {
                if e.is_connect() {
                    ProxyError::Connect {
                        addr: ep.addr,
                        source: std::io::Error::other(error_chain(&e)),
                    }
                } else {
                    ProxyError::Upstream {
                        addr: ep.addr,
                        message: error_chain(&e),
                    }
                }
            })?;
        strip_hop_by_hop(resp.headers_mut(), false);
        Ok(resp.map(Either::Left))
    }

    /// Send on the pooled connection. If the connection turns out to be closing before the
    /// request was written (a GOAWAY race), the request is unsent and is retried once on a
    /// fresh connection: this is safe for any method because the peer never saw it.
    async fn send(
        &self,
        ep: &Endpoint,
        mut send: hyper::client::conn::http2::SendRequest<Incoming>,
        req: Request<Incoming>,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        let attempt = async {
            match send.try_send_request(req).await {
                Ok(resp) => Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(req) => {
                        self.pool.invalidate(ep);
                        let mut send = self.pool.get(ep, connect_timeout).await?;
                        send.send_request(req).await.map_err(|e| upstream(ep, &e))
                    }
                    None => Err(upstream(ep, e.error())),
                },
            }
        };
        tokio::time::timeout(request_timeout, attempt)
            .await
            .map_err(|_| ProxyError::ResponseTimeout {
                addr: ep.addr,
                timeout: request_timeout,
            })?
    }
}

// === outlier detection hooks ===

impl Outbound {
    /// Choose an endpoint or say why there is none.
    fn choose<B>(
        &self,
        route: &Route,
        req: &Request<B>,
        ip: std::net::IpAddr,
        exclude: Option<usize>,
    ) -> Result<usize, ProxyError> {
        let name = &route.service.name;
        match route.choose(req, ip, exclude) {
            Choice::Endpoint(i) => Ok(i),
            Choice::Panic(i) => {
                self.metrics.outlier_event(name, "panic_routing");
                tracing::debug!(service = %name, "every endpoint is ejected: routing anyway (when_all_ejected: ignore_ejections)");
                Ok(i)
            }
            Choice::NoEndpoints => Err(ProxyError::NoEndpoints(name.to_string())),
            Choice::AllEjected => Err(ProxyError::AllEjected(name.to_string())),
        }
    }

    /// Feed a result (status, or the sidecar's own error) to outlier detection; log and count
    /// state changes. Failures: connect/TLS/handshake errors, resets, timeouts and 5xx.
    fn outcome(&self, route: &Route, i: usize, result: Result<u16, &ProxyError>) {
        let success = matches!(result, Ok(status) if status < 500);
        let name = &route.service.name;
        match route.record(i, success) {
            OutlierEvent::None => {}
            OutlierEvent::Ejected(d) => {
                self.metrics.outlier_event(name, "ejected");
                let endpoint = route.service.endpoints.get(i).map(|e| e.addr);
                tracing::warn!(service = %name, endpoint = ?endpoint, ejected_for = ?d, "endpoint ejected after consecutive failures");
            }
            OutlierEvent::Readmitted => {
                self.metrics.outlier_event(name, "readmitted");
                let endpoint = route.service.endpoints.get(i).map(|e| e.addr);
                tracing::info!(service = %name, endpoint = ?endpoint, "endpoint re-admitted after a successful probe");
            }
        }
    }
}

fn upstream(ep: &Endpoint, e: &hyper::Error) -> ProxyError {
    ProxyError::Upstream {
        addr: ep.addr,
        message: error_chain(e),
    }
}

/// An error and its sources, joined: hyper's top-level messages alone are often vague.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}
