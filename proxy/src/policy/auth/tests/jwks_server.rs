//! JWKS fetching against a real loopback HTTP server that counts its requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use trellis_policies::JwksSource;

use super::signer::{jwks, Signer};
use super::{authenticator, claims, provider};
use crate::policy::auth::jwks::Jwks;
use crate::policy::auth::{JwtAuthenticator, JwtError, MAX_JWKS_BYTES};

/// Serves `body` at any path and counts requests; `stop()` closes the listener.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

// === impl JwksServer ===

impl JwksServer {
    async fn start(body: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = Arc::new(Mutex::new(body));
        let requests = Arc::new(AtomicUsize::new(0));
        let (b, r) = (body.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (b, r) = (b.clone(), r.clone());
                let svc = service_fn(move |_req| {
                    r.fetch_add(1, SeqCst);
                    let text = b.lock().map(|t| t.clone()).unwrap_or_default();
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            body,
            requests,
            task,
        }
    }

    fn uri(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn serve(&self, body: String) {
        if let Ok(mut b) = self.body.lock() {
            *b = body;
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

fn remote(server: &JwksServer) -> JwtAuthenticator {
    authenticator(provider(JwksSource::Uri(server.uri())))
}

/// Wait (bounded) until the server has answered `n` requests.
async fn wait_for_requests(server: &JwksServer, n: usize) {
    for _ in 0..200 {
        if server.requests() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("server saw {} requests, expected {n}", server.requests());
}

#[tokio::test]
async fn background_fetch_then_rotation_is_picked_up_by_an_unknown_kid() {
    let old = Signer::ec("2026-01");
    let new = Signer::ed("2026-02");
    let server = JwksServer::start(jwks(&[&old])).await;
    let auth = remote(&server);
    auth.spawn_refresh();
    wait_for_requests(&server, 1).await;
    assert!(auth.authenticate(&old.sign(&claims())).await.is_ok());
    let status = &auth.status()[0];
    assert_eq!((status.source, status.fetches), ("uri", 1));
    assert_eq!(status.keys, ["2026-01 (ES256)"]);
    assert!(status.last_success.is_some() && status.last_error.is_none());

    // The identity provider publishes the new key and starts signing with it. The refetch
    // is allowed once min_refresh_interval (1 s) has passed since the last fetch.
    server.serve(jwks(&[&old, &new]));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(auth.authenticate(&new.sign(&claims())).await.is_ok());
    assert_eq!(server.requests(), 2);
    // Known kids never fetch.
    for s in [&old, &new] {
        assert!(auth.authenticate(&s.sign(&claims())).await.is_ok());
    }
    assert_eq!(server.requests(), 2);
    assert_eq!(auth.status()[0].keys.len(), 2);
}

#[tokio::test]
async fn unknown_kids_share_one_fetch_per_interval() {
    let key = Signer::rsa("k1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let auth = remote(&server);
    // No background task: the first tokens find no key set and fetch it, once.
    let forged = |i: usize| {
        key.sign_with_header(
            &json!({"alg": "RS256", "kid": format!("bogus-{i}")}),
            &claims(),
        )
    };
    let results = futures_util::future::join_all((0..20).map(|i| {
        let token = forged(i);
        let auth = &auth;
        async move { auth.authenticate(&token).await }
    }))
    .await;
    assert!(
        results.iter().all(|r| *r == Err(JwtError::UnknownKid)),
        "{results:?}"
    );
    assert_eq!(server.requests(), 1);
    // More within the interval: no fetch at all.
    for i in 20..40 {
        assert_eq!(
            auth.authenticate(&forged(i)).await,
            Err(JwtError::UnknownKid)
        );
    }
    assert_eq!(server.requests(), 1);
    assert!(auth.authenticate(&key.sign(&claims())).await.is_ok());
    assert_eq!(server.requests(), 1);
    // After the interval, one more.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 40..45 {
        assert_eq!(
            auth.authenticate(&forged(i)).await,
            Err(JwtError::UnknownKid)
        );
    }
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn server_down_keeps_the_last_good_keys() {
    let key = Signer::hmac("h1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let auth = remote(&server);
    assert!(auth.refresh_all().await);
    server.stop().await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    // An unknown kid triggers a fetch, which fails; known keys keep verifying.
    let header = json!({"alg": "HS256", "kid": "h2"});
    let r = auth
        .authenticate(&key.sign_with_header(&header, &claims()))
        .await;
    assert_eq!(r, Err(JwtError::UnknownKid));
    assert!(!auth.refresh_all().await);
    assert!(auth.authenticate(&key.sign(&claims())).await.is_ok());
    let status = &auth.status()[0];
    assert_eq!((status.fetches, status.failures), (3, 2));
    assert_eq!(status.keys, ["h1 (HS256)"]);
    let error = status.last_error.as_deref().unwrap_or_default();
    assert!(error.starts_with("connect"), "{error}");
}

#[tokio::test]
async fn bad_documents_keep_the_last_good_keys() {
    let key = Signer::ed("e1");
    let server = JwksServer::start(jwks(&[&key])).await;
    let auth = remote(&server);
    assert!(auth.refresh_all().await);
    for body in [
        "not json".to_string(),
        json!({"keys": []}).to_string(),
        json!({"keys": [{"kty": "RSA", "use": "enc", "n": "AA", "e": "AQAB"}]}).to_string(),
        format!(
            "{{\"keys\": [], \"pad\": \"{}\"}}",
            "x".repeat(MAX_JWKS_BYTES)
        ),
    ] {
        server.serve(body);
        assert!(!auth.refresh_all().await);
        assert!(auth.authenticate(&key.sign(&claims())).await.is_ok());
    }
    let status = &auth.status()[0];
    assert_eq!(status.failures, 4);
    let error = status.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("body larger"), "{error}");
}

#[tokio::test]
async fn never_fetched_is_jwks_unavailable() {
    let server = JwksServer::start(String::new()).await;
    let uri = server.uri();
    server.stop().await;
    let auth = authenticator(provider(JwksSource::Uri(uri)));
    let key = Signer::hmac("h1");
    assert_eq!(
        auth.authenticate(&key.sign(&claims())).await,
        Err(JwtError::JwksUnavailable)
    );
    // Without a kid as well.
    let r = auth
        .authenticate(&key.sign_with_header(&json!({"alg": "HS256"}), &claims()))
        .await;
    assert_eq!(r, Err(JwtError::JwksUnavailable));
}

#[tokio::test]
async fn periodic_refresh_runs_until_the_key_set_is_dropped() {
    let key = Signer::ec("p1");
    let server = JwksServer::start(jwks(&[&key])).await;
    // Built directly: the policy's lower bounds (10 s, 1 s) would make this test slow.
    let set = Arc::new(
        Jwks::remote(
            "p".into(),
            &server.uri(),
            Duration::from_millis(100),
            Duration::from_millis(50),
        )
        .expect("uri"),
    );
    set.spawn_refresh();
    wait_for_requests(&server, 3).await;
    drop(set);
    // A loop iteration that had already upgraded its reference finishes; then no more.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let n = server.requests();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(server.requests(), n);
}
