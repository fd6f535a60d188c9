//! Trellis data plane: the sidecar's listeners, mTLS identity, routing and admin API.
//!
//! The data plane knows nothing about where its state comes from: it receives [`state::snapshot::Snapshot`]s
//! through a watch channel (from the file store today, from etcd later) and never calls out on
//! the request path.

pub mod admin;
pub mod app;
pub mod atomic_file;
pub mod cache;
pub mod compose;
pub mod config;
pub mod drain;
pub mod error;
pub mod http;
pub mod identity;
pub mod listeners;
pub mod policy;
pub mod readiness;
pub mod state;
pub mod telemetry;
pub mod validate;

#[cfg(feature = "testing")]
pub mod testing;

/// The body type of every response the sidecar returns: the upstream's body, streamed, or a
/// small locally generated one.
pub type ResponseBody =
    http_body_util::Either<crate::http::body::Streamed, http_body_util::Full<bytes::Bytes>>;

/// The body of a request sent to a peer sidecar: the app's body streamed as is, or a small body
/// buffered so that it can be replayed on a retry.
pub type RequestBody = http_body_util::Either<
    crate::http::client_body::ClientBody,
    http_body_util::Full<bytes::Bytes>,
>;
