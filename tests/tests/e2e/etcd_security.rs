//! The store secured, against real etcd processes started by the harness: sidecars registering
//! and discovering through TLS with client certificates and through etcd's authentication with
//! a user name and password; refusals (no client certificate, an untrusted server, a wrong
//! password, no user) named in the error; and least privilege: a sidecar of `echo` logged in
//! as user `echo` (role `trellis-service-echo`, from `mesh-agent etcd rbac`) registers, is
//! discovered, serves and shares a global rate limit, but cannot write another service's keys
//! or any policy, which the operator (`trellis-operator`) can.

use std::time::{Duration, Instant};

use etcd_client::{GetOptions, PutOptions};
use mesh_agent::config::EtcdConfig;
use mesh_agent::etcd::rbac;
use mesh_agent::etcd::{Etcd, EtcdError};
use mesh_agent::testing::{EtcdCluster, ROOT_USER};
use trellis_policies::parse_documents;
use trellis_proxy::app::Running;
use trellis_tests::backend::Backend;
use trellis_tests::client;
use trellis_tests::{etcd_sidecar, etcd_sidecar_config, init_logs, wait_for, Pki};

const PREFIX: &str = "/trellis/v1";
const ROOT_PASSWORD: &str = "root-pw";

/// Use `etcd`'s endpoints, TLS files and credentials in a sidecar's configuration (keeping
/// the sidecar's lease TTL and cache file).
fn use_etcd(cfg: &mut mesh_agent::config::AgentConfig, etcd: &EtcdConfig) {
    if let Some(e) = cfg.store.etcd.as_mut() {
        e.endpoints = etcd.endpoints.clone();
        e.ca = etcd.ca.clone();
        e.cert = etcd.cert.clone();
        e.key = etcd.key.clone();
        e.username = etcd.username.clone();
        e.password = etcd.password.clone();
    }
}

async fn status_of(c: &client::HttpClient, uri: &str) -> u16 {
    match client::send(c, http::Request::get(uri).body(client::empty()).unwrap()).await {
        Ok(r) => r.status.as_u16(),
        Err(_) => 0,
    }
}

async fn dump(r: &Running) -> serde_json::Value {
    client::admin(r.bound.admin, "/config_dump").await.json()
}

/// Keys under `prefix`, read with `cfg`.
async fn keys_under(cfg: &EtcdConfig, prefix: &str) -> Vec<String> {
    let Ok(etcd) = Etcd::connect(cfg).await else {
        return Vec::new();
    };
    let mut c = etcd.client.clone();
    etcd.call(c.get(
        prefix,
        Some(GetOptions::new().with_prefix().with_keys_only()),
    ))
    .await
    .map(|r| {
        r.kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap_or("").to_string())
            .collect()
    })
    .unwrap_or_default()
}

/// `echo` behind its sidecar and a `client` sidecar, each with its own etcd configuration;
/// returns once `echo` answers through the mesh.
struct Mesh {
    _pki: Pki,
    _backend: Backend,
    echo: Running,
    client: Running,
}

