//! The ingress gateway over real sockets: TLS with a certificate per SNI name (exact and
//! wildcard, default for unknown names), hot reload of a certificate, HTTP -> HTTPS redirect,
//! API-key authentication of outside clients at the edge, and routing by HTTPRoute into the
//! mesh over mTLS (the app sees the gateway's SPIFFE identity).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::Empty;
use rustls_pki_types::CertificateDer;
use trellis_policies::MeshDocument;
use trellis_proxy::config::{IngressConfig, IngressHttpConfig, ServerCertificate};
use trellis_proxy::policy::access::key_digest;
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::web::{loopback_ingress, Dial, WebPki};
use trellis_tests::{init_logs, wait_for, Pki, Sidecar};

const KEY: &str = "edge-key-6f1d2c";

/// One HTTPS request to `addr` with SNI `sni` (also the `Host`): status, body, and the
/// certificate served.
async fn https_get(
    web: &WebPki,
    addr: SocketAddr,
    sni: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, CertificateDer<'static>) {
    let mut req = Request::get(path).header("host", sni);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let dial = Dial {
        addr,
        from: None,
        name: sni,
        sni: true,
        h2: false,
    };
    let r = web
        .send(dial, req.body(Empty::new()).expect("request"))
        .await;
    (r.status, r.body, r.served)
}

