//! One request's life in any listener (outbound, inbound, ingress): admitted (who is asking,
//! may they, within which limits), then observed from start to finish (span, access log,
//! metrics, and an error turned into a response that names its cause).
//!
//! Written once, so that the listeners differ only in what they do in between, and a request
//! is counted, traced and logged the same way whichever door it came in by.

pub mod admission;
mod observe;

pub use admission::Admission;
pub use observe::{end_with_body, Finished, Labels, Lifecycle, Observed};
