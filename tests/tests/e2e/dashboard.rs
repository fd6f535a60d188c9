//! Telemetry over the mesh and the dashboard, with real etcd and real sidecars: the figures
//! the dashboard shows are what the test sent; sidecars answer telemetry reads only to the
//! identities they list; the UI renders in a real browser with the expected services and
//! numbers, and no console errors.

use std::sync::Arc;
use std::time::Duration;

use mesh_agent::dashboard::{alerts::Notify, scrape::Reader, DashboardConfig};
use mesh_agent::testing::EtcdCluster;
use trellis_proxy::identity::{IdentityFiles, SpiffeId, TlsContext};
use trellis_tests::backend::Backend;
use trellis_tests::{browser, client, etcd_sidecar, init_logs, wait_for, Pki, TRUST_DOMAIN};

fn reader(pki: &Pki, name: &str) -> Reader {
    let files = IdentityFiles {
        cert: pki.path().join(format!("{name}.pem")),
        key: pki.path().join(format!("{name}-key.pem")),
        bundle: pki.path().join("ca.pem"),
    };
    let own = SpiffeId::for_service(TRUST_DOMAIN, name).expect("identity");
    let tls = TlsContext::load(&files, &own, 1).expect("identity loads");
    Reader::new(Arc::new(tls), Duration::from_secs(2))
}

/// A dashboard on loopback reading every 300 ms, its evaluator lease 2 s.
fn config(pki: &Pki, etcd: Vec<String>, notify: Notify) -> DashboardConfig {
    DashboardConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        etcd: mesh_agent::config::EtcdConfig::new(etcd),
        identity_dir: pki.path().to_path_buf(),
        name: "dashboard".into(),
        trust_domain: TRUST_DOMAIN.into(),
        interval: Duration::from_millis(300),
        concurrency: 4,
        fetch_timeout: Duration::from_secs(2),
        token: None,
        notify,
        evaluator_ttl: Duration::from_secs(2),
    }
}

async fn api(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    let r = client::get(&client::h1(addr), &format!("http://{addr}{path}")).await;
    assert_eq!(r.status, 200, "{path}: {}", r.body);
    r.json()
}

