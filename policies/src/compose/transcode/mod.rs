//! `grpc_transcode`: a gRPC service exposed as REST/JSON at an ingress, as Envoy's
//! `grpc_json_transcoder` does, from the service's descriptor set and its `google.api.http`
//! annotations.
//!
//! The descriptor set (`protoc --include_imports --descriptor_set_out`) is held in the policy,
//! base64-encoded, at most [`MAX_DESCRIPTOR_SET`] bytes. [`GrpcTranscode::compile`] decodes it
//! (prost-reflect: messages are dynamic, no code is generated per service), reads each method's
//! HTTP bindings and checks every path variable and body field against the method's input
//! message; validation and the data plane call the same function, so a policy that validates
//! compiles. The result, a [`Transcoder`], is a table from path templates to methods, built
//! once per policy; a request is matched against it and mapped by [`Binding`].

mod json;
mod rules;
mod stream;
mod template;

use std::sync::Arc;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

pub use json::TranscodeError;
pub use rules::{Binding, BodyRule};
pub use stream::ArraySplitter;
pub use template::PathTemplate;

/// Largest descriptor set (decoded), in bytes.
pub const MAX_DESCRIPTOR_SET: usize = 1024 * 1024;
/// Default and largest request body, and response message.
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
const DEFAULT_MAX_MESSAGE: u64 = 4 * 1024 * 1024;
pub const MAX_TRANSCODE_BYTES: u64 = 16 * 1024 * 1024;

/// Expose the gRPC `service` of a rule's backends as REST/JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcTranscode {
    /// A `FileDescriptorSet` with its imports, base64 (standard alphabet, padded).
    pub descriptor_set: String,
    /// The full name of the service: `package.Service`.
    pub service: String,
    /// How a server-streaming method's messages are sent: `array` (one JSON array, the
    /// default) or `ndjson` (one JSON document per line).
    #[serde(default)]
    pub stream: StreamFormat,
    /// The largest JSON request body, in bytes (default 1 MiB): larger answers 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// The largest gRPC message of the answer, in bytes (default 4 MiB): larger answers 502.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: u64,
    /// Query parameters that name no field of the input message are ignored instead of
    /// refused (400).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_unknown_query_parameters: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamFormat {
    #[default]
    Array,
    Ndjson,
}

fn default_max_body() -> u64 {
    DEFAULT_MAX_BODY
}

fn default_max_message() -> u64 {
    DEFAULT_MAX_MESSAGE
}

/// A request path's variable values, or why one does not decode.
pub type PathVars = Result<Vec<String>, String>;

/// A compiled `grpc_transcode`: the HTTP bindings of the service's methods, the most specific
/// template first.
#[derive(Debug)]
pub struct Transcoder {
    bindings: Vec<Arc<Binding>>,
    pub stream: StreamFormat,
    pub max_body: u64,
    pub max_message: u64,
    pub ignore_unknown_query: bool,
}

// === impl GrpcTranscode ===

impl GrpcTranscode {
    pub fn validate(&self) -> Result<(), String> {
        self.compile().map(|_| ())
    }

