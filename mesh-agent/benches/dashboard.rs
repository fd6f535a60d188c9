//! What a dashboard spends per refresh round on its own side, for a fleet of 300 sidecars:
//! parsing their summaries (JSON, as fetched) and folding them into the model. The mTLS reads
//! themselves (a connection and a handshake per instance per round) are not in it: the whole
//! process is measured by `bench/dashboard.sh` (docs/dashboard.md).
//! `cargo bench -p mesh-agent --bench dashboard`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mesh_agent::dashboard::fleet::Member;
use mesh_agent::dashboard::model::Model;
use trellis_proxy::telemetry::summary::{Histogram, Summary, Traffic, SUMMARY_VERSION};

const SERVICES: usize = 30;
const PER_SERVICE: usize = 10;
/// Services each instance calls (its outbound series), besides its own inbound series.
const CALLEES: usize = 9;

fn member(s: usize, i: usize) -> Member {
    Member {
        service: format!("service-{s}"),
        instance: format!("service-{s}-{i}"),
        address: format!("10.0.{s}.{i}:4143"),
        identity: format!("spiffe://trellis.local/service/service-{s}"),
        zone: None,
        version: "0.1.0".into(),
        draining: false,
        lease_ttl_left: Some(10),
        applied_revision: Some(1),
    }
}

/// The summary of an instance of service `s` after `n` requests on each of its series.
fn summary(s: usize, n: f64) -> String {
    let traffic = |direction: &str, to: String| Traffic {
        direction: direction.into(),
        service: to,
        route: "default".into(),
        statuses: [(200, n), (503, n / 100.0)].into_iter().collect(),
        latency: Histogram {
            bounds: (0..19).map(|i| 0.0001 * 2f64.powi(i)).collect(),
            counts: (0..19).map(|i| n * f64::from(i + 1) / 19.0).collect(),
            count: n,
            sum: n * 0.003,
        },
    };
    let mut t = vec![traffic("inbound", format!("service-{s}"))];
    t.extend((1..=CALLEES).map(|d| traffic("outbound", format!("service-{}", (s + d) % SERVICES))));
    serde_json::to_string(&Summary {
        version: SUMMARY_VERSION,
        service: format!("service-{s}"),
        traffic: t,
        ..Default::default()
    })
    .expect("a summary serializes")
}

fn parse(texts: &[String]) -> Vec<Result<Summary, String>> {
    texts
        .iter()
        .map(|t| serde_json::from_slice(t.as_bytes()).map_err(|e: serde_json::Error| e.to_string()))
        .collect()
}

fn refresh(c: &mut Criterion) {
    let shape: Vec<(usize, Member)> = (0..SERVICES)
        .flat_map(|s| (0..PER_SERVICE).map(move |i| (s, member(s, i))))
        .collect();
    let members: Vec<Member> = shape.iter().map(|(_, m)| m.clone()).collect();
    // Counters grow every round, as a live fleet's do (no restart path).
    let round = |n: f64| -> Vec<String> { shape.iter().map(|(s, _)| summary(*s, n)).collect() };
    let bytes: usize = round(1000.0).iter().map(String::len).sum();
    println!(
        "{} summaries of {} series each, {bytes} bytes of JSON per round",
        members.len(),
        CALLEES + 1
    );
    let mut model = Model::default();
    model.tick(0, 1, members.clone(), parse(&round(1000.0)));
    let (mut now, mut n) = (0, 1000.0);
    let mut group = c.benchmark_group("dashboard_round_300_instances");
    group.bench_function("parse", |b| {
        let texts = round(2000.0);
        b.iter(|| parse(&texts))
    });
    group.bench_function("parse_and_fold", |b| {
        b.iter_batched(
            || {
                n += 100.0;
                now += 10_000;
                (now, members.clone(), round(n))
            },
            |(now, members, texts)| model.tick(now, 1, members, parse(&texts)),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, refresh);
criterion_main!(benches);
