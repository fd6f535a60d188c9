//! gRPC-JSON transcoding (`policies/src/compose/transcode/`): a stranger's JSON request
//! matched against the binding table (path templates, verbs, percent-decoding) and mapped to
//! the method's message (body, path variables, query parameters, the proto3 JSON mapping),
//! on the test service of `tests/proto/transcode.proto`.
//!
//! Input: `METHOD PATH[?QUERY]\nBODY`.

use std::sync::OnceLock;

use base64::Engine as _;
use trellis_policies::compose::{GrpcTranscode, Transcoder};

use crate::outcome;

const DESCRIPTOR_SET: &[u8] = include_bytes!("../../../tests/proto/transcode.pb");

pub const DICT: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PATCH ",
    b"/v1/shelves/",
    b"/items/",
    b"/v1/items/",
    b":stream",
    b"/meta",
    b"/v1/missing/",
    b"/test.Echo/Plain",
    b"?title=",
    b"&tags=",
    b"meta.pages=",
    b"draft=true",
    b"%2F",
    b"%ff",
    b"{\"created\": \"2026-12-03T10:00:00Z\"}",
    b"{\"ttl\": \"1.5s\"}",
    b"{\"id\": \"-9\"}",
    b"{\"kind\": \"BOOK\"}",
    b"{\"data\": \"aGk=\"}",
    b"{\"count\": null}",
    b"{\"meta\": {\"pages\": 1}}",
    b"\\u0000",
];

fn table() -> &'static Transcoder {
    static TABLE: OnceLock<Transcoder> = OnceLock::new();
    TABLE.get_or_init(|| {
        let spec = GrpcTranscode {
            descriptor_set: base64::engine::general_purpose::STANDARD.encode(DESCRIPTOR_SET),
            service: "test.Echo".into(),
            stream: Default::default(),
            max_body_bytes: 1 << 20,
            max_message_bytes: 1 << 20,
            ignore_unknown_query_parameters: false,
        };
        spec.compile()
            .unwrap_or_else(|e| panic!("the test descriptor set: {e}"))
    })
}

pub fn run(data: &[u8]) -> u64 {
    let (head, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, target) = head.split_once(' ').unwrap_or(("GET", &head));
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let t = table();
    let Some((binding, vars)) = t.find(method, path) else {
        return outcome("no binding");
    };
    let vars = match vars {
        Ok(v) => v,
        Err(e) => return outcome(&e),
    };
    assert_eq!(
        vars.len(),
        binding.template.vars.len(),
        "one value per variable"
    );
    match binding.request(body, vars, query, false) {
        Ok(message) => {
            // What the gateway encodes is a message of the method's input type: it reads back
            // (the test service's input and output types are the same).
            let json = binding
                .response(&message)
                .unwrap_or_else(|e| panic!("an encoded request does not decode: {e}"));
            assert!(
                serde_json::from_slice::<serde_json::Value>(&json).is_ok(),
                "the answer is not JSON"
            );
            outcome(&format!("mapped {}", binding.grpc_path))
        }
        Err(e) => outcome(&e.to_string()),
    }
}
