//! API composition at the edge, as HTTPRoute rule fields: `aggregate` (one public call that
//! fans out to several services and merges their JSON answers) and `transform` (JSON body
//! transforms with jq, compiled by jaq).
//!
//! Validated here so that a policy that validates compiles in the data plane: the jq
//! expressions are compiled by [`compile_jq`], the same function the proxy uses, and the
//! aggregate's path templates are parsed by [`Template::parse`].

mod aggregate;
mod fields;
mod jq;
mod template;
mod transform;

pub use aggregate::{AggregateCall, AggregateSpec, MergeMode, MAX_CALLS};
pub use fields::FieldOps;
pub use jq::{compile_jq, JqError, JqFilter, MAX_JQ_LEN};
pub use template::{Part, Template};
pub use transform::{BodyProgram, BodyTransform, TransformSpec, MAX_TRANSFORM_BODY};