fn service<'a>(overview: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    overview["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_mesh_served_to_allowed_readers_only() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["echo", "client", "dashboard", "stranger"]);
    let backend = Backend::start().await;
    let readers = |c: &mut mesh_agent::config::AgentConfig| {
        c.proxy.telemetry.readers = vec![Pki::spiffe("dashboard")];
    };
    let server = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), readers).await;
    let caller = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), readers).await;
    let c = client::h1(caller.bound.outbound);
    wait_for(Duration::from_secs(10), "echo reachable", || async {
        client::get(&c, "http://echo/echo").await.status == 200
    })
    .await;

    // Only the listed identity reads; a stranger with a valid mesh certificate gets 403.
    let echo_id = SpiffeId::for_service(TRUST_DOMAIN, "echo").expect("id");
    let inbound = server.bound.inbound;
    let metrics = reader(&pki, "dashboard")
        .get(inbound, &echo_id, "metrics")
        .await
        .expect("the dashboard identity reads metrics");
    assert!(String::from_utf8_lossy(&metrics).contains("trellis_requests_total"));
    let refused = reader(&pki, "stranger").summary(inbound, &echo_id).await;
    let msg = refused.expect_err("a stranger reads nothing").to_string();
    assert!(msg.contains("403") && msg.contains("denied"), "{msg}");
    let plain = client::get(
        &client::h1(inbound),
        &format!("http://{inbound}/.well-known/trellis/summary"),
    )
    .await;
    assert_ne!(plain.status, 200, "plaintext reads nothing: {}", plain.body);
    assert!(!plain.body.contains("traffic"), "{}", plain.body);

    let dash = mesh_agent::dashboard::start(config(&pki, etcd.endpoints(), Default::default()))
        .await
        .expect("dashboard starts");
    let addr = dash.addr;
    // Both instances read once: that read is the baseline every later request is counted from.
    wait_for(Duration::from_secs(10), "both instances read", || async {
        let o = api(addr, "/api/v1/overview").await;
        ["echo", "client"]
            .iter()
            .all(|s| service(&o, s)["up"] == 1 && service(&o, s)["instances"] == 1)
    })
    .await;

    // 1,000 requests, 10 % answered 500 by the app (not retried).
    for i in 0..1000 {
        let path = if i % 10 == 0 { "/status/500" } else { "/echo" };
        let r = client::get(&c, &format!("http://echo{path}")).await;
        assert_eq!(r.status, if i % 10 == 0 { 500 } else { 200 });
    }
    // Generous: a loaded CI machine can stall etcd for seconds (leases re-made meanwhile).
    wait_for(Duration::from_secs(30), "the load counted", || async {
        let o = api(addr, "/api/v1/overview?window=1h").await;
        service(&o, "echo")["stats"]["requests"].as_f64() >= Some(1000.0)
    })
    .await;
    let o = api(addr, "/api/v1/overview?window=1h").await;
    let echo = service(&o, "echo");
    assert_eq!(echo["stats"]["requests"], 1000.0, "{echo}");
    let ratio = echo["stats"]["error_ratio"].as_f64().expect("error ratio");
    assert!((ratio - 0.10).abs() <= 0.01, "{ratio}");
    assert!(echo["stats"]["p50_ms"].as_f64().is_some(), "{echo}");
    let edge = o["edges"]
        .as_array()
        .and_then(|e| {
            e.iter()
                .find(|e| e["from"] == "client" && e["to"] == "echo")
        })
        .expect("client -> echo edge");
    assert_eq!(edge["stats"]["requests"], 1000.0, "{edge}");
    let success = edge["stats"]["success_rate"]
        .as_f64()
        .expect("success rate");
    assert!((success - 0.90).abs() <= 0.01, "{success}");

    let s = api(addr, "/api/v1/services/echo?window=1h").await;
    let instance = &s["instances"][0];
    assert_eq!(instance["address"], inbound.to_string());
    assert!(
        instance["lease_ttl_left"].as_i64().is_some_and(|t| t > 0),
        "{instance}"
    );
    assert!(
        instance["applied_revision"].as_i64().is_some(),
        "{instance}"
    );
    assert!(instance["error"].is_null(), "{instance}");
    assert!(s["series"].as_array().is_some_and(|p| p.len() >= 2), "{s}");
    // No minute with >= 5 % errors... except that this one had 10 %: the minute is down.
    let down = s["availability"]["1h"]["down"].as_array().map(Vec::len);
    assert!(down.is_some_and(|d| d >= 1), "{}", s["availability"]);

    // For Prometheus: the whole mesh in one scrape, each series labelled with its instance,
    // and `up` per instance; HTTP service discovery; the KEDA figure.
    let fed = client::get(
        &client::h1(addr),
        &format!("http://{addr}/api/v1/prometheus/federate"),
    )
    .await;
    assert_eq!(fed.status, 200);
    let parsed = trellis_proxy::telemetry::exposition::parse(&fed.body).expect("federation parses");
    let echo_instance = instance["instance"].as_str().expect("instance id");
    let up: Vec<_> = parsed.samples.iter().filter(|x| x.name == "up").collect();
    assert_eq!(up.len(), 2, "{up:?}");
    assert!(up.iter().all(|x| x.value == 1.0), "{up:?}");
    let served = parsed
        .samples
        .iter()
        .filter(|x| {
            x.name == "trellis_requests_total"
                && x.label("mesh_instance") == Some(echo_instance)
                && x.label("direction") == Some("inbound")
        })
        .map(|x| x.value)
        .sum::<f64>();
    assert!(served >= 1000.0, "{served}");
    let sd = api(addr, "/api/v1/prometheus/sd").await;
    let groups = sd.as_array().expect("SD groups");
    assert_eq!(groups.len(), 2, "{sd}");
    assert!(groups.iter().any(|g| g["targets"][0] == inbound.to_string()
        && g["labels"]["__meta_trellis_service"] == "echo"));
    let scale = api(addr, "/api/v1/scale/echo").await;
    assert!(scale["rps"].as_f64().is_some_and(|r| r > 0.0), "{scale}");
    assert_eq!(scale["instances_up"], 1);

    // `mesh-agent report` across hosts, through the dashboard: usage and uptime.
    let source = mesh_agent::usage::Source::Dashboard {
        url: format!("http://{addr}"),
        token: None,
    };
    let report = mesh_agent::usage::report(&source, None)
        .await
        .expect("report");
    let served = &report.services["echo"];
    assert!(served.requests >= 1000.0, "{served:?}");
    assert!(
        report.routes.keys().any(|k| k.starts_with("echo /")),
        "{:?}",
        report.routes
    );
    let up = &report.uptime["echo"];
    assert!(!up.down.is_empty() && up.minutes_observed >= 1, "{up:?}");
    let csv = mesh_agent::usage::render_csv(&report);
    assert!(
        csv.starts_with("kind,key,requests") && csv.contains("\nservice,echo,"),
        "{csv}"
    );

    // The pages, in a real browser.
    let top = browser::render(&format!("http://{addr}/"), "dashboard-topology", 4000);
    assert!(top.console_errors.is_empty(), "{:?}", top.console_errors);
    assert!(
        top.dom.contains(r#"data-from="client" data-to="echo""#),
        "{}",
        top.dom
    );
    assert!(
        top.dom.contains(">echo</a>") && top.dom.contains(">client</a>"),
        "{}",
        top.dom
    );
    assert!(!top.dom.contains(r#"<h2 class="bad">"#), "{}", top.dom);
    let page = browser::render(
        &format!("http://{addr}/#/service/echo"),
        "dashboard-service-echo",
        4000,
    );
    assert!(page.console_errors.is_empty(), "{:?}", page.console_errors);
    assert!(page.dom.contains("echo: golden metrics"), "{}", page.dom);
    assert!(
        page.dom.contains(&inbound.to_string()),
        "instance listed: {}",
        page.dom
    );
    assert!(page.dom.contains("Calls in and out"), "{}", page.dom);
    // 0 % available next to 90 % successful: the page says why, beside the figure.
    assert!(
        page.dom
            .contains("so it can read 0 % next to a 90 % success rate"),
        "{}",
        page.dom
    );

    drop(caller);
    drop(server);
}

/// A real Alertmanager on loopback, killed on drop.
struct Alertmanager {
    url: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = dir.path().join("am.yml");
        std::fs::write(
            &cfg,
            "route:\n  receiver: default\n  group_wait: 0s\n  group_interval: 1s\nreceivers:\n  - name: default\n",
        )
        .expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let bin = ["prometheus-alertmanager", "alertmanager"]
            .into_iter()
            .find(|b| {
                std::process::Command::new("which")
                    .arg(b)
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("Alertmanager: install Debian's `prometheus-alertmanager` (.ci/run does)");
        let child = std::process::Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.path={}", dir.path().display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("alertmanager starts");
        Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }

    /// Active alerts named `name`.
    async fn active(&self, name: &str) -> usize {
        let addr = self
            .url
            .trim_start_matches("http://")
            .parse()
            .expect("addr");
        let r = client::send(
            &client::h1(addr),
            http::Request::get(format!("{}/api/v2/alerts?active=true", self.url))
                .body(client::empty())
                .expect("request"),
        )
        .await;
        let Ok(r) = r else { return 0 };
        r.json()
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| {
                        x["labels"]["alertname"] == name && x["status"]["state"] == "active"
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn evaluator(etcd: &[String]) -> String {
    let mut c = etcd_client::Client::connect(etcd, None)
        .await
        .expect("etcd");
    let r = c
        .get("/trellis/v1/alerts/evaluator", None)
        .await
        .expect("get");
    r.kvs()
        .first()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_in_alertmanager_survives_its_evaluator_dying_and_resolves() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["echo", "client", "dashboard"]);
    let backend = Backend::start().await;
    let readers = |c: &mut mesh_agent::config::AgentConfig| {
        c.proxy.telemetry.readers = vec![Pki::spiffe("dashboard")];
    };
    let _server = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), readers).await;
    let caller = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), readers).await;
    let c = client::h1(caller.bound.outbound);
    wait_for(Duration::from_secs(10), "echo reachable", || async {
        client::get(&c, "http://echo/echo").await.status == 200
    })
    .await;
    let am = Alertmanager::start();
    let rule = trellis_policies::parse_documents(
        "apiVersion: trellis.dev/v1\nkind: AlertRule\nmetadata: {name: echo-errors}\nspec:\n  service: echo\n  signal: error_ratio\n  above: 0.2\n  window: 2s\n  for: 1s\n  labels: {severity: page}\n  annotations: {summary: echo fails}\n",
        "rule.yaml",
    );
    let docs: Vec<_> = rule.into_iter().map(|d| d.expect("valid rule")).collect();
    let etcd_cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    mesh_agent::policy::apply(&etcd_cfg, &docs, false)
        .await
        .expect("rule applied");
    let notify = || Notify {
        alertmanagers: vec![am.url.clone()],
        ..Notify::default()
    };
    let a = mesh_agent::dashboard::start(config(&pki, etcd.endpoints(), notify()))
        .await
        .expect("a");
    let b = mesh_agent::dashboard::start(config(&pki, etcd.endpoints(), notify()))
        .await
        .expect("b");
    wait_for(Duration::from_secs(10), "an evaluator elected", || async {
        !evaluator(&etcd.endpoints()).await.is_empty()
    })
    .await;

    // Half the requests fail, in the background, until told to stop (bounded).
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (failing, stop) = (failing.clone(), stop.clone());
        let c = c.clone();
        tokio::spawn(async move {
            for i in 0..20_000u32 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let bad = failing.load(std::sync::atomic::Ordering::Relaxed) && i % 2 == 0;
                let path = if bad { "/status/500" } else { "/echo" };
                let _ = client::get(&c, &format!("http://echo{path}")).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = std::time::Instant::now();
    // for (1 s) + two evaluation intervals (0.6 s), plus the reads that see the errors (two
    // intervals) and Alertmanager's own intake.
    wait_for(
        Duration::from_secs(10),
        "the alert active in Alertmanager",
        || async { am.active("echo-errors").await == 1 },
    )
    .await;
    let fired_after = started.elapsed();
    assert!(
        fired_after < Duration::from_secs(4),
        "fired after {fired_after:?}"
    );

    // Kill the evaluating dashboard: the other takes over within the lease TTL + 2 s, and
    // the alert never leaves Alertmanager meanwhile.
    let holder = evaluator(&etcd.endpoints()).await;
    let (dead, alive) = if holder.ends_with(&format!("-{}", a.addr.port())) {
        (a, b)
    } else {
        (b, a)
    };
    dead.abort();
    let killed = std::time::Instant::now();
    let mut lost = false;
    let successor = format!("-{}", alive.addr.port());
    while !evaluator(&etcd.endpoints()).await.ends_with(&successor) {
        assert!(
            killed.elapsed() < Duration::from_secs(4),
            "no new evaluator within TTL + 2 s"
        );
        lost |= am.active("echo-errors").await == 0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..10 {
        lost |= am.active("echo-errors").await == 0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !lost,
        "the firing alert left Alertmanager during the failover"
    );
    let list = mesh_agent::dashboard::alerts::list(&etcd_cfg)
        .await
        .expect("alerts list");
    assert!(
        list.contains("echo-errors") && list.contains("firing"),
        "{list}"
    );
    // The service page shows the rule firing, with its summary, from either dashboard.
    let alerts = api(alive.addr, "/api/v1/services/echo/alerts").await;
    assert_eq!(alerts[0]["rule"], "echo-errors", "{alerts}");
    assert_eq!(alerts[0]["state"], "firing", "{alerts}");
    let page = browser::render(
        &format!("http://{}/#/service/echo", alive.addr),
        "dashboard-service-echo-alert-firing",
        4000,
    );
    assert!(page.console_errors.is_empty(), "{:?}", page.console_errors);
    assert!(
        page.dom.contains(r#"<section id="alerts">"#)
            && page.dom.contains("echo-errors")
            && page.dom.contains("echo fails")
            && page.dom.contains(r#"<td class="bad">firing</td>"#),
        "{}",
        page.dom
    );

    // Recovery: the errors stop, the window passes, the alert resolves.
    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    wait_for(Duration::from_secs(10), "the alert resolved", || async {
        am.active("echo-errors").await == 0
    })
    .await;
    let list = mesh_agent::dashboard::alerts::list(&etcd_cfg)
        .await
        .expect("alerts list");
    assert!(list.contains("inactive"), "{list}");
    let alerts = api(alive.addr, "/api/v1/services/echo/alerts").await;
    assert_eq!(alerts[0]["state"], "inactive", "{alerts}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = load.await;
    alive.abort();
}

/// The stored form of `ServicePolicy/echo` with `request_timeout`, as `policy apply` writes it.
fn echo_policy(timeout: &str) -> String {
    format!(
        r#"{{"apiVersion":"trellis.dev/v1","kind":"ServicePolicy","metadata":{{"name":"echo"}},"spec":{{"request_timeout":"{timeout}"}}}}"#
    )
}

fn policy<'a>(policies: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    policies["policies"]
        .as_array()
        .and_then(|p| {
            p.iter().find(|p| {
                format!(
                    "{}/{}",
                    p["kind"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ) == id
            })
        })
        .unwrap_or(&serde_json::Value::Null)
}

/// Slow requests held open through the mesh are in flight on the service page and in the KEDA
/// figure, and leave it when answered; a policy written twice (straight to etcd, around the
/// CLI) shows both versions and the changed line; each instance's rate-limit use has its row;
/// the browser shows the new sections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_page_shows_requests_in_flight_policy_history_and_rate_limit_use() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["echo", "client", "dashboard"]);
    let backend = Backend::start().await;
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .expect("etcd");
    let key = "/trellis/v1/mesh/policies/ServicePolicy/echo";
    for timeout in ["20s", "25s"] {
        raw.put(key, echo_policy(timeout), None).await.expect("put");
    }
    // A limit on /echo only (the slow requests below must not be refused), low enough that a
    // burst is partly limited.
    let limit = trellis_policies::parse_documents(
        "apiVersion: trellis.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: echo-limit}\nspec: {service: echo, match: {path: {prefix: /echo}}, scope: global, limit: {requests: 20, per: second}, burst: 20}\n",
        "limit.yaml",
    );
    let docs: Vec<_> = limit.into_iter().map(|d| d.expect("valid limit")).collect();
    let etcd_cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    mesh_agent::policy::apply(&etcd_cfg, &docs, false)
        .await
        .expect("limit applied");
    let readers = |c: &mut mesh_agent::config::AgentConfig| {
        c.proxy.telemetry.readers = vec![Pki::spiffe("dashboard")];
    };
    let server = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), readers).await;
    let caller = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), readers).await;
    let c = client::h1(caller.bound.outbound);
    wait_for(Duration::from_secs(10), "echo reachable", || async {
        client::get(&c, "http://echo/echo").await.status == 200
    })
    .await;
    let dash = mesh_agent::dashboard::start(config(&pki, etcd.endpoints(), Default::default()))
        .await
        .expect("dashboard starts");
    let addr = dash.addr;
    wait_for(Duration::from_secs(10), "echo read", || async {
        service(&api(addr, "/api/v1/overview").await, "echo")["up"] == 1
    })
    .await;

    // A burst over the limit: allowed and limited, in this instance's row.
    let mut statuses = Vec::new();
    for _ in 0..60 {
        statuses.push(client::get(&c, "http://echo/echo").await.status.as_u16());
    }
    assert!(statuses.contains(&200), "{statuses:?}");
    wait_for(
        Duration::from_secs(10),
        "the rate-limit use read",
        || async {
            let s = api(addr, "/api/v1/services/echo").await;
            s["instances"][0]["rate_limits"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["policy"] == "echo-limit"))
                .is_some_and(|l| {
                    l["allowed_rps"].is_f64() && l["share_per_second"].as_f64() > Some(0.0)
                })
        },
    )
    .await;
    let s = api(addr, "/api/v1/services/echo").await;
    let total = &s["rate_limits"][0];
    assert!(total["allowed"].as_f64() > Some(0.0), "{total}");

    // Four requests held open by the app for 12 s: in flight at echo's inbound side.
    let held: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                client::get(&c, "http://echo/slow/12000")
                    .await
                    .status
                    .as_u16()
            })
        })
        .collect();
    wait_for(Duration::from_secs(8), "4 requests in flight", || async {
        let s = api(addr, "/api/v1/services/echo").await;
        s["in_flight"] == 4.0 && s["instances"][0]["in_flight"] == 4.0
    })
    .await;
    let scale = api(addr, "/api/v1/scale/echo").await;
    assert_eq!(scale["in_flight"], 4.0, "{scale}");

    // The page while they are held: in flight, the limit's row, the policies and their diff.
    let page = browser::render_tall(
        &format!("http://{addr}/#/service/echo"),
        "dashboard-service-echo-details",
        4000,
        2400,
    );
    assert!(page.console_errors.is_empty(), "{:?}", page.console_errors);
    for expected in [
        "in flight (now)",
        "Rate limits per instance",
        "echo-limit",
        "Policies that apply",
        "ServicePolicy/echo",
        "RateLimitPolicy/echo-limit",
        "+  request_timeout: 25s",
        "id=\"availability-rule\"",
        "share of observed minutes that were up",
    ] {
        assert!(
            page.dom.contains(expected),
            "{expected} not on the page: {}",
            page.dom
        );
    }

    for h in held {
        assert_eq!(h.await.expect("request task"), 200);
    }
    wait_for(Duration::from_secs(5), "nothing in flight", || async {
        let s = api(addr, "/api/v1/services/echo").await;
        s["in_flight"] == 0.0 && s["instances"][0]["in_flight"] == 0.0
    })
    .await;
    assert_eq!(api(addr, "/api/v1/scale/echo").await["in_flight"], 0.0);

    // Cancelled by the caller long before the app answers: out of the count at once too.
    let cancelled: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { client::get(&c, "http://echo/slow/20000").await })
        })
        .collect();
    wait_for(Duration::from_secs(8), "2 requests in flight", || async {
        api(addr, "/api/v1/services/echo").await["in_flight"] == 2.0
    })
    .await;
    for t in cancelled {
        t.abort();
    }
    wait_for(
        Duration::from_secs(8),
        "cancelled requests out of the count",
        || async { api(addr, "/api/v1/services/echo").await["in_flight"] == 0.0 },
    )
    .await;

    // Written twice: two versions, newest first, the second a diff of the changed line; the
    // first created the key.
    let policies = api(addr, "/api/v1/services/echo/policies").await;
    let sp = policy(&policies, "ServicePolicy/echo");
    let versions = sp["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 2, "{sp}");
    let diff: Vec<&str> = versions[0]["diff"]
        .as_array()
        .expect("a diff")
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(diff.contains(&"-  request_timeout: 20s"), "{diff:?}");
    assert!(diff.contains(&"+  request_timeout: 25s"), "{diff:?}");
    assert_eq!(sp["end"]["reason"], "created", "{sp}");
    assert_eq!(sp["applies"], "calls to it");
    assert!(sp["error"].is_null(), "{sp}");
    assert_eq!(
        policy(&policies, "RateLimitPolicy/echo-limit")["applies"],
        "rate-limits it"
    );
    // The client's page lists neither.
    let other = api(addr, "/api/v1/services/client/policies").await;
    assert!(policy(&other, "ServicePolicy/echo").is_null(), "{other}");

    // Compacted: etcd forgets the first version, and the history says where it ends.
    let now = raw
        .get(key, None)
        .await
        .expect("get")
        .header()
        .map_or(0, |h| h.revision());
    raw.compact(now, None).await.expect("compact");
    let policies = api(addr, "/api/v1/services/echo/policies").await;
    let sp = policy(&policies, "ServicePolicy/echo");
    assert_eq!(sp["versions"].as_array().map(Vec::len), Some(1), "{sp}");
    assert_eq!(sp["end"]["reason"], "compacted", "{sp}");
    dash.abort();
    drop(caller);
    drop(server);
}