async fn mesh(echo_etcd: &EtcdConfig, client_etcd: &EtcdConfig) -> Mesh {
    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let eps = echo_etcd.endpoints.clone();
    let echo = etcd_sidecar(&pki, "echo", backend.addr, eps.clone(), |c| {
        use_etcd(c, echo_etcd)
    })
    .await;
    let client = etcd_sidecar(&pki, "client", backend.addr, eps, |c| {
        use_etcd(c, client_etcd)
    })
    .await;
    let c = client::h1(client.bound.outbound);
    wait_for(
        Duration::from_secs(15),
        "echo reachable through the mesh",
        || async { status_of(&c, "http://echo/echo").await == 200 },
    )
    .await;
    Mesh {
        _pki: pki,
        _backend: backend,
        echo,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_register_and_discover_through_tls_etcd_with_client_certificates() {
    init_logs();
    let etcd = EtcdCluster::start_tls(1).await;
    assert!(etcd.endpoint().starts_with("https://"));
    let m = mesh(
        &etcd.config(Some("echo"), None),
        &etcd.config(Some("client"), None),
    )
    .await;
    let root = etcd.config(Some(ROOT_USER), None);
    let echo_keys = keys_under(&root, &format!("{PREFIX}/mesh/services/echo/instances/")).await;
    assert_eq!(echo_keys.len(), 1, "{echo_keys:?}");
    let d = dump(&m.echo).await;
    assert_eq!(d["etcd"]["registration"]["registered"], true, "{d}");
    assert_eq!(d["etcd"]["discovery"]["connected"], true, "{d}");
    let statuses = keys_under(&root, &format!("{PREFIX}/status/")).await;
    assert_eq!(
        statuses.len(),
        2,
        "both sidecars report status: {statuses:?}"
    );
    drop(m.client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refusals_name_their_cause() {
    init_logs();
    let etcd = EtcdCluster::start_tls(1).await;

    // No client certificate: etcd ends the handshake, and the error says what to set.
    let no_cert = etcd.config(None, None);
    let err = mesh_agent::policy::status(&no_cert)
        .await
        .expect_err("no client certificate");
    let msg = err.to_string();
    assert!(
        msg.contains("client certificate") && msg.contains("store.etcd.cert"),
        "{msg}"
    );

    // A server certificate from a CA we do not trust.
    let other = mesh_agent::testing::EtcdTls::generate();
    let mut wrong_ca = etcd.config(Some("echo"), None);
    wrong_ca.ca = Some(other.ca_path());
    let msg = mesh_agent::policy::status(&wrong_ca)
        .await
        .expect_err("untrusted server")
        .to_string();
    assert!(msg.contains("not signed by a CA in store.etcd.ca"), "{msg}");

    // A client certificate from a CA etcd does not trust.
    let mut foreign_client = etcd.config(None, None);
    let (cert, key) = other.client("echo");
    foreign_client.cert = Some(cert);
    foreign_client.key = Some(key);
    let msg = mesh_agent::policy::status(&foreign_client)
        .await
        .expect_err("foreign client certificate")
        .to_string();
    assert!(msg.contains("etcd refused our client certificate"), "{msg}");

    // A certificate without its key is a configuration error, before any connection.
    let mut half = etcd.config(Some("echo"), None);
    half.key = None;
    assert!(matches!(
        Etcd::connect(&half).await,
        Err(EtcdError::TlsIncomplete)
    ));

    // A sidecar without a client certificate is not ready and says why in /config_dump.
    let pki = Pki::new(&["echo"]);
    let backend = Backend::start().await;
    let echo = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), |c| {
        use_etcd(c, &no_cert)
    })
    .await;
    wait_for(
        Duration::from_secs(10),
        "the discovery error in /config_dump",
        || async {
            dump(&echo).await["etcd"]["discovery"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("client certificate"))
        },
    )
    .await;
    let ready = client::admin(echo.bound.admin, "/ready").await;
    assert_eq!(ready.status, 503, "not ready without etcd: {}", ready.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_register_and_discover_through_etcd_with_a_password() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    etcd.enable_auth(ROOT_PASSWORD).await;
    let root = etcd.config(None, Some((ROOT_USER, ROOT_PASSWORD)));
    let m = mesh(&root, &root).await;
    let echo_keys = keys_under(&root, &format!("{PREFIX}/mesh/services/echo/instances/")).await;
    assert_eq!(echo_keys.len(), 1, "{echo_keys:?}");
    // `/config_dump` shows the agent's configuration with the data plane's, never the password.
    let d = dump(&m.client).await;
    assert_eq!(d["config"]["service"], "client");
    assert_eq!(d["config"]["store"]["etcd"]["username"], ROOT_USER);
    assert!(!d.to_string().contains(ROOT_PASSWORD), "{d}");
    // Without credentials nothing can be read any more.
    let anonymous = etcd.config(None, None);
    let msg = mesh_agent::policy::status(&anonymous)
        .await
        .expect_err("auth is on")
        .to_string();
    assert!(msg.contains("no etcd user was given"), "{msg}");
    drop(m.client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_naming_the_cause() {
    init_logs();
    let etcd = EtcdCluster::start(1).await;
    etcd.enable_auth(ROOT_PASSWORD).await;
    let wrong = etcd.config(None, Some((ROOT_USER, "not-the-password")));
    let err = Etcd::connect(&wrong)
        .await
        .err()
        .expect("refused at connect");
    assert!(matches!(err, EtcdError::AuthFailed { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("authentication failed for user `root`: wrong user name or password")
            && msg.contains(&etcd.endpoint()),
        "{msg}"
    );
    let msg = mesh_agent::policy::status(&wrong)
        .await
        .expect_err("status with a wrong password")
        .to_string();
    assert!(msg.contains("authentication failed"), "{msg}");

    // A sidecar with a wrong password: not ready, both loops report the cause.
    let pki = Pki::new(&["echo"]);
    let backend = Backend::start().await;
    let echo = etcd_sidecar(&pki, "echo", backend.addr, etcd.endpoints(), |c| {
        use_etcd(c, &wrong)
    })
    .await;
    wait_for(
        Duration::from_secs(10),
        "the authentication errors in /config_dump",
        || async {
            let d = dump(&echo).await;
            let has = |v: &serde_json::Value| {
                v.as_str()
                    .is_some_and(|e| e.contains("authentication failed for user `root`"))
            };
            has(&d["etcd"]["discovery"]["last_error"])
                && has(&d["etcd"]["registration"]["last_error"])
        },
    )
    .await;
    assert_eq!(client::admin(echo.bound.admin, "/ready").await.status, 503);
}

/// An etcd with auth on, the operator user `ops` and users `echo` and `client` with their
/// service roles, all made with `mesh-agent etcd rbac`'s plans.
async fn least_privilege_etcd() -> (EtcdCluster, EtcdConfig) {
    let etcd = EtcdCluster::start(1).await;
    etcd.enable_auth(ROOT_PASSWORD).await;
    let root = Etcd::connect(&etcd.config(None, Some((ROOT_USER, ROOT_PASSWORD))))
        .await
        .expect("root");
    let plans = [
        (rbac::operator_plan("/trellis", "ops").unwrap(), "ops-pw"),
        (rbac::service_plan("/trellis", "echo").unwrap(), "echo-pw"),
        (
            rbac::service_plan("/trellis", "client").unwrap(),
            "client-pw",
        ),
    ];
    for (plan, pw) in &plans {
        let done = plan.apply(&root, Some(pw)).await.expect("apply the plan");
        assert!(
            done.iter().any(|l| l.starts_with("created role")),
            "{done:?}"
        );
        // Applying again changes nothing.
        let again = plan.apply(&root, Some(pw)).await.expect("apply again");
        assert!(
            again
                .iter()
                .all(|l| l.contains("password") || l.contains("already as planned")),
            "{again:?}"
        );
    }
    let ops = etcd.config(None, Some(("ops", "ops-pw")));
    (etcd, ops)
}

fn docs(yaml: &str) -> Vec<trellis_policies::PolicyDocument> {
    parse_documents(yaml, "test")
        .into_iter()
        .map(|d| d.expect("valid document"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_role_lets_its_sidecar_work_and_refuses_every_other_key() {
    init_logs();
    let (etcd, ops) = least_privilege_etcd().await;
    let echo_cfg = etcd.config(None, Some(("echo", "echo-pw")));
    let client_cfg = etcd.config(None, Some(("client", "client-pw")));

    // The operator writes policies (and their history).
    let policy =
        "apiVersion: trellis.dev/v1\nkind: ServicePolicy\nmetadata: {name: echo}\nspec: {request_timeout: 7s}\n";
    mesh_agent::policy::apply_as(&ops, &docs(policy), false, "ops")
        .await
        .expect("the operator applies a policy");

    // Sidecars logged in as their service register, discover each other and serve.
    let m = mesh(&echo_cfg, &client_cfg).await;
    wait_for(
        Duration::from_secs(10),
        "both sidecars converged (status keys written)",
        || async {
            mesh_agent::policy::status(&ops)
                .await
                .is_ok_and(|s| s.lines().filter(|l| l.ends_with(" yes")).count() == 2)
        },
    )
    .await;
    let d = dump(&m.client).await;
    assert!(
        d["snapshot"].to_string().contains("7s"),
        "the policy reached the client sidecar: {}",
        d["snapshot"]
    );

    // With echo's credentials, every key of another service and every policy is refused.
    let as_echo = Etcd::connect(&echo_cfg).await.expect("echo logs in");
    let client_instance = keys_under(&ops, &format!("{PREFIX}/mesh/services/client/instances/"))
        .await
        .pop()
        .expect("client registered");
    let mut c = as_echo.client.clone();
    let forbidden = [
        client_instance.clone(),
        format!("{PREFIX}/mesh/services/client/instances/fake"),
        format!("{PREFIX}/mesh/services/echo-v2/instances/fake"),
        format!("{PREFIX}/mesh/policies/ServicePolicy/echo"),
        format!("{PREFIX}/mesh/policies/ServicePolicy/client"),
        format!("{PREFIX}/status/client/fake"),
        format!("{PREFIX}/ratelimit/client/fake"),
        format!("{PREFIX}/history/ServicePolicy/echo/00000000000000000099"),
        "/elsewhere".to_string(),
    ];
    for key in &forbidden {
        let err = as_echo
            .call(c.put(key.as_str(), "{}", None))
            .await
            .expect_err("write refused");
        let msg = err.to_string();
        assert!(
            matches!(err, EtcdError::PermissionDenied { .. })
                && msg.contains("permission denied for user `echo`"),
            "{key}: {msg}"
        );
    }
    let err = as_echo
        .call(c.delete(client_instance.as_str(), None))
        .await
        .expect_err("deleting another service's registration is refused");
    assert!(matches!(err, EtcdError::PermissionDenied { .. }), "{err}");
    // Its own prefixes are writable.
    as_echo
        .call(c.put(format!("{PREFIX}/status/echo/probe"), "{}", None))
        .await
        .expect("echo writes under its own status prefix");
    as_echo
        .call(c.delete(format!("{PREFIX}/status/echo/probe"), None))
        .await
        .expect("and deletes there");
    // `policy apply` as echo fails and says why.
    let msg =
        mesh_agent::policy::apply_as(&echo_cfg, &docs(&policy.replace("7s", "1s")), false, "echo")
            .await
            .expect_err("a service cannot change policies")
            .to_string();
    assert!(msg.contains("permission denied for user `echo`"), "{msg}");

    // A clean shutdown revokes the lease (which needs write access to its keys): the
    // registration is gone at once, not after the TTL.
    m.echo.shutdown_handle().shutdown();
    let start = Instant::now();
    wait_for(
        Duration::from_secs(1),
        "echo deregistered at once",
        || async {
            keys_under(&ops, &format!("{PREFIX}/mesh/services/echo/"))
                .await
                .is_empty()
        },
    )
    .await;
    eprintln!("deregistered {:?} after shutdown", start.elapsed());
    drop(m.client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_rate_limit_sharing_works_under_the_service_role() {
    init_logs();
    let (etcd, ops) = least_privilege_etcd().await;
    let echo_cfg = etcd.config(None, Some(("echo", "echo-pw")));
    let client_cfg = etcd.config(None, Some(("client", "client-pw")));
    let policy = "apiVersion: trellis.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: echo-global}\n\
                  spec: {service: echo, scope: global, limit: {requests: 1000, per: second}, burst: 100}\n";
    mesh_agent::policy::apply_as(&ops, &docs(policy), false, "ops")
        .await
        .expect("the operator applies the rate limit");

    let pki = Pki::new(&["client", "echo"]);
    let backend = Backend::start().await;
    let mut echoes = Vec::new();
    for i in 0..2 {
        let mut cfg = etcd_sidecar_config(&pki, "echo", backend.addr, etcd.endpoints());
        use_etcd(&mut cfg, &echo_cfg);
        if let Some(e) = cfg.store.etcd.as_mut() {
            e.cache_file = Some(pki.path().join(format!("echo-{i}.cache.json")));
        }
        echoes.push(mesh_agent::run::start(cfg).await.expect("echo sidecar"));
    }
    let client = etcd_sidecar(&pki, "client", backend.addr, etcd.endpoints(), |c| {
        use_etcd(c, &client_cfg)
    })
    .await;
    let c = client::h1(client.bound.outbound);
    // Traffic to both instances makes each publish its demand under its own lease.
    wait_for(
        Duration::from_secs(20),
        "both echo sidecars sharing the limit with each other",
        || async {
            for _ in 0..10 {
                status_of(&c, "http://echo/echo").await;
            }
            let mut all = true;
            for e in &echoes {
                let s = dump(e).await["etcd"]["rate_limit_sharing"].clone();
                all &= s["connected"] == true && s["peers"] == 2 && s["last_error"].is_null();
            }
            all
        },
    )
    .await;
    let demands = keys_under(&ops, &format!("{PREFIX}/ratelimit/echo/")).await;
    assert_eq!(demands.len(), 2, "one demand key per instance: {demands:?}");
    for e in &echoes {
        let reg = dump(e).await["etcd"]["registration"].clone();
        assert!(reg["last_error"].is_null(), "no registration error: {reg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_log_in_as_the_service_user() {
    init_logs();
    // With TLS and auth, etcd takes the user from the certificate's common name: a sidecar of
    // `echo` with echo's certificate and no password is user `echo`, with echo's role.
    let etcd = EtcdCluster::start_tls(1).await;
    etcd.enable_auth(ROOT_PASSWORD).await;
    let root = Etcd::connect(&etcd.config(Some(ROOT_USER), None))
        .await
        .expect("root by certificate");
    for s in ["echo", "client"] {
        rbac::service_plan("/trellis", s)
            .unwrap()
            .apply(&root, None)
            .await
            .expect("a user without a password");
    }
    let m = mesh(
        &etcd.config(Some("echo"), None),
        &etcd.config(Some("client"), None),
    )
    .await;
    let as_echo = Etcd::connect(&etcd.config(Some("echo"), None))
        .await
        .expect("echo by certificate");
    let mut c = as_echo.client.clone();
    let err = as_echo
        .call(c.put(
            format!("{PREFIX}/mesh/policies/ServicePolicy/echo"),
            "{}",
            Some(PutOptions::new()),
        ))
        .await
        .expect_err("echo's certificate cannot write policies");
    let msg = err.to_string();
    assert!(
        matches!(err, EtcdError::PermissionDenied { .. }) && msg.contains("client-echo.pem"),
        "{msg}"
    );
    drop(m.client);
}
