//! The ingress gateway over real sockets: TLS with a certificate per SNI name (exact and
//! wildcard, default for unknown names), hot reload of a certificate, HTTP -> HTTPS redirect,
//! API-key authentication of outside clients at the edge, and routing by HTTPRoute into the
//! mesh over mTLS (the app sees the gateway's SPIFFE identity).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName};
use trellis_policies::MeshDocument;
use trellis_proxy::access::key_digest;
use trellis_proxy::config::{IngressConfig, IngressHttpConfig, ServerCertificate};
use trellis_proxy::snapshot::Snapshot;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::{init_logs, wait_for, Pki, Sidecar};

const KEY: &str = "edge-key-6f1d2c";

/// A web PKI for outside clients (not the mesh's): a CA and leaves for DNS names.
struct WebPki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl WebPki {
    fn new() -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "test web CA");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertifiedIssuer::self_signed(p, ca_key).expect("ca");
        Self { ca }
    }

    /// Write a leaf for `names` as `<stem>.pem` / `<stem>-key.pem`; returns its DER.
    fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
        let p =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &self.ca).expect("leaf");
        std::fs::write(dir.join(format!("{stem}.pem")), cert.pem()).expect("write cert");
        std::fs::write(dir.join(format!("{stem}-key.pem")), key.serialize_pem())
            .expect("write key");
        cert.der().clone()
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).expect("root");
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Full handshakes only: a resumed session shows the certificate of its first one.
        c.resumption = rustls::client::Resumption::disabled();
        Arc::new(c)
    }
}

/// One HTTPS request to `addr` with SNI `sni`: status, body, and the certificate served.
async fn https_get(
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, CertificateDer<'static>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("TLS handshake (the served certificate verifies for the SNI name)");
    let served = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .clone()
        .into_owned();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("http1");
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", sni);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Empty::<bytes::Bytes>::new()).expect("request"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned(), served)
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
    let orders = Sidecar::start(&pki, "orders", backend.addr, |_| {}).await;
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let gateway = Sidecar::start(&pki, "gateway", backend.addr, |c| {
        c.ingress = Some(IngressConfig {
            listen: loopback,
            certificates: vec![
                ServerCertificate {
                    hosts: vec!["api.example.com".into()],
                    cert: dir.join("api.pem"),
                    key: dir.join("api-key.pem"),
                },
                ServerCertificate {
                    hosts: vec!["*.shop.example".into()],
                    cert: dir.join("shop.pem"),
                    key: dir.join("shop-key.pem"),
                },
            ],
            http: Some(IngressHttpConfig {
                listen: loopback,
                redirect_to_https: true,
            }),
        });
    })
    .await;
    let snap = snapshot(orders.inbound());
    orders.apply(snap.clone()).await;
    gateway.apply(snap).await;
    let tls_addr = gateway.running.bound.ingress.expect("ingress bound");
    let http_addr = gateway.running.bound.ingress_http.expect("http bound");
    let tls = web.client_config();

    // SNI picks the certificate: exact name, then the wildcard.
    let (status, body, served) = https_get(
        tls.clone(),
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
        tls.clone(),
        tls_addr,
        "web.shop.example",
        "/echo",
        &[("x-api-key", KEY)],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(served, shop_der);

    // Outside clients authenticate at the edge.
    let (status, body, _) = https_get(tls.clone(), tls_addr, "api.example.com", "/echo", &[]).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, _) = https_get(
        tls.clone(),
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
        let tls = tls.clone();
        let new_der = new_der.clone();
        async move {
            https_get(
                tls,
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
