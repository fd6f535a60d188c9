//! `mesh-agent api public`: the APIs an ingress gateway exposes, as its consumers see them.
//!
//! Reads the `HTTPRoute` and `AuthenticationPolicy` policies and the latest stored document of
//! every service from etcd, and prints the public view `trellis_policies::public_apis` builds:
//! one service's document, or one combined document for the whole gateway. A policy value that
//! does not parse is named on stderr and left out; the rest is still shown.

use std::collections::BTreeSet;

use etcd_client::GetOptions;
use serde_json::Value;
use trellis_policies::{
    combined_public_api, public_apis, AuthenticationSpec, Gateway, HttpRouteSpec, Policy,
    PolicyDocument, PublicApi, RouteInput, SpecInput,
};

use crate::api::{document, entries_with, entry, ApiError};
use crate::config::EtcdConfig;
use crate::etcd::keys::Keys;
use crate::etcd::Etcd;

/// What `api public` was asked for.
pub struct Request<'a> {
    pub gateway: &'a str,
    pub public_url: Option<&'a str>,
    /// One service's document instead of the combined one.
    pub service: Option<&'a str>,
    pub title: &'a str,
}

/// The routes and the gateway's authentication policies stored in etcd.
struct Policies {
    routes: Vec<(String, HttpRouteSpec)>,
    auth: Vec<AuthenticationSpec>,
}

/// The public document(s) as pretty JSON, and notes on what could not be shown.
pub async fn public(
    cfg: &EtcdConfig,
    req: &Request<'_>,
) -> Result<(String, Vec<String>), ApiError> {
    let etcd = Etcd::connect(cfg).await?;
    let keys = Keys::new(&cfg.prefix);
    let mut view = view(&etcd, &keys, req).await?;
    let doc = match req.service {
        Some(service) => match view.apis.into_iter().next() {
            Some(api) => api.document,
            None => {
                return Err(ApiError::NotPublic(
                    service.to_string(),
                    req.gateway.to_string(),
                ))
            }
        },
        None => {
            let (doc, skipped) = combined(req, &view.apis);
            view.notes.extend(skipped);
            doc
        }
    };
    Ok((serde_json::to_string_pretty(&doc)? + "\n", view.notes))
}

/// The public APIs of a gateway, and notes on what could not be shown.
pub struct View {
    pub apis: Vec<PublicApi>,
    pub notes: Vec<String>,
}

/// The public view as etcd holds it now: its routes and authentication, and the latest
/// stored document of every service (of `req.service` only, when set).
pub async fn view(etcd: &Etcd, keys: &Keys, req: &Request<'_>) -> Result<View, ApiError> {
    let (policies, mut notes) = policies(etcd, keys, req.gateway).await?;
    let services: BTreeSet<String> = index(etcd, keys).await?;
    if let Some(s) = req.service.filter(|s| !services.contains(*s)) {
        return Err(ApiError::NotFound(s.to_string()));
    }
    let mut docs = Vec::new();
    for service in services
        .iter()
        .filter(|s| req.service.is_none_or(|x| x == *s))
    {
        let e = entry(etcd, keys, service, None).await?;
        docs.push((
            e.version.clone(),
            service.clone(),
            document(etcd, keys, &e).await?,
        ));
    }
    let gateway = gateway(req, &policies.auth);
    let routes: Vec<RouteInput> = policies
        .routes
        .iter()
        .map(|(name, spec)| RouteInput { name, spec })
        .collect();
    let specs: Vec<SpecInput> = docs
        .iter()
        .map(|(version, service, doc)| SpecInput {
            service,
            version,
            doc,
        })
        .collect();
    let apis = public_apis(&gateway, &routes, &specs);
    for api in &apis {
        notes.extend(api.skipped.iter().map(|s| format!("{}: {s}", api.service)));
    }
    Ok(View { apis, notes })
}

/// The public document of `service` at each of `versions`, as today's routes and
/// authentication show it (`None` where the gateway exposes nothing of that version): what the
/// portal's changelog compares, so that it names the paths consumers call and never an
/// unpublished one.
pub async fn public_versions(
    etcd: &Etcd,
    keys: &Keys,
    req: &Request<'_>,
    service: &str,
    versions: &[&str],
) -> Result<Vec<Option<Value>>, ApiError> {
    let (policies, _) = policies(etcd, keys, req.gateway).await?;
    let gateway = gateway(req, &policies.auth);
    let routes: Vec<RouteInput> = policies
        .routes
        .iter()
        .map(|(name, spec)| RouteInput { name, spec })
        .collect();
    let mut out = Vec::new();
    for version in versions {
        let e = entry(etcd, keys, service, Some(version)).await?;
        let doc = document(etcd, keys, &e).await?;
        let spec = SpecInput {
            service,
            version,
            doc: &doc,
        };
        let api = public_apis(&gateway, &routes, &[spec]).into_iter().next();
        out.push(api.map(|a| a.document));
    }
    Ok(out)
}

/// The combined document of `apis`, and what it could not show.
pub fn combined(req: &Request<'_>, apis: &[PublicApi]) -> (Value, Vec<String>) {
    combined_public_api(&gateway(req, &[]), req.title, apis)
}

fn gateway<'a>(req: &Request<'a>, auth: &'a [AuthenticationSpec]) -> Gateway<'a> {
    Gateway {
        name: req.gateway,
        public_url: req.public_url,
        auth: auth.iter().collect(),
    }
}

/// The services with a stored document.
async fn index(etcd: &Etcd, keys: &Keys) -> Result<BTreeSet<String>, ApiError> {
    Ok(entries_with(etcd, keys)
        .await?
        .into_iter()
        .map(|e| e.service)
        .collect())
}

/// Every `HTTPRoute` stored; notes name the policy values that could not be read.
pub(crate) async fn routes(
    etcd: &Etcd,
    keys: &Keys,
) -> Result<(Vec<(String, HttpRouteSpec)>, Vec<String>), ApiError> {
    let (p, notes) = policies(etcd, keys, "").await?;
    Ok((p.routes, notes))
}

/// Every `HTTPRoute`, and the `AuthenticationPolicy`s of `gateway`; notes name the values
/// that could not be read.
async fn policies(
    etcd: &Etcd,
    keys: &Keys,
    gateway: &str,
) -> Result<(Policies, Vec<String>), ApiError> {
    let mut client = etcd.client.clone();
    let prefix = keys.policies();
    let resp = etcd
        .call(client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())))
        .await?;
    let mut out = Policies {
        routes: Vec::new(),
        auth: Vec::new(),
    };
    let mut notes = Vec::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let policy = serde_json::from_slice::<PolicyDocument>(kv.value())
            .map_err(|e| e.to_string())
            .and_then(|d| d.validate().map_err(|e| e.to_string()));
        match policy {
            Ok(Policy::HttpRoute { name, spec }) => out.routes.push((name, *spec)),
            Ok(Policy::Authentication { spec, .. }) if spec.service == gateway => {
                out.auth.push(spec)
            }
            Ok(_) => {}
            Err(e) => notes.push(format!("etcd key {key} left out: {e}")),
        }
    }
    Ok((out, notes))
}
