//! HTTPRoute on the caller's sidecar, over real sockets: app client -> `client` sidecar ->
//! mTLS -> the chosen service's sidecar -> its backend. Which service served a request is read
//! from the backends' request counters.
//!
//! Statistical checks use bounds of 5 standard deviations of the binomial count (a false
//! failure about once in 1.7 million runs), not guesses.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Request;
use trellis_policies::{EndpointSpec, MeshDocument, ServiceSpec};
use trellis_tests::backend::Backend;
use trellis_tests::client::{self, metric, HttpClient};
use trellis_tests::{init_logs, Pki, Sidecar};

const SERVICES: [&str; 3] = ["echo", "echo-v2", "shadow"];

/// `echo`, `echo-v2` and `shadow`, each a backend behind its own sidecar, and a `client`.
struct RouteMesh {
    _pki: Pki,
    backends: Vec<Backend>,
    _servers: Vec<Sidecar>,
    client: Sidecar,
    c: HttpClient,
    inbound: Vec<SocketAddr>,
    /// The client sidecar's access log (errors always logged).
    access_log: std::path::PathBuf,
}

impl RouteMesh {
    async fn start() -> Self {
        init_logs();
        let pki = Pki::new(&["client", "echo", "echo-v2", "shadow"]);
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for s in SERVICES {
            let b = Backend::start().await;
            let sc = Sidecar::start(&pki, s, b.addr, |_| {}).await;
            sc.route(&[]).await;
            backends.push(b);
            servers.push(sc);
        }
        let inbound = servers.iter().map(|s| s.inbound()).collect();
        let access_log = pki.path().join("client-access.log");
        let log = access_log.clone();
        let client = Sidecar::start(&pki, "client", backends[0].addr, move |cfg| {
            cfg.access_log.enabled = true;
            cfg.access_log.path = Some(log);
        })
        .await;
        let c = client::h1(client.outbound());
        Self {
            _pki: pki,
            backends,
            _servers: servers,
            client,
            c,
            inbound,
            access_log,
        }
    }

    /// Route the three services plus `routes` (YAML of `http_routes`), validated like a file.
    async fn routes(&self, routes: &str) {
        self.routes_with(routes, &[]).await;
    }

    /// As [`RouteMesh::routes`], with extra services (name, endpoint address).
    async fn routes_with(&self, routes: &str, extra: &[(&str, SocketAddr)]) {
        let mut doc = MeshDocument::default();
        let all = SERVICES
            .iter()
            .copied()
            .zip(self.inbound.iter().copied())
            .chain(extra.iter().copied());
        for (name, addr) in all {
            doc.services.insert(
                name.to_string(),
                ServiceSpec {
                    endpoints: vec![EndpointSpec {
                        address: addr.to_string(),
                        identity: None,
                        weight: 1,
                        zone: None,
                    }],
                    ..Default::default()
                },
            );
        }
        doc.http_routes = serde_norway::from_str(routes).expect("routes YAML");
        trellis_policies::validate(&doc).expect("valid routes");
        self.client.apply(trellis_tests::snapshot_of(&doc)).await;
    }

