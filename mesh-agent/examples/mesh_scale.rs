//! Helper of `bench/scale.sh` (issue 16): writes a synthetic mesh straight to etcd, churns it,
//! and waits for fleet-wide conditions, so the script can measure real `mesh-agent run`
//! processes against meshes of any size.
//!
//! ```text
//! mesh_scale populate   ENDPOINT PREFIX INSTANCES SERVICES [GATEWAY]
//! mesh_scale churn      ENDPOINT PREFIX INSTANCES SERVICES RATE SECONDS
//! mesh_scale touch      ENDPOINT PREFIX INSTANCES SERVICES INSTANCE
//! mesh_scale wait-count ENDPOINT PREFIX SERVICE WANT TIMEOUT_SECONDS
//! mesh_scale wait-applied ENDPOINT PREFIX SERVICE WANT REVISION TIMEOUT_SECONDS
//! ```
//!
//! The layout is the sidecars' own (`mesh_agent::etcd::keys::Keys`): instance `i` is
//! `i-<i>` of service `svc-<i mod SERVICES>`, so every service gets INSTANCES / SERVICES
//! instances. Addresses are on 127.1.0.0/16, port 9, where nothing listens: a request routed
//! to one fails fast (503) and a vanished one is not retained. With GATEWAY, one `HTTPRoute`
//! per service (`svc-N.edge.bench` -> `svc-N`) is bound to that ingress gateway. `touch`
//! rewrites one instance (a marker change of its service; prints `revision N`). The
//! `wait-*` commands print the wall-clock time (Unix milliseconds) at which the condition was
//! first seen, polling every 20 ms.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, GetOptions, GetResponse};
use mesh_agent::etcd::keys::Keys;
use trellis_policies::{parse_documents, Registration};

const TRUST_DOMAIN: &str = "bench.local";
const POLL: Duration = Duration::from_millis(20);
/// Writes in flight while populating.
const PARALLEL: usize = 64;

fn service_of(i: usize, services: usize) -> String {
    format!("svc-{:04}", i % services)
}

fn registration(i: usize, services: usize, weight: u32, generation: u64) -> Registration {
    let service = service_of(i, services);
    let mut metadata = std::collections::BTreeMap::new();
    metadata.insert("generation".to_string(), generation.to_string());
    Registration {
        identity: format!("spiffe://{TRUST_DOMAIN}/service/{service}"),
        service,
        instance: format!("i-{i:05}"),
        address: format!("127.1.{}.{}:9", i / 250, i % 250 + 1),
        weight,
        zone: None,
        metadata,
        version: "bench".to_string(),
        ttl_seconds: 10,
        draining: false,
    }
}

