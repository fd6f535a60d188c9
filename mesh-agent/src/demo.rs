//! `mesh-agent demo`: a whole mesh in one process, without etcd. An ephemeral CA, a `frontend`
//! client sidecar, and two services (`orders`, `payments`) with two instances each, every
//! instance a small built-in backend behind its own sidecar. The file store feeds every sidecar
//! the same mesh file. Traffic: demo client -> frontend sidecar -> mTLS -> orders sidecar ->
//! orders app -> orders sidecar -> mTLS -> payments sidecar -> payments app.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::AgentConfig;
use tokio::net::TcpListener;
use trellis_proxy::app::Running;
use trellis_proxy::identity::CertificateAuthority;

use crate::demo_app;

const TRUST_DOMAIN: &str = "demo.trellis.local";
const SERVICES: [(&str, usize); 2] = [("orders", 2), ("payments", 2)];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo setup: {0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// Requests seen by each demo backend instance, and the caller identities it verified.
#[derive(Default)]
struct Stats {
    per_instance: BTreeMap<String, (u64, BTreeSet<String>)>,
}

type SharedStats = Arc<Mutex<Stats>>;

struct Instance {
    name: String,
    app: SocketAddr,
    sidecar: Running,
}

/// Run the demo; `Ok(true)` when every request succeeded with the expected identities.
pub async fn run(duration: Option<Duration>, rate: u32) -> Result<bool, DemoError> {
    let dir = tempfile::tempdir().map_err(setup("temp dir"))?;
    let ca = CertificateAuthority::generate(TRUST_DOMAIN, Duration::from_secs(86_400))
        .map_err(setup("CA"))?;
    ca.write(dir.path()).map_err(setup("CA"))?;
    for svc in ["frontend", "orders", "payments"] {
        ca.issue_service(svc, Duration::from_secs(86_400))
            .and_then(|c| c.write(dir.path(), svc))
            .map_err(setup("certificate"))?;
    }
    let mesh_file = dir.path().join("mesh.yaml");
    let stats: SharedStats = Arc::default();
    let client = demo_app::client();

    // Sidecars bind first (port 0), then the mesh file lists their real inbound addresses.
    let mut instances = Vec::new();
    let mut stores = Vec::new();
    for (service, count) in SERVICES {
        for i in 1..=count {
            let name = format!("{service}-{i}");
            let app = TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(setup("bind backend"))?;
            let app_addr = app.local_addr().map_err(setup("backend address"))?;
            let (sidecar, store) = start_sidecar(service, dir.path(), app_addr, &mesh_file).await?;
            let upstream = (service == "orders").then(|| demo_app::Upstream {
                outbound: sidecar.bound.outbound,
                service: "payments".into(),
                path: "/charge".into(),
            });
            let tally = {
                let (stats, name) = (stats.clone(), name.clone());
                Arc::new(move |caller: &str| {
                    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
                    let e = s.per_instance.entry(name.clone()).or_default();
                    e.0 += 1;
                    e.1.insert(caller.to_string());
                })
            };
            tokio::spawn(demo_app::serve(
                app,
                name.clone(),
                upstream,
                client.clone(),
                tally,
            ));
            instances.push(Instance {
                name,
                app: app_addr,
                sidecar,
            });
            stores.push(store);
        }
    }
    let unused_app: SocketAddr = "127.0.0.1:9".parse().map_err(setup("address"))?;
    let (frontend, store) = start_sidecar("frontend", dir.path(), unused_app, &mesh_file).await?;
    stores.push(store);

    let mut yaml = String::from("services:\n");
    for (service, _) in SERVICES {
        yaml.push_str(&format!("  {service}:\n    endpoints:\n"));
        for inst in instances.iter().filter(|i| i.name.starts_with(service)) {
            yaml.push_str(&format!(
                "      - address: {}\n",
                inst.sidecar.bound.inbound
            ));
        }
    }
    std::fs::write(&mesh_file, yaml).map_err(setup("mesh file"))?;
    for start in stores {
        start();
    }

    println!(
        "Trellis demo mesh (trust domain {TRUST_DOMAIN}, no etcd: file store {})",
        mesh_file.display()
    );
    println!(
        "{:<12} {:<22} {:<22} admin",
        "instance", "app", "sidecar inbound (mTLS)"
    );
    for inst in &instances {
        println!(
            "{:<12} {:<22} {:<22} http://{}",
            inst.name,
            inst.app.to_string(),
            inst.sidecar.bound.inbound.to_string(),
            inst.sidecar.bound.admin
        );
    }
    println!(
        "{:<12} {:<22} {:<22} http://{}",
        "frontend",
        "(demo client)",
        format!("outbound {}", frontend.bound.outbound),
        frontend.bound.admin
    );

    let all: Vec<&Running> = instances
        .iter()
        .map(|i| &i.sidecar)
        .chain([&frontend])
        .collect();
    wait_ready(&all).await?;
    println!(
        "\nall sidecars ready; sending {rate} req/s: client -> frontend -> orders -> payments"
    );
    match duration {
        Some(d) => println!("running for {}s", d.as_secs()),
        None => println!("press Ctrl-C to stop"),
    }

    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let mut tick = tokio::time::interval(period);
    let deadline = duration.map(|d| Instant::now() + d);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut in_flight = tokio::task::JoinSet::new();
    let stop = crate::run::wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut stop => break,
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let (client, outbound) = (client.clone(), frontend.bound.outbound);
        in_flight.spawn(async move {
            demo_app::call(
                &client,
                outbound,
                "orders",
                "/checkout",
                &http::HeaderMap::new(),
            )
            .await
        });
        while let Some(r) = in_flight.try_join_next() {
            tally(r, &mut ok, &mut failed);
        }
    }
    while let Some(r) = in_flight.join_next().await {
        tally(r, &mut ok, &mut failed);
    }

    let identity_ok = print_summary(&stats, ok, failed, &frontend);
    for s in all {
        s.shutdown_handle().shutdown();
    }
    for inst in instances {
        inst.sidecar.wait().await;
    }
    frontend.wait().await;
    Ok(failed == 0 && ok > 0 && identity_ok)
}

