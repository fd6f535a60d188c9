//! The mesh's APIs as the outside sees them through one ingress gateway.
//!
//! A service's OpenAPI document describes the paths its app serves. A consumer calls the
//! ingress instead, through the `HTTPRoute`s bound to it, which may match only some of those
//! paths and methods and rewrite them on the way in. This module turns each document into its
//! public form: every path reachable through a route, written as the consumer sends it; the
//! ingress's public URL as the server; the gateway's authentication as security schemes. A
//! service no route of the gateway reaches does not appear: internal APIs stay internal.
//!
//! What cannot be inverted is left out and said so (`skipped`): a path matched by a regex
//! (the public form of a template path cannot be derived from it), and redirect or direct
//! response rules (they reach no backend).
//!
//! Pure: the CLI (`mesh-agent api public`) and the portal call it with what they read.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::access::AuthenticationSpec;
use crate::http_route::{HttpRouteMatch, HttpRouteSpec, Rewrite};

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// One stored API document.
pub struct SpecInput<'a> {
    pub service: &'a str,
    pub version: &'a str,
    pub doc: &'a Value,
}

/// One `HTTPRoute` policy.
pub struct RouteInput<'a> {
    pub name: &'a str,
    pub spec: &'a HttpRouteSpec,
}

/// What the public view is built for.
pub struct Gateway<'a> {
    /// The ingress's service name, as `HTTPRoute.gateways` names it.
    pub name: &'a str,
    /// The URL consumers call (`https://api.example.com`); `https://<route host>` when unset.
    pub public_url: Option<&'a str>,
    /// The gateway's `AuthenticationPolicy`s (those whose `service` is the gateway).
    pub auth: Vec<&'a AuthenticationSpec>,
}

/// One API in its public form.
#[derive(Debug, Clone, PartialEq)]
pub struct PublicApi {
    pub service: String,
    pub version: String,
    pub document: Value,
    /// What could not be shown, and why.
    pub skipped: Vec<String>,
}

/// The public form of every document a route of `gateway` reaches, in input order.
pub fn public_apis(
    gateway: &Gateway,
    routes: &[RouteInput],
    specs: &[SpecInput],
) -> Vec<PublicApi> {
    specs
        .iter()
        .filter_map(|spec| public_api(gateway, routes, spec))
        .collect()
}

/// One document through the gateway's routes; `None` when no route reaches its service.
fn public_api(gateway: &Gateway, routes: &[RouteInput], spec: &SpecInput) -> Option<PublicApi> {
    let internal = spec.doc.get("paths").and_then(Value::as_object)?;
    let mut paths = Map::new();
    let mut hosts = Vec::new();
    let mut skipped = Vec::new();
    let mut reached = false;
    for route in routes.iter().filter(|r| r.spec.binds(gateway.name)) {
        for (i, rule) in route.spec.rules.iter().enumerate() {
            if !rule.backends.iter().any(|b| b.service == spec.service) {
                continue;
            }
            let rule_name = rule.name.clone().unwrap_or(format!("{}-{i}", route.name));
            if rule.redirect.is_some() || rule.direct_response.is_some() {
                continue;
            }
            reached = true;
            hosts.extend(route.spec.hosts.iter().cloned());
            let everything = [HttpRouteMatch::default()];
            let matches = match rule.matches.is_empty() {
                true => &everything[..],
                false => &rule.matches[..],
            };
            for m in matches {
                if m.path.as_ref().is_some_and(|p| p.regex.is_some()) {
                    skipped.push(format!(
                        "rule {rule_name}: a regex path match has no public form to show"
                    ));
                    continue;
                }
                map_paths(internal, m, rule.rewrite.as_ref(), &mut paths, &mut skipped);
            }
        }
    }
    if !reached {
        return None;
    }
    let mut document = spec.doc.clone();
    if let Some(obj) = document.as_object_mut() {
        obj.insert("paths".into(), Value::Object(paths));
        obj.insert("servers".into(), servers(gateway, &hosts));
        apply_security(obj, &gateway.auth);
    }
    Some(PublicApi {
        service: spec.service.to_string(),
        version: spec.version.to_string(),
        document,
        skipped,
    })
}

