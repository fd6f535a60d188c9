//! The small app behind every demo sidecar, also runnable on its own (`mesh-agent demo-app`) so
//! that container examples (`examples/compose/`) need no other image.
//!
//! It answers every request with JSON naming itself and the caller identity its sidecar
//! verified. With an upstream it first calls that service through its own sidecar's outbound
//! listener, passing the trace context on like any traced app, so a request through several
//! services is one trace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use trellis_proxy::config::PEER_IDENTITY_HEADER;

/// Headers an app copies from the request it serves to the calls it makes.
pub const TRACE_HEADERS: &[&str] = &[
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];

pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// A service the app calls for each request, through a sidecar's outbound listener.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub outbound: SocketAddr,
    pub service: String,
    pub path: String,
}

/// Told the verified caller identity of each request (`(none)` without one).
pub type OnRequest = Arc<dyn Fn(&str) + Send + Sync>;

/// A client for calls through a sidecar: requests carry the destination in `Host`.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .set_host(false)
        .build_http()
}

/// Call `service` at `path` through the sidecar at `outbound`; the body on 200, else a message
/// naming the status and the sidecar's `trellis-error` cause.
pub async fn call(
    client: &HttpClient,
    outbound: SocketAddr,
    service: &str,
    path: &str,
    incoming: &http::HeaderMap,
) -> Result<String, String> {
    let mut req = Request::get(format!("http://{outbound}{path}"))
        .header(header::HOST, service)
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    for name in TRACE_HEADERS {
        if let Some(v) = incoming.get(*name) {
            req.headers_mut().insert(*name, v.clone());
        }
    }
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("{service}: {e}"))?;
    let status = resp.status();
    let cause = resp
        .headers()
        .get("trellis-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).trim().to_string();
    if status == StatusCode::OK {
        Ok(body)
    } else {
        Err(format!(
            "{service}{path}: {status} {} {body}",
            cause.unwrap_or_default()
        ))
    }
}

/// Serve the demo app on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    name: String,
    upstream: Option<Upstream>,
    client: HttpClient,
    on_request: OnRequest,
) {
    let name = Arc::new(name);
    let upstream = Arc::new(upstream);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (name, upstream, client, on_request) = (
            name.clone(),
            upstream.clone(),
            client.clone(),
            on_request.clone(),
        );
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (name, upstream, client, on_request) = (
                    name.clone(),
                    upstream.clone(),
                    client.clone(),
                    on_request.clone(),
                );
                async move {
                    let (status, body) =
                        respond(&req, &name, &upstream, &client, &on_request).await;
                    let mut resp = Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn respond(
    req: &Request<Incoming>,
    name: &str,
    upstream: &Option<Upstream>,
    client: &HttpClient,
    on_request: &OnRequest,
) -> (StatusCode, String) {
    if req.uri().path() == "/healthz" {
        return (StatusCode::OK, "{\"ok\":true}".to_string());
    }
    let caller = req
        .headers()
        .get(PEER_IDENTITY_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_string();
    on_request(&caller);
    let me = serde_json::json!({"instance": name, "caller": caller});
    let Some(up) = upstream else {
        return (StatusCode::OK, me.to_string());
    };
    match call(client, up.outbound, &up.service, &up.path, req.headers()).await {
        Ok(body) => {
            let inner = serde_json::from_str::<serde_json::Value>(&body)
                .unwrap_or(serde_json::Value::String(body));
            let mut v = me;
            v[up.service.as_str()] = inner;
            (StatusCode::OK, v.to_string())
        }
        Err(e) => (
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"instance": name, "error": e}).to_string(),
        ),
    }
}

/// `mesh-agent demo-app`: serve until interrupted.
pub async fn run(
    listen: SocketAddr,
    name: String,
    upstream: Option<Upstream>,
) -> Result<(), std::io::Error> {
    let listener = TcpListener::bind(listen).await?;
    tracing::info!(%listen, %name, upstream = ?upstream.as_ref().map(|u| &u.service), "demo app listening");
    let served = serve(listener, name, upstream, client(), Arc::new(|_: &str| {}));
    tokio::select! {
        _ = served => {}
        _ = crate::run::wait_for_signal() => {}
    }
    Ok(())
}
