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
//!
//! Everything else on the portal's host (the pages, sign-up, sign-in, API keys) is the
//! [`PortalApp`]'s, which the agent implements: it keeps accounts in etcd, and the data
//! plane never talks to etcd. The proxy hands it the request with its body read (bounded) and
//! the TCP peer's address, which is what sign-in limits count (never a forwarding header).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};

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

/// What the agent gives the portal: the documents, replaced whole and read by every portal
/// request, and the app behind the pages, set once the listeners are bound.
#[derive(Default)]
pub struct PortalState {
    pub docs: ArcSwap<PortalContent>,
    pub app: OnceLock<Arc<dyn PortalApp>>,
}

pub type PortalDocs = Arc<PortalState>;

/// The most a request to the portal's app may carry: forms and small JSON, never uploads.
pub const MAX_APP_BODY: usize = 64 * 1024;

/// How long a client may take to send that body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A request for the portal's app, its body read.
#[derive(Debug)]
pub struct AppRequest {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The TCP peer: the address sign-in limits count. Never taken from a header.
    pub peer: SocketAddr,
    /// Whether the client connected over TLS.
    pub tls: bool,
}

pub type AppFuture = Pin<Box<dyn Future<Output = Response<Bytes>> + Send>>;

/// The portal's pages and account API, implemented by the agent (`mesh-agent/src/portal_app/`).
pub trait PortalApp: Send + Sync + 'static {
    fn handle(&self, req: AppRequest) -> AppFuture;
}

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

    /// The answer to a request for the portal's host: a document, or the app's answer.
    pub async fn answer<B>(
        &self,
        req: Request<B>,
        peer: SocketAddr,
        tls: bool,
    ) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let is_document = is_document(req.uri().path());
        let app = self.docs.app.get().cloned();
        match app {
            Some(app) if !is_document => self.to_app(app.as_ref(), req, peer, tls).await,
            _ => self.document(&req),
        }
    }

    async fn to_app<B>(
        &self,
        app: &dyn PortalApp,
        req: Request<B>,
        peer: SocketAddr,
        tls: bool,
    ) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (parts, body) = req.into_parts();
        let collected =
            tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_APP_BODY).collect());
        let body = match collected.await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return json(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    error(&format!("the body is over {MAX_APP_BODY} bytes")),
                )
            }
            Ok(Err(e)) => {
                return json(
                    StatusCode::BAD_REQUEST,
                    error(&format!("cannot read the body: {e}")),
                )
            }
            Err(_) => return json(StatusCode::REQUEST_TIMEOUT, error("the body took too long")),
        };
        let resp = app
            .handle(AppRequest {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body,
                peer,
                tls,
            })
            .await;
        resp.map(|b| Either::Right(Full::new(b)))
    }

    /// A public document, or a clear status.
    fn document<B>(&self, req: &Request<B>) -> Response<ResponseBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut resp = json(StatusCode::METHOD_NOT_ALLOWED, error("only GET and HEAD"));
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        let docs = self.docs.docs.load();
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

/// The paths the documents are served at (the app answers the others).
fn is_document(path: &str) -> bool {
    matches!(path, "/openapi.json" | "/apis" | "/apis/")
        || (path.starts_with("/apis/") && path.ends_with("/openapi.json"))
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
            open_signup: false,
        };
        let state = PortalState {
            docs: ArcSwap::from_pointee(content),
            app: OnceLock::new(),
        };
        Portal::new(&cfg, Arc::new(state))
    }

    fn get(p: &Portal, method: Method, path: &str) -> Response<ResponseBody> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        p.document(&req)
    }

    /// Answers with the body length it received and the peer.
    struct Echo;

    impl PortalApp for Echo {
        fn handle(&self, req: AppRequest) -> AppFuture {
            Box::pin(async move {
                Response::new(Bytes::from(format!(
                    "{} {} {}",
                    req.uri.path(),
                    req.body.len(),
                    req.peer
                )))
            })
        }
    }

    async fn to_app(p: &Portal, path: &str, body: Vec<u8>) -> (StatusCode, Bytes) {
        let req = Request::post(path)
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let peer: SocketAddr = "192.0.2.7:4000".parse().expect("addr");
        let resp = p.answer(req, peer, true).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        (status, body.unwrap_or_default())
    }

    #[tokio::test]
    async fn the_app_gets_the_rest_with_a_bounded_body_and_the_peer() {
        let p = portal(PortalContent {
            catalog: Bytes::from_static(b"[]"),
            ..Default::default()
        });
        // No app yet: only documents.
        assert_eq!(
            to_app(&p, "/signin", vec![]).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(p.docs.app.set(Arc::new(Echo)).is_ok());
        let (status, body) = to_app(&p, "/portal/api/signin", vec![b'x'; 10]).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "/portal/api/signin 10 192.0.2.7:4000");
        let (status, _) = to_app(&p, "/x", vec![b'x'; MAX_APP_BODY + 1]).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        // Documents stay the documents'.
        assert_eq!(
            to_app(&p, "/apis", vec![]).await.0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    /// A client that never finishes its body is answered 408, not waited for.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_ends_times_out() {
        let p = portal(PortalContent::default());
        assert!(p.docs.app.set(Arc::new(Echo)).is_ok());
        let never = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<http_body::Frame<Bytes>, std::convert::Infallible>,
        >());
        let req = Request::post("/portal/api/signin")
            .body(never)
            .expect("request");
        let peer: SocketAddr = "192.0.2.7:4000".parse().expect("addr");
        let resp = p.answer(req, peer, true).await;
        assert_eq!(resp.status(), StatusCode::REQUEST_TIMEOUT);
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
