//! Scoped discovery against a real etcd: a sidecar holds only what it uses, learns a service on
//! the first request to it (no error, one etcd read), drops it when unused, answers promptly
//! when etcd is gone, bounds what made-up names can cost, and follows one service's changes
//! without rebuilding the others.

use std::time::{Duration, Instant};

use mesh_agent::testing::EtcdCluster;
use trellis_proxy::app::Running;
use trellis_tests::backend::Backend;
use trellis_tests::client::{self, metric};
use trellis_tests::{etcd_sidecar, init_logs, wait_for, Pki};

async fn dump(r: &Running) -> serde_json::Value {
    client::admin(r.bound.admin, "/config_dump").await.json()
}

/// Services the sidecar holds and why (`own`, `declared`, `learned`...).
async fn held(r: &Running) -> serde_json::Map<String, serde_json::Value> {
    dump(r).await["etcd"]["discovery"]["services"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// A mesh of `services` (one instance each, its backend answering its name) and a client
/// sidecar started with `tweak`.
struct Mesh {
    etcd: EtcdCluster,
    pki: Pki,
    _backends: Vec<Backend>,
    servers: Vec<Running>,
    client: Running,
}

async fn mesh(services: &[&str], tweak: impl FnOnce(&mut mesh_agent::config::AgentConfig)) -> Mesh {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let mut names = services.to_vec();
    names.push("client");
    let pki = Pki::new(&names);
    let mut backends = Vec::new();
    let mut servers = Vec::new();
    for s in services {
        let b = Backend::start().await;
        servers.push(etcd_sidecar(&pki, s, b.addr, etcd.endpoints(), |_| {}).await);
        backends.push(b);
    }
    let app = Backend::start().await;
    let client = etcd_sidecar(&pki, "client", app.addr, etcd.endpoints(), tweak).await;
    backends.push(app);
    wait_for(Duration::from_secs(10), "client ready", || async {
        client::admin(client.bound.admin, "/ready").await.status == 200
    })
    .await;
    // Every server registered.
    let c = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "every service registered", || {
        let mut c = c.clone();
        async move {
            let r = c
                .get(
                    "/trellis/v1/mesh/services/",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_keys_only(),
                    ),
                )
                .await
                .unwrap();
            r.kvs().len() > services.len()
        }
    })
    .await;
    Mesh {
        etcd,
        pki,
        _backends: backends,
        servers,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_holds_only_what_it_uses_and_learns_a_service_on_its_first_request() {
    let m = mesh(&["orders", "payments", "stock"], |c| {
        if let Some(e) = c.store.etcd.as_mut() {
            e.discovery.dependencies = vec!["payments".into()];
        }
    })
    .await;
    // Held: its declared dependency; not the other services of the mesh, nor its own (no
    // policy needs its peers).
    let h = held(&m.client).await;
    assert!(!h.contains_key("client"), "{h:?}");
    assert_eq!(h.get("payments").and_then(|v| v.as_str()), Some("declared"));
    assert!(
        !h.contains_key("orders") && !h.contains_key("stock"),
        "{h:?}"
    );
    wait_for(
        Duration::from_secs(10),
        "declared service routed",
        || async {
            !dump(&m.client).await["snapshot"]["services"]["payments"]["endpoints"][0].is_null()
        },
    )
    .await;
    let d = dump(&m.client).await;
    assert!(d["snapshot"]["services"]["orders"].is_null(), "not held");

    // The first request to a service it has never seen succeeds (no error, no retry by the
    // app); the service is held from then on.
    let c = client::h1(m.client.bound.outbound);
    let first = Instant::now();
    let r = client::get(&c, "http://orders/echo").await;
    let first = first.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    eprintln!("first request to an unknown service: {first:?}");
    assert_eq!(
        held(&m.client).await.get("orders").and_then(|v| v.as_str()),
        Some("learned")
    );
    let text = client::admin(m.client.bound.admin, "/metrics").await.body;
    assert_eq!(
        metric(&text, "trellis_discovery_on_demand_total{result=\"found\"}"),
        1.0
    );
    // Later requests do not ask again.
    for _ in 0..5 {
        assert_eq!(client::get(&c, "http://orders/echo").await.status, 200);
    }
    let text = client::admin(m.client.bound.admin, "/metrics").await.body;
    assert_eq!(
        metric(&text, "trellis_discovery_on_demand_total{result=\"found\"}"),
        1.0
    );

    // A name etcd does not know: 503 unknown-service, promptly; etcd is asked again only
    // after the negative cache (1 s) expires, however many requests name it.
    let start = Instant::now();
    for _ in 0..20 {
        let t = Instant::now();
        let r = client::get(&c, "http://nosuch/echo").await;
        assert_eq!(r.status, 503);
        assert_eq!(r.cause(), "unknown-service");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    let periods = start.elapsed().as_secs_f64().ceil() + 1.0;
    let text = client::admin(m.client.bound.admin, "/metrics").await.body;
    let reads = metric(
        &text,
        "trellis_discovery_on_demand_total{result=\"missing\"}",
    );
    assert!(
        (1.0..=periods).contains(&reads),
        "{reads} reads in {periods} s"
    );
    assert!(
        metric(
            &text,
            "trellis_discovery_on_demand_total{result=\"missing-cached\"}"
        ) >= 20.0 - reads
    );

    // A new instance of a learned service is followed (its watch is live).
    let b2 = Backend::start().await;
    let _s2 = etcd_sidecar(&m.pki, "orders", b2.addr, m.etcd.endpoints(), |_| {}).await;
    wait_for(
        Duration::from_secs(10),
        "second orders instance routed",
        || async {
            dump(&m.client).await["snapshot"]["services"]["orders"]["endpoints"]
                .as_array()
                .map_or(0, |a| a.len())
                == 2
        },
    )
    .await;
    // Only that service was rebuilt: the snapshot was patched, not rebuilt from the whole state.
    let text = client::admin(m.client.bound.admin, "/metrics").await.body;
    assert!(
        metric(
            &text,
            "trellis_discovery_publishes_total{kind=\"services\"}"
        ) >= 1.0,
        "{text}"
    );
    let _ = &m.servers;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_services_are_dropped_and_learned_again() {
    let m = mesh(&["orders"], |c| {
        if let Some(e) = c.store.etcd.as_mut() {
            e.discovery.idle_timeout = Duration::from_secs(1);
        }
    })
    .await;
    let c = client::h1(m.client.bound.outbound);
    assert_eq!(client::get(&c, "http://orders/echo").await.status, 200);
    assert!(held(&m.client).await.contains_key("orders"));
    wait_for(
        Duration::from_secs(10),
        "orders dropped when idle",
        || async {
            !held(&m.client).await.contains_key("orders")
                && dump(&m.client).await["snapshot"]["services"]["orders"].is_null()
        },
    )
    .await;
    let text = client::admin(m.client.bound.admin, "/metrics").await.body;
    assert_eq!(metric(&text, "trellis_discovery_dropped_total"), 1.0);
    assert_eq!(
        dump(&m.client).await["etcd"]["discovery"]["watches"],
        1,
        "the policies only"
    );
    // Called again: learned again, without an error.
    assert_eq!(client::get(&c, "http://orders/echo").await.status, 200);
    assert!(held(&m.client).await.contains_key("orders"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_gone_held_services_serve_and_unknown_ones_fail_fast_naming_the_store() {
    let mut m = mesh(&["orders", "payments"], |_| {}).await;
    let c = client::h1(m.client.bound.outbound);
    assert_eq!(client::get(&c, "http://orders/echo").await.status, 200);
    m.etcd.members[0].kill();
    wait_for(Duration::from_secs(15), "etcd loss noticed", || async {
        dump(&m.client).await["etcd"]["discovery"]["connected"] == false
    })
    .await;
    // Held: still served from the last good state.
    assert_eq!(client::get(&c, "http://orders/echo").await.status, 200);
    // Not held: 503 at once, the cause naming the store, never a hang.
    let t = Instant::now();
    let r = client::get(&c, "http://payments/echo").await;
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(r.status, 503);
    assert_eq!(r.cause(), "discovery-unavailable");
    assert!(r.body.contains("etcd"), "{}", r.body);

    // etcd back: the same request is learned and served.
    m.etcd.members[0].restart().await;
    wait_for(
        Duration::from_secs(15),
        "payments learned after etcd returns",
        || async { client::get(&c, "http://payments/echo").await.status == 200 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_names_cannot_make_a_sidecar_hold_more_than_max_learned() {
    let m = mesh(&["orders", "payments"], |c| {
        if let Some(e) = c.store.etcd.as_mut() {
            e.discovery.max_learned = 1;
        }
    })
    .await;
    let c = client::h1(m.client.bound.outbound);
    assert_eq!(client::get(&c, "http://orders/echo").await.status, 200);
    let r = client::get(&c, "http://payments/echo").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.cause(), "discovery-unavailable");
    assert!(r.body.contains("max_learned"), "{}", r.body);
    // A flood of distinct made-up names: all answered, none held, the sidecar still serves.
    for i in 0..200 {
        let r = client::get(&c, &format!("http://made-up-{i}/echo")).await;
        assert_eq!(r.status, 503, "{i}");
    }
    assert_eq!(held(&m.client).await.len(), 1, "orders only");
    assert_eq!(client::get(&c, "http://orders/echo").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingress_holds_the_backends_its_routes_name_and_follows_route_changes() {
    let m = mesh(&["orders", "payments"], |_| {}).await;
    let web = trellis_tests::web::WebPki::new();
    web.leaf(m.pki.path(), "api", &["api.example.com"]);
    let app = Backend::start().await;
    let gateway = etcd_sidecar(&m.pki, "client", app.addr, m.etcd.endpoints(), |c| {
        c.proxy.ingress = Some(trellis_tests::web::loopback_ingress(
            m.pki.path(),
            &[("api.example.com", "api")],
            false,
        ));
        // Its own instance must not stand in for the client sidecar's.
        if let Some(e) = c.store.etcd.as_mut() {
            e.registration.enabled = false;
            e.cache_file = Some(m.pki.path().join("gateway.cache.json"));
        }
    })
    .await;
    let route = |backend: &str| {
        let yaml = format!(
            "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {{name: edge}}\nspec:\n  hosts: [api.example.com]\n  gateways: [client]\n  rules: [{{name: api, backends: [{{service: {backend}}}]}}]\n"
        );
        trellis_policies::parse_documents(&yaml, "test")
            .into_iter()
            .map(|d| d.unwrap())
            .collect::<Vec<_>>()
    };
    let cfg = mesh_agent::config::EtcdConfig::new(m.etcd.endpoints());
    mesh_agent::policy::apply(&cfg, &route("orders"), false)
        .await
        .unwrap();
    // Held because the route names it, before any request.
    wait_for(Duration::from_secs(10), "orders held as routed", || async {
        held(&gateway).await.get("orders").and_then(|v| v.as_str()) == Some("routed")
    })
    .await;
    assert!(!held(&gateway).await.contains_key("payments"));
    let edge = gateway.bound.ingress_http.expect("http bound");
    let c = client::h1(edge);
    let r = client::get(&c, "http://api.example.com/echo").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The route moves to payments: payments is held as routed, orders becomes learned
    // (dropped when unused).
    mesh_agent::policy::apply(&cfg, &route("payments"), false)
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "payments held as routed",
        || async {
            let h = held(&gateway).await;
            h.get("payments").and_then(|v| v.as_str()) == Some("routed")
                && h.get("orders").and_then(|v| v.as_str()) == Some("learned")
        },
    )
    .await;
    // The edge never learns a name from a stranger's Host header.
    let r = client::get(&c, "http://orders/echo").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let text = client::admin(gateway.bound.admin, "/metrics").await.body;
    assert_eq!(
        metric(&text, "trellis_discovery_on_demand_total{result=\"found\"}"),
        0.0
    );
}