/// Writes one registration; the store revision it made.
async fn put_instance(client: &mut Client, keys: &Keys, r: &Registration) -> i64 {
    let value = serde_json::to_vec(r).expect("registration as JSON");
    client
        .put(keys.instance(&r.service, &r.instance), value, None)
        .await
        .expect("etcd put")
        .header()
        .map_or(0, |h| h.revision())
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// xorshift64*: reproducible churn without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

async fn populate(
    client: Client,
    keys: Keys,
    instances: usize,
    services: usize,
    gateway: Option<String>,
) {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..PARALLEL {
        let (mut client, keys) = (client.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..instances).step_by(PARALLEL) {
                put_instance(&mut client, &keys, &registration(i, services, 1, 0)).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    let mut routes = 0;
    if let Some(gateway) = gateway {
        let mut tasks = Vec::new();
        for worker in 0..PARALLEL {
            let (mut client, keys, gateway) = (client.clone(), keys.clone(), gateway.clone());
            tasks.push(tokio::spawn(async move {
                for s in (worker..services).step_by(PARALLEL) {
                    let svc = format!("svc-{s:04}");
                    let yaml = format!(
                        "apiVersion: trellis.dev/v1\nkind: HTTPRoute\nmetadata: {{name: edge-{svc}}}\nspec:\n  hosts: [{svc}.edge.bench]\n  gateways: [{gateway}]\n  rules: [{{backends: [{{service: {svc}}}]}}]\n"
                    );
                    let doc = parse_documents(&yaml, "route")
                        .pop()
                        .expect("one document")
                        .expect("valid HTTPRoute");
                    let value = serde_json::to_vec(&doc).expect("route as JSON");
                    client
                        .put(keys.policy(&doc.kind, &doc.metadata.name), value, None)
                        .await
                        .expect("etcd put");
                }
            }));
        }
        for t in tasks {
            t.await.expect("writer task");
        }
        routes = services;
    }
    println!(
        "populated {instances} instances in {services} services and {routes} routes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// RATE changes per second for SECONDS, spread uniformly over the instances (so over the
/// services): a deleted instance is added again, a live one is updated (new weight and
/// metadata) 3 times in 4 and deleted (no graceful deregistration) otherwise.
async fn churn(
    mut client: Client,
    keys: Keys,
    instances: usize,
    services: usize,
    rate: f64,
    seconds: f64,
) {
    let seed = now_ms() as u64 | 1;
    let mut rng = Rng(seed);
    let mut deleted = vec![false; instances];
    let (mut updates, mut deletes, mut adds) = (0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let mut generation = 0u64;
    let mut revision = 0;
    loop {
        tick.tick().await;
        if Instant::now() >= end {
            break;
        }
        generation += 1;
        let i = rng.below(instances);
        if deleted[i] {
            revision = put_instance(
                &mut client,
                &keys,
                &registration(i, services, 1, generation),
            )
            .await;
            deleted[i] = false;
            adds += 1;
        } else if rng.below(4) < 3 {
            let weight = 1 + rng.below(100) as u32;
            revision = put_instance(
                &mut client,
                &keys,
                &registration(i, services, weight, generation),
            )
            .await;
            updates += 1;
        } else {
            let service = service_of(i, services);
            revision = client
                .delete(keys.instance(&service, &format!("i-{i:05}")), None)
                .await
                .expect("etcd delete")
                .header()
                .map_or(0, |h| h.revision());
            deleted[i] = true;
            deletes += 1;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "churn: {} changes in {secs:.1} s ({:.1}/s): {updates} updates, {deletes} deletes, {adds} re-adds (seed {seed}); last revision {revision}",
        updates + deletes + adds,
        (updates + deletes + adds) as f64 / secs
    );
}

/// Rewrites instance `i` (new metadata, so a real change) and prints the revision it made: a
/// marker in a service the measured processes hold, to time when they have caught up.
async fn touch(mut client: Client, keys: Keys, i: usize, services: usize) {
    let generation = now_ms() as u64;
    let revision = put_instance(
        &mut client,
        &keys,
        &registration(i, services, 1, generation),
    )
    .await;
    println!("revision {revision}");
}

/// Reads PREFIX every [`POLL`] until the answer has `want` of what `count` counts (prints
/// when, Unix ms) or TIMEOUT seconds pass (prints the last count to stderr, exit 1).
async fn wait_for_keys(
    mut client: Client,
    prefix: String,
    opts: GetOptions,
    timeout: f64,
    want: i64,
    count: impl Fn(&GetResponse) -> i64,
) {
    let deadline = Instant::now() + Duration::from_secs_f64(timeout);
    let mut last = 0;
    loop {
        if let Ok(r) = client.get(prefix.as_str(), Some(opts.clone())).await {
            last = count(&r);
            if last >= want {
                println!("{}", now_ms());
                return;
            }
        }
        if Instant::now() >= deadline {
            eprintln!("timed out after {timeout} s at {last} of {want}");
            std::process::exit(1);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i} ({what}) missing or invalid; see the header"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let endpoint: String = arg(&args, 1, "ENDPOINT");
    let keys = Keys::new(&arg::<String>(&args, 2, "PREFIX"));
    let client = Client::connect([endpoint.as_str()], None)
        .await
        .expect("connect to etcd");
    let size = || (arg(&args, 3, "INSTANCES"), arg(&args, 4, "SERVICES"));
    match cmd {
        "populate" => {
            let (instances, services) = size();
            populate(client, keys, instances, services, args.get(5).cloned()).await
        }
        "churn" => {
            let (instances, services) = size();
            let (rate, seconds) = (arg(&args, 5, "RATE"), arg(&args, 6, "SECONDS"));
            churn(client, keys, instances, services, rate, seconds).await
        }
        "touch" => {
            let (instances, services): (usize, usize) = size();
            let i: usize = arg(&args, 5, "INSTANCE");
            assert!(i < instances, "INSTANCE must be below INSTANCES");
            touch(client, keys, i, services).await
        }
        "wait-count" => {
            let want: i64 = arg(&args, 4, "WANT");
            wait_for_keys(
                client,
                keys.instances(&arg::<String>(&args, 3, "SERVICE")),
                GetOptions::new().with_prefix().with_count_only(),
                arg(&args, 5, "TIMEOUT_SECONDS"),
                want,
                |r| r.count(),
            )
            .await
        }
        "wait-applied" => {
            let want: i64 = arg(&args, 4, "WANT");
            let revision: i64 = arg(&args, 5, "REVISION");
            wait_for_keys(
                client,
                keys.service_statuses(&arg::<String>(&args, 3, "SERVICE")),
                GetOptions::new().with_prefix(),
                arg(&args, 6, "TIMEOUT_SECONDS"),
                want,
                |r| {
                    r.kvs()
                        .iter()
                        .filter_map(|kv| {
                            serde_json::from_slice::<serde_json::Value>(kv.value()).ok()
                        })
                        .filter(|v| v["applied_revision"].as_i64().unwrap_or(0) >= revision)
                        .count() as i64
                },
            )
            .await
        }
        _ => {
            eprintln!("usage: see the header of mesh-agent/examples/mesh_scale.rs");
            std::process::exit(2);
        }
    }
}
