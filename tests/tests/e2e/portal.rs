//! The developer portal's pages and consumer self-service over real sockets, a real etcd and
//! a real ingress (issue 19): a consumer signs up with an invite, creates a key, calls an API
//! through the ingress with try-it-out, sees it in the usage page and revokes the key, in a
//! real headless chromium running the pages' scripts; and the attacks the portal must refuse.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use etcd_client::{Client, GetOptions};
use http::Request;
use http_body_util::Full;
use mesh_agent::cli::{Cli, Command};
use mesh_agent::testing::EtcdCluster;
use serde_json::{json, Value};
use trellis_policies::parse_documents;
use trellis_tests::backend::Backend;
use trellis_tests::cdp::Browser;
use trellis_tests::web::{loopback_ingress, Dial, HttpsReply, WebPki};
use trellis_tests::{client, etcd_sidecar, init_logs, wait_for, Pki};

const PORTAL: &str = "developer.example.com";
const API: &str = "api.example.com";

/// `orders` v1 (under `/echo/`, where the test app echoes requests): list and get, each order with `id`, `total` and `note`.
fn v1() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Orders API", "version": "1.0.0", "description": "Orders of the shop."},
        "paths": {
            "/echo/orders": {"get": {"summary": "List orders",
                "parameters": [{"name": "limit", "in": "query", "schema": {"type": "integer"}}],
                "responses": {"200": {"description": "the orders", "content": {"application/json":
                    {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}}}}}}}},
            "/echo/orders/{id}": {"get": {"summary": "One order",
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the order", "content": {"application/json":
                    {"schema": {"$ref": "#/components/schemas/Order"}}}}}},
                "delete": {"summary": "Cancel an order", "responses": {"204": {"description": "cancelled"}}}}
        },
        "components": {"schemas": {"Order": {"type": "object", "required": ["id"], "properties": {
            "id": {"type": "string"}, "total": {"type": "number", "description": "in cents"},
            "note": {"type": "string"}}}}}
    })
}

/// v2: `note` removed from the response, `DELETE` removed, a required `region` query
/// parameter on the list, and a new `POST /orders`.
fn v2() -> Value {
    let mut d = v1();
    d["info"]["version"] = json!("2.0.0");
    d["components"]["schemas"]["Order"]["properties"]
        .as_object_mut()
        .expect("props")
        .remove("note");
    d["paths"]["/echo/orders/{id}"]
        .as_object_mut()
        .expect("item")
        .remove("delete");
    d["paths"]["/echo/orders"]["get"]["parameters"]
        .as_array_mut()
        .expect("params")
        .push(json!({"name": "region", "in": "query", "required": true, "schema": {"type": "string"}}));
    d["paths"]["/echo/orders"]["post"] = json!({"summary": "Place an order",
        "requestBody": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}},
        "responses": {"201": {"description": "placed"}}});
    d
}

const POLICIES: &str = "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: shop}\nspec:\n  hosts: [api.example.com]\n  gateways: [edge]\n  rules:\n  - name: shop\n    matches: [{path: {prefix: /shop}}]\n    rewrite: {path_prefix: /echo/orders}\n    backends: [{service: orders}]\n---\napiVersion: trellis.dev/v1\nkind: AuthenticationPolicy\nmetadata: {name: edge-keys}\nspec:\n  service: edge\n  api_keys: {header: x-api-key}\n";

/// A mesh with `orders` (v1 and v2 documents stored, an echo app behind a sidecar) and
/// `replicas` ingress gateways `edge`, each with the portal on [`PORTAL`].
struct Mesh {
    etcd: EtcdCluster,
    web: WebPki,
    _pki: Pki,
    _backend: Backend,
    _orders: trellis_proxy::app::Running,
    gateways: Vec<trellis_proxy::app::Running>,
}