fn tally(
    r: Result<Result<String, String>, tokio::task::JoinError>,
    ok: &mut u64,
    failed: &mut u64,
) {
    match r {
        Ok(Ok(_)) => *ok += 1,
        Ok(Err(e)) => {
            *failed += 1;
            eprintln!("request failed: {e}");
        }
        Err(e) => {
            *failed += 1;
            eprintln!("request task failed: {e}");
        }
    }
}

type StartStore = Box<dyn FnOnce() + Send>;

async fn start_sidecar(
    service: &str,
    dir: &std::path::Path,
    app: SocketAddr,
    mesh_file: &std::path::Path,
) -> Result<(Running, StartStore), DemoError> {
    let mut cfg = AgentConfig::new(service, dir);
    let p = &mut cfg.proxy;
    p.trust_domain = TRUST_DOMAIN.into();
    let any: SocketAddr = "127.0.0.1:0".parse().map_err(setup("address"))?;
    p.inbound.listen = any;
    p.outbound.listen = any;
    p.admin.listen = any;
    p.inbound.app = app;
    p.drain.grace_period = Duration::from_secs(2);
    // Traces only when a collector is named (e.g. a local Jaeger on :4317), then every request.
    p.tracing.enabled = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    p.tracing.sampling = 1.0;
    cfg.store.file = Some(mesh_file.to_path_buf());
    cfg.store.reload_interval = Duration::from_millis(200);
    // The store must not read the file before it is written: start it afterwards.
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut proxy = crate::run::data_plane(&cfg, rx);
    let dns = Arc::new(crate::dns::Dns::new(&[], proxy.registry_mut()));
    let store = crate::store::FileStore::new(
        mesh_file.to_path_buf(),
        TRUST_DOMAIN.into(),
        cfg.store.reload_interval,
        dns,
        proxy.registry_mut(),
    );
    let running = proxy.start().await.map_err(setup("sidecar"))?;
    let start: StartStore = Box::new(move || {
        tokio::spawn(store.run(tx));
    });
    Ok((running, start))
}

async fn wait_ready(sidecars: &[&Running]) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sidecars.iter().all(|s| s.ready.is_ready()) {
        if Instant::now() > deadline {
            let pending: Vec<_> = sidecars.iter().flat_map(|s| s.ready.pending()).collect();
            return Err(DemoError::Setup(format!(
                "sidecars not ready after 10s: {pending:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// GET `path` from `service` through a sidecar's outbound listener.
/// Print what happened; `false` if an instance saw an unexpected caller identity.
fn print_summary(stats: &SharedStats, ok: u64, failed: u64, frontend: &Running) -> bool {
    let s = stats.lock().unwrap_or_else(|p| p.into_inner());
    println!("\n=== summary ===");
    println!("client requests: {ok} succeeded, {failed} failed");
    println!(
        "{:<12} {:>9}  verified caller identity",
        "instance", "requests"
    );
    let mut all_ok = true;
    for (service, count) in SERVICES {
        let expected = match service {
            "orders" => format!("spiffe://{TRUST_DOMAIN}/service/frontend"),
            _ => format!("spiffe://{TRUST_DOMAIN}/service/orders"),
        };
        for i in 1..=count {
            let name = format!("{service}-{i}");
            let (n, callers) = s.per_instance.get(&name).cloned().unwrap_or_default();
            let seen: Vec<_> = callers.into_iter().collect();
            let good = n > 0 && seen == [expected.clone()];
            all_ok &= good;
            println!(
                "{name:<12} {n:>9}  {}{}",
                seen.join(", "),
                if good { "" } else { "  <-- unexpected" }
            );
        }
    }
    println!(
        "metrics: curl http://{}/metrics   config: curl http://{}/config_dump",
        frontend.bound.admin, frontend.bound.admin
    );
    all_ok
}
