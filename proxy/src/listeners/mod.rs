//! The sidecar's doors: the outbound listener (the app's calls into the mesh), the inbound
//! listener (peers' calls to the app), the ingress gateway (the outside world's calls), what
//! they share (the accept loop and connection serving, one request lifecycle), and the
//! transparent interception on the outbound side.

pub mod h2_server;
pub mod inbound;
pub mod ingress;
pub mod lifecycle;
pub mod original_dst;
pub mod outbound;
pub mod protocol;
pub mod server;