impl Mesh {
    async fn start(replicas: usize, open_signup: bool) -> Self {
        init_logs();
        let etcd = EtcdCluster::start(1).await;
        let cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
        let dir = tempfile::tempdir().expect("dir");
        for (version, doc) in [("v1", v1()), ("v2", v2())] {
            let f = dir.path().join(format!("{version}.json"));
            std::fs::write(&f, doc.to_string()).expect("write");
            let spec = mesh_agent::api::load_document(&f, "orders", version).expect("spec");
            mesh_agent::api::put(&cfg, &[spec], false)
                .await
                .expect("put");
        }
        let docs: Vec<_> = parse_documents(POLICIES, "t")
            .into_iter()
            .map(|d| d.expect("doc"))
            .collect();
        mesh_agent::policy::apply_as(&cfg, &docs, false, "ops")
            .await
            .expect("apply");
        let pki = Pki::new(&["edge", "orders"]);
        let web = WebPki::new();
        web.leaf(pki.path(), "portal", &[PORTAL]);
        web.leaf(pki.path(), "api", &[API]);
        let backend = Backend::start().await;
        // orders believes the consumer the gateway names (and no one else).
        let orders = etcd_sidecar(&pki, "orders", backend.addr, etcd.endpoints(), |c| {
            c.proxy.authorization.consumer_from_peers = vec![Pki::spiffe("edge")];
        })
        .await;
        let mut gateways = Vec::new();
        for _ in 0..replicas {
            let g = etcd_sidecar(&pki, "edge", backend.addr, etcd.endpoints(), |c| {
                let mut ingress =
                    loopback_ingress(pki.path(), &[(PORTAL, "portal"), (API, "api")], false);
                ingress.portal = Some(trellis_proxy::config::PortalConfig {
                    host: PORTAL.into(),
                    public_url: Some(format!("https://{API}")),
                    open_signup,
                });
                c.proxy.ingress = Some(ingress);
            })
            .await;
            gateways.push(g);
        }
        let mesh = Self {
            etcd,
            web,
            _pki: pki,
            _backend: backend,
            _orders: orders,
            gateways,
        };
        for i in 0..replicas {
            wait_for(
                Duration::from_secs(20),
                "the portal's documents",
                || async {
                    mesh.portal(i, "GET", "/apis", None, &[])
                        .await
                        .body
                        .contains("orders")
                },
            )
            .await;
        }
        mesh
    }

    fn tls(&self, i: usize) -> SocketAddr {
        self.gateways[i].bound.ingress.expect("ingress bound")
    }

    fn endpoint(&self) -> String {
        self.etcd.endpoints()[0].clone()
    }

    /// One HTTPS request to replica `i`'s portal.
    async fn portal(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> HttpsReply {
        self.portal_from(i, None, method, path, body, headers).await
    }

    async fn portal_from(
        &self,
        i: usize,
        from: Option<IpAddr>,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, &str)],
    ) -> HttpsReply {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", PORTAL);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .expect("request");
        let dial = Dial {
            addr: self.tls(i),
            from,
            name: PORTAL,
            sni: true,
            h2: false,
        };
        self.web.send(dial, req).await
    }

    /// A call to the API through replica `i` with `key`.
    async fn call_api(&self, i: usize, key: &str) -> u16 {
        let req = Request::get("/shop/42")
            .header("host", API)
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .expect("request");
        let dial = Dial {
            addr: self.tls(i),
            from: None,
            name: API,
            sni: true,
            h2: false,
        };
        let r = self.web.send(dial, req).await;
        r.status
    }

    async fn invite(&self) -> String {
        let out = consumer(&self.endpoint(), &["invite", "--note", "test"]).await;
        out.rsplit(' ').next().expect("token").trim().to_string()
    }
}

/// `mesh-agent consumer ARGS` as the CLI runs it; what it prints.
async fn consumer(endpoint: &str, args: &[&str]) -> String {
    let argv = ["mesh-agent", "consumer"]
        .iter()
        .chain(args)
        .copied()
        .chain(["--etcd-endpoints", endpoint]);
    let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Command::Consumer { command } = cli.command else {
        unreachable!()
    };
    mesh_agent::portal_app::admin::execute(command)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn browser_args(mesh: &Mesh) -> Vec<String> {
    let port = mesh.tls(0).port();
    vec![
        format!("--host-resolver-rules=MAP {PORTAL} 127.0.0.1:{port}, MAP {API} 127.0.0.1:{port}"),
        // The test CA is not the browser's; the portal's cookies still need HTTPS.
        "--ignore-certificate-errors".to_string(),
    ]
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).expect("screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} looks empty",
        path.display()
    );
}

