//! A jq body transform on a 2 kB JSON body, per request: strict parse (UTF-8, depth, JSON),
//! the compiled program, compact output. Goal (docs/composition.md): at most 20 µs.
//!
//! `cargo bench -p trellis-policies --bench transform`

use criterion::{criterion_group, Criterion};
use trellis_policies::compose::{compile_jq, BodyProgram, JqLimits, TransformSpec};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::per_run;

#[path = "support/order.rs"]
mod order;
use order::{body, FIELDS, FIELDS_JQ, GATEWAY, RESHAPE};

fn transforms(c: &mut Criterion) {
    let body = body();
    let reshape = compile_jq(RESHAPE).expect("compiles");
    c.bench_function("jq reshape, 2 kB body", |b| {
        b.iter(|| reshape.apply(&body).expect("transforms"))
    });
    let gateway = compile_jq(GATEWAY).expect("compiles");
    c.bench_function("jq gateway forms, 2 kB body", |b| {
        b.iter(|| gateway.apply(&body).expect("transforms"))
    });
    let native = fields().compile(JqLimits::default()).expect("compiles");
    c.bench_function("field operations (native), 2 kB body", |b| {
        b.iter(|| native.apply(&body).expect("transforms"))
    });
    let ops = TransformSpec {
        jq: Some(FIELDS_JQ.into()),
        ..fields()
    };
    let ops = ops.compile(JqLimits::default()).expect("compiles");
    c.bench_function("field operations + jq, 2 kB body", |b| {
        b.iter(|| ops.apply(&body).expect("transforms"))
    });
    let identity = compile_jq(".").expect("compiles");
    c.bench_function("identity (parse + write), 2 kB body", |b| {
        b.iter(|| identity.apply(&body).expect("transforms"))
    });
}

fn fields() -> TransformSpec {
    serde_norway::from_str(FIELDS).expect("spec")
}

/// CPU time per transform.
fn cpu_per_transform() {
    let body = body();
    let reshape = BodyProgram::Jq(compile_jq(RESHAPE).expect("compiles"));
    let gateway = BodyProgram::Jq(compile_jq(GATEWAY).expect("compiles"));
    let native = fields().compile(JqLimits::default()).expect("compiles");
    let identity = BodyProgram::Jq(compile_jq(".").expect("compiles"));
    let n = 20_000u32;
    for (name, program) in [
        ("jq reshape", &reshape),
        ("jq gateway forms", &gateway),
        ("field operations (native)", &native),
        ("identity jq", &identity),
    ] {
        let label = format!("{name}, 2 kB body");
        per_run(&label, "transform", n, || {
            program.apply(&body).expect("transforms")
        });
    }
}

criterion_group!(benches, transforms);

fn main() {
    benches();
    cpu_per_transform();
    Criterion::default().configure_from_args().final_summary();
}
