//! The ingress as the boundary, tried the way an attacker would: mesh services no route binds
//! to the gateway stay unreachable whatever the client writes in `Host`, `:authority`, an
//! absolute-form target or SNI; forwarding headers are believed only from trusted proxies
//! (and rate limits key on the believed client); identity headers a stranger sends never
//! reach an app; framing that RFC 9110/9112 forbid is refused; HTTP/2 rapid-reset and
//! CONTINUATION floods are cut off.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::Request;
use http_body_util::Empty;
use trellis_policies::MeshDocument;
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::web::{loopback_ingress, Dial, HttpsReply, WebPki};
use trellis_tests::{init_logs, Pki, Sidecar};

const UNTRUSTED: &str = "127.0.0.1";
const PROXY: &str = "127.0.0.2";

/// orders (exposed by the route `edge`, bound to the gateway) and payments (a mesh route
/// `internal` names it, bound to the mesh only); a per-source-address limit at the edge.
fn snapshot(orders: SocketAddr, payments: SocketAddr) -> Arc<Snapshot> {
    let yaml = format!(
        r#"
services:
  orders:
    endpoints: [{{address: "{orders}"}}]
  payments:
    endpoints: [{{address: "{payments}"}}]
http_routes:
  edge:
    hosts: [api.example.com]
    gateways: [gateway]
    rules:
      - name: api
        backends: [{{service: orders}}]
  internal:
    hosts: [payments]
    rules:
      - name: payments-all
        backends: [{{service: payments}}]
rate_limits:
  per-client:
    service: gateway
    scope: local
    match: {{path: {{prefix: /echo/limited}}}}
    key: {{source_ip: true}}
    limit: {{requests: 1, per: minute}}
    burst: 1
"#
    );
    let doc: MeshDocument = trellis_policies::parse_mesh_yaml(&yaml).expect("mesh document");
    trellis_tests::snapshot_of(&doc)
}

struct Edge {
    _pki: Pki,
    web: WebPki,
    orders: Backend,
    payments: Backend,
    _sidecars: Vec<Sidecar>,
    gateway: Sidecar,
    tls: SocketAddr,
    plain: SocketAddr,
}

impl Edge {
    async fn start() -> Self {
        init_logs();
        let pki = Pki::new(&["gateway", "orders", "payments"]);
        let web = WebPki::new();
        let dir = pki.path();
        web.leaf(dir, "api", &["api.example.com"]);
        web.leaf(dir, "shop", &["*.shop.example"]);
        let orders = Backend::start().await;
        let payments = Backend::start().await;
        let orders_sc = Sidecar::start(&pki, "orders", orders.addr, |_| {}).await;
        let payments_sc = Sidecar::start(&pki, "payments", payments.addr, |_| {}).await;
        let gateway = Sidecar::start(&pki, "gateway", orders.addr, |c| {
            // Served, not redirected: the routing rule alone must hold there.
            let mut ingress = loopback_ingress(
                dir,
                &[("api.example.com", "api"), ("*.shop.example", "shop")],
                false,
            );
            ingress.trusted_proxies = vec![PROXY.into()];
            c.ingress = Some(ingress);
        })
        .await;
        let snap = snapshot(orders_sc.inbound(), payments_sc.inbound());
        for s in [&orders_sc, &payments_sc, &gateway] {
            s.apply(snap.clone()).await;
        }
        let tls = gateway.running.bound.ingress.expect("ingress bound");
        let plain = gateway.running.bound.ingress_http.expect("http bound");
        Self {
            _pki: pki,
            web,
            orders,
            payments,
            _sidecars: vec![orders_sc, payments_sc],
            gateway,
            tls,
            plain,
        }
    }

    fn dial<'a>(&self, name: &'a str, sni: bool, h2: bool) -> Dial<'a> {
        Dial {
            addr: self.tls,
            from: None,
            name,
            sni,
            h2,
        }
    }

    async fn https(&self, dial: Dial<'_>, req: http::request::Builder) -> HttpsReply {
        self.web
            .send(dial, req.body(Empty::new()).expect("request"))
            .await
    }

    /// A TLS connection to the ingress for `api.example.com` with ALPN h2, for a client that
    /// writes HTTP/2 itself.
    async fn h2_tls(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.tls)
            .await
            .expect("connect");
        let name = rustls_pki_types::ServerName::try_from("api.example.com").expect("name");
        tokio_rustls::TlsConnector::from(self.web.client_config(true, true))
            .connect(name, tcp)
            .await
            .expect("tls")
    }

    /// A well-behaved HTTP/2 client is served.
    async fn served_over_h2(&self) {
        let r = self
            .https(
                self.dial("api.example.com", true, true),
                Request::get("https://api.example.com/echo"),
            )
            .await;
        assert_eq!(r.status, 200);
    }

    fn reached(&self) -> (u64, u64) {
        (
            self.orders.requests.load(Ordering::Relaxed),
            self.payments.requests.load(Ordering::Relaxed),
        )
    }
}