    /// Decode the descriptor set and build the binding table; the error names the field.
    pub fn compile(&self) -> Result<Transcoder, String> {
        for (field, v) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_message_bytes", self.max_message_bytes),
        ] {
            if v == 0 || v > MAX_TRANSCODE_BYTES {
                return Err(format!("{field}: between 1 and {MAX_TRANSCODE_BYTES}"));
            }
        }
        let bytes = self.descriptor_bytes()?;
        let pool = prost_reflect::DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
            format!("descriptor_set: not a FileDescriptorSet with its imports: {e}")
        })?;
        let Some(service) = pool.get_service_by_name(&self.service) else {
            let known: Vec<String> = pool.services().map(|s| s.full_name().into()).collect();
            return Err(format!(
                "service: `{}` is not in the descriptor set (it has: {})",
                self.service,
                if known.is_empty() {
                    "no service".into()
                } else {
                    known.join(", ")
                }
            ));
        };
        let mut bindings = rules::bindings(&pool, &service)?;
        // Stable: equally specific templates keep the order of the methods.
        bindings.sort_by_key(|b| std::cmp::Reverse(b.template.specificity()));
        Ok(Transcoder {
            bindings: bindings.into_iter().map(Arc::new).collect(),
            stream: self.stream,
            max_body: self.max_body_bytes,
            max_message: self.max_message_bytes,
            ignore_unknown_query: self.ignore_unknown_query_parameters,
        })
    }

    /// The descriptor set's bytes, bounded before it is decoded.
    fn descriptor_bytes(&self) -> Result<Vec<u8>, String> {
        let text = self.descriptor_set.trim();
        if text.len() / 4 * 3 > MAX_DESCRIPTOR_SET + 2 {
            return Err(format!(
                "descriptor_set: larger than {MAX_DESCRIPTOR_SET} bytes (1 MiB) once decoded"
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("descriptor_set: not base64: {e}"))?;
        if bytes.len() > MAX_DESCRIPTOR_SET {
            return Err(format!(
                "descriptor_set: larger than {MAX_DESCRIPTOR_SET} bytes (1 MiB) once decoded"
            ));
        }
        Ok(bytes)
    }
}

// === impl Transcoder ===

impl Transcoder {
    /// The binding a request fits, with its path variables' values (`Err`: a value that does
    /// not decode to UTF-8).
    pub fn find(&self, method: &str, path: &str) -> Option<(&Arc<Binding>, PathVars)> {
        self.bindings.iter().find_map(|b| {
            if b.http_method != method {
                return None;
            }
            b.template.matches(path).map(|vars| (b, vars))
        })
    }

    /// The table, `METHOD template -> /package.Service/Method` (for `/config_dump` and tests).
    pub fn routes(&self) -> Vec<String> {
        self.bindings
            .iter()
            .map(|b| format!("{} {} -> {}", b.http_method, b.text, b.grpc_path))
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The descriptor set of `tests/proto/transcode.proto` (generated by protoc; how is
    /// written in the `.proto`).
    pub const DESCRIPTOR_SET: &[u8] = include_bytes!("../../../../tests/proto/transcode.pb");

    pub fn spec() -> GrpcTranscode {
        GrpcTranscode {
            descriptor_set: base64::engine::general_purpose::STANDARD.encode(DESCRIPTOR_SET),
            service: "test.Echo".into(),
            stream: StreamFormat::Array,
            max_body_bytes: DEFAULT_MAX_BODY,
            max_message_bytes: DEFAULT_MAX_MESSAGE,
            ignore_unknown_query_parameters: false,
        }
    }

    #[test]
    fn the_table_maps_every_binding_most_specific_first() {
        let t = spec().compile().unwrap();
        assert_eq!(
            t.routes(),
            [
                "POST /v1/{name=shelves/*}/items:collect -> /test.Echo/Collect",
                "GET /v1/{name=shelves/*}/items/{id} -> /test.Echo/Say",
                "POST /v1/{name=shelves/*}/items -> /test.Echo/Create",
                "PATCH /v1/items/{id}/meta -> /test.Echo/Annotate",
                "GET /v1/items/{id}:stream -> /test.Echo/Repeat",
                "GET /v1/items/{id} -> /test.Echo/Say",
                "GET /v1/missing/{id} -> /test.Echo/Fail",
                "POST /test.Echo/Plain -> /test.Echo/Plain",
                "POST /test.Echo/Chat -> /test.Echo/Chat",
            ]
        );
        let (b, vars) = t.find("GET", "/v1/items/7:stream").unwrap();
        assert_eq!(b.grpc_path, "/test.Echo/Repeat");
        assert!(b.server_streaming && !b.client_streaming);
        assert_eq!(vars.unwrap(), ["7"]);
        let (b, _) = t.find("POST", "/v1/shelves/1/items:collect").unwrap();
        assert!(b.client_streaming && !b.server_streaming);
        let (b, _) = t.find("POST", "/test.Echo/Chat").unwrap();
        assert!(b.client_streaming && b.server_streaming);
        assert!(t.find("POST", "/v1/items/7").is_none());
        assert!(t.find("GET", "/v2/items/7").is_none());
    }

    #[test]
    fn bad_descriptor_sets_are_refused_with_the_reason() {
        let mut s = spec();
        s.service = "test.Nope".into();
        let e = s.validate().unwrap_err();
        assert!(
            e.contains("`test.Nope` is not in the descriptor set (it has: test.Echo)"),
            "{e}"
        );
        let mut s = spec();
        s.descriptor_set = "!!!".into();
        assert!(s.validate().unwrap_err().contains("not base64"));
        let mut s = spec();
        s.descriptor_set = base64::engine::general_purpose::STANDARD.encode(b"\x0a\x05hello");
        let e = s.validate().unwrap_err();
        assert!(e.contains("not a FileDescriptorSet"), "{e}");
        let mut s = spec();
        s.descriptor_set = "A".repeat(MAX_DESCRIPTOR_SET * 4 / 3 + 8);
        let e = s.validate().unwrap_err();
        assert!(e.contains("larger than 1048576 bytes (1 MiB)"), "{e}");
        let mut s = spec();
        s.max_message_bytes = 0;
        assert!(s.validate().unwrap_err().contains("max_message_bytes"));
    }
}
