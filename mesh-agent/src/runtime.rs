//! The async runtime a sidecar runs on.
//!
//! A sidecar is usually given one CPU or less. tokio's multi-thread scheduler with one worker
//! still runs two busy threads (the worker, and the main thread driving `run`), wakes across
//! them, and gives each its own allocator arena. With one worker, the current-thread scheduler
//! does the same work on one thread: no cross-thread wake-ups, no work-stealing bookkeeping,
//! one arena. linkerd2-proxy makes the same choice (`LINKERD2_PROXY_CORES`); ztunnel sizes its
//! workers with `ZTUNNEL_WORKER_THREADS`. Blocking work (password hashing, schema compiling)
//! already goes to `spawn_blocking`, which both schedulers run on a separate pool.

use std::num::NonZeroUsize;

use tokio::runtime::{Builder, Runtime};

/// Most workers accepted: more than any sidecar needs, few enough that a typo (`--workers
/// 1000`) is an error instead of a thousand threads.
pub const MAX_WORKERS: usize = 64;

/// Worker threads for a sidecar: `requested` (`--workers` / `TRELLIS_WORKERS`), else the CPUs
/// this process may run on (its affinity mask, as tokio's own default; a container's CPU quota
/// is not seen here, so set `TRELLIS_WORKERS` from the pod's CPU limit).
pub fn workers(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(NonZeroUsize::get)
            .unwrap_or(1)
            .min(MAX_WORKERS)
    })
}

/// The runtime for `mesh-agent run`: current-thread with one worker, multi-thread otherwise.
pub fn for_agent(workers: usize) -> std::io::Result<Runtime> {
    if workers <= 1 {
        Builder::new_current_thread().enable_all().build()
    } else {
        Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    }
}

/// The runtime for the other commands (CLI calls to etcd, the demo, the injector).
pub fn for_command() -> std::io::Result<Runtime> {
    Builder::new_multi_thread().enable_all().build()
}

/// Parse `--workers`: 1 to [`MAX_WORKERS`].
pub fn parse_workers(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!(
            "expected a number of worker threads from 1 to {MAX_WORKERS}, got {s:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_bounded_and_named_in_the_error() {
        assert_eq!(parse_workers("1"), Ok(1));
        assert_eq!(parse_workers("64"), Ok(64));
        for bad in ["0", "65", "-1", "two", ""] {
            let err = parse_workers(bad).unwrap_err();
            assert!(err.contains("from 1 to 64"), "{bad}: {err}");
        }
        assert_eq!(workers(Some(3)), 3);
        assert!((1..=MAX_WORKERS).contains(&workers(None)));
    }

    #[test]
    fn one_worker_runs_everything_on_the_calling_thread() {
        let rt = for_agent(1).expect("runtime");
        let main = std::thread::current().id();
        let spawned =
            rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_eq!(spawned.expect("task"), main);
        let rt = for_agent(2).expect("runtime");
        let spawned =
            rt.block_on(async { tokio::spawn(async { std::thread::current().id() }).await });
        assert_ne!(
            spawned.expect("task"),
            main,
            "two workers: tasks run on the workers"
        );
    }
}
