//! Client errors (hyper's, and its pooled client's) as the sidecar's own errors.
//!
//! One mapping for every exit (mesh peers, upgrades, external services, pass-through, the
//! local app), so that a connect failure is a `connect-failed` 502 and anything after it an
//! `upstream-failed` 502 whichever way the request left.

use std::net::SocketAddr;

use crate::error::ProxyError;

/// An error and its sources, joined: hyper's top-level messages alone are often vague.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

/// A request to `addr` that failed after the connection was made.
pub fn upstream(addr: SocketAddr, e: &(dyn std::error::Error + 'static)) -> ProxyError {
    ProxyError::Upstream {
        addr,
        message: error_chain(e),
    }
}

/// A failed request of hyper's pooled client to `addr` (the local app, or a destination
/// outside the mesh): connect failures apart from everything after.
pub fn from_pooled(addr: SocketAddr, e: &hyper_util::client::legacy::Error) -> ProxyError {
    if e.is_connect() {
        ProxyError::Connect {
            addr,
            source: std::io::Error::other(error_chain(e)),
        }
    } else {
        upstream(addr, e)
    }
}

/// No response headers from `addr` within `timeout`.
pub fn response_timeout(addr: SocketAddr, timeout: std::time::Duration) -> ProxyError {
    ProxyError::ResponseTimeout { addr, timeout }
}
