//! What a signed-in consumer does: manage its API keys (each shown once, stored as a digest
//! in its `Consumer` policy), read its usage, try an API; and what anyone may read: an API's
//! versions and the changes between two of them.

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_proxy::listeners::ingress::portal::AppRequest;

use super::auth::Inner;
use super::relay::{KeyIn, Target, TryRequest};
use super::{body, consumer, error, json_response};
use crate::policy::PolicyError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    label: String,
}

macro_rules! signed_in {
    ($inner:expr, $req:expr, $csrf:expr) => {
        match $inner.account($req, $csrf).await {
            Ok(x) => x,
            Err(resp) => return *resp,
        }
    };
}

pub async fn list_keys(inner: &Inner, req: &AppRequest) -> Response<Bytes> {
    let (_, account) = signed_in!(inner, req, false);
    match consumer::read(inner.store.cfg(), &account.consumer).await {
        Ok(spec) => {
            let spec = spec.unwrap_or_default();
            let keys: Vec<Value> = spec.api_keys.iter().map(|k| json!({"id": k.id})).collect();
            let quota = spec
                .quota
                .map(|q| json!({"limit": q.limit, "burst": q.burst}));
            json_response(
                StatusCode::OK,
                &json!({"consumer": account.consumer, "keys": keys, "quota": quota, "disabled": spec.disabled}),
            )
        }
        Err(e) => policy_error(&e),
    }
}

pub async fn create_key(inner: &Inner, req: &AppRequest) -> Response<Bytes> {
    let (_, account) = signed_in!(inner, req, true);
    let label = match body::<NewKey>(req).map(|k| k.label) {
        Ok(l) => l,
        Err(resp) => return *resp,
    };
    if label.is_empty()
        || label.len() > 40
        || !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return error(StatusCode::BAD_REQUEST, "label: 1 to 40 of a-z, 0-9 and -");
    }
    let (key, digest) = match crate::apikey::generate() {
        Ok(k) => k,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let author = format!("portal:{}", account.email);
    let res = consumer::update(inner.store.cfg(), &account.consumer, &author, |spec| {
        consumer::add(spec, &label, &digest)
    })
    .await;
    shown_once(res, &label, key, StatusCode::CREATED)
}

