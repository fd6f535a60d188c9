//! HTTPRoute matching and rewriting (`proxy/src/routing/`: `matcher.rs`, `table.rs`
//! `RoutingTable::decide`, `actions.rs` rewrites, redirects and direct responses,
//! `mod.rs` `prepare_request`): an HTTPRoute spec from policy, then requests from clients.
//!
//! Input: `spec\0request\0request...`. The spec is YAML or JSON (`HttpRouteSpec`), applied to a
//! mesh with services `orders` and `users`; a request is `METHOD URI` then `name: value` lines
//! (one of them may be `host`, else the host is `orders`).

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri};
use trellis_policies::{HttpRouteSpec, MeshDocument};
use trellis_proxy::policy::routing::{finish_response, prepare_request, Action, Decision};
use trellis_proxy::state::snapshot::Snapshot;
use trellis_proxy::state::target::{StatsRegistry, TargetTable};

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"hosts: [orders]\n",
    b"hosts: [\"*.example.com\"]\n",
    b"rules:\n",
    b"- matches:\n",
    b"  - path:\n",
    b"      prefix: /",
    b"      exact: /",
    b"      regex: ",
    b"method: GET\n",
    b"headers:\n",
    b"- name: x-a\n",
    b"  exact: v\n",
    b"  regex: ",
    b"query_params:\n",
    b"  backends:\n",
    b"  - service: orders\n",
    b"    weight: ",
    b"  rewrite:\n",
    b"    path_prefix: /",
    b"    path: /",
    b"    host: ",
    b"  redirect:\n",
    b"    scheme: https\n",
    b"    status: 301\n",
    b"    port: ",
    b"  direct_response:\n",
    b"    body: ",
    b"  request_headers:\n",
    b"    set:\n",
    b"    add:\n",
    b"    remove: [",
    b"  timeout: 1s\n",
    b"\0",
    b"GET ",
    b"POST ",
    b"http://orders",
    b"/api/v1/",
    b"?a=1&b=2",
    b"%2F",
    b"%00",
    b"//",
    b"/../",
    b"\nhost: ",
    b"\nx-a: v",
    b"orders",
    b"users",
    b"*",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b"(a+)+$",
    b"\\",
];

fn mesh() -> MeshDocument {
    let doc = serde_json::json!({
        "services": {
            "orders": {"endpoints": [{"address": "127.0.0.1:9001"}]},
            "users": {"endpoints": [{"address": "127.0.0.1:9002"}, {"address": "[::1]:9003"}]},
        }
    });
    serde_json::from_value(doc).unwrap_or_default()
}

pub fn run(data: &[u8]) -> u64 {
    let parts = crate::split(data, 17);
    let Ok(text) = std::str::from_utf8(parts[0]) else {
        return 0;
    };
    let spec: HttpRouteSpec = match serde_norway::from_str(text) {
        Ok(s) => s,
        Err(e) => return outcome(&e.to_string()),
    };
    let mut doc = mesh();
    doc.http_routes = BTreeMap::from([("fuzz".to_string(), spec)]);
    if let Err(e) = trellis_policies::validate(&doc) {
        return outcome(&e.to_string());
    }
    let snapshot = match Snapshot::from_document(&doc, "trellis.local", 1, "fuzz".into()) {
        Ok(s) => s,
        Err(e) => return outcome(&e),
    };
    let table = TargetTable::build(
        Arc::new(snapshot),
        &StatsRegistry::default(),
        None,
        Some("gateway"),
    );
    let _ = table.routing.dump();
    let mut label = String::from("valid ");
    for request in &parts[1..] {
        label.push_str(route(&table, request));
    }
    outcome(&label)
}

fn route(table: &TargetTable, request: &[u8]) -> &'static str {
    let mut lines = request.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let mut words = first.splitn(2, |&b| b == b' ');
    let Ok(method) = Method::from_bytes(words.next().unwrap_or_default()) else {
        return "bad method";
    };
    let Ok(uri) = Uri::try_from(words.next().unwrap_or(b"/")) else {
        return "bad uri";
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
        ) else {
            continue;
        };
        headers.append(n, v);
    }
    let host = uri
        .host()
        .map(str::to_string)
        .or_else(|| {
            headers
                .get("host")
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "orders".into());
    // The edge's table holds only routes bound to the gateway: a subset of the hosts.
    if let Decision::Matched { prefix, .. } =
        table.gateway_routing.decide(&host, &method, &uri, &headers)
    {
        assert!(
            prefix <= uri.path().len(),
            "edge: matched prefix longer than the path"
        );
    }
    let decision = table.routing.decide(&host, &method, &uri, &headers);
    let (rule, prefix) = match decision {
        Decision::Unrouted => return "unrouted",
        Decision::NoMatch(_) => return "no match",
        Decision::Matched { rule, prefix, .. } => (rule, prefix),
    };
    assert!(
        prefix <= uri.path().len(),
        "matched prefix longer than the path"
    );
    match &rule.action {
        Action::Forward { backends, .. } => {
            let mut req = Request::builder()
                .method(method)
                .uri(uri)
                .body(())
                .unwrap_or_default();
            *req.headers_mut() = headers;
            prepare_request(rule, prefix, &mut req);
            // (Without a rewrite an authority-form target, `CONNECT host:port`, keeps its
            // empty path.)
            assert!(
                rule.rewrite.is_none() || req.uri().path().starts_with('/'),
                "a rewrite produced the path {:?}",
                req.uri().path()
            );
            let mut resp = Response::new(());
            finish_response(rule, &mut resp);
            if backends.is_empty() {
                "forward none"
            } else {
                "forward"
            }
        }
        Action::Redirect(r) => {
            let resp = r.response("http", &host, &uri);
            assert!(resp.status().is_redirection(), "{}", resp.status());
            "redirect"
        }
        Action::Direct(d) => {
            let _ = d.response();
            "direct"
        }
        // Bound to gateways only: the mesh table the fuzzer builds has none.
        Action::Aggregate(_) => "aggregate",
    }
}
