//! What the sidecar tells about itself: Prometheus metrics (requests, routes, the process),
//! the access log and distributed tracing.

pub mod access_log;
pub mod exposition;
pub mod log_file;
pub mod metrics;
pub mod process_metrics;
pub mod route_metrics;
pub mod summary;
pub mod trace;
