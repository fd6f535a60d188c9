//! The developer portal's pages and account API, served by every ingress with a `portal` on
//! the portal's host (docs/portal.md). The data plane hands requests here through
//! [`trellis_proxy::listeners::ingress::portal::PortalApp`]: this side has etcd, where the
//! accounts, invites and the session secret live, so any replica serves any consumer and
//! there is no portal server to run.
//!
//! - pages: `/` (one page, its views by `#/...`), `/assets/*`;
//! - `/portal/api/*`: sign-up, sign-in, the account's API keys, usage, try-it-out, versions
//!   and changelogs (JSON).

pub mod admin;
mod api;
mod auth;
mod consumer;
mod pages;
mod relay;
mod session;
pub mod store;
mod throttle;
pub mod usage;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use trellis_proxy::config::{PortalConfig, ServerCertificate};
use trellis_proxy::listeners::ingress::portal::{AppFuture, AppRequest, PortalDocs};

pub use relay::Relay;

/// Labels of the portal's counters: what happened, in a few fixed words.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

/// `trellis_portal_signins_total{outcome}` and `trellis_portal_refusals_total{outcome}`.
#[derive(Clone, Default)]
pub struct PortalMetrics {
    signins: Family<OutcomeLabels, Counter>,
    refusals: Family<OutcomeLabels, Counter>,
}

// === impl PortalMetrics ===

impl PortalMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "portal_signins",
            "Portal sign-in attempts by outcome (ok, wrong_password, throttled, pending, suspended)",
            m.signins.clone(),
        );
        registry.register(
            "portal_refusals",
            "Portal requests refused by reason (csrf, session, origin, invite, body, throttled)",
            m.refusals.clone(),
        );
        m
    }

    fn signin(&self, outcome: &'static str) {
        self.signins.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    fn refused(&self, outcome: &'static str) {
        self.refusals
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }
}

/// Everything the portal's app needs, built by the agent once the ingress is bound.
pub struct Settings {
    pub etcd: crate::etcd::Connector,
    /// This gateway's service name (the public view's routes are those bound to it).
    pub gateway: String,
    pub portal: PortalConfig,
    pub docs: PortalDocs,
    pub metrics: PortalMetrics,
    /// The ingress TLS listener, for try-it-out.
    pub ingress: std::net::SocketAddr,
    pub certificates: Vec<ServerCertificate>,
}

/// Install the portal's app on the ingress; the usage ledger this replica must run.
pub fn start(s: Settings, admin: std::net::SocketAddr) -> usage::Ledger {
    let store = store::Store::new(s.etcd.clone());
    let docs = s.docs.clone();
    if docs.app.set(Arc::new(PortalApp::new(s))).is_err() {
        tracing::warn!("portal: an app was already installed");
    }
    let mut id = [0u8; 6];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
    usage::Ledger {
        store,
        admin,
        replica: id.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

/// The portal's app; cheap to clone (one shared state).
#[derive(Clone)]
pub struct PortalApp(Arc<auth::Inner>);

// === impl PortalApp ===

impl PortalApp {
    pub fn new(s: Settings) -> Self {
        Self(Arc::new(auth::Inner::new(s)))
    }

    async fn route(&self, req: AppRequest) -> Response<Bytes> {
        let path = req.uri.path().to_string();
        let inner = &self.0;
        if req.method != Method::GET && req.method != Method::HEAD {
            if let Err(resp) = inner.check_origin(&req) {
                return *resp;
            }
        }
        let Some(api) = path.strip_prefix("/portal/api/") else {
            return pages::serve(&req.method, &path);
        };
        let segments: Vec<&str> = api.split('/').collect();
        match (req.method.clone(), segments.as_slice()) {
            (Method::GET, ["me"]) => inner.me(&req).await,
            (Method::POST, ["signup"]) => inner.signup(&req).await,
            (Method::POST, ["signin"]) => inner.signin(&req).await,
            (Method::POST, ["signout"]) => inner.signout(&req).await,
            (Method::GET, ["keys"]) => api::list_keys(inner, &req).await,
            (Method::POST, ["keys"]) => api::create_key(inner, &req).await,
            (Method::POST, ["keys", id, "rotate"]) => api::rotate_key(inner, &req, id).await,
            (Method::DELETE, ["keys", id]) => api::revoke_key(inner, &req, id).await,
            (Method::GET, ["usage"]) => api::usage(inner, &req).await,
            (Method::POST, ["try"]) => api::try_it(inner, &req).await,
            (Method::GET, ["apis", service, "versions"]) => api::versions(inner, service).await,
            (Method::GET, ["apis", service, "versions", version]) => {
                api::version_document(inner, service, version).await
            }
            (Method::GET, ["apis", service, "changelog"]) => {
                api::changelog(inner, service, req.uri.query().unwrap_or("")).await
            }
            _ => error(StatusCode::NOT_FOUND, "no such portal API"),
        }
    }
}

impl trellis_proxy::listeners::ingress::portal::PortalApp for PortalApp {
    fn handle(&self, req: AppRequest) -> AppFuture {
        let me = self.clone();
        Box::pin(async move { me.route(req).await })
    }
}

/// An answer that ends a request early; boxed, as a `Response` is large to move through
/// every `Result` on the way.
pub(crate) type Refusal = Box<Response<Bytes>>;

/// A JSON answer; never cached (it may hold a key shown once, or an account's data).
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(body.to_string()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

pub(crate) fn refuse(status: StatusCode, message: &str) -> Refusal {
    Box::new(error(status, message))
}

pub(crate) fn error(status: StatusCode, message: &str) -> Response<Bytes> {
    json_response(status, &json!({ "error": message }))
}

/// 429 with the seconds to wait.
pub(crate) fn too_many(wait: std::time::Duration) -> Response<Bytes> {
    let secs = wait.as_secs().max(1);
    let mut resp = error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("too many attempts; try again in {secs} s"),
    );
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// The JSON body of a request as `T`, or a 400 naming the problem.
pub(crate) fn body<T: serde::de::DeserializeOwned>(req: &AppRequest) -> Result<T, Refusal> {
    serde_json::from_slice(&req.body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            &format!("the body is not the expected JSON: {e}"),
        )
    })
}
