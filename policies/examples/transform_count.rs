//! Runs one body transform N times, for instruction counts that a busy machine does not
//! disturb (docs/composition.md#cost):
//!
//! ```sh
//! cargo build --release -p trellis-policies --example transform_count
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/transform_count reshape 1000
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p target/release/examples/transform_count reshape 0
//! ```
//!
//! The difference of the two totals divided by N is the cost of one transform (the run with
//! 0 transforms counts start-up, building the body and compiling the program). Without
//! valgrind it prints the CPU time per transform (`/proc/self/stat`, for large N).

use trellis_policies::compose::{compile_jq, BodyProgram, JqLimits, TransformSpec};

#[path = "../benches/support/cpu.rs"]
mod cpu;
#[path = "../benches/support/order.rs"]
mod order;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(which), Some(n)) = (args.get(1), args.get(2).and_then(|n| n.parse::<u32>().ok()))
    else {
        eprintln!("usage: transform_count fields|identity|fields-jq|reshape|reshape-jaq|gateway|gateway-jaq N");
        std::process::exit(2);
    };
    let fields = || serde_norway::from_str::<TransformSpec>(order::FIELDS).expect("spec");
    let program = match which.as_str() {
        "fields" => fields().compile(JqLimits::default()).expect("compiles"),
        "fields-jq" => TransformSpec {
            jq: Some(order::FIELDS_JQ.into()),
            ..fields()
        }
        .compile(JqLimits::default())
        .expect("compiles"),
        "identity" => BodyProgram::Jq(compile_jq(".").expect("compiles")),
        "reshape" => BodyProgram::Jq(compile_jq(order::RESHAPE).expect("compiles")),
        // The same outside the fast path's subset (a variable): jaq runs it, bounded, on a
        // thread of its own (jq_bound.rs).
        "reshape-jaq" => BodyProgram::Jq(
            compile_jq(&format!("{} | . as $x | $x", order::RESHAPE)).expect("compiles"),
        ),
        "gateway" => BodyProgram::Jq(compile_jq(order::GATEWAY).expect("compiles")),
        "gateway-jaq" => BodyProgram::Jq(
            compile_jq(&format!("{} | . as $x | $x", order::GATEWAY)).expect("compiles"),
        ),
        other => {
            eprintln!("unknown transform `{other}`");
            std::process::exit(2);
        }
    };
    let body = order::body();
    if which == "gateway" {
        // The native run gives what jaq gives on this body (the differential test in jq.rs
        // checks the forms on many more).
        let jaq = compile_jq(&format!("{} | . as $x | $x", order::GATEWAY)).expect("compiles");
        assert_eq!(
            program.apply(&body).expect("transforms"),
            jaq.apply(&body).expect("transforms"),
            "the native path and jaq differ"
        );
    }
    // One run outside the count, so that the run with N = 0 pays the first-use costs too.
    let _ = program.apply(&body).expect("transforms");
    // With N = 0 too, so that the difference holds nothing but the transforms.
    cpu::per_run(&format!("{which}, 2 kB body"), "transform", n, || {
        program
            .apply(std::hint::black_box(&body))
            .expect("transforms")
    });
}
