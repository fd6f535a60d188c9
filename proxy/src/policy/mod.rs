//! What the mesh's policies decide on the request path: who may call (authentication and
//! authorization), how often (rate and concurrency limits), where a request goes (HTTPRoute
//! routing), and how failures are handled (retries and circuit breakers).

pub mod access;
pub mod auth;
pub mod breaker;
pub mod ratelimit;
pub mod retry;
pub mod routing;
