//! The process's limit on open files, raised to what the system allows before the sidecar
//! starts.
//!
//! Why: every connection is a file descriptor (two for a proxied one: the client's and the
//! upstream's), and the soft limit a process inherits is often 1,024 (systemd's default, many
//! shells') while the hard limit is far higher. At the soft limit `accept` fails with `EMFILE`:
//! new clients wait in the kernel's backlog however low the sidecar's load. Go's runtime (since
//! 1.19) and nginx's `worker_rlimit_nofile` raise it the same way; raising the soft limit up to
//! the hard one needs no privilege. The hard limit is the operator's (`ulimit -Hn`, systemd's
//! `LimitNOFILE`, the container runtime's `nofile`): when it is below what `max_connections`
//! allows, the sidecar says so at startup.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for everything that is not a client connection: listeners, etcd, the
/// app pool's and the mesh's upstream connections beyond one per client, files, DNS.
const RESERVE: u64 = 1024;

/// What [`raise`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub before: Option<u64>,
    pub after: Option<u64>,
}

/// Raise the soft limit on open files to the hard limit (`None`: unlimited).
pub fn raise() -> std::io::Result<NoFile> {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current == limit.maximum {
        return Ok(NoFile {
            before,
            after: before,
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(NoFile {
        before,
        after: getrlimit(Resource::Nofile).current,
    })
}

/// Descriptors that `listeners` listeners of `max_connections` each may need at once: two per
/// proxied connection, and [`RESERVE`].
pub fn needed(listeners: u64, max_connections: u64) -> u64 {
    listeners
        .saturating_mul(max_connections)
        .saturating_mul(2)
        .saturating_add(RESERVE)
}

/// Raise the limit and log the outcome: a warning when it stays below `need`.
pub fn raise_and_report(need: u64) {
    match raise() {
        Ok(NoFile { before, after }) => {
            let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
            if after.is_some_and(|a| a < need) {
                tracing::warn!(
                    limit = %show(after),
                    needed = need,
                    "the open-file limit is below what max_connections allows: connections past it wait unaccepted (counted in trellis_accept_errors_total); raise the hard limit (ulimit -Hn, systemd LimitNOFILE, the container runtime's nofile) or lower limits.max_connections"
                );
            } else if before != after {
                tracing::info!(from = %show(before), to = %show(after), "raised the open-file limit to the hard limit");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_counts_two_descriptors_per_connection_and_a_reserve() {
        assert_eq!(needed(2, 10_000), 41_024);
        assert_eq!(needed(3, u64::MAX), u64::MAX, "saturates");
    }
}
