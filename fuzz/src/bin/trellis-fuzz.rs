//! The stable fuzz driver's command line (see docs/fuzzing.md):
//!
//! ```text
//! trellis-fuzz list
//! trellis-fuzz run <target|all> [--seconds N] [--iterations N] [--seed N] [--crashes DIR]
//!                  [--corpus DIR] [--corpus-out DIR] [--timeout-seconds N]
//! trellis-fuzz repro <target> <file>...
//! ```
//!
//! `run` prints one line per target (executions, rate, corpus, outcomes, peak allocation,
//! findings) and exits 1 when a target had a finding; crashing inputs are saved under
//! `--crashes` (default `fuzz/crashes`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use trellis_fuzz::driver::{self, Config};

#[global_allocator]
static ALLOC: trellis_fuzz::alloc::Counting = trellis_fuzz::alloc::Counting;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    match args.first().map(String::as_str) {
        Some("list") => {
            for t in trellis_fuzz::targets() {
                println!("{}", t.name);
            }
            ExitCode::SUCCESS
        }
        Some("run") if args.len() >= 2 => run(&root, &args[1], &args[2..]),
        Some("repro") if args.len() >= 3 => repro(&args[1], &args[2..]),
        _ => {
            eprintln!("usage: trellis-fuzz list | run <target|all> [--seconds N] [--iterations N] [--seed N] [--crashes DIR] [--corpus DIR] [--corpus-out DIR] [--timeout-seconds N] | repro <target> <file>...");
            ExitCode::from(2)
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn run(root: &std::path::Path, which: &str, args: &[String]) -> ExitCode {
    let num = |name: &str, default: u64| {
        flag(args, name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seconds = num("--seconds", 600);
    let corpus_dir = flag(args, "--corpus").map_or_else(|| root.join("corpus"), PathBuf::from);
    let cfg = Config {
        duration: Duration::from_secs(seconds),
        iterations: num("--iterations", u64::MAX),
        seed: num("--seed", 0x5eed_f022),
        crashes: Some(flag(args, "--crashes").map_or_else(|| root.join("crashes"), PathBuf::from)),
        corpus_out: flag(args, "--corpus-out").map(PathBuf::from),
    };
    driver::spawn_watchdog(Duration::from_secs(num("--timeout-seconds", 10)));
    let targets: Vec<_> = trellis_fuzz::targets()
        .iter()
        .filter(|t| which == "all" || t.name == which)
        .collect();
    if targets.is_empty() {
        eprintln!("no target {which}");
        return ExitCode::from(2);
    }
    let mut failed = false;
    for t in targets {
        let seeds = driver::load_corpus(&corpus_dir.join(t.name));
        let r = driver::fuzz(t, seeds, &cfg);
        println!(
            "{:<13} execs {:>10} ({:>7.0}/s) in {:>6.1}s  seeds {:>3}  corpus {:>5}  outcomes {:>5}  peak alloc {} B for {} B  findings {}",
            t.name,
            r.execs,
            r.execs as f64 / r.elapsed.as_secs_f64().max(1e-9),
            r.elapsed.as_secs_f64(),
            r.seeds,
            r.corpus,
            r.outcomes,
            r.max_alloc.0,
            r.max_alloc.1,
            r.findings.len()
        );
        for f in &r.findings {
            failed = true;
            println!(
                "  FINDING {} ({} bytes, saved under {}): {}",
                f.kind,
                f.input.len(),
                cfg.crashes
                    .as_ref()
                    .map_or(String::new(), |d| d.join(t.name).display().to_string()),
                f.message
            );
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Run inputs one by one with the panic shown as usual (and a backtrace with RUST_BACKTRACE).
fn repro(name: &str, files: &[String]) -> ExitCode {
    let Some(t) = trellis_fuzz::target(name) else {
        eprintln!("no target {name}");
        return ExitCode::from(2);
    };
    for f in files {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{f}: {e}");
                return ExitCode::from(2);
            }
        };
        let base = trellis_fuzz::alloc::start();
        let outcome = (t.run)(&data[..data.len().min(t.max_len)]);
        let peak = trellis_fuzz::alloc::stop(base);
        println!(
            "{f}: outcome {outcome:016x}, peak allocation {peak} bytes (bound {})",
            t.alloc_bound(data.len())
        );
    }
    ExitCode::SUCCESS
}
