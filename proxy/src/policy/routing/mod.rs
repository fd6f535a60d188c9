//! `HTTPRoute` routing in the data plane: a table compiled per snapshot ([`RoutingTable`]),
//! a decision per request ([`RoutingTable::decide`], a function of the request's parts only,
//! shared by the outbound listener and a future ingress), and the rule's actions.
//!
//! Hosts no HTTPRoute names are routed exactly as before: `Host` is the service. Nothing here
//! does I/O on the request path except the mirror's detached task.

pub mod actions;
pub mod fault;
pub mod matcher;
pub mod mirror;
pub mod table;

use http::{header, HeaderValue, Request, Response};

pub use table::{Action, Backend, Decision, HostRoutes, RoutingTable, Rule};

/// The `route` label of requests no HTTPRoute rule routed.
pub const DEFAULT_ROUTE: &str = "default";

/// The scheme a request arrived with, for redirects that keep it: a listener that terminates
/// TLS (the ingress) inserts `RequestScheme("https")` as a request extension; without it the
/// request came over plain HTTP (the app's outbound calls).
#[derive(Clone, Copy, Debug)]
pub struct RequestScheme(pub &'static str);

/// The request timeout a rule sets, handed to the forwarding code as a request extension.
#[derive(Clone, Copy, Debug)]
pub struct RouteTimeout(pub std::time::Duration);

/// Apply a forwarding rule's request changes: header modifiers, then path and host rewrites
/// (`prefix` is the length of the path prefix the rule matched).
pub fn prepare_request<B>(rule: &Rule, prefix: usize, req: &mut Request<B>) {
    if let Some(ops) = &rule.request_headers {
        ops.apply(req.headers_mut());
    }
    if let Some(rw) = &rule.rewrite {
        // Origin form from here on, the authority in `Host` (an absolute-form request's
        // authority wins over its `Host`, so it moves there first).
        if let Some(a) = req.uri().authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
            let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            if let Ok(uri) = pq.parse() {
                *req.uri_mut() = uri;
            }
        }
        if let Some(host) = rw.host() {
            req.headers_mut().insert(header::HOST, host.clone());
        }
        if let Some(uri) = rw.uri(req.uri(), prefix) {
            *req.uri_mut() = uri;
        }
    }
    if let Some(t) = rule.timeout {
        req.extensions_mut().insert(RouteTimeout(t));
    }
}

/// Apply a rule's response header modifiers.
pub fn finish_response<B>(rule: &Rule, resp: &mut Response<B>) {
    if let Some(ops) = &rule.response_headers {
        ops.apply(resp.headers_mut());
    }
}
