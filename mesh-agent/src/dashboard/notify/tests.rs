//! Alert delivery over real loopback sockets: an HTTPS receiver (hyper + tokio-rustls) with
//! certificates of a test CA, and the checks of the TLS files at startup.

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::service::service_fn;
use trellis_proxy::identity::CertificateAuthority;

use super::*;

const DAY: Duration = Duration::from_secs(86_400);

/// What a receiver got: `(path, body)` per request.
type Received = Arc<Mutex<Vec<(String, String)>>>;

/// A CA written as `<dir>/<name>.pem` (its subject names it: two CAs of one name differ only
/// by their keys, which rustls reports as a bad signature rather than an unknown issuer).
fn ca(dir: &Path, name: &str) -> CertificateAuthority {
    let ca = CertificateAuthority::generate(&format!("{name}.test"), DAY).expect("ca");
    std::fs::write(dir.join(format!("{name}.pem")), ca.cert_pem()).expect("write ca");
    ca
}

/// A leaf of `ca` for `hosts`, written as `<dir>/<stem>.pem` and `<dir>/<stem>-key.pem`.
fn leaf(ca: &CertificateAuthority, dir: &Path, stem: &str, hosts: &[&str]) {
    let cert = ca.issue_for_hosts(hosts, DAY).expect("leaf");
    std::fs::write(dir.join(format!("{stem}.pem")), &cert.cert_pem).expect("write cert");
    std::fs::write(dir.join(format!("{stem}-key.pem")), &cert.key_pem).expect("write key");
}

/// An HTTPS receiver on loopback serving `<dir>/<stem>.pem`; with `client_ca`, it requires a
/// client certificate of that CA.
async fn receiver(dir: &Path, stem: &str, client_ca: Option<&str>) -> (u16, Received) {
    let read = |f: String| std::fs::read(dir.join(f)).expect("read");
    let chain = CertificateDer::pem_slice_iter(&read(format!("{stem}.pem")))
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_slice(&read(format!("{stem}-key.pem"))).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(format!("{ca}.pem"))) {
                roots.add(c.expect("ca pem")).expect("root");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(chain, key).expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let received = Received::default();
    let got = received.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, got) = (acceptor.clone(), got.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let got = got.clone();
                    async move {
                        let path = req.uri().to_string();
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        let body = String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
                        got.lock().expect("lock").push((path, body));
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, received)
}

fn webhook(port: u16, dir: &Path, ca: Option<&str>) -> Notify {
    Notify {
        webhook: Some(format!("https://localhost:{port}/hook")),
        ca_file: ca.map(|c| dir.join(format!("{c}.pem"))),
        ..Notify::default()
    }
}

/// Everything logged at warn and above while `f` runs on this thread.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

