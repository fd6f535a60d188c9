//! The HTTP layer every listener builds on: bodies (the upstream's, streamed with an idle
//! timeout and the guards a request holds; the client's, watched for faults), upgrades,
//! header handling and the mesh's header names, gRPC specifics, how a request is rewritten as
//! it leaves the sidecar, and how a failed client call becomes a
//! [`crate::error::ProxyError`].
//!
//! It sits below the listeners (outbound, inbound, ingress) and knows none of them, so that
//! each can use it without importing another.

pub mod body;
pub mod client_body;
pub mod client_error;
pub mod grpc;
pub mod h1_pool;
pub mod headers;
pub mod mesh_h2;
pub mod origin;
pub mod read_ahead;
pub mod replay;
pub mod rewrite;
pub mod upgrade;
