//! gRPC-JSON transcoding (`policies/src/compose/transcode/`): a stranger's JSON request
//! matched against the binding table (path templates, verbs, percent-decoding) and mapped to
//! the method's message (body, path variables, query parameters, the proto3 JSON mapping),
//! on the test service of `tests/proto/transcode.proto`. A client-streaming method's body
//! (`POST /v1/shelves/1/items:collect`, `POST /test.Echo/Chat`) is split into its array's
//! elements as it would stream, in two pieces cut where the input says, and checked against
//! serde_json reading the whole array.
//!
//! Input: `METHOD PATH[?QUERY]\nBODY`.

use std::sync::OnceLock;

use base64::Engine as _;
use trellis_policies::compose::{ArraySplitter, Binding, GrpcTranscode, Transcoder};

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
    b"/test.Echo/Chat",
    b"/items:collect",
    b"[{}, ",
    b"]",
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
    if binding.client_streaming {
        return stream(binding, body, &vars, query);
    }
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

/// A client stream's body: its elements, fed in two pieces, are those serde_json finds in
/// the whole array (when it reads one), and each maps to a message that reads back.
fn stream(binding: &Binding, body: &[u8], vars: &[String], query: Option<&str>) -> u64 {
    let cut = body
        .first()
        .map_or(0, |b| usize::from(*b) % (body.len() + 1));
    let mut splitter = ArraySplitter::default();
    let mut elements: Vec<Vec<u8>> = Vec::new();
    let mut mapped = 0;
    let fed = splitter
        .feed(&body[..cut], |_, e| {
            elements.push(e.to_vec());
            Ok(())
        })
        .and_then(|()| {
            splitter.feed(&body[cut..], |_, e| {
                elements.push(e.to_vec());
                Ok(())
            })
        })
        .and_then(|()| splitter.finish());
    let values: Option<Vec<serde_json::Value>> = elements
        .iter()
        .map(|e| serde_json::from_slice(e).ok())
        .collect();
    let whole = serde_json::from_slice::<Vec<serde_json::Value>>(body);
    match (&fed, values, &whole) {
        (Ok(()), Some(v), Ok(w)) => assert_eq!(&v, w, "the elements are the array's"),
        // One level deeper than its deepest element: past serde_json's limit.
        (Ok(()), Some(_), Err(e)) if e.to_string().contains("recursion limit") => {}
        (Ok(()), Some(_), Err(e)) => panic!("split into JSON values, but not a JSON array: {e}"),
        (_, _, Ok(w)) if fed.is_err() => {
            let depth_limited = body.iter().filter(|b| **b == b'[' || **b == b'{').count() > 128;
            assert!(
                depth_limited,
                "a JSON array of {} values refused: {fed:?}",
                w.len()
            );
        }
        _ => {}
    }
    for (i, e) in elements.iter().enumerate() {
        if let Ok(message) = binding.stream_message(i, e, vars, query, false) {
            binding
                .response(&message)
                .unwrap_or_else(|e| panic!("an encoded request does not decode: {e}"));
            mapped += 1;
        }
    }
    match fed {
        Ok(()) => outcome(&format!("stream of {} ({mapped} mapped)", elements.len())),
        Err(e) => outcome(&e.to_string()),
    }
}