fn cause(r: &HttpsReply) -> &str {
    r.headers
        .get("trellis-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_exposes_only_hosts_of_routes_bound_to_it() {
    let e = Edge::start().await;

    // The routed host works over h1 and h2.
    for h2 in [false, true] {
        let req = if h2 {
            Request::get("https://api.example.com/echo")
        } else {
            Request::get("/echo").header("host", "api.example.com")
        };
        let r = e.https(e.dial("api.example.com", true, h2), req).await;
        assert_eq!(r.status, 200, "h2={h2}: {}", r.body);
    }
    assert_eq!(e.reached(), (2, 0));

    // Mesh services by name, on a connection opened for api.example.com: misdirected.
    let api = e.dial("api.example.com", true, false);
    let attempts = [
        (
            "Host",
            Request::get("/internal/secret").header("host", "payments"),
        ),
        (
            "Host",
            Request::get("/internal/secret").header("host", "orders"),
        ),
        (
            "absolute-form",
            Request::get("http://payments/internal/secret").header("host", "api.example.com"),
        ),
    ];
    for (how, req) in attempts {
        let r = e.https(api, req).await;
        assert_eq!(r.status, 421, "{how}: {}", r.body);
        assert_eq!(cause(&r), "misdirected-request", "{how}");
    }
    let r = e
        .https(
            e.dial("api.example.com", true, true),
            Request::get("https://payments/internal/secret"),
        )
        .await;
    assert_eq!(
        (r.status, cause(&r)),
        (421, "misdirected-request"),
        ":authority"
    );
    // A mismatched SNI: the wildcard certificate's connection cannot ask for api.example.com.
    let r = e
        .https(
            e.dial("web.shop.example", true, false),
            Request::get("/echo").header("host", "api.example.com"),
        )
        .await;
    assert_eq!((r.status, cause(&r)), (421, "misdirected-request"), "SNI");
    // No SNI: the default certificate's names only.
    let no_sni = e.dial("api.example.com", false, false);
    let r = e
        .https(no_sni, Request::get("/echo").header("host", "payments"))
        .await;
    assert_eq!(r.status, 421, "no SNI, Host payments");
    let r = e
        .https(
            no_sni,
            Request::get("/echo").header("host", "api.example.com"),
        )
        .await;
    assert_eq!(r.status, 200, "no SNI, Host api.example.com: {}", r.body);
    // A name the certificate covers but no route binds: 404.
    let r = e
        .https(
            e.dial("web.shop.example", true, false),
            Request::get("/echo").header("host", "web.shop.example"),
        )
        .await;
    assert_eq!(
        (r.status, cause(&r)),
        (404, "no-route"),
        "covered, unrouted"
    );

    // Without TLS (no certificate to check), only routing decides.
    for target in [
        "/internal/secret HTTP/1.1\r\nHost: payments",
        "/internal/secret HTTP/1.1\r\nHost: orders",
        "http://payments/internal/secret HTTP/1.1\r\nHost: api.example.com",
    ] {
        let r = client::raw(
            e.plain,
            format!("GET {target}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 404"), "{target}: {r}");
        assert!(r.contains("trellis-error: no-route"), "{target}: {r}");
    }
    // The mesh's own route to payments still works from a sidecar's outbound side.
    let r = client::get(&client::h1(e.gateway.outbound()), "http://payments/echo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(e.reached(), (3, 1), "nothing unrouted reached an app");
    let dump = client::admin(e.gateway.admin(), "/config_dump")
        .await
        .json();
    let exposed: Vec<&String> = dump["gateway_routing"]
        .as_object()
        .expect("gateway_routing")
        .keys()
        .collect();
    assert_eq!(exposed, vec!["api.example.com"]);
    assert!(dump["routing"].get("payments").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_believed_only_from_trusted_proxies() {
    let e = Edge::start().await;
    let spoofed = |req: http::request::Builder| {
        req.header("host", "api.example.com")
            .header("x-forwarded-for", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6;proto=https")
            .header("x-real-ip", "6.6.6.6")
            .header("x-forwarded-host", "admin.example.com")
            .header("x-forwarded-proto", "https")
            .header(
                "trellis-peer-identity",
                "spiffe://trellis.test/service/admin",
            )
            .header("trellis-consumer", "acme")
            .header("trellis-retried", "1")
    };
    // A client not in trusted_proxies: everything it wrote is replaced.
    let r = e
        .https(
            e.dial("api.example.com", true, false),
            spoofed(Request::get("/echo")),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen: serde_json::Value = serde_json::from_str(&r.body).expect("echo JSON");
    let h = &seen["headers"];
    assert!(!r.body.contains("6.6.6.6"), "{}", r.body);
    assert!(h.get("x-real-ip").is_none() && h.get("x-forwarded-host").is_none());
    // Internal headers are the sidecars' alone.
    assert_eq!(h["trellis-peer-identity"], Pki::spiffe("gateway"));
    assert!(h.get("trellis-consumer").is_none() && h.get("trellis-retried").is_none());
    // The edge hop, then the orders sidecar's hop from the gateway.
    assert_eq!(h["x-forwarded-for"], format!("{UNTRUSTED}, 127.0.0.1"));
    assert_eq!(
        h["forwarded"],
        format!("for={UNTRUSTED};proto=https | for=127.0.0.1;proto=https")
    );
    assert_eq!(h["x-forwarded-proto"], "https");

    // Plain HTTP: the scheme is http, whatever the client claims.
    let c = client::h1(e.plain);
    let r = client::send(
        &c,
        spoofed(Request::get(format!("http://{}/echo", e.plain)))
            .body(client::empty())
            .expect("request"),
    )
    .await
    .expect("reply");
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "http");

    // A trusted proxy's chain is kept, and the hop appended.
    let mut via_proxy = e.dial("api.example.com", true, false);
    via_proxy.from = Some(PROXY.parse::<IpAddr>().expect("ip"));
    let r = e
        .https(
            via_proxy,
            Request::get("/echo")
                .header("host", "api.example.com")
                .header("x-forwarded-for", "198.51.100.7")
                .header("forwarded", "for=198.51.100.7"),
        )
        .await;
    let seen: serde_json::Value = serde_json::from_str(&r.body).expect("echo JSON");
    assert_eq!(
        seen["headers"]["x-forwarded-for"],
        format!("198.51.100.7, {PROXY}, 127.0.0.1")
    );
    assert_eq!(
        seen["headers"]["forwarded"],
        format!("for=198.51.100.7 | for={PROXY};proto=https | for=127.0.0.1;proto=https")
    );

    // Rate limits key on the believed client: a stranger rotating X-Forwarded-For shares one
    // budget; clients behind the trusted proxy get one each.
    let limited = |dial: Dial<'static>, xff: &'static str| {
        let web = &e.web;
        async move {
            web.send(
                dial,
                Request::get("/echo/limited")
                    .header("host", "api.example.com")
                    .header("x-forwarded-for", xff)
                    .body(Empty::new())
                    .expect("request"),
            )
            .await
            .status
        }
    };
    let stranger = Dial {
        addr: e.tls,
        from: None,
        name: "api.example.com",
        sni: true,
        h2: false,
    };
    let proxied = Dial {
        from: Some(PROXY.parse().expect("ip")),
        ..stranger
    };
    assert_eq!(limited(stranger, "10.0.0.1").await, 200);
    assert_eq!(
        limited(stranger, "10.0.0.2").await,
        429,
        "spoofed XFF, same budget"
    );
    assert_eq!(limited(proxied, "203.0.113.1").await, 200);
    assert_eq!(
        limited(proxied, "203.0.113.2").await,
        200,
        "another real client"
    );
    assert_eq!(
        limited(proxied, "203.0.113.1").await,
        429,
        "same real client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_rfc_9112_forbids_is_refused_on_every_listener() {
    let e = Edge::start().await;
    for (listener, addr) in [
        ("ingress http", e.plain),
        ("outbound", e.gateway.outbound()),
    ] {
        let two_hosts = client::raw(
            addr,
            b"GET /echo HTTP/1.1\r\nHost: api.example.com\r\nHost: payments\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            two_hosts.starts_with("HTTP/1.1 400")
                && two_hosts.contains("trellis-error: bad-request"),
            "{listener}: {two_hosts}"
        );
        let te = client::raw(
            addr,
            b"POST /echo HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: identity, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        .await;
        assert!(te.starts_with("HTTP/1.1 501"), "{listener}: {te}");
        assert!(
            te.to_ascii_lowercase()
                .contains("trellis-error: unsupported-transfer-coding"),
            "{listener}: {te}"
        );
    }
    assert_eq!(e.reached(), (0, 0));
}

/// HTTP/2 "rapid reset" (CVE-2023-44487) at the edge: a client opens streams and cancels each
/// at once, as fast as it can. The ingress ends that connection (GOAWAY `ENHANCE_YOUR_CALM`
/// once 20 streams were reset before it took them: h2's bound, which hyper keeps), while the
/// client still holds it; the cancelled streams do not reach the origin; another client is
/// served. On this machine the client had sent 400-4,000 of its 20,000 streams when it noticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_is_cut_off_and_hurts_no_one_else() {
    const FLOOD: usize = 20_000;
    let e = Edge::start().await;
    let tls = e.h2_tls().await;
    let (mut send, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let before = e.reached().0;
    let mut opened = 0;
    for _ in 0..FLOOD {
        let ready = match send.ready().await {
            Ok(s) => s,
            Err(_) => break,
        };
        send = ready;
        let req = Request::get("https://api.example.com/echo")
            .body(())
            .expect("request");
        match send.send_request(req, true) {
            // Both handles dropped at once: the stream is reset (CANCEL).
            Ok((response, stream)) => drop((response, stream)),
            Err(_) => break,
        }
        opened += 1;
    }
    // The client keeps its handle: only the server can end the connection.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), conn)
        .await
        .unwrap_or_else(|_| panic!("the server never ended the connection ({opened} streams)"))
        .expect("connection task");
    // GOAWAY, or the socket it was sent on already closed under the client's next write.
    let error = ended.expect_err("the server ends the connection");
    if let Some(reason) = error.reason() {
        assert_eq!(reason, h2::Reason::ENHANCE_YOUR_CALM, "opened {opened}");
    } else {
        assert!(error.is_io(), "{error}");
    }
    let reached = e.reached().0 - before;
    assert!(
        reached < 1_000,
        "{reached} of {opened} cancelled streams reached the origin"
    );
    e.served_over_h2().await;
}

/// An HTTP/2 frame header: length, type, flags, stream.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The error code of the first GOAWAY among the frames the server sent (read until the
/// connection ends).
async fn goaway_code<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> Option<u32> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 65536];
    let wait = std::time::Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout(wait, io.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    let mut frames = all.as_slice();
    while frames.len() >= 9 {
        let len =
            usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
        let payload = frames.get(9..9 + len)?;
        if frames[3] == 0x7 {
            return payload
                .get(4..8)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        }
        frames = &frames[9 + len..];
    }
    None
}

/// HTTP/2 CONTINUATION flood (CVE-2024-27316 and its kin): a request head that never ends, one
/// CONTINUATION frame after another. The ingress refuses the head once it passes its header
/// limit and closes the connection: the client cannot make it buffer more than a few
/// megabytes (what the sockets hold) of the 64 MB it tries to send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_continuation_flood_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    const FLOOD: usize = 64 << 20;
    let e = Edge::start().await;
    let mut tls = e.h2_tls().await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    tls.write_all(&h2_frame(0x4, 0, 0, &[]))
        .await
        .expect("settings");
    // :method GET, :scheme https, :path / (static table), then no END_HEADERS.
    let mut head = vec![0x82, 0x87, 0x84];
    head.extend_from_slice(b"\x01\x0fapi.example.com");
    tls.write_all(&h2_frame(0x1, 0x1, 1, &head))
        .await
        .expect("headers");
    // Literal fields without indexing, new names: 16 KB of them per frame.
    let mut block = Vec::new();
    while block.len() < 16_000 {
        block.extend_from_slice(b"\x00\x05x-pad\x7f\x00");
        let value = [b'a'; 127];
        block.extend_from_slice(&value);
    }
    let frame = h2_frame(0x9, 0, 1, &block);
    let mut sent = 0;
    let cut = loop {
        if sent >= FLOOD {
            break false;
        }
        let write =
            tokio::time::timeout(std::time::Duration::from_secs(10), tls.write_all(&frame)).await;
        match write {
            Ok(Ok(())) => sent += frame.len(),
            Ok(Err(_)) => break true,
            // Nobody reads: the server stopped reading without closing.
            Err(_) => panic!("writes stalled after {sent} bytes: the connection hangs open"),
        }
    };
    assert!(cut, "the server took all {sent} bytes of one request head");
    assert!(sent < FLOOD / 4, "cut off after {sent} bytes");
    // Its GOAWAY, when the reset of the socket did not overtake it: ENHANCE_YOUR_CALM (not a
    // protocol or compression error: the frames were well formed).
    if let Some(code) = goaway_code(&mut tls).await {
        assert_eq!(code, 11, "GOAWAY error code");
    }
    e.served_over_h2().await;
}
