//! The HTTP layer every listener builds on: how a request is rewritten as it leaves the
//! sidecar, and how a failed client call becomes a [`crate::error::ProxyError`].
//!
//! It sits below the listeners (outbound, inbound, ingress) and knows none of them, so that
//! each can use it without importing another.

pub mod client_error;
pub mod origin;
pub mod rewrite;
