//! Active health checks. One task per checked service, restarted when a new route table
//! arrives: it walks the service's endpoints one at a time, each at most once per jittered
//! interval, so a sidecar never floods a service (N sidecars x M endpoints / interval checks
//! per second at most). HTTP checks go through the real mesh path (mTLS to the peer sidecar,
//! then the app); TCP checks connect to the peer's inbound listener.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{Either, Full};
use trellis_policies::HealthCheckSpec;

use crate::state::balance::rand::Rng;
use crate::state::pool::PeerPool;
use crate::state::target::{Target, TargetTable};
use crate::telemetry::metrics::Metrics;

/// Running checkers by service, with the route each checks.
#[derive(Default)]
pub struct HealthChecks {
    tasks: HashMap<String, (Arc<Target>, tokio::task::JoinHandle<()>)>,
}

impl HealthChecks {
    /// Replace the checkers with those `table` asks for. A service whose route did not change
    /// keeps its checker (and its place in the walk): an unrelated change elsewhere in the
    /// mesh restarts nothing.
    pub fn update(&mut self, table: &TargetTable, pool: &Arc<PeerPool>, metrics: &Arc<Metrics>) {
        let mut next = HashMap::new();
        for route in table.routes() {
            let Some(spec) = route.service.health_check.clone() else {
                continue;
            };
            if route.service.external_host.is_some() {
                continue;
            }
            let name = route.service.name.to_string();
            if let Some((r, task)) = self.tasks.remove(&name) {
                if Arc::ptr_eq(&r, route) {
                    next.insert(name, (r, task));
                    continue;
                }
                task.abort();
            }
            let task = tokio::spawn(check_loop(
                route.clone(),
                spec,
                pool.clone(),
                metrics.clone(),
            ));
            next.insert(name, (route.clone(), task));
        }
        for (_, (_, task)) in self.tasks.drain() {
            task.abort();
        }
        self.tasks = next;
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for (_, (_, task)) in self.tasks.drain() {
            task.abort();
        }
    }
}

async fn check_loop(
    route: Arc<Target>,
    spec: HealthCheckSpec,
    pool: Arc<PeerPool>,
    metrics: Arc<Metrics>,
) {
    let rng = Rng::new();
    let n = route.stats.len().max(1) as u32;
    loop {
        for i in 0..route.stats.len() {
            // Spread the endpoints over the interval, +-20 % jitter each.
            let slot = spec.interval / n;
            let jitter = slot.as_millis() as u64 / 5;
            let wait = slot.saturating_sub(Duration::from_millis(jitter))
                + Duration::from_millis(if jitter == 0 {
                    0
                } else {
                    rng.next() % (2 * jitter + 1)
                });
            tokio::time::sleep(wait).await;
            let ok = tokio::time::timeout(spec.timeout, check(&route, i, &spec, &pool))
                .await
                .unwrap_or(false);
            let name = &route.service.name;
            if !ok {
                metrics.outlier_event(name, "health_check_failed");
            }
            if let Some(healthy) =
                route.stats[i].record_check(ok, spec.healthy_threshold, spec.unhealthy_threshold)
            {
                let endpoint = route.service.endpoints[i].addr;
                if healthy {
                    metrics.endpoint_event(name, endpoint, "healthy");
                    tracing::info!(service = %name, %endpoint, "endpoint passes health checks again");
                } else {
                    metrics.endpoint_event(name, endpoint, "unhealthy");
                    tracing::warn!(service = %name, %endpoint, "endpoint failed health checks; removed from balancing");
                }
            }
        }
    }
}

async fn check(route: &Target, i: usize, spec: &HealthCheckSpec, pool: &PeerPool) -> bool {
    let ep = &route.service.endpoints[i];
    let Some(path) = &spec.http_path else {
        return tokio::net::TcpStream::connect(ep.addr).await.is_ok();
    };
    let uri = Uri::builder()
        .scheme("https")
        .authority(route.service.name.as_str())
        .path_and_query(path.as_str())
        .build();
    let Ok(uri) = uri else { return false };
    let mut req = Request::new(Either::Right(Full::new(Bytes::new())));
    *req.uri_mut() = uri;
    *req.version_mut() = http::Version::HTTP_2;
    req.headers_mut().insert(
        "user-agent",
        http::HeaderValue::from_static("trellis-health-check"),
    );
    matches!(pool.request(ep, spec.timeout, req).await, Ok(resp) if resp.status().is_success())
}
