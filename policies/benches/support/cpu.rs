//! CPU time of the bench process, shared by the benches (`#[path]` module): a loaded machine
//! (other builds on the same cores) inflates it far less than the wall time criterion reports.

use std::time::{Duration, Instant};

/// This process's user + system CPU time, from /proc (clock ticks of 10 ms).
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Run `f` `n` times and print its CPU and wall time per run, as `{label}: ... per {unit}`.
pub fn per_run<T>(label: &str, unit: &str, n: u32, mut f: impl FnMut() -> T) {
    let (Some(start), wall) = (cpu_time(), Instant::now()) else {
        return;
    };
    for _ in 0..n {
        std::hint::black_box(f());
    }
    if let Some(end) = cpu_time() {
        println!(
            "{label}: {:.1} us CPU, {:.1} us wall per {unit} ({n} runs)",
            (end - start).as_secs_f64() * 1e6 / f64::from(n.max(1)),
            wall.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1)),
        );
    }
}
