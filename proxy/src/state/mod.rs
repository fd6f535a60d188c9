//! The data plane's view of the mesh, built off the request path: snapshots of the mesh
//! state, each service's target (its endpoints, balancer, live stats), on-demand discovery,
//! active health checks, and the pooled connections to peer sidecars.

pub mod balance;
pub mod discover;
pub mod health;
pub mod pool;
pub mod snapshot;
pub mod target;
