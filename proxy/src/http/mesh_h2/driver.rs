//! The task that drives one mesh HTTP/2 connection, and its keepalive pings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

/// Pings on the connection: one every `interval`, the connection closed when one is not
/// answered within `timeout`.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

/// Run `conn` in its own task until it ends (or stops answering pings); `closed` tells the
/// pool, which then dials a new connection for the next request.
pub(super) fn spawn<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    keepalive: Keepalive,
    peer: SocketAddr,
    closed: Arc<AtomicBool>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let pings = conn.ping_pong();
    tokio::spawn(async move {
        let outcome = match pings {
            Some(pings) => tokio::select! {
                done = &mut conn => done.map_err(|e| e.to_string()),
                dead = watch(pings, keepalive) => Err(dead),
            },
            None => (&mut conn).await.map_err(|e| e.to_string()),
        };
        closed.store(true, Ordering::Release);
        if let Err(error) = outcome {
            tracing::debug!(%peer, %error, "peer connection closed with error");
        }
    });
}

/// Ping until a ping goes unanswered; what went wrong.
pub(crate) async fn watch(mut pings: h2::PingPong, keepalive: Keepalive) -> String {
    loop {
        tokio::time::sleep(keepalive.interval).await;
        match tokio::time::timeout(keepalive.timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
            Err(_) => return format!("keepalive ping not answered within {:?}", keepalive.timeout),
        }
    }
}