/// The whole consumer flow in a real browser: catalog (search), reference, changelog with
/// breaking changes flagged, sign-up with an invite, a key created and shown once,
/// try-it-out answered 200 through the ingress, the usage page counting it, the key revoked,
/// and the next call refused with 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_signs_up_gets_a_key_tries_the_api_sees_usage_and_revokes_it_in_a_browser() {
    let mesh = Mesh::start(1, false).await;
    let invite = mesh.invite().await;
    assert!(invite.starts_with("inv_"), "{invite}");
    let mut b = Browser::launch(&browser_args(&mesh)).await;
    let base = format!("https://{PORTAL}");

    // Catalog, with search.
    b.goto(&format!("{base}/")).await;
    b.wait(
        "document.querySelectorAll('.api-card').length === 1",
        "the catalog",
    )
    .await;
    assert_eq!(
        b.eval("document.querySelector('.api-card .title').textContent")
            .await,
        "Orders API"
    );
    b.fill("#search", "nothing-like-this").await;
    b.wait(
        "document.querySelectorAll('.api-card').length === 0",
        "the search filtering",
    )
    .await;
    b.fill("#search", "shop").await;
    b.wait(
        "document.querySelectorAll('.api-card').length === 1",
        "a match on the description",
    )
    .await;
    assert_png(&b.screenshot("portal-catalog").await);

    // Reference: the public view (paths through the gateway's rewrite), its schemas.
    b.goto(&format!("{base}/#/apis/orders")).await;
    b.wait(
        "document.querySelectorAll('.op').length === 3",
        "the operations of v2",
    )
    .await;
    let ops = b
        .eval("[...document.querySelectorAll('.op')].map(o => o.dataset.op).join(',')")
        .await;
    assert_eq!(
        ops, "GET /shop,POST /shop,GET /shop/{id}",
        "the public paths of the latest version"
    );
    let text = b
        .eval("document.querySelector('#operations').innerText")
        .await;
    let text = text.as_str().expect("text");
    assert!(
        text.contains("region") && text.contains("total") && text.contains("in cents"),
        "{text}"
    );
    assert_png(&b.screenshot_full("portal-reference").await);
    // Another version's reference, picked from the list.
    b.eval("(() => { const s = document.querySelector('#version'); s.value = 'v1'; s.dispatchEvent(new Event('change')); return true; })()").await;
    b.wait(
        "[...document.querySelectorAll('.op')].some(o => o.dataset.op === 'DELETE /shop/{id}')",
        "v1's reference",
    )
    .await;
    let v1_text = b
        .eval("document.querySelector('#operations').innerText")
        .await;
    assert!(
        !v1_text.as_str().expect("text").contains("region"),
        "{v1_text}"
    );
    assert_png(&b.screenshot("portal-reference-v1").await);

    // Changelog v1 -> v2: the three breaking changes flagged.
    b.goto(&format!("{base}/#/apis/orders/changelog")).await;
    b.wait(
        "document.querySelector('#breaking-summary')",
        "the changelog",
    )
    .await;
    let summary = b
        .eval("document.querySelector('#breaking-summary').textContent")
        .await;
    assert!(
        summary
            .as_str()
            .expect("s")
            .starts_with("4 breaking changes"),
        "{summary}"
    );
    let breaking = b.eval("[...document.querySelectorAll('.change.breaking .loc')].map(e => e.textContent).join(' | ')").await;
    let breaking = breaking.as_str().expect("s");
    for what in ["DELETE /shop/{id}", "GET /shop"] {
        assert!(breaking.contains(what), "{breaking}");
    }
    assert_png(&b.screenshot_full("portal-changelog").await);

    // Sign up with the invite; the keys page follows.
    b.goto(&format!("{base}/#/signup?invite={invite}")).await;
    b.wait("document.querySelector('#signup-invite') && document.querySelector('#signup-invite').value", "the invite in the form").await;
    b.fill("#signup-email", "ann@example.com").await;
    b.fill("#signup-password", "correct horse battery").await;
    assert_png(&b.screenshot("portal-signup").await);
    b.click("#signup-submit").await;
    b.wait(
        "document.body.dataset.view === 'keys' && document.querySelector('#key-create')",
        "the keys page after sign-up",
    )
    .await;
    assert_eq!(
        b.eval("document.querySelector('#who').textContent").await,
        "ann@example.com"
    );
    let cookie_js = b.eval("document.cookie").await;
    assert_eq!(cookie_js, "", "the session cookie is HttpOnly");

    // A key, shown once.
    b.fill("#key-label", "laptop").await;
    b.click("#key-create").await;
    let key = b
        .wait(
            "document.querySelector('#new-key') && document.querySelector('#new-key').textContent",
            "the new key",
        )
        .await;
    let key = key.as_str().expect("key").to_string();
    assert!(key.starts_with("trk_"), "{key}");
    b.wait(
        "document.querySelector('.key-row[data-id=laptop]')",
        "the key listed",
    )
    .await;
    assert_png(&b.screenshot("portal-keys").await);

    // Every ingress accepts it once the Consumer policy reaches its snapshot.
    wait_for(Duration::from_secs(15), "the new key accepted", || async {
        mesh.call_api(0, &key).await == 200
    })
    .await;

    // Try-it-out on the reference page: through the ingress, with the key.
    b.goto(&format!("{base}/#/apis/orders")).await;
    b.wait(
        "document.querySelector('.op[data-op=\"GET /shop\"] .try-send')",
        "the try-it-out panel",
    )
    .await;
    let prefilled = b
        .eval("document.querySelector('.op[data-op=\"GET /shop\"] .try-key').value")
        .await;
    assert_eq!(prefilled, key.as_str(), "the key just created is offered");
    b.fill(".op[data-op=\"GET /shop\"] [data-param=region]", "eu")
        .await;
    b.click(".op[data-op=\"GET /shop\"] .try-send").await;
    let status = b
        .wait(
            "document.querySelector('.op[data-op=\"GET /shop\"] .try-status').textContent",
            "the try-it-out answer",
        )
        .await;
    assert_eq!(status, "200");
    let shown = b
        .eval("document.querySelector('.op[data-op=\"GET /shop\"] .try-result').innerText")
        .await;
    let shown = shown.as_str().expect("s");
    // The echo app saw the request as routed: the prefix rewritten, the consumer named.
    assert!(
        shown.contains("/echo/orders?region=eu") && shown.contains("portal-ann-"),
        "{shown}"
    );
    b.eval("window.scrollTo(0, document.querySelector('.op[data-op=\"GET /shop\"] .try-result').getBoundingClientRect().top + window.scrollY - 300)").await;
    assert_png(&b.screenshot("portal-try-it-out").await);

    // Usage: the calls counted (the direct call above and try-it-out), per route and day.
    b.goto(&format!("{base}/#/usage")).await;
    let mut counted = Value::Null;
    for _ in 0..40 {
        b.goto(&format!("{base}/#/usage")).await;
        counted = b.wait("document.body.dataset.view === 'usage' && document.querySelector('#usage') && (document.querySelector('.usage-row .requests') || {textContent: '0'}).textContent", "the usage page").await;
        if counted.as_str().and_then(|s| s.parse::<u64>().ok()) >= Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.goto(&format!("{base}/#/")).await;
    }
    assert_eq!(counted, "2", "the usage page counts both calls");
    assert_eq!(
        b.eval("document.querySelector('.usage-row').dataset.route")
            .await,
        "shop"
    );
    assert_png(&b.screenshot("portal-usage").await);
    // Each day's usage entries expire with a lease (kept about a month).
    let mut etcd = Client::connect([mesh.endpoint()], None)
        .await
        .expect("etcd");
    let usage = etcd
        .get(
            "/trellis/v1/portal/usage/",
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .expect("get");
    assert!(!usage.kvs().is_empty());
    for kv in usage.kvs() {
        let ttl = etcd
            .lease_time_to_live(kv.lease(), None)
            .await
            .expect("lease")
            .ttl();
        assert!(
            ttl > 31 * 86_400,
            "{} expires in {ttl} s",
            kv.key_str().unwrap_or("")
        );
    }

    // Revoke: the next call is refused.
    b.goto(&format!("{base}/#/keys")).await;
    b.wait(
        "document.querySelector('.key-row[data-id=laptop] .revoke')",
        "the key row",
    )
    .await;
    b.click(".key-row[data-id=laptop] .revoke").await;
    b.wait("document.querySelector('#revoked')", "the revocation")
        .await;
    assert_eq!(
        b.eval("document.querySelectorAll('.key-row').length").await,
        0
    );
    wait_for(
        Duration::from_secs(15),
        "the revoked key refused",
        || async { mesh.call_api(0, &key).await == 401 },
    )
    .await;
    b.goto(&format!("{base}/#/apis/orders")).await;
    b.wait(
        "document.querySelector('.op[data-op=\"GET /shop\"] .try-send')",
        "the try-it-out panel",
    )
    .await;
    b.fill(".op[data-op=\"GET /shop\"] .try-key", &key).await;
    b.fill(".op[data-op=\"GET /shop\"] [data-param=region]", "eu")
        .await;
    b.click(".op[data-op=\"GET /shop\"] .try-send").await;
    let status = b
        .wait(
            "document.querySelector('.op[data-op=\"GET /shop\"] .try-status').textContent",
            "the try-it-out answer",
        )
        .await;
    assert_eq!(status, "401", "try-it-out with the revoked key");
    assert!(b.errors.is_empty(), "page errors: {:?}", b.errors);
}

