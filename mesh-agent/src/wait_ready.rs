//! `mesh-agent wait-ready`: block until the sidecar's admin `/ready` answers 200, so that an app
//! started next to it never sends its first calls into a sidecar that cannot route yet (the
//! startup-ordering problem of sidecar meshes). Also usable as a container health check.
//!
//! Exit codes: 0 ready; 1 not ready before the timeout (the last answer or connection error is
//! printed); 2 usage error (clap); 126/127 the command given after `--` could not be executed.
//!
//! Plain blocking HTTP/1.1 over `std::net`: one request per probe, no async runtime, so the
//! check costs a few hundred microseconds and works in a container without a shell or curl.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Bytes of an answer kept for the message; `/ready` bodies are one short line.
const MAX_ANSWER: u64 = 4096;

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// 200.
    Ready,
    /// Another status, with the body (e.g. `not ready: waiting for snapshot`).
    NotReady { status: u16, body: String },
    /// No HTTP answer: refused (not started yet), timed out, or not HTTP.
    Unreachable(String),
}

/// Why waiting failed.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("sidecar at {addr} not ready after {}: {last}", humantime::format_duration(*.waited))]
    Timeout {
        addr: SocketAddr,
        waited: Duration,
        last: String,
    },
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Probe::Ready => write!(f, "ready"),
            Probe::NotReady { status, body } => write!(f, "{status} {}", body.trim()),
            Probe::Unreachable(e) => write!(f, "unreachable: {e}"),
        }
    }
}

/// The address to dial for an admin listen address: a wildcard listener is reached on loopback.
pub fn dial_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// One `GET /ready`, bounded by `timeout` for the connect and again for the answer.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Probe {
    let timeout = timeout.max(Duration::from_millis(10));
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Probe::Unreachable(e.to_string()),
    };
    let io = s
        .set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .and_then(|()| {
            s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        });
    if let Err(e) = io {
        return Probe::Unreachable(e.to_string());
    }
    let mut answer = Vec::new();
    if let Err(e) = (&mut s).take(MAX_ANSWER).read_to_end(&mut answer) {
        if answer.is_empty() {
            return Probe::Unreachable(e.to_string());
        }
    }
    parse_answer(&String::from_utf8_lossy(&answer))
}

/// Status line and body of an HTTP/1.x answer.
fn parse_answer(answer: &str) -> Probe {
    let status = answer
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok());
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    match status {
        Some(200) => Probe::Ready,
        Some(status) => Probe::NotReady { status, body },
        None => Probe::Unreachable("not an HTTP answer".into()),
    }
}

/// Probe every `interval` until ready or `timeout` has passed. A zero timeout probes once.
pub fn wait(addr: SocketAddr, timeout: Duration, interval: Duration) -> Result<(), WaitError> {
    let start = Instant::now();
    let per_probe = interval.clamp(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        let last = probe(addr, per_probe.min(left.max(Duration::from_millis(100))));
        if last == Probe::Ready {
            return Ok(());
        }
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(WaitError::Timeout {
                addr,
                waited: Duration::from_millis(start.elapsed().as_millis() as u64),
                last: last.to_string(),
            });
        }
        tracing::debug!(%addr, answer = %last, "sidecar not ready yet");
        std::thread::sleep(interval.min(left));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ready_and_not_ready_answers() {
        assert_eq!(
            parse_answer("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"),
            Probe::Ready
        );
        assert_eq!(
            parse_answer(
                "HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready: waiting for snapshot\n"
            ),
            Probe::NotReady {
                status: 503,
                body: "not ready: waiting for snapshot\n".into()
            }
        );
        assert!(matches!(parse_answer("SSH-2.0"), Probe::Unreachable(_)));
        assert!(matches!(parse_answer(""), Probe::Unreachable(_)));
    }

    #[test]
    fn wildcard_admin_address_is_dialed_on_loopback() {
        let a: SocketAddr = "0.0.0.0:15000".parse().unwrap();
        assert_eq!(dial_addr(a), "127.0.0.1:15000".parse().unwrap());
        let b: SocketAddr = "[::]:15000".parse().unwrap();
        assert_eq!(dial_addr(b), "[::1]:15000".parse().unwrap());
        let c: SocketAddr = "10.0.0.1:15000".parse().unwrap();
        assert_eq!(dial_addr(c), c);
    }

    #[test]
    fn times_out_on_a_closed_port_with_the_reason() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let err = wait(addr, Duration::from_millis(300), Duration::from_millis(50)).unwrap_err();
        assert!(err.to_string().contains("unreachable"), "{err}");
    }
}
