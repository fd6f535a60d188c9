//! Background revalidation (`stale-while-revalidate`, RFC 5861 section 3): the stale entry
//! answers at once, and a conditional GET to the origin, sent by a task of its own, refreshes
//! or replaces it. One at a time per key (the coalescing leader's slot), so a burst of stale
//! hits sends one request. A new body is stored as it arrives, like a miss's: in memory, or on
//! the disk tier when it is too large for memory.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use trellis_policies::CachePolicySpec;

use super::coalesce::Leader;
use super::store::{Entry, Store};
use super::tee::{Pending, Tee};
use super::{CacheError, PurgeCheck};

type Sent = Pin<Box<dyn Future<Output = Result<Response<Incoming>, String>> + Send>>;

/// Sends a revalidation request to the origin.
pub type Revalidator = Arc<dyn Fn(Request<Empty<Bytes>>) -> Sent + Send + Sync>;

/// A revalidator that sends to the local app over HTTP/1.1 (what every app the inbound
/// listener reaches speaks, in `auto` mode too), within `timeout`.
pub fn app_revalidator(app: SocketAddr, timeout: Duration) -> Revalidator {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    Arc::new(move |mut req| {
        let client = client.clone();
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let uri = format!("http://{app}{path}").parse::<http::Uri>();
        Box::pin(async move {
            *req.uri_mut() = uri.map_err(|e| e.to_string())?;
            match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no response within {timeout:?}")),
            }
        })
    })
}

pub(super) struct Job {
    pub request: Request<Empty<Bytes>>,
    pub stored: Arc<Entry>,
    pub store: Arc<Store>,
    pub primary: Arc<str>,
    /// Its hash ([`super::store::Store::hash`]).
    pub hash: u64,
    pub spec: CachePolicySpec,
    pub resource: super::key::Resource,
    pub leader: Leader,
    /// A purge since the job started wins over its response.
    pub purged: PurgeCheck,
}

// === impl Job ===

impl Job {
    pub async fn run(self, send: Revalidator) {
        let uri = self.request.uri().to_string();
        if let Err(e) = self.revalidate(send).await {
            let CacheError::Revalidation { message, .. } = &e;
            tracing::debug!(%uri, %message, "background revalidation failed; the stale entry stays until its windows end");
        }
    }

    async fn revalidate(self, send: Revalidator) -> Result<(), CacheError> {
        let uri = self.request.uri().to_string();
        let fail = |message: String| CacheError::Revalidation {
            uri: uri.clone(),
            message,
        };
        // The headers kept whatever the store has seen: a background revalidation is rare.
        let cc = super::control::CacheControl::parse(self.request.headers());
        let authorization = self
            .request
            .headers()
            .contains_key(http::header::AUTHORIZATION);
        let fetch = super::entry::Fetch::start(&self.request, &cc, true, authorization);
        let resp = send(self.request).await.map_err(fail)?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            let fresh = self
                .stored
                .refreshed(resp.headers(), fetch.requested, &self.spec);
            if !self.purged.selects(&fresh) {
                self.store.insert_hashed(
                    self.primary,
                    self.hash,
                    fetch.headers.as_ref(),
                    Arc::new(fresh),
                );
            }
            return Ok(());
        }
        let Ok(built) = fetch.entry(&resp, &self.spec, self.resource.clone()) else {
            // Not storable now: the stale entry ends with its windows.
            return Ok(());
        };
        let (entry, expected) = (built.entry, built.expected);
        let tee = match expected.filter(|n| *n > self.spec.max_object_bytes) {
            // Too large for memory: written to the disk tier as it arrives, if there is one.
            Some(n) => {
                let disk = self.store.disk();
                let key =
                    super::key::variant_of(&self.primary, fetch.headers.as_ref(), &entry.vary);
                let sink = disk.zip(key).and_then(|(disk, key)| {
                    let leader = Some(self.leader);
                    disk.tee(
                        key,
                        self.primary.len(),
                        entry,
                        fetch.started,
                        leader,
                        Some(n),
                    )
                });
                match sink {
                    Some(sink) => Tee::to_disk(sink),
                    None => return Ok(()),
                }
            }
            None => {
                let limit = usize::try_from(self.spec.max_object_bytes).unwrap_or(usize::MAX);
                let pending = Pending {
                    store: self.store,
                    primary: self.primary,
                    hash: self.hash,
                    req_headers: fetch.headers,
                    entry,
                    purged: self.purged,
                    started: fetch.started,
                    _leader: Some(self.leader),
                };
                Tee::new(
                    pending,
                    limit,
                    expected.and_then(|n| usize::try_from(n).ok()),
                    built.body,
                )
            }
        };
        pump(resp.into_body(), tee).await.map_err(fail)
    }
}

/// Copy a body into `tee` as it arrives: stored only if it ends cleanly, whole (a body that
/// fails drops the tee, which stores nothing).
async fn pump(mut body: Incoming, mut tee: Box<Tee>) -> Result<(), String> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
            tee.data(&data);
        }
    }
    tee.finish();
    Ok(())
}