/// A webhook receiver behind TLS on loopback: an HTTP/1.1 server over tokio-rustls with a
/// `localhost` certificate of its own CA (written as `<dir>/receiver-ca.pem`). It records every
/// request's path and body, and counts the handshakes that failed.
struct HttpsReceiver {
    port: u16,
    received: Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
    failed_handshakes: Arc<std::sync::atomic::AtomicUsize>,
}

impl HttpsReceiver {
    async fn start(dir: &std::path::Path) -> Self {
        use http_body_util::BodyExt;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca = trellis_proxy::identity::CertificateAuthority::generate(
            "receiver.test",
            Duration::from_secs(86_400),
        )
        .expect("receiver CA");
        std::fs::write(dir.join("receiver-ca.pem"), ca.cert_pem()).expect("write CA");
        let leaf = ca
            .issue_for_hosts(&["localhost"], Duration::from_secs(86_400))
            .expect("receiver certificate");
        let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("chain");
        let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let got = received.clone();
        let failed_handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = failed_handshakes.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, got, failed) = (acceptor.clone(), got.clone(), failed.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let got = got.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let json = serde_json::from_slice(&body)
                                    .unwrap_or(serde_json::Value::Null);
                                got.lock().expect("lock").push((path, json));
                                Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::new()),
                                ))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Self {
            port,
            received,
            failed_handshakes,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port)
    }

    /// The bodies received on `path` that mention rule `rule`.
    fn bodies(&self, path: &str, rule: &str) -> Vec<serde_json::Value> {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|(p, body)| p == path && body.to_string().contains(rule))
            .map(|(_, body)| body.clone())
            .collect()
    }
}

