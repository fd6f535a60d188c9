//! The developer portal's documents, served by the ingress on a host of its own.
//!
//! The agent builds the public view of the mesh's APIs from etcd (`mesh-agent/src/portal.rs`:
//! the stored OpenAPI documents mapped through the HTTPRoutes bound to this gateway) and
//! publishes it here, whole, as immutable bytes; requests only read it. A request for the
//! portal's host is answered from it and never routed, so the portal needs no route and
//! no backend, and any ingress replica serves the same documents.
//!
//! - `GET /openapi.json`: one document for every public API of the gateway;
//! - `GET /apis`: the catalog (service, version, title, description, path count);
//! - `GET /apis/<service>/openapi.json`: one API's public document.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::config::PortalConfig;
use crate::ResponseBody;

/// What the portal serves: the documents as they were last built.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PortalContent {
    /// The combined document (JSON).
    pub combined: Bytes,
    /// The catalog (JSON array).
    pub catalog: Bytes,
    /// Each public API's document (JSON), by service.
    pub apis: BTreeMap<String, Bytes>,
}

/// Replaced whole by the agent, read by every portal request.
pub type PortalDocs = Arc<ArcSwap<PortalContent>>;

/// The portal of one ingress: where it answers, and what.
pub struct Portal {
    host: String,
    docs: PortalDocs,
}

// === impl Portal ===

impl Portal {
    pub fn new(cfg: &PortalConfig, docs: PortalDocs) -> Self {
        Self {
            host: cfg.host.to_ascii_lowercase(),
            docs,
        }
    }

    /// Whether `host` (the request's, without port) is the portal's.
    pub fn serves(&self, host: &str) -> bool {
        host.eq_ignore_ascii_case(&self.host)
    }

    /// The answer to a request for the portal's host.
    pub fn answer<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = json(StatusCode::METHOD_NOT_ALLOWED, error("only GET and HEAD"));
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        let docs = self.docs.load();
        let path = req.uri().path();
        let body = match path {
            "/openapi.json" => Some(docs.combined.clone()),
            "/apis" | "/apis/" => Some(docs.catalog.clone()),
            _ => path
                .strip_prefix("/apis/")
                .and_then(|rest| rest.strip_suffix("/openapi.json"))
                .and_then(|service| docs.apis.get(service).cloned()),
        };
        match body {
            Some(b) if !b.is_empty() => json(StatusCode::OK, b),
            Some(_) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                error("the API documents have not been read from the mesh yet"),
            ),
            None => json(StatusCode::NOT_FOUND, error("no such document")),
        }
    }
}

fn error(message: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": message }).to_string())
}

fn json(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut resp = Response::new(Either::Right(Full::new(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    // The documents change when the APIs do; a browser may keep them briefly.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=10"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portal(content: PortalContent) -> Portal {
        let cfg = PortalConfig {
            host: "Developer.Example.com".into(),
            public_url: None,
        };
        Portal::new(&cfg, Arc::new(ArcSwap::from_pointee(content)))
    }

    fn get(p: &Portal, method: Method, path: &str) -> Response<ResponseBody> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        p.answer(&req)
    }

    #[test]
    fn documents_by_path_and_clear_statuses_otherwise() {
        let mut apis = BTreeMap::new();
        apis.insert("orders".to_string(), Bytes::from_static(b"{\"o\":1}"));
        let p = portal(PortalContent {
            combined: Bytes::from_static(b"{\"all\":1}"),
            catalog: Bytes::from_static(b"[]"),
            apis,
        });
        assert!(p.serves("developer.example.com"));
        assert!(!p.serves("api.example.com"));
        assert_eq!(
            get(&p, Method::GET, "/openapi.json").status(),
            StatusCode::OK
        );
        assert_eq!(get(&p, Method::HEAD, "/apis").status(), StatusCode::OK);
        let one = get(&p, Method::GET, "/apis/orders/openapi.json");
        assert_eq!(one.status(), StatusCode::OK);
        assert_eq!(one.headers()[header::CONTENT_TYPE], "application/json");
        for missing in [
            "/apis/billing/openapi.json",
            "/apis/orders",
            "/admin",
            "/apis/../x",
        ] {
            assert_eq!(
                get(&p, Method::GET, missing).status(),
                StatusCode::NOT_FOUND,
                "{missing}"
            );
        }
        let post = get(&p, Method::POST, "/openapi.json");
        assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn before_the_first_build_it_says_so() {
        let p = portal(PortalContent::default());
        assert_eq!(
            get(&p, Method::GET, "/openapi.json").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
