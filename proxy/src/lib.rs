//! Trellis data plane: the sidecar's listeners, mTLS identity, routing and admin API.
//!
//! The data plane knows nothing about where its state comes from: it receives [`snapshot::Snapshot`]s
//! through a watch channel (from the file store today, from etcd later) and never calls out on
//! the request path.

pub mod access;
pub mod access_log;
pub mod admin;

pub mod app;
pub mod app_protocol;
pub mod atomic_file;
pub mod auth;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod client_body;
pub mod config;
pub mod discover;
pub mod drain;
pub mod error;
pub mod grpc;
pub mod headers;
pub mod health;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod ingress;
pub mod lifecycle;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod pool;
pub mod process_metrics;

pub mod ratelimit;
pub mod readiness;
pub mod retry;
pub mod route;
pub mod route_metrics;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod trace;

mod upgrade;

#[cfg(feature = "testing")]
pub mod testing;

/// The body type of every response the sidecar returns: the upstream's body, streamed, or a
/// small locally generated one.
pub type ResponseBody = http_body_util::Either<body::Streamed, http_body_util::Full<bytes::Bytes>>;

/// The body of a request sent to a peer sidecar: the app's body streamed as is, or a small body
/// buffered so that it can be replayed on a retry.
pub type RequestBody =
    http_body_util::Either<client_body::ClientBody, http_body_util::Full<bytes::Bytes>>;
