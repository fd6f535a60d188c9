//! The short fuzz pass that runs with the test suite: each target on its whole seed corpus,
//! then a fixed number of mutated inputs (deterministic seed, capped in time), with the
//! allocation bound checked on every input. A failure prints the finding and the input;
//! `bench/fuzz.sh` runs the same targets for much longer.
//!
//! `FUZZ_SHORT_ITERATIONS` and `FUZZ_SHORT_SECONDS` change the budget per target.

use std::path::PathBuf;
use std::time::Duration;

use trellis_fuzz::driver::{self, Config};

#[global_allocator]
static ALLOC: trellis_fuzz::alloc::Counting = trellis_fuzz::alloc::Counting;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn short_pass(name: &str) {
    let target = trellis_fuzz::target(name).expect("target exists");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name);
    let seeds = driver::load_corpus(&dir);
    assert!(!seeds.is_empty(), "no seed corpus in {}", dir.display());
    let cfg = Config {
        duration: Duration::from_secs(env("FUZZ_SHORT_SECONDS", 5)),
        iterations: env("FUZZ_SHORT_ITERATIONS", 20_000),
        seed: env("FUZZ_SEED", 0x5eed_f022),
        crashes: None,
        corpus_out: None,
    };
    let report = driver::fuzz(target, seeds, &cfg);
    println!(
        "{name}: {} execs in {:.1}s, {} outcomes, peak allocation {} B for a {} B input",
        report.execs,
        report.elapsed.as_secs_f64(),
        report.outcomes,
        report.max_alloc.0,
        report.max_alloc.1
    );
    if let Some(f) = report.findings.first() {
        panic!(
            "{name}: {} findings; first: {} {}\ninput ({} bytes): {:?}",
            report.findings.len(),
            f.kind,
            f.message,
            f.input.len(),
            String::from_utf8_lossy(&f.input)
        );
    }
}

#[test]
fn jwt() {
    short_pass("jwt");
}

#[test]
fn jwks() {
    short_pass("jwks");
}

#[test]
fn policy() {
    short_pass("policy");
}

#[test]
fn etcd() {
    short_pass("etcd");
}

#[test]
fn spiffe() {
    short_pass("spiffe");
}

#[test]
fn routing() {
    short_pass("routing");
}

#[test]
fn grpc_timeout() {
    short_pass("grpc_timeout");
}

#[test]
fn json_body() {
    short_pass("json_body");
}

#[test]
fn ratelimit() {
    short_pass("ratelimit");
}

#[test]
fn protocol() {
    short_pass("protocol");
}

#[test]
fn every_target_has_a_test() {
    let names: Vec<&str> = trellis_fuzz::targets().iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "jwt",
            "jwks",
            "policy",
            "etcd",
            "spiffe",
            "routing",
            "grpc_timeout",
            "ratelimit",
            "protocol",
            "openapi",
            "inject",
            "transcode",
            "json_body"
        ]
    );
}

#[test]
fn openapi() {
    short_pass("openapi");
}

#[test]
fn inject() {
    short_pass("inject");
}

#[test]
fn transcode() {
    short_pass("transcode");
}