/// Add the operations of `internal` that `m` (and its rule's `rewrite`) reach, under their
/// public paths.
fn map_paths(
    internal: &Map<String, Value>,
    m: &HttpRouteMatch,
    rewrite: Option<&Rewrite>,
    out: &mut Map<String, Value>,
    skipped: &mut Vec<String>,
) {
    let method = m.method.as_deref().map(str::to_ascii_lowercase);
    for (path, item) in internal {
        let Some(public) = public_path(path, m, rewrite) else {
            continue;
        };
        let Some(item) = item.as_object() else {
            continue;
        };
        let entry = out
            .entry(public.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(entry) = entry.as_object_mut() else {
            continue;
        };
        for (key, value) in item {
            let is_method = METHODS.contains(&key.as_str());
            if is_method && method.as_deref().is_some_and(|m| m != key) {
                continue;
            }
            if is_method && entry.contains_key(key) && entry.get(key) != Some(value) {
                skipped.push(format!(
                    "{} {public}: reached from two internal paths; the first is shown",
                    key.to_ascii_uppercase()
                ));
                continue;
            }
            entry.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    // A path none of whose operations passed the method filter is not public.
    out.retain(|_, item| {
        item.as_object()
            .is_some_and(|o| o.keys().any(|k| METHODS.contains(&k.as_str())))
    });
}

/// The public path under which a consumer reaches `internal` through `m`, if it does.
///
/// Prefixes match whole segments, as the routes do. With `rewrite.path_prefix` the route
/// replaces the matched prefix, so the public path puts it back; with `rewrite.path` every
/// request the match takes reaches one internal path, shown under the match's own path.
pub fn public_path(
    internal: &str,
    m: &HttpRouteMatch,
    rewrite: Option<&Rewrite>,
) -> Option<String> {
    let (exact, prefix) = match &m.path {
        None => (None, "/"),
        Some(p) => match (&p.exact, &p.prefix) {
            (Some(e), _) => (Some(e.as_str()), ""),
            (None, Some(pre)) => (None, pre.as_str()),
            (None, None) => return None,
        },
    };
    let whole = rewrite.and_then(|r| r.path.as_deref());
    let replaced = rewrite.and_then(|r| r.path_prefix.as_deref());
    match (exact, whole, replaced) {
        (Some(e), Some(target), _) => (internal == target).then(|| e.to_string()),
        (Some(e), None, _) => (internal == e).then(|| e.to_string()),
        (None, Some(target), _) => (internal == target).then(|| prefix.to_string()),
        (None, None, Some(target)) => rest_after(internal, target).map(|rest| {
            // A prefix rewritten to `/`: the app's root is the public prefix itself.
            let rest = if target.trim_end_matches('/').is_empty() && rest == "/" {
                ""
            } else {
                rest
            };
            join(prefix, rest)
        }),
        (None, None, None) => rest_after(internal, prefix).map(|_| internal.to_string()),
    }
}

/// What follows `prefix` in `path` when `prefix` matches whole segments of it.
fn rest_after<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

fn join(prefix: &str, rest: &str) -> String {
    let joined = format!("{}{rest}", prefix.trim_end_matches('/'));
    match joined.is_empty() {
        true => "/".to_string(),
        false => joined,
    }
}

fn servers(gateway: &Gateway, hosts: &[String]) -> Value {
    let mut urls: Vec<String> = match gateway.public_url {
        Some(url) => vec![url.trim_end_matches('/').to_string()],
        None => hosts.iter().map(|h| format!("https://{h}")).collect(),
    };
    urls.dedup();
    Value::Array(urls.into_iter().map(|url| json!({ "url": url })).collect())
}

/// The gateway's credentials as security schemes: API keys where it reads them, JWTs as
/// bearer tokens. A policy that does not require a credential adds the empty alternative.
fn apply_security(doc: &mut Map<String, Value>, auth: &[&AuthenticationSpec]) {
    let mut schemes = BTreeMap::new();
    let mut optional = false;
    for a in auth {
        if let Some(k) = &a.api_keys {
            let (place, name) = match (&k.header, &k.query) {
                (Some(h), _) => ("header", h.as_str()),
                (None, Some(q)) => ("query", q.as_str()),
                (None, None) => continue,
            };
            schemes.insert(
                "apiKey".to_string(),
                json!({ "type": "apiKey", "in": place, "name": name }),
            );
        }
        if !a.jwt.is_empty() {
            schemes.insert(
                "jwt".to_string(),
                json!({ "type": "http", "scheme": "bearer", "bearerFormat": "JWT" }),
            );
        }
        optional |= !a.required;
    }
    if schemes.is_empty() {
        return;
    }
    let mut security: Vec<Value> = schemes.keys().map(|k| json!({ k.as_str(): [] })).collect();
    if optional {
        security.push(json!({}));
    }
    // Merged with the app's own schemes: the gateway passes the app's credentials through.
    let components = doc
        .entry("components")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Some(c) = components.as_object_mut() {
        let own = c
            .entry("securitySchemes")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(own) = own.as_object_mut() {
            own.extend(schemes);
        }
    }
    doc.insert("security".into(), Value::Array(security));
}

/// One OpenAPI document for the whole gateway: every public API's paths, their components
/// renamed `<service>.<name>` (two services may both have a `User` schema) with every
/// reference rewritten to match, operation ids prefixed the same way. The security schemes
/// are the union of the APIs' (the gateway's, already in each, and the apps' own), and the
/// requirement is the gateway's, as each API states it.
pub fn combined(gateway: &Gateway, title: &str, apis: &[PublicApi]) -> (Value, Vec<String>) {
    let mut paths = Map::new();
    let mut components: Map<String, Value> = Map::new();
    let mut schemes = Map::new();
    let mut skipped = Vec::new();
    for api in apis {
        let mut doc = api.document.clone();
        rename_refs(&mut doc, &api.service);
        if let Some(own) = doc.get("components").and_then(Value::as_object) {
            for (kind, entries) in own {
                if kind == "securitySchemes" {
                    if let Some(e) = entries.as_object() {
                        schemes.extend(e.iter().map(|(k, v)| (k.clone(), v.clone())));
                    }
                    continue;
                }
                let Some(entries) = entries.as_object() else {
                    continue;
                };
                let into = components
                    .entry(kind.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(into) = into.as_object_mut() {
                    for (name, v) in entries {
                        into.insert(format!("{}.{name}", api.service), v.clone());
                    }
                }
            }
        }
        let Some(own_paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else {
            continue;
        };
        for (path, item) in own_paths.iter_mut() {
            // The gateway's requirement (top level) applies; an operation's own would name
            // a scheme of its service's document, which the combined one does not carry.
            prefix_operation_ids(item, &api.service);
            if paths.contains_key(path) {
                skipped.push(format!(
                    "{path}: served by {} and an API listed before it; the first is shown",
                    api.service
                ));
                continue;
            }
            paths.insert(path.clone(), item.clone());
        }
    }
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": { "title": title, "version": "mesh" },
        "servers": servers(gateway, &[]),
        "paths": paths,
    });
    if !schemes.is_empty() {
        components.insert("securitySchemes".into(), Value::Object(schemes));
    }
    let security = apis
        .iter()
        .find_map(|a| a.document.get("security"))
        .cloned();
    if let Some(obj) = doc.as_object_mut() {
        if !components.is_empty() {
            obj.insert("components".into(), Value::Object(components));
        }
        if let Some(s) = security {
            obj.insert("security".into(), s);
        }
    }
    (doc, skipped)
}

/// Rewrite `#/components/<kind>/<name>` references to `#/components/<kind>/<service>.<name>`.
fn rename_refs(v: &mut Value, service: &str) {
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == "$ref" {
                    if let Some(r) = value.as_str() {
                        if let Some(renamed) = renamed_ref(r, service) {
                            *value = Value::String(renamed);
                        }
                    }
                } else {
                    rename_refs(value, service);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rename_refs(i, service)),
        _ => {}
    }
}

fn renamed_ref(r: &str, service: &str) -> Option<String> {
    let rest = r.strip_prefix("#/components/")?;
    let (kind, name) = rest.split_once('/')?;
    (kind != "securitySchemes").then(|| format!("#/components/{kind}/{service}.{name}"))
}

/// Operation ids prefixed `<service>.`; operation-level security requirements removed.
fn prefix_operation_ids(item: &mut Value, service: &str) {
    let Some(item) = item.as_object_mut() else {
        return;
    };
    for (key, op) in item.iter_mut() {
        if !METHODS.contains(&key.as_str()) {
            continue;
        }
        if let Some(op) = op.as_object_mut() {
            op.remove("security");
        }
        if let Some(id) = op.get_mut("operationId") {
            if let Some(s) = id.as_str() {
                *id = Value::String(format!("{service}.{s}"));
            }
        }
    }
}

#[cfg(test)]
mod tests;