    fn counts(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.backends[i].requests.load(Ordering::Relaxed))
    }

    /// Which service served one request (by the backend counters), and the reply.
    async fn served_by(&self, req: Request<client::Body>) -> (&'static str, client::Reply) {
        let before = self.counts();
        let reply = client::send(&self.c, req).await.expect("reply");
        let after = self.counts();
        let who = (0..3)
            .find(|&i| after[i] > before[i])
            .map_or("none", |i| SERVICES[i]);
        (who, reply)
    }

    async fn get_served_by(&self, uri: &str) -> &'static str {
        let req = Request::get(uri).body(client::empty()).expect("request");
        let (who, r) = self.served_by(req).await;
        assert!(
            r.status == 200 || who == "none",
            "{uri}: {} {}",
            r.status,
            r.body
        );
        who
    }

    async fn metrics(&self) -> String {
        client::admin(self.client.admin(), "/metrics").await.body
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_header_query_and_method_matches_pick_the_backend() {
    let m = RouteMesh::start().await;
    m.routes(
        r#"
echo-routes:
  hosts: [echo]
  rules:
    - name: exact
      matches: [{path: {exact: /echo/exact}}]
      backends: [{service: echo-v2}]
    - name: prefix
      matches: [{path: {prefix: /echo/v2}}]
      backends: [{service: echo-v2}]
    - name: regex
      matches: [{path: {regex: '/echo/users/[0-9]+'}}]
      backends: [{service: shadow}]
    - name: header
      matches: [{headers: [{name: x-canary, exact: "yes"}]}]
      backends: [{service: echo-v2}]
    - name: query
      matches: [{query: [{name: beta, exact: "1"}]}]
      backends: [{service: echo-v2}]
    - name: post
      matches: [{path: {prefix: /echo/orders}, method: POST}]
      backends: [{service: shadow}]
shop:
  hosts: [shop.example.com]
  rules:
    - matches: [{path: {prefix: /echo}}]
      backends: [{service: echo-v2}]
"#,
    )
    .await;
    assert_eq!(m.get_served_by("http://echo/echo/exact").await, "echo-v2");
    assert_eq!(
        m.get_served_by("http://echo/echo/exact/more").await,
        "echo",
        "exact is exact; unmatched requests for a service host go to the service"
    );
    assert_eq!(
        m.get_served_by("http://echo/echo/v2/a?x=1").await,
        "echo-v2"
    );
    assert_eq!(m.get_served_by("http://echo/echo/v2x").await, "echo");
    assert_eq!(m.get_served_by("http://echo/echo/users/42").await, "shadow");
    assert_eq!(m.get_served_by("http://echo/echo/users/ab").await, "echo");
    assert_eq!(m.get_served_by("http://echo/echo?beta=1").await, "echo-v2");
    assert_eq!(m.get_served_by("http://echo/echo?beta=2").await, "echo");
    assert_eq!(m.get_served_by("http://echo/echo/orders").await, "echo");
    let post = Request::post("http://echo/echo/orders")
        .body(client::full("{}"))
        .unwrap();
    assert_eq!(m.served_by(post).await.0, "shadow");
    let canary = Request::get("http://echo/echo")
        .header("x-canary", "yes")
        .body(client::empty())
        .unwrap();
    assert_eq!(m.served_by(canary).await.0, "echo-v2");
    // Exact outranks the header rule even though both match.
    let both = Request::get("http://echo/echo/exact")
        .header("x-canary", "no")
        .body(client::empty())
        .unwrap();
    assert_eq!(m.served_by(both).await.0, "echo-v2");

    // An ingress-style host: routed by its rules; nothing else is served (404 no-route).
    assert_eq!(
        m.get_served_by("http://shop.example.com/echo/x").await,
        "echo-v2"
    );
    let (who, r) = m
        .served_by(
            Request::get("http://shop.example.com/other")
                .body(client::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (who, r.status.as_u16(), r.cause()),
        ("none", 404, "no-route")
    );

    let text = m.metrics().await;
    let series = |svc: &str, route: &str, status: u16| {
        metric(
            &text,
            &format!("trellis_requests_total{{direction=\"outbound\",service=\"{svc}\",route=\"{route}\",status_code=\"{status}\"}}"),
        )
    };
    assert_eq!(series("echo-v2", "exact", 200), 2.0, "{text}");
    assert_eq!(series("echo-v2", "shop-0", 200), 1.0, "{text}");
    assert_eq!(series("shadow", "regex", 200), 1.0);
    assert_eq!(series("echo", "default", 200), 5.0);
    assert_eq!(series("shop.example.com", "default", 404), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_holds_90_10_over_2000_requests() {
    let m = RouteMesh::start().await;
    m.routes(
        "split:\n  hosts: [echo]\n  rules:\n    - backends: [{service: echo, weight: 90}, {service: echo-v2, weight: 10}]\n",
    )
    .await;
    let n = 2000;
    let workers = 8;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let c = m.c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / workers {
                let r = client::get(&c, "http://echo/echo").await;
                assert_eq!(r.status, 200, "{}", r.body);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let [v1, v2, _] = m.counts();
    assert_eq!(v1 + v2, n);
    // Binomial(2000, 0.1): mean 200, sd = sqrt(2000 x 0.1 x 0.9) = 13.4; 5 sd = 67.
    eprintln!("canary split: {v1} / {v2} of {n}");
    assert!((133..=267).contains(&v2), "echo-v2 got {v2} of {n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_and_header_modifiers_are_seen_by_the_app_and_the_caller() {
    let m = RouteMesh::start().await;
    m.routes(
        r#"
rw:
  hosts: [echo]
  rules:
    - name: prefix
      matches: [{path: {prefix: /api/v1}}]
      backends: [{service: echo-v2}]
      rewrite: {path_prefix: /echo/v1, host: orders.internal}
      request_headers: {set: {x-set: new}, add: {x-add: two}, remove: [x-drop]}
      response_headers: {set: {x-served-by: v2}, add: {cache-control: no-store}, remove: [content-type]}
    - name: full
      matches: [{path: {exact: /old}}]
      backends: [{service: echo}]
      rewrite: {path: /echo/new}
"#,
    )
    .await;
    let req = Request::get("http://echo/api/v1/users?page=2")
        .header("x-set", "old")
        .header("x-add", "one")
        .header("x-drop", "secret")
        .body(client::empty())
        .unwrap();
    let (who, r) = m.served_by(req).await;
    assert_eq!((who, r.status.as_u16()), ("echo-v2", 200), "{}", r.body);
    let seen = r.json();
    assert_eq!(seen["path"], "/echo/v1/users?page=2");
    assert_eq!(seen["headers"]["host"], "orders.internal");
    assert_eq!(seen["headers"]["x-set"], "new");
    assert_eq!(seen["headers"]["x-add"], "one | two");
    assert!(seen["headers"].get("x-drop").is_none(), "{seen}");
    assert_eq!(r.headers["x-served-by"], "v2");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(r.headers.get("content-type").is_none());

    let (who, r) = m
        .served_by(
            Request::get("http://echo/old?q=1")
                .body(client::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(who, "echo");
    assert_eq!(r.json()["path"], "/echo/new?q=1");
    assert_eq!(
        r.json()["headers"]["host"],
        "echo",
        "host kept without a host rewrite"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_direct_responses_are_answered_by_the_sidecar() {
    let m = RouteMesh::start().await;
    m.routes(
        r#"
local:
  hosts: [echo]
  rules:
    - name: moved
      matches: [{path: {prefix: /old}}]
      redirect: {scheme: https, host: example.com, status: 301}
    - name: temp
      matches: [{path: {exact: /tmp}}]
      redirect: {path: /echo/here, port: 8080}
    - name: teapot
      matches: [{path: {exact: /teapot}}]
      direct_response: {status: 418, body: "short and stout"}
      response_headers: {set: {x-local: "1"}}
"#,
    )
    .await;
    let before = m.counts();
    let r = client::get(&m.c, "http://echo/old/page?a=b").await;
    assert_eq!(r.status, 301);
    assert_eq!(r.headers["location"], "https://example.com/old/page?a=b");
    assert!(r.headers.get("trellis-error").is_none());
    let r = client::get(&m.c, "http://echo:9000/tmp").await;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "http://echo:8080/echo/here");
    let r = client::get(&m.c, "http://echo/teapot").await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (418, "short and stout")
    );
    assert_eq!(r.headers["x-local"], "1");
    assert!(r.headers.get("trellis-error").is_none());
    assert_eq!(m.counts(), before, "nothing reached a backend");
    // The access log names the rule.
    let log = m.access_log.clone();
    trellis_tests::eventually(Duration::from_secs(5), move || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(r#""route":"teapot""#) && l.contains(r#""status":418"#))
    })
    .await;
    let text = m.metrics().await;
    assert_eq!(
        metric(
            &text,
            "trellis_requests_total{direction=\"outbound\",service=\"echo\",route=\"teapot\",status_code=\"418\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_abort_rate_and_delay() {
    let m = RouteMesh::start().await;
    m.routes(
        r#"
faults:
  hosts: [echo]
  rules:
    - name: abort-half
      matches: [{path: {prefix: /echo/abort}}]
      backends: [{service: echo}]
      fault: {abort: {status: 503, percent: 50}}
    - name: delayed
      matches: [{path: {prefix: /echo/delay}}]
      backends: [{service: echo}]
      fault: {delay: {duration: 150ms, percent: 100}}
"#,
    )
    .await;
    let n = 400u64;
    let mut aborted = 0u64;
    for _ in 0..n {
        let r = client::get(&m.c, "http://echo/echo/abort").await;
        match r.status.as_u16() {
            503 => {
                assert_eq!(r.cause(), "fault-abort");
                aborted += 1;
            }
            200 => {}
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    // Binomial(400, 0.5): mean 200, sd 10; 5 sd = 50.
    eprintln!("fault abort: {aborted} of {n}");
    assert!((150..=250).contains(&aborted), "{aborted} of {n} aborted");
    assert_eq!(m.counts()[0], n - aborted, "aborted requests never left");

    for _ in 0..3 {
        let start = Instant::now();
        let r = client::get(&m.c, "http://echo/echo/delay").await;
        assert_eq!(r.status, 200);
        assert!(start.elapsed() >= Duration::from_millis(150));
    }
    let start = Instant::now();
    assert_eq!(
        client::get(&m.c, "http://echo/echo/plain").await.status,
        200
    );
    assert!(
        start.elapsed() < Duration::from_millis(150),
        "no delay elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_receives_a_copy_and_never_changes_the_main_response() {
    let m = RouteMesh::start().await;
    // `gone` has an endpoint that refuses connections.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    m.routes_with(
        r#"
mirror:
  hosts: [echo]
  rules:
    - name: mirrored
      matches: [{path: {prefix: /echo/m}}]
      backends: [{service: echo}]
      mirror: {service: shadow}
    - name: mirrored-to-nowhere
      matches: [{path: {prefix: /echo/n}}]
      backends: [{service: echo}]
      mirror: {service: gone}
"#,
        &[("gone", gone)],
    )
    .await;
    for i in 0..20 {
        let r = client::get(&m.c, &format!("http://echo/echo/m/{i}")).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["path"], format!("/echo/m/{i}"));
    }
    trellis_tests::eventually(Duration::from_secs(5), || m.counts()[2] == 20).await;
    assert_eq!(m.counts()[0], 20);

    // A body is not mirrored (see docs/routing.md); the main request is served as usual.
    let r = client::send(
        &m.c,
        Request::post("http://echo/echo/m/body")
            .body(client::full("payload"))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);

    // A mirror that cannot be reached changes nothing for the caller.
    let start = Instant::now();
    for _ in 0..20 {
        assert_eq!(client::get(&m.c, "http://echo/echo/n").await.status, 200);
    }
    eprintln!("20 requests with a failing mirror: {:?}", start.elapsed());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(m.counts()[2], 20, "the POST was not mirrored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_backend_and_rule_timeout() {
    let m = RouteMesh::start().await;
    m.routes(
        r#"
misc:
  hosts: [echo]
  rules:
    - name: ghost
      matches: [{path: {prefix: /echo/ghost}}]
      backends: [{service: ghost}]
    - name: quick
      matches: [{path: {prefix: /slow}}]
      backends: [{service: echo}]
      timeout: 100ms
"#,
    )
    .await;
    let r = client::get(&m.c, "http://echo/echo/ghost").await;
    assert_eq!((r.status.as_u16(), r.cause()), (503, "unknown-service"));
    let start = Instant::now();
    let r = client::get(&m.c, "http://echo/slow/2000").await;
    assert_eq!((r.status.as_u16(), r.cause()), (504, "response-timeout"));
    assert!(start.elapsed() < Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_from_the_file_store() {
    init_logs();
    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let server = Sidecar::start(&pki, "echo", backend.addr, |_| {}).await;
    server.route(&[]).await;
    let mesh_file = pki.path().join("mesh.yaml");
    std::fs::write(
        &mesh_file,
        format!(
            "services:\n  echo:\n    endpoints:\n      - address: {}\nhttp_routes:\n  web:\n    hosts: [echo]\n    rules:\n      - matches: [{{path: {{exact: /hello}}}}]\n        direct_response: {{status: 200, body: hi}}\n      - matches: [{{path: {{prefix: /v1}}}}]\n        backends: [{{service: echo}}]\n        rewrite: {{path_prefix: /echo}}\n",
            server.inbound()
        ),
    )
    .unwrap();
    let mut cfg = mesh_agent::testing::config("client", pki.path(), backend.addr);
    cfg.store.file = Some(mesh_file);
    let running = mesh_agent::run::start(cfg).await.expect("start");
    let c = client::h1(running.bound.outbound);
    trellis_tests::wait_for(Duration::from_secs(5), "file routes applied", || async {
        client::get(&c, "http://echo/hello").await.body == "hi"
    })
    .await;
    let r = client::get(&c, "http://echo/v1/x").await;
    assert_eq!(r.json()["path"], "/echo/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_route_applied_through_etcd_and_checked_by_policy_validate() {
    init_logs();
    let etcd = mesh_agent::testing::EtcdCluster::start(1).await;
    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let _server =
        trellis_tests::etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), |_| {}).await;
    let client =
        trellis_tests::etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), |_| {}).await;
    let c = client::h1(client.bound.outbound);
    trellis_tests::wait_for(Duration::from_secs(10), "echo reachable", || async {
        client::send(
            &c,
            Request::get("http://echo/echo")
                .body(client::empty())
                .unwrap(),
        )
        .await
        .is_ok_and(|r| r.status == 200)
    })
    .await;

    // `policy validate` / `apply` read files through load_documents: a bad HTTPRoute is named
    // with its field, a good one passes.
    let dir = pki.path();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  hosts: [echo]\n  rules:\n    - matches: [{path: {regex: '(unclosed'}}]\n      backends: [{service: echo}]\n",
    )
    .unwrap();
    let e = mesh_agent::policy::load_documents(&bad)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("HTTPRoute/web: spec.rules[0].matches[0].path.regex"),
        "{e}"
    );
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {name: web}\nspec:\n  hosts: [echo]\n  rules:\n    - name: teapot\n      matches: [{path: {exact: /teapot}}]\n      direct_response: {status: 418, body: stout}\n    - name: api\n      matches: [{path: {prefix: /api}}]\n      backends: [{service: echo}]\n      rewrite: {path_prefix: /echo}\n",
    )
    .unwrap();
    let docs = mesh_agent::policy::load_documents(&good).expect("valid");
    let mut cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    cfg.timeout = Duration::from_secs(1);
    let report = mesh_agent::policy::apply(&cfg, &docs, false)
        .await
        .expect("apply");
    assert_eq!(report[0], "HTTPRoute/web created", "{report:?}");
    trellis_tests::wait_for(
        Duration::from_secs(5),
        "route applied from etcd",
        || async { client::get(&c, "http://echo/teapot").await.status == 418 },
    )
    .await;
    let r = client::get(&c, "http://echo/api/users?x=1").await;
    assert_eq!(r.json()["path"], "/echo/users?x=1");
    let dump = client::admin(client.bound.admin, "/config_dump")
        .await
        .json();
    assert_eq!(
        dump["snapshot"]["http_routes"]["web"]["rules"][0]["name"],
        "teapot"
    );
    // Precedence as the sidecar applies it: the exact match before the prefix.
    assert_eq!(
        dump["routing"]["echo"]["match_order"],
        serde_json::json!(["teapot", "api"])
    );
}