fn cookie_of(r: &HttpsReply) -> String {
    let set = r.headers["set-cookie"].to_str().expect("ascii");
    assert!(
        set.contains("Secure") && set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    set.split(';').next().expect("pair").to_string()
}

fn creds(email: &str, password: &str, invite: Option<&str>) -> Option<Bytes> {
    let mut v = json!({"email": email, "password": password});
    if let Some(i) = invite {
        v["invite"] = json!(i);
    }
    Some(Bytes::from(v.to_string()))
}

async fn metric(mesh: &Mesh, series: &str) -> f64 {
    let text = client::admin(mesh.gateways[0].bound.admin, "/metrics")
        .await
        .body;
    client::metric(&text, series)
}

/// What an attacker tries, refused: sign-up without a valid invite (none, made up, reused);
/// a password flood (per account, then per client address); requests without the CSRF
/// token or from another origin; forged cookies and another account's cookie; oversized
/// bodies. And what must hold: a key is shown once and stored only as its digest, the
/// password only as Argon2id; a session and a key made on one replica work on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_refuses_what_an_attacker_tries_and_any_replica_serves_any_consumer() {
    let mesh = Mesh::start(2, false).await;
    let pw = "correct horse battery";

    // Sign-up needs a valid invite: none, a made-up one, and one already used.
    let none = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signup",
            creds("eve@example.com", pw, None),
            &[],
        )
        .await;
    assert_eq!(none.status, 403, "{}", none.body);
    assert!(none.body.contains("an invite is required"), "{}", none.body);
    let made_up = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signup",
            creds("eve@example.com", pw, Some("inv_nope")),
            &[],
        )
        .await;
    assert_eq!(made_up.status, 403);
    assert!(
        made_up.body.contains("unknown, used or expired"),
        "{}",
        made_up.body
    );
    let invite = mesh.invite().await;
    let short = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signup",
            creds("ann@example.com", "short", Some(&invite)),
            &[],
        )
        .await;
    assert_eq!(short.status, 400, "{}", short.body);
    let ann = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signup",
            creds("ann@example.com", pw, Some(&invite)),
            &[],
        )
        .await;
    assert_eq!(ann.status, 201, "{}", ann.body);
    let ann_cookie = cookie_of(&ann);
    let ann_csrf = serde_json::from_str::<Value>(&ann.body).expect("json")["csrf"]
        .as_str()
        .expect("csrf")
        .to_string();
    let reused = mesh
        .portal(
            1,
            "POST",
            "/portal/api/signup",
            creds("eve@example.com", pw, Some(&invite)),
            &[],
        )
        .await;
    assert_eq!(
        reused.status, 403,
        "an invite works once, on any replica: {}",
        reused.body
    );
    let bob_invite = mesh.invite().await;
    let bob = mesh
        .portal(
            1,
            "POST",
            "/portal/api/signup",
            creds("bob@example.com", pw, Some(&bob_invite)),
            &[],
        )
        .await;
    assert_eq!(bob.status, 201, "{}", bob.body);
    let bob_cookie = cookie_of(&bob);
    let bob_csrf = serde_json::from_str::<Value>(&bob.body).expect("json")["csrf"]
        .as_str()
        .expect("csrf")
        .to_string();
    assert!(metric(&mesh, "trellis_portal_refusals_total{outcome=\"invite\"}").await >= 2.0);

    // A state change without the CSRF token, or with another session's, is refused.
    let label = Some(Bytes::from_static(br#"{"label":"ci"}"#));
    let no_csrf = mesh
        .portal(
            0,
            "POST",
            "/portal/api/keys",
            label.clone(),
            &[("cookie", &ann_cookie)],
        )
        .await;
    assert_eq!(no_csrf.status, 403, "{}", no_csrf.body);
    let wrong_csrf = mesh
        .portal(
            0,
            "POST",
            "/portal/api/keys",
            label.clone(),
            &[("cookie", &ann_cookie), ("x-csrf-token", &bob_csrf)],
        )
        .await;
    assert_eq!(wrong_csrf.status, 403);
    let other_origin = mesh
        .portal(
            0,
            "POST",
            "/portal/api/keys",
            label.clone(),
            &[
                ("cookie", &ann_cookie),
                ("x-csrf-token", &ann_csrf),
                ("origin", "https://evil.example"),
            ],
        )
        .await;
    assert_eq!(other_origin.status, 403, "{}", other_origin.body);

    // A key: made on replica 0 with ann's session, shown once.
    let made = mesh
        .portal(
            0,
            "POST",
            "/portal/api/keys",
            label.clone(),
            &[
                ("cookie", &ann_cookie),
                ("x-csrf-token", &ann_csrf),
                ("origin", "https://developer.example.com"),
            ],
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.body);
    assert_eq!(made.headers["cache-control"], "no-store");
    let key = serde_json::from_str::<Value>(&made.body).expect("json")["key"]
        .as_str()
        .expect("key")
        .to_string();
    // Replica 1 knows ann's session (the secret is in etcd) and never shows the key again.
    let listed = mesh
        .portal(
            1,
            "GET",
            "/portal/api/keys",
            None,
            &[("cookie", &ann_cookie)],
        )
        .await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(
        listed.body.contains("\"ci\"") && !listed.body.contains(&key),
        "{}",
        listed.body
    );
    let digest = mesh_agent::apikey::digest_hex(&key);
    assert!(
        !listed.body.contains(&digest),
        "not even its digest: {}",
        listed.body
    );
    // Both replicas accept the key once their snapshots carry it.
    let made_at = std::time::Instant::now();
    for i in 0..2 {
        wait_for(Duration::from_secs(15), "the key accepted", || async {
            mesh.call_api(i, &key).await == 200
        })
        .await;
    }

    eprintln!(
        "portal: a new key accepted by both replicas {:?} after it was shown",
        made_at.elapsed()
    );
    // Nothing in etcd holds the key or the password in clear: the digest and Argon2id only.
    let mut etcd = Client::connect([mesh.endpoint()], None)
        .await
        .expect("etcd");
    let all = etcd
        .get("/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("get");
    let mut stored_digest = false;
    for kv in all.kvs() {
        let v = String::from_utf8_lossy(kv.value());
        assert!(
            !v.contains(&key) && !v.contains(pw),
            "{} holds a secret in clear",
            kv.key_str().unwrap_or("")
        );
        stored_digest |= v.contains(&digest);
    }
    assert!(stored_digest, "the Consumer policy holds the key's digest");
    let account = etcd
        .get("/trellis/v1/portal/accounts/ann@example.com", None)
        .await
        .expect("get");
    let account: Value = serde_json::from_slice(account.kvs()[0].value()).expect("account");
    assert!(
        account["password"]
            .as_str()
            .expect("hash")
            .starts_with("$argon2id$"),
        "{account}"
    );

    // Bob's session acts on bob's account only: ann's key is not his to revoke.
    let steal = mesh
        .portal(
            0,
            "DELETE",
            "/portal/api/keys/ci",
            None,
            &[("cookie", &bob_cookie), ("x-csrf-token", &bob_csrf)],
        )
        .await;
    assert_eq!(steal.status, 404, "{}", steal.body);
    assert_eq!(mesh.call_api(0, &key).await, 200, "ann's key still works");
    // Forged cookies: made up, altered to name ann, and bob's tag on ann's payload.
    let (ann_payload, _) = ann_cookie
        .split_once('=')
        .expect("pair")
        .1
        .split_once('.')
        .expect("dot");
    let (_, bob_tag) = bob_cookie
        .split_once('=')
        .expect("pair")
        .1
        .split_once('.')
        .expect("dot");
    for forged in [
        "__Host-trellis-portal=eyJhIjoiYW5uQGV4YW1wbGUuY29tIiwieCI6OTk5OTk5OTk5OSwibiI6IngifQ.AAAA"
            .to_string(),
        format!("__Host-trellis-portal={ann_payload}.{bob_tag}"),
        "__Host-trellis-portal=garbage".to_string(),
    ] {
        let r = mesh
            .portal(0, "GET", "/portal/api/keys", None, &[("cookie", &forged)])
            .await;
        assert_eq!(r.status, 401, "{forged}: {}", r.body);
    }
    assert!(metric(&mesh, "trellis_portal_refusals_total{outcome=\"session\"}").await >= 3.0);
    assert!(metric(&mesh, "trellis_portal_refusals_total{outcome=\"csrf\"}").await >= 2.0);

    // Oversized and malformed bodies.
    let big = Some(Bytes::from(vec![b'a'; 70 * 1024]));
    let r = mesh.portal(0, "POST", "/portal/api/signin", big, &[]).await;
    assert_eq!(r.status, 413, "{}", r.body);
    let r = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signin",
            Some(Bytes::from_static(b"{\"email\":1")),
            &[],
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // A password flood on ann: 5 failures, then 429 even with the right password, while
    // bob (another account) still signs in from the same address.
    let from = Some("127.0.0.2".parse().expect("ip"));
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = mesh
            .portal_from(
                0,
                from,
                "POST",
                "/portal/api/signin",
                creds("ann@example.com", "wrong password!", None),
                &[],
            )
            .await;
        statuses.push(r.status);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429]);
    let right = mesh
        .portal_from(
            0,
            from,
            "POST",
            "/portal/api/signin",
            creds("ann@example.com", pw, None),
            &[],
        )
        .await;
    assert_eq!(
        right.status, 429,
        "locked for now, even with the right password"
    );
    assert!(right.headers.contains_key("retry-after"));
    let signin_at = std::time::Instant::now();
    let other = mesh
        .portal_from(
            0,
            from,
            "POST",
            "/portal/api/signin",
            creds("bob@example.com", pw, None),
            &[],
        )
        .await;
    assert_eq!(other.status, 200, "{}", other.body);
    eprintln!(
        "portal: a sign-in (Argon2id verification included) took {:?}",
        signin_at.elapsed()
    );
    // Many accounts from one address: the address's budget runs out.
    let from = Some("127.0.0.3".parse().expect("ip"));
    let mut refused_at = None;
    for n in 0..40 {
        let r = mesh
            .portal_from(
                0,
                from,
                "POST",
                "/portal/api/signin",
                creds(&format!("u{n}@example.com"), "guess guess guess", None),
                &[],
            )
            .await;
        if r.status == 429 {
            refused_at = Some(n);
            break;
        }
        assert_eq!(r.status, 401);
    }
    assert_eq!(refused_at, Some(30), "30 attempts per address per window");
    assert!(metric(&mesh, "trellis_portal_signins_total{outcome=\"throttled\"}").await >= 4.0);
    // A header naming another client changes nothing: the TCP peer is what counts.
    let spoofed = mesh
        .portal_from(
            0,
            from,
            "POST",
            "/portal/api/signin",
            creds("bob@example.com", pw, None),
            &[
                ("x-forwarded-for", "198.51.100.9"),
                ("x-real-ip", "198.51.100.9"),
            ],
        )
        .await;
    assert_eq!(spoofed.status, 429);

    // Rotation: a new key under the same label, shown once; the old one stops working.
    let rotated = mesh
        .portal(
            0,
            "POST",
            "/portal/api/keys/ci/rotate",
            None,
            &[("cookie", &ann_cookie), ("x-csrf-token", &ann_csrf)],
        )
        .await;
    assert_eq!(rotated.status, 200, "{}", rotated.body);
    let old_key = key;
    let key = serde_json::from_str::<Value>(&rotated.body).expect("json")["key"]
        .as_str()
        .expect("key")
        .to_string();
    assert_ne!(key, old_key);
    wait_for(
        Duration::from_secs(15),
        "the rotated key accepted",
        || async { mesh.call_api(1, &key).await == 200 },
    )
    .await;
    assert_eq!(
        mesh.call_api(1, &old_key).await,
        401,
        "the old key is refused"
    );

    // The operator's view and control.
    let accounts = consumer(&mesh.endpoint(), &["accounts"]).await;
    assert!(
        accounts.contains("ann@example.com") && accounts.contains("active"),
        "{accounts}"
    );
    consumer(&mesh.endpoint(), &["suspend", "bob@example.com"]).await;
    let r = mesh
        .portal(
            1,
            "GET",
            "/portal/api/keys",
            None,
            &[("cookie", &bob_cookie)],
        )
        .await;
    assert_eq!(r.status, 401, "a suspended account's session ends");

    // Revoked on replica 1: refused by both.
    let r = mesh
        .portal(
            1,
            "DELETE",
            "/portal/api/keys/ci",
            None,
            &[("cookie", &ann_cookie), ("x-csrf-token", &ann_csrf)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    for i in 0..2 {
        wait_for(
            Duration::from_secs(15),
            "the revoked key refused",
            || async { mesh.call_api(i, &key).await == 401 },
        )
        .await;
    }

    // Signing out ends the session everywhere, a copy of the cookie included.
    let out = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signout",
            None,
            &[("cookie", &ann_cookie), ("x-csrf-token", &ann_csrf)],
        )
        .await;
    assert_eq!(out.status, 200, "{}", out.body);
    assert!(out.headers["set-cookie"]
        .to_str()
        .expect("ascii")
        .contains("Max-Age=0"));
    let copied = mesh
        .portal(
            1,
            "GET",
            "/portal/api/keys",
            None,
            &[("cookie", &ann_cookie)],
        )
        .await;
    assert_eq!(copied.status, 401, "{}", copied.body);
}

/// Without an invite, with `open_signup`: the account waits for `consumer approve`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_signup_waits_for_the_operators_approval() {
    let mesh = Mesh::start(1, true).await;
    let pw = "correct horse battery";
    let r = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signup",
            creds("cy@example.com", pw, None),
            &[],
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(
        !r.headers.contains_key("set-cookie"),
        "no session while pending"
    );
    let r = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signin",
            creds("cy@example.com", pw, None),
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("approval"), "{}", r.body);
    // A bad invite is still refused, not turned into a pending account.
    let r = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signup",
            creds("dee@example.com", pw, Some("inv_nope")),
            &[],
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let out = consumer(&mesh.endpoint(), &["approve", "cy@example.com"]).await;
    assert!(out.contains("active"), "{out}");
    let r = mesh
        .portal(
            0,
            "POST",
            "/portal/api/signin",
            creds("cy@example.com", pw, None),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let cookie = cookie_of(&r);
    let me = mesh
        .portal(0, "GET", "/portal/api/me", None, &[("cookie", &cookie)])
        .await;
    assert_eq!(me.status, 200);
    assert!(me.body.contains("portal-cy-"), "{}", me.body);
}