#[tokio::test]
async fn https_delivers_with_the_right_ca_and_a_wrong_one_fails_with_the_tls_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let right = ca(dir.path(), "right-ca");
    ca(dir.path(), "wrong-ca");
    leaf(&right, dir.path(), "server", &["localhost"]);
    let (port, received) = receiver(dir.path(), "server", None).await;
    let alert = serde_json::json!({"status": "firing", "alert": {"rule": "echo-errors"}});

    let ok = Notifier::new(&webhook(port, dir.path(), Some("right-ca"))).expect("notifier");
    let hook = ok.webhook.clone().expect("webhook");
    assert!(hook.is_https());
    ok.post(&hook, &alert).await.expect("delivered over https");
    {
        let got = received.lock().expect("lock");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "/hook");
        let body: serde_json::Value = serde_json::from_str(&got[0].1).expect("json");
        assert_eq!(body, alert);
    }

    // A CA that did not sign the server's certificate: a TLS failure, told and logged as one,
    // and nothing reaches the receiver.
    let wrong = Notifier::new(&webhook(port, dir.path(), Some("wrong-ca"))).expect("notifier");
    let err = wrong.post(&hook, &alert).await.expect_err("wrong CA");
    assert!(
        matches!(&err, DeliveryError::Tls(r) if r.contains("UnknownIssuer") && r.contains("--alert-ca-file")),
        "{err}"
    );
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .finish();
    let delivered = {
        let _guard = tracing::subscriber::set_default(subscriber);
        wrong.deliver(&hook, &alert).await
    };
    assert!(!delivered);
    let text = logs.text();
    assert!(
        text.contains("alert not delivered")
            && text.contains("kind=\"tls\"")
            && text.contains("UnknownIssuer")
            && text.contains(&format!("https://localhost:{port}/hook")),
        "{text}"
    );
    // The public roots do not know a private CA either.
    let public = Notifier::new(&webhook(port, dir.path(), None)).expect("notifier");
    assert!(matches!(
        public.post(&hook, &alert).await,
        Err(DeliveryError::Tls(_))
    ));
    assert_eq!(
        received.lock().expect("lock").len(),
        1,
        "nothing more received"
    );
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_with_that_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca(dir.path(), "ca");
    leaf(&ca, dir.path(), "server", &["alerts.example"]);
    let (port, received) = receiver(dir.path(), "server", None).await;
    let n = Notifier::new(&webhook(port, dir.path(), Some("ca"))).expect("notifier");
    let hook = n.webhook.clone().expect("webhook");
    let err = n
        .post(&hook, &serde_json::json!({}))
        .await
        .expect_err("name mismatch");
    assert!(
        matches!(&err, DeliveryError::Tls(r) if r.contains("not for the URL's host")),
        "{err}"
    );
    assert!(received.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn an_expired_certificate_is_refused_with_that_reason() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca(dir.path(), "ca");
    // Valid until the second it is issued: expired once that second has passed.
    let cert = ca
        .issue_for_hosts(&["localhost"], Duration::ZERO)
        .expect("leaf");
    std::fs::write(dir.path().join("server.pem"), &cert.cert_pem).expect("write cert");
    std::fs::write(dir.path().join("server-key.pem"), &cert.key_pem).expect("write key");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (port, received) = receiver(dir.path(), "server", None).await;
    let n = Notifier::new(&webhook(port, dir.path(), Some("ca"))).expect("notifier");
    let hook = n.webhook.clone().expect("webhook");
    let err = n
        .post(&hook, &serde_json::json!({}))
        .await
        .expect_err("expired");
    assert!(
        matches!(&err, DeliveryError::Tls(r) if r.contains("has expired")),
        "{err}"
    );
    assert!(received.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn mtls_alertmanager_gets_alerts_only_with_the_client_certificate() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca(dir.path(), "ca");
    leaf(&ca, dir.path(), "server", &["localhost"]);
    leaf(&ca, dir.path(), "dashboard", &["dashboard"]);
    let (port, received) = receiver(dir.path(), "server", Some("ca")).await;
    let mut notify = Notify {
        alertmanagers: vec![format!("https://localhost:{port}/")],
        ca_file: Some(dir.path().join("ca.pem")),
        ..Notify::default()
    };
    let alerts = serde_json::json!([{"labels": {"alertname": "x"}}]);

    let anonymous = Notifier::new(&notify).expect("notifier");
    let am = anonymous.alertmanagers[0].clone();
    assert_eq!(am.url(), format!("https://localhost:{port}/api/v2/alerts"));
    let err = anonymous
        .post(&am, &alerts)
        .await
        .expect_err("no client certificate");
    assert_eq!(err.kind(), "tls", "{err}");
    assert!(
        err.to_string().contains("CertificateRequired"),
        "the server's alert: {err}"
    );
    assert!(received.lock().expect("lock").is_empty());

    notify.client_cert = Some(dir.path().join("dashboard.pem"));
    notify.client_key = Some(dir.path().join("dashboard-key.pem"));
    let n = Notifier::new(&notify).expect("notifier");
    n.post(&am, &alerts).await.expect("delivered with mTLS");
    let got = received.lock().expect("lock");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "/api/v2/alerts");
}

#[test]
fn bad_settings_are_refused_at_startup_naming_the_file() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = ca(dir.path(), "ca");
    leaf(&ca, dir.path(), "client", &["dashboard"]);
    let p = |f: &str| dir.path().join(f);
    std::fs::write(p("garbage.pem"), "not a certificate\n").expect("write");
    std::fs::write(
        p("broken.pem"),
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let https = |ca_file: PathBuf| Notify {
        webhook: Some("https://alerts.example/hook".into()),
        ca_file: Some(ca_file),
        ..Notify::default()
    };
    let err = |n: Notify| match Notifier::new(&n) {
        Ok(_) => panic!("accepted {n:?}"),
        Err(e) => e,
    };

    let e = err(https(p("missing.pem")));
    assert!(matches!(e, NotifyConfigError::Read { .. }), "{e}");
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let e = err(https(p("garbage.pem")));
    assert!(matches!(e, NotifyConfigError::NoCertificate { .. }), "{e}");
    assert!(e.to_string().contains("garbage.pem"), "{e}");
    let e = err(https(p("broken.pem")));
    assert!(matches!(e, NotifyConfigError::Pem { .. }), "{e}");
    assert!(e.to_string().contains("broken.pem"), "{e}");

    let mut n = https(p("ca.pem"));
    n.client_cert = Some(p("client.pem"));
    let e = err(n.clone());
    assert!(e.to_string().contains("--alert-client-key"), "{e}");
    n.client_key = Some(p("client.pem"));
    let e = err(n.clone());
    assert!(matches!(e, NotifyConfigError::NoKey { .. }), "{e}");
    assert!(e.to_string().contains("client.pem"), "{e}");
    n.client_key = Some(p("client-key.pem"));
    Notifier::new(&n).expect("a valid client certificate");

    // A file given without any https destination is still checked.
    let e = err(Notify {
        webhook: Some("http://127.0.0.1:9/hook".into()),
        ca_file: Some(p("missing.pem")),
        ..Notify::default()
    });
    assert!(e.to_string().contains("missing.pem"), "{e}");

    for url in ["ftp://am:9093", "not a url", "https:///hook"] {
        let e = err(Notify {
            alertmanagers: vec![url.into()],
            ..Notify::default()
        });
        assert!(matches!(e, NotifyConfigError::Url { .. }), "{url}: {e}");
    }
    let plain = Notifier::new(&Notify {
        alertmanagers: vec!["http://127.0.0.1:9093".into()],
        ..Notify::default()
    })
    .expect("plain http");
    assert!(plain.tls.is_none() && !plain.alertmanagers[0].is_https());
}