fn snapshot(orders: SocketAddr) -> Arc<Snapshot> {
    let yaml = format!(
        r#"
services:
  orders:
    endpoints: [{{address: "{orders}"}}]
http_routes:
  edge:
    hosts: [api.example.com, "*.shop.example"]
    gateways: [gateway]
    rules:
      - name: api
        backends: [{{service: orders}}]
authentication:
  edge-keys:
    service: gateway
    api_keys: {{header: x-api-key}}
consumers:
  partner:
    api_keys: [{{id: partner-1, sha256: "{digest}"}}]
"#,
        digest = key_digest(KEY.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let doc: MeshDocument = trellis_policies::parse_mesh_yaml(&yaml).expect("mesh document");
    trellis_tests::snapshot_of(&doc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_terminates_tls_per_sni_authenticates_and_routes_into_the_mesh() {
    init_logs();
    let pki = Pki::new(&["gateway", "orders"]);
    let web = WebPki::new();
    let dir = pki.path();
    let api_der = web.leaf(dir, "api", &["api.example.com"]);
    let shop_der = web.leaf(dir, "shop", &["*.shop.example"]);
    let backend = Backend::start().await;
    // orders believes the consumer only from the gateway (the default believes no peer).
    let orders = Sidecar::start(&pki, "orders", backend.addr, |c| {
        c.authorization.consumer_from_peers = vec![Pki::spiffe("gateway")];
    })
    .await;
    let gateway = Sidecar::start(&pki, "gateway", backend.addr, |c| {
        c.ingress = Some(loopback_ingress(
            dir,
            &[("api.example.com", "api"), ("*.shop.example", "shop")],
            true,
        ));
    })
    .await;
    let snap = snapshot(orders.inbound());
    orders.apply(snap.clone()).await;
    gateway.apply(snap).await;
    let tls_addr = gateway.running.bound.ingress.expect("ingress bound");
    let http_addr = gateway.running.bound.ingress_http.expect("http bound");

    // SNI picks the certificate: exact name, then the wildcard.
    let (status, body, served) = https_get(
        &web,
        tls_addr,
        "api.example.com",
        "/echo",
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(served, api_der);
    let seen: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(
        seen["headers"]["trellis-peer-identity"],
        Pki::spiffe("gateway")
    );
    assert_eq!(seen["headers"]["trellis-consumer"], "partner");
    assert!(seen["headers"].get("x-api-key").is_none());
    let (status, _, served) = https_get(
        &web,
        tls_addr,
        "web.shop.example",
        "/echo",
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(served, shop_der);

    // Outside clients authenticate at the edge.
    let (status, body, _) = https_get(&web, tls_addr, "api.example.com", "/echo", &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = https_get(
        &web,
        tls_addr,
        "api.example.com",
        "/echo",
        &[("x-api-key", "nope")],
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::Relaxed),
        2,
        "only admitted requests reach the app"
    );

    // Plain HTTP is redirected to HTTPS with the path kept.
    let c = client::h1(http_addr);
    let r = client::send(
        &c,
        Request::get(format!("http://{http_addr}/echo?x=1"))
            .header("host", "api.example.com")
            .body(client::empty())
            .expect("request"),
    )
    .await
    .expect("reply");
    assert_eq!(r.status, 308);
    assert_eq!(
        r.headers["location"],
        format!("https://api.example.com:{}/echo?x=1", tls_addr.port())
    );

    // A new certificate for api.example.com is picked up without a restart.
    let new_der = web.leaf(dir, "api", &["api.example.com"]);
    assert_ne!(new_der, api_der);
    wait_for(Duration::from_secs(5), "new certificate served", || {
        let new_der = new_der.clone();
        let web = &web;
        async move {
            https_get(
                web,
                tls_addr,
                "api.example.com",
                "/echo",
                &[("x-api-key", KEY)],
            )
            .await
            .2 == new_der
        }
    })
    .await;
    let text = client::admin(gateway.admin(), "/metrics").await.body;
    // Both certificates' expiry, by first host name (rcgen's default validity ends in 4096).
    for host in ["api.example.com", "*.shop.example"] {
        let exp = client::metric(
            &text,
            &format!("trellis_ingress_cert_expiry_timestamp_seconds{{host=\"{host}\"}}"),
        );
        assert!(exp > 4.0e9, "{host}: {exp}");
    }
    let dump = client::admin(gateway.admin(), "/config_dump").await.json();
    assert_eq!(dump["ingress_certificates"][0]["host"], "api.example.com");
    assert!(
        client::metric(&text, "trellis_connections_total{direction=\"ingress\"}") >= 6.0,
        "{text}"
    );
    // Two routed requests to orders (and the reload probes), two refused under the gateway.
    assert!(
        client::metric(
            &text,
            "trellis_requests_total{direction=\"ingress\",service=\"orders\",route=\"api\",status_code=\"200\"}"
        ) >= 3.0,
        "{text}"
    );
    assert_eq!(
        client::metric(
            &text,
            "trellis_requests_total{direction=\"ingress\",service=\"gateway\",route=\"default\",status_code=\"401\"}"
        ),
        2.0,
        "{text}"
    );
}

#[tokio::test]
async fn an_ingress_that_cannot_bind_names_its_own_listener_and_address() {
    init_logs();
    let pki = Pki::new(&["gateway"]);
    let web = WebPki::new();
    web.leaf(pki.path(), "api", &["api.example.com"]);
    // Both ingress ports are taken by someone else.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("addr");
    let taken_http = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_http_addr = taken_http.local_addr().expect("addr");
    for (tls, http, what, addr) in [
        (taken_addr, None, "ingress listener", taken_addr),
        (
            "127.0.0.1:0".parse().expect("addr"),
            Some(taken_http_addr),
            "ingress http listener",
            taken_http_addr,
        ),
    ] {
        let mut cfg = trellis_proxy::testing::config(
            "gateway",
            pki.path(),
            "127.0.0.1:9".parse().expect("addr"),
        );
        cfg.ingress = Some(IngressConfig {
            listen: tls,
            certificates: vec![ServerCertificate {
                hosts: vec!["api.example.com".into()],
                cert: pki.path().join("api.pem"),
                key: pki.path().join("api-key.pem"),
            }],
            http: http.map(|listen| IngressHttpConfig {
                listen,
                redirect_to_https: true,
            }),
            trusted_proxies: Vec::new(),
        });
        let admin = cfg.admin.listen;
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let err = match trellis_proxy::app::Proxy::new(cfg, rx).start().await {
            Ok(_) => panic!("{what} on a taken port must not start"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(what) && err.contains(&addr.to_string()),
            "error names the listener and its address: {err}"
        );
        if admin.port() != 0 {
            assert!(!err.contains(&admin.to_string()), "{err}");
        }
    }
}