pub async fn rotate_key(inner: &Inner, req: &AppRequest, id: &str) -> Response<Bytes> {
    let (_, account) = signed_in!(inner, req, true);
    let (key, digest) = match crate::apikey::generate() {
        Ok(k) => k,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let author = format!("portal:{}", account.email);
    let res = consumer::update(inner.store.cfg(), &account.consumer, &author, |spec| {
        consumer::rotate(spec, id, &digest)
    })
    .await;
    shown_once(res, id, key, StatusCode::OK)
}

pub async fn revoke_key(inner: &Inner, req: &AppRequest, id: &str) -> Response<Bytes> {
    let (_, account) = signed_in!(inner, req, true);
    let author = format!("portal:{}", account.email);
    let res = consumer::update(inner.store.cfg(), &account.consumer, &author, |spec| {
        consumer::revoke(spec, id)
    })
    .await;
    match res {
        Ok(()) => {
            tracing::info!(consumer = %account.consumer, key = %id, "portal: key revoked");
            json_response(StatusCode::OK, &json!({"revoked": id}))
        }
        Err(e) => policy_error(&e),
    }
}

/// The key itself, in this answer only: the mesh keeps its digest.
fn shown_once(
    res: Result<(), PolicyError>,
    id: &str,
    key: String,
    status: StatusCode,
) -> Response<Bytes> {
    match res {
        Ok(()) => {
            tracing::info!(key = %id, "portal: key issued");
            json_response(
                status,
                &json!({"id": id, "key": key,
                        "note": "shown once: the mesh stores only its SHA-256 digest"}),
            )
        }
        Err(e) => policy_error(&e),
    }
}

fn policy_error(e: &PolicyError) -> Response<Bytes> {
    match e {
        PolicyError::Invalid(m) => error(StatusCode::BAD_REQUEST, &m.join("; ")),
        PolicyError::NotFound(what) => error(StatusCode::NOT_FOUND, &format!("{what} not found")),
        PolicyError::Conflict(_) => error(StatusCode::CONFLICT, "changed meanwhile; try again"),
        other => super::auth::unavailable(other),
    }
}

/// The account's requests per day and route, as the ingress replicas recorded them.
pub async fn usage(inner: &Inner, req: &AppRequest) -> Response<Bytes> {
    let (_, account) = signed_in!(inner, req, false);
    let days = match super::usage::read(&inner.store, &account.consumer).await {
        Ok(d) => d,
        Err(e) => return super::auth::unavailable(&e),
    };
    let quota = match consumer::read(inner.store.cfg(), &account.consumer).await {
        Ok(spec) => spec
            .and_then(|s| s.quota)
            .map(|q| json!({"limit": q.limit, "burst": q.burst})),
        Err(e) => return policy_error(&e),
    };
    json_response(
        StatusCode::OK,
        &json!({"consumer": account.consumer, "days": days, "quota": quota}),
    )
}

/// Try-it-out: the request goes through this ingress with the key the page holds.
pub async fn try_it(inner: &Inner, req: &AppRequest) -> Response<Bytes> {
    let (_, account) = signed_in!(inner, req, true);
    let t: TryRequest = match body(req) {
        Ok(t) => t,
        Err(resp) => return *resp,
    };
    let doc = inner.docs.docs.load().apis.get(&t.service).cloned();
    let Some(doc) = doc.and_then(|d| serde_json::from_slice::<Value>(&d).ok()) else {
        return error(StatusCode::NOT_FOUND, "no such public API");
    };
    let target = match target(&doc) {
        Ok(t) => t,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m),
    };
    tracing::info!(consumer = %account.consumer, service = %t.service, "portal: try-it-out");
    match inner.relay.send(&target, &t).await {
        Ok(r) => json_response(StatusCode::OK, &json!(r)),
        Err(super::relay::RelayError::Bad(m)) => error(StatusCode::BAD_REQUEST, &m),
        Err(e) => error(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

/// The API's host and base path (its first server) and where its key goes (its API-key
/// security scheme; `x-api-key` when it declares none).
fn target(doc: &Value) -> Result<Target, String> {
    let url = doc
        .pointer("/servers/0/url")
        .and_then(Value::as_str)
        .ok_or("the API names no server")?;
    let uri: http::Uri = url.parse().map_err(|e| format!("server `{url}`: {e}"))?;
    let host = uri.host().ok_or(format!("server `{url}` has no host"))?;
    let scheme = doc
        .pointer("/components/securitySchemes")
        .and_then(Value::as_object)
        .and_then(|m| m.values().find(|s| s["type"] == "apiKey"));
    let name = scheme
        .and_then(|s| s["name"].as_str())
        .unwrap_or("x-api-key")
        .to_string();
    let key_in = match scheme.and_then(|s| s["in"].as_str()) {
        Some("query") => KeyIn::Query(name),
        _ => KeyIn::Header(name),
    };
    Ok(Target {
        host: host.to_string(),
        base: uri.path().to_string(),
        key_in,
    })
}

/// Only the APIs the portal publishes have versions and changelogs here.
fn published(inner: &Inner, service: &str) -> bool {
    inner.docs.docs.load().apis.contains_key(service)
}

pub async fn versions(inner: &Inner, service: &str) -> Response<Bytes> {
    if !published(inner, service) {
        return error(StatusCode::NOT_FOUND, "no such public API");
    }
    match crate::api::entries(inner.store.cfg()).await {
        Ok(entries) => {
            let v: Vec<Value> = entries
                .iter()
                .filter(|e| e.service == service)
                .map(|e| json!({"version": e.version, "title": e.title, "info_version": e.info_version}))
                .collect();
            json_response(StatusCode::OK, &json!(v))
        }
        Err(e) => super::auth::unavailable(&e),
    }
}

/// One version's public document (the reference page's version picker).
pub async fn version_document(inner: &Inner, service: &str, version: &str) -> Response<Bytes> {
    if !published(inner, service) {
        return error(StatusCode::NOT_FOUND, "no such public API");
    }
    match public_versions(inner, service, &[version]).await {
        Ok(docs) => match docs.into_iter().next().flatten() {
            Some(doc) => json_response(StatusCode::OK, &doc),
            None => error(
                StatusCode::NOT_FOUND,
                "a version this gateway does not publish",
            ),
        },
        Err(crate::api::ApiError::NotFound(what)) => {
            error(StatusCode::NOT_FOUND, &format!("{what} not found"))
        }
        Err(e) => super::auth::unavailable(&e),
    }
}

/// `?from=v1&to=v2`: the changes, breaking ones first and flagged.
pub async fn changelog(inner: &Inner, service: &str, query: &str) -> Response<Bytes> {
    if !published(inner, service) {
        return error(StatusCode::NOT_FOUND, "no such public API");
    }
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let (Some(from), Some(to)) = (param("from"), param("to")) else {
        return error(StatusCode::BAD_REQUEST, "set ?from=VERSION&to=VERSION");
    };
    let changes = match public_versions(inner, service, &[&from, &to]).await {
        Ok(docs) => match docs.as_slice() {
            [Some(old), Some(new)] => trellis_policies::diff_api(old, new),
            _ => {
                return error(
                    StatusCode::NOT_FOUND,
                    "a version this gateway does not publish",
                )
            }
        },
        Err(crate::api::ApiError::NotFound(what)) => {
            return error(StatusCode::NOT_FOUND, &format!("{what} not found"))
        }
        Err(e) => return super::auth::unavailable(&e),
    };
    json_response(
        StatusCode::OK,
        &json!({"service": service, "from": from, "to": to,
                "breaking": changes.iter().filter(|c| c.breaking).count(),
                "changes": changes.iter().map(|c| json!({
                    "kind": c.kind.as_str(), "breaking": c.breaking,
                    "location": c.location, "detail": c.detail})).collect::<Vec<_>>()}),
    )
}

/// `versions` of `service` as this gateway publishes them.
async fn public_versions(
    inner: &Inner,
    service: &str,
    versions: &[&str],
) -> Result<Vec<Option<Value>>, crate::api::ApiError> {
    let cfg = inner.store.cfg();
    let etcd = crate::etcd::Etcd::connect(cfg).await?;
    let keys = crate::etcd::keys::Keys::new(&cfg.prefix);
    let req = crate::api_public::Request {
        gateway: &inner.gateway,
        public_url: inner.public_url.as_deref(),
        service: Some(service),
        title: "",
    };
    crate::api_public::public_versions(&etcd, &keys, &req, service, versions).await
}
