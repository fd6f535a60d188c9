//! API composition at the edge, as HTTPRoute rule fields: `aggregate` (one public call that
//! fans out to several services and merges their JSON answers), `transform` (JSON body
//! transforms with jq, compiled by jaq) and `grpc_transcode` (a gRPC service as REST/JSON,
//! from its descriptor set).
//!
//! Validated here so that a policy that validates compiles in the data plane: the jq
//! expressions are compiled by [`compile_jq`], the same function the proxy uses, and the
//! aggregate's path templates are parsed by [`Template::parse`].

mod aggregate;
mod fields;
mod jq;
mod jq_bound;
mod jq_native;
mod template;
mod transcode;
mod transform;

pub use aggregate::{
    AggregateCall, AggregateSpec, BodySource, CallBody, CallMethod, MergeMode, MAX_CALLS,
};
pub use fields::FieldOps;
pub use jq::{compile_jq, read_json, JqError, JqFilter, MAX_JQ_LEN};
pub use jq_bound::{
    default_steps as default_jq_steps, Limits as JqLimits, Stop as JqStop,
    MAX_STEPS as MAX_JQ_STEPS,
};
pub use template::{Part, Template};
pub use transcode::{
    ArraySplitter, Binding, BodyRule, GrpcTranscode, PathTemplate, StreamFormat, TranscodeError,
    Transcoder, MAX_DESCRIPTOR_SET, MAX_TRANSCODE_BYTES,
};
pub use transform::{BodyProgram, BodyTransform, TransformSpec, MAX_TRANSFORM_BODY};
