//! Transparent interception on the outbound listener: connections that iptables redirected to
//! it (`mesh-agent iptables install`) carry their original destination in the conntrack entry,
//! read with `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (`IP6T_SO_ORIGINAL_DST` on `SOL_IPV6`).
//!
//! What users of Istio and Linkerd expect, and what this does:
//! - a connection whose original destination is the listener itself was addressed to the sidecar
//!   explicitly (`HTTP_PROXY`, `Host: orders`): nothing changes;
//! - a redirected connection that speaks HTTP is routed by its `Host`/`:authority` like any
//!   other when that names a mesh service (mTLS, balancing, retries), and otherwise goes as is to
//!   the original destination (Istio's `PassthroughCluster`): the app reaches non-mesh hosts
//!   without proxy settings or exclusions;
//! - a redirected connection that does not start like HTTP (TLS, databases, anything opaque) is
//!   copied byte for byte to the original destination. Only the first bytes are inspected, and
//!   a client that sends nothing for [`DETECT_TIMEOUT`] (a server-speaks-first protocol such as
//!   MySQL or SMTP) is passed through then; exclude such ports from interception to avoid even
//!   that delay (`--exclude-outbound-ports`).
//!
//! The sidecar's own upstream connections are exempt from the redirect by UID, so passing a
//! connection through never loops back into the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

/// How long a redirected connection may stay silent before it is treated as opaque TCP.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// The `service` label of requests passed through to a destination outside the mesh.
pub const PASSTHROUGH: &str = "passthrough";

/// Request extension: the destination the app dialed before iptables redirected the
/// connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst(pub SocketAddr);

/// What the first bytes of a redirected connection look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1 request line or the HTTP/2 preface.
    Http,
    /// Anything else, or nothing within [`DETECT_TIMEOUT`].
    Opaque,
}

/// Starts of everything the outbound HTTP server accepts.
const HTTP_STARTS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
    b"PRI * HTTP/2.0",
];

/// The original destination of a redirected connection; `None` when the connection was not
/// redirected (it was addressed to the listener) or the kernel has no NAT record of it.
pub fn redirected(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    // ENOENT (no conntrack entry) or ENOPROTOOPT (no netfilter): not redirected.
    let orig = orig.ok()?.as_socket()?;
    (orig != local).then_some(orig)
}

/// Classify a byte prefix: `None` while it could still become either.
pub fn classify(prefix: &[u8]) -> Option<Protocol> {
    if prefix.is_empty() {
        return None;
    }
    let mut undecided = false;
    for start in HTTP_STARTS {
        let n = prefix.len().min(start.len());
        if prefix[..n] == start[..n] {
            if n == start.len() {
                return Some(Protocol::Http);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(Protocol::Opaque)
    }
}

/// Peek at the first bytes (without consuming them) until the protocol is clear, the client
/// stops sending, or [`DETECT_TIMEOUT`] passes.
pub async fn detect(tcp: &TcpStream) -> Protocol {
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    let mut seen = 0;
    loop {
        let peeked = tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) => n,
            // Closed or failed: the pass-through reports it to neither side's harm.
            Ok(Err(_)) | Err(_) => return Protocol::Opaque,
        };
        if n == 0 {
            return Protocol::Opaque;
        }
        if let Some(p) = classify(&buf[..n]) {
            return p;
        }
        if n == seen {
            // A partial method name and nothing more yet: wait a little for the rest instead
            // of spinning on a readable socket whose data we do not consume.
            if tokio::time::Instant::now() >= deadline {
                return Protocol::Opaque;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        seen = n;
    }
}

/// Copy bytes both ways between the app and its original destination until both sides close.
pub async fn tcp_passthrough(mut app: TcpStream, dst: SocketAddr, connect_timeout: Duration) {
    let upstream = tokio::time::timeout(connect_timeout, TcpStream::connect(dst)).await;
    let mut upstream = match upstream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%dst, error = %e, "pass-through connect failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%dst, "pass-through connect timed out");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    match tokio::io::copy_bidirectional(&mut app, &mut upstream).await {
        Ok((sent, received)) => {
            tracing::debug!(%dst, sent, received, "pass-through connection closed")
        }
        Err(e) => tracing::debug!(%dst, error = %e, "pass-through connection failed"),
    }
}

/// The label requests passed through are counted under (one allocation per process).
pub fn passthrough_label() -> Arc<String> {
    static LABEL: std::sync::LazyLock<Arc<String>> =
        std::sync::LazyLock::new(|| Arc::new(PASSTHROUGH.to_string()));
    LABEL.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_http_starts_and_opaque_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(Protocol::Http));
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http));
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Protocol::Opaque));
        assert_eq!(classify(b"GETX"), Some(Protocol::Opaque));
        assert_eq!(classify(b"hello"), Some(Protocol::Opaque));
        // Could still be a request line: wait for more.
        assert_eq!(classify(b"PO"), None);
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b""), None);
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_detect_timeout() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(detect(&server).await, Protocol::Opaque);
        assert!(start.elapsed() >= DETECT_TIMEOUT);
        // A connection straight to the listener is not a redirected one.
        assert_eq!(redirected(&server), None);
    }

    #[tokio::test]
    async fn a_request_split_inside_the_method_is_still_http() {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        client.write_all(b"PO").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.write_all(b"ST / HTTP/1.1\r\n").await.unwrap();
            client
        });
        assert_eq!(detect(&server).await, Protocol::Http);
        let _ = writer.await;
    }
}