/// Apply an alert rule `name` that fires at once: no instance of `ghost` is up.
async fn apply_ghost_rule(cfg: &mesh_agent::config::EtcdConfig, name: &str) {
    let rule = trellis_policies::parse_documents(
        &format!("apiVersion: trellis.dev/v1\nkind: AlertRule\nmetadata: {{name: {name}}}\nspec:\n  service: ghost\n  signal: instances_up\n  below: 1\n  for: 0s\n"),
        "rule.yaml",
    );
    let docs: Vec<_> = rule.into_iter().map(|d| d.expect("valid rule")).collect();
    mesh_agent::policy::apply(cfg, &docs, false)
        .await
        .expect("rule applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_an_https_webhook_with_its_ca_and_nothing_arrives_with_another_ca() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["dashboard"]);
    let receiver = HttpsReceiver::start(pki.path()).await;
    // Two fleets in one etcd (two prefixes), so two evaluators run side by side: one trusts
    // the receiver's CA, the other the mesh CA, which did not sign the receiver's certificate.
    let fleet = |prefix: &str| {
        let mut c = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
        c.prefix = prefix.into();
        c
    };
    let (right, wrong) = (fleet("/right"), fleet("/wrong"));
    apply_ghost_rule(&right, "tls-right").await;
    apply_ghost_rule(&wrong, "tls-wrong").await;
    let notify = |ca: &str| Notify {
        alertmanagers: vec![receiver.url("")],
        webhook: Some(receiver.url("/hook")),
        ca_file: Some(pki.path().join(ca)),
        ..Notify::default()
    };
    let start = |etcd: &mesh_agent::config::EtcdConfig, ca: &str| {
        let mut cfg = config(&pki, etcd.endpoints.clone(), notify(ca));
        cfg.etcd = etcd.clone();
        mesh_agent::dashboard::start(cfg)
    };
    let good = start(&right, "receiver-ca.pem").await.expect("dashboard");
    let bad = start(&wrong, "ca.pem").await.expect("dashboard");

    wait_for(
        Duration::from_secs(10),
        "the firing alert posted to the https webhook",
        || async { !receiver.bodies("/hook", "tls-right").is_empty() },
    )
    .await;
    let hook = receiver.bodies("/hook", "tls-right");
    assert_eq!(hook[0]["status"], "firing", "{hook:?}");
    assert_eq!(hook[0]["alert"]["rule"], "tls-right", "{hook:?}");
    assert_eq!(hook[0]["alert"]["service"], "ghost", "{hook:?}");
    wait_for(
        Duration::from_secs(10),
        "the alert posted to Alertmanager's API over https",
        || async { !receiver.bodies("/api/v2/alerts", "tls-right").is_empty() },
    )
    .await;
    let am = receiver.bodies("/api/v2/alerts", "tls-right");
    assert_eq!(am[0][0]["labels"]["alertname"], "tls-right", "{am:?}");

    // The other evaluator fires too (its state is in etcd) and tries every round (the webhook
    // once, Alertmanager each round), but its handshakes fail (UnknownIssuer, logged at warn):
    // nothing of it is received.
    wait_for(Duration::from_secs(10), "the other rule firing", || async {
        mesh_agent::dashboard::alerts::list(&wrong)
            .await
            .is_ok_and(|l| l.contains("tls-wrong") && l.contains("firing"))
    })
    .await;
    wait_for(
        Duration::from_secs(10),
        "failed handshakes: the webhook's and Alertmanager's, retried",
        || async {
            receiver
                .failed_handshakes
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 3
        },
    )
    .await;
    let received = receiver.received.lock().expect("lock").clone();
    assert!(
        received
            .iter()
            .all(|(_, b)| !b.to_string().contains("tls-wrong")),
        "received from the dashboard with the wrong CA: {received:?}"
    );
    // The evaluator with the wrong CA goes on evaluating: its state is rewritten each round.
    let list = mesh_agent::dashboard::alerts::list(&wrong)
        .await
        .expect("alerts list");
    assert!(list.contains("firing"), "{list}");
    good.abort();
    bad.abort();
}

/// The hex SHA-256 of an API key, as a `Consumer` policy stores it.
fn key_digest(key: &str) -> String {
    trellis_proxy::policy::access::key_digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The consumers page over a real ingress: requests of API-key consumers through two HTTPRoute
/// rules are counted per route; a consumer over its quota (3 a minute, shared through etcd) shows
/// its use of the period and its refusals; the page renders both tables in a browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consumers_page_shows_use_per_route_and_quota_use() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    let pki = Pki::new(&["gateway", "orders", "dashboard"]);
    let web = trellis_tests::web::WebPki::new();
    web.leaf(pki.path(), "api", &["api.example.com"]);
    let backend = Backend::start().await;
    let (acme_key, beta_key) = ("tk_dash_acme", "tk_dash_beta");
    let yaml = format!(
        "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {{name: edge}}\n\
         spec:\n  hosts: [api.example.com]\n  gateways: [gateway]\n  rules:\n\
         \x20   - name: list\n      matches: [{{path: {{prefix: /echo/list}}}}]\n      backends: [{{service: orders}}]\n\
         \x20   - name: get\n      matches: [{{path: {{prefix: /echo/get}}}}]\n      backends: [{{service: orders}}]\n---\n\
         apiVersion: trellis.dev/v1\nkind: AuthenticationPolicy\nmetadata: {{name: gateway-keys}}\n\
         spec: {{service: gateway, api_keys: {{header: x-api-key}}}}\n---\n\
         apiVersion: trellis.dev/v1\nkind: Consumer\nmetadata: {{name: acme}}\n\
         spec: {{api_keys: [{{id: k1, sha256: \"{}\"}}], quota: {{limit: {{requests: 3, per: minute}}, burst: 3}}}}\n---\n\
         apiVersion: trellis.dev/v1\nkind: Consumer\nmetadata: {{name: beta}}\n\
         spec: {{api_keys: [{{id: k1, sha256: \"{}\"}}]}}\n",
        key_digest(acme_key),
        key_digest(beta_key),
    );
    let docs: Vec<_> = trellis_policies::parse_documents(&yaml, "consumers.yaml")
        .into_iter()
        .map(|d| d.expect("valid policy"))
        .collect();
    let etcd_cfg = mesh_agent::config::EtcdConfig::new(etcd.endpoints());
    mesh_agent::policy::apply(&etcd_cfg, &docs, false)
        .await
        .expect("policies applied");
    let readers = |c: &mut mesh_agent::config::AgentConfig| {
        c.proxy.telemetry.readers = vec![Pki::spiffe("dashboard")];
    };
    let _orders = etcd_sidecar(&pki, "orders", backend.addr, etcd.endpoints(), readers).await;
    let dir = pki.path().to_path_buf();
    let gateway = etcd_sidecar(&pki, "gateway", backend.addr, etcd.endpoints(), |c| {
        readers(c);
        let ingress =
            trellis_tests::web::loopback_ingress(&dir, &[("api.example.com", "api")], false);
        c.proxy.ingress = Some(ingress);
    })
    .await;
    let edge = gateway.bound.ingress_http.expect("plain ingress bound");
    let c = client::h1(edge);
    let call = |path: &'static str, key: &'static str| {
        let c = c.clone();
        async move {
            let req = http::Request::get(format!("http://api.example.com{path}"))
                .header("x-api-key", key)
                .body(client::empty())
                .expect("request");
            client::send(&c, req).await.expect("answer").status.as_u16()
        }
    };
    // Routed to orders, and the quota's share allocated, before anything is counted.
    wait_for(
        Duration::from_secs(15),
        "beta routed at the edge",
        || async { call("/echo/list", beta_key).await == 200 },
    )
    .await;
    wait_for(Duration::from_secs(15), "acme's quota shared", || async {
        let dump = client::admin(gateway.bound.admin, "/config_dump")
            .await
            .json();
        dump["etcd"]["rate_limit_sharing"]["shares"]["quota.acme.gateway"]
            .as_f64()
            .is_some_and(|v| v > 0.049)
    })
    .await;

    let dash = mesh_agent::dashboard::start(config(&pki, etcd.endpoints(), Default::default()))
        .await
        .expect("dashboard starts");
    let addr = dash.addr;
    // The gateway read once: the baseline what follows is counted from.
    wait_for(Duration::from_secs(10), "gateway read", || async {
        let o = api(addr, "/api/v1/overview").await;
        service(&o, "gateway")["up"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // beta: 1 through `list`, 2 through `get`; acme: 2 + 1 admitted (its burst), then 2
    // refused by its quota, before routing (so under `default`).
    let mut statuses = Vec::new();
    for (path, key) in [
        ("/echo/list", beta_key),
        ("/echo/get", beta_key),
        ("/echo/get", beta_key),
        ("/echo/list", acme_key),
        ("/echo/list", acme_key),
        ("/echo/get", acme_key),
        ("/echo/get", acme_key),
        ("/echo/list", acme_key),
    ] {
        statuses.push(call(path, key).await);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 200, 429, 429]);

    let row = |cs: &serde_json::Value, consumer: &str| {
        cs.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c["consumer"] == consumer && c["service"] == "gateway")
            })
            .cloned()
            .unwrap_or_default()
    };
    let route = |c: &serde_json::Value, route: &str| {
        c["routes"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["route"] == route))
            .cloned()
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(30), "the requests counted", || async {
        let cs = api(addr, "/api/v1/consumers").await;
        row(&cs, "acme")["requests"] == 5.0 && row(&cs, "beta")["requests"] == 3.0
    })
    .await;
    let cs = api(addr, "/api/v1/consumers").await;
    let (acme, beta) = (row(&cs, "acme"), row(&cs, "beta"));
    // Totals as before routes were counted.
    assert_eq!(acme["limited"], 2.0, "{acme}");
    assert_eq!(acme["by_status"]["200"], 3.0, "{acme}");
    assert_eq!(acme["by_status"]["429"], 2.0, "{acme}");
    assert_eq!(route(&beta, "list")["requests"], 1.0, "{beta}");
    assert_eq!(route(&beta, "get")["requests"], 2.0, "{beta}");
    assert_eq!(route(&acme, "list")["by_status"]["200"], 2.0, "{acme}");
    assert_eq!(route(&acme, "get")["by_status"]["200"], 1.0, "{acme}");
    assert_eq!(route(&acme, "default")["by_status"]["429"], 2.0, "{acme}");
    assert_eq!(route(&acme, "default")["limited"], 2.0, "{acme}");
    // The quota, from etcd, and its use in the last minute.
    let q = &acme["quota"];
    assert_eq!(
        (&q["requests"], &q["per"], &q["period_s"], &q["burst"]),
        (
            &serde_json::json!(3),
            &serde_json::json!("minute"),
            &serde_json::json!(60),
            &serde_json::json!(3)
        ),
        "{acme}"
    );
    assert_eq!(
        (&q["used"], &q["refused"]),
        (&serde_json::json!(3.0), &serde_json::json!(2.0)),
        "{acme}"
    );
    assert_eq!(q["requests_in_period"], 5.0, "{acme}");
    assert!(
        beta["quota"].is_null() && beta["quota_error"].is_null(),
        "{beta}"
    );

    // The page, in a real browser: a row per consumer and route, and the quota table.
    let page = browser::render_tall(
        &format!("http://{addr}/#/consumers"),
        "dashboard-consumers",
        4000,
        800,
    );
    assert!(page.console_errors.is_empty(), "{:?}", page.console_errors);
    assert!(!page.dom.contains(r#"<h2 class="bad">"#), "{}", page.dom);
    for expected in [
        "Usage per consumer and route",
        "<td class=\"\">acme</td><td class=\"\">gateway</td><td class=\"\">list</td><td class=\"num \">2</td>",
        "<td class=\"\">acme</td><td class=\"\">gateway</td><td class=\"\">get</td><td class=\"num \">1</td>",
        "<td class=\"\">acme</td><td class=\"\">gateway</td><td class=\"\">default</td><td class=\"num \">2</td>",
        "<td class=\"\">beta</td><td class=\"\">gateway</td><td class=\"\">get</td><td class=\"num \">2</td>",
        "Quotas (current period)",
        "<td class=\"\">3 / minute, burst 3</td><td class=\"num bad\">3 / 3 (100 %)</td><td class=\"num bad\">2</td>",
    ] {
        assert!(page.dom.contains(expected), "{expected} in {}", page.dom);
    }
}
