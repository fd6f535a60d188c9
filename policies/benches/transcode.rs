//! gRPC-JSON transcoding's own work per request, which a plain gRPC call through the ingress
//! does not do (its bytes pass as they are): the JSON request mapped to the method's message
//! (parse, path variables and query parameters, the proto3 JSON mapping, protobuf encoding)
//! and the answer's message mapped back to JSON. The test service of `tests/proto/`, an `Item`
//! of about 1 kB (text, 20 tags, a timestamp, a duration, a wrapper, an enum, bytes); and a
//! client stream's array of ten of them, split and mapped element by element.
//!
//! `cargo bench -p trellis-policies --bench transcode`; instructions per request, repeatable
//! on a loaded machine: the bench binary under `valgrind --tool=callgrind` with
//! `TRANSCODE_CPU_ONLY=1 TRANSCODE_PHASE=POST TRANSCODE_RUNS=1000` (and `=0`), the difference
//! divided by 1000.

use base64::Engine as _;
use criterion::{criterion_group, Criterion};
use trellis_policies::compose::{ArraySplitter, GrpcTranscode, Transcoder};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::per_run;

const DESCRIPTOR_SET: &[u8] = include_bytes!("../../tests/proto/transcode.pb");

fn transcoder() -> Transcoder {
    let set = base64::engine::general_purpose::STANDARD.encode(DESCRIPTOR_SET);
    let spec: GrpcTranscode =
        serde_norway::from_str(&format!("{{descriptor_set: {set}, service: test.Echo}}"))
            .expect("spec");
    spec.compile().expect("compiles")
}

/// An `Item` of about 1 kB as JSON.
fn item() -> Vec<u8> {
    let tags: Vec<String> = (0..20).map(|i| format!("tag-number-{i:03}")).collect();
    let v = serde_json::json!({
        "title": "The Analytical Engine: notes by the translator, with an appendix of tables ".repeat(4),
        "created": "2026-12-03T10:00:00.250Z", "ttl": "3600s", "count": 12, "kind": "BOOK",
        "data": base64::engine::general_purpose::STANDARD.encode([7u8; 96]),
        "tags": tags, "meta": {"author": "Ada Lovelace", "pages": 320},
        "draft": false, "big": "9007199254740993", "price": 29.5,
    });
    let b = serde_json::to_vec(&v).expect("JSON");
    assert!((900..1300).contains(&b.len()), "{} bytes", b.len());
    b
}

/// The three mappings of one transcoded request, each returning what it made.
struct Work {
    t: Transcoder,
    body: Vec<u8>,
    message: Vec<u8>,
}

impl Work {
    fn new() -> Self {
        let t = transcoder();
        let body = item();
        let message = Self::post(&t, &body);
        Self { t, body, message }
    }

    fn post(t: &Transcoder, body: &[u8]) -> Vec<u8> {
        let (b, vars) = t.find("POST", "/test.Echo/Plain").expect("binding");
        b.request(body, vars.expect("vars"), None, false)
            .expect("maps")
    }

    fn get(&self) -> Vec<u8> {
        let (b, vars) = self
            .t
            .find("GET", "/v1/shelves/3/items/42")
            .expect("binding");
        let query = Some("title=hello&tags=a&tags=b&draft=true");
        b.request(b"", vars.expect("vars"), query, false)
            .expect("maps")
    }

    /// A client stream's body, ten of the 1 kB items as one JSON array: split into its
    /// elements and each mapped to a message, as the gateway does while it streams.
    fn stream(&self, array: &[u8]) -> Vec<u8> {
        let (b, vars) = self
            .t
            .find("POST", "/v1/shelves/3/items:collect")
            .expect("binding");
        let vars = vars.expect("vars");
        let mut out = Vec::new();
        let mut s = ArraySplitter::default();
        s.feed(array, |i, e| {
            out.extend(b.stream_message(i, e, &vars, None, false)?);
            Ok(())
        })
        .expect("maps");
        s.finish().expect("closed");
        out
    }

    fn array(&self) -> Vec<u8> {
        let mut a = b"[".to_vec();
        for i in 0..10 {
            if i > 0 {
                a.push(b',');
            }
            a.extend_from_slice(&self.body);
        }
        a.push(b']');
        a
    }

    fn answer(&self) -> Vec<u8> {
        let (b, _) = self.t.find("POST", "/test.Echo/Plain").expect("binding");
        b.response(&self.message).expect("maps")
    }
}

fn transcoding(c: &mut Criterion) {
    let w = Work::new();
    c.bench_function("POST 1 kB JSON body -> message", |b| {
        b.iter(|| Work::post(&w.t, &w.body))
    });
    c.bench_function("GET path + query -> message", |b| b.iter(|| w.get()));
    c.bench_function("1 kB message -> JSON answer", |b| b.iter(|| w.answer()));
    let array = w.array();
    c.bench_function("STREAM 10 x 1 kB array -> 10 messages", |b| {
        b.iter(|| w.stream(&array))
    });
}

/// CPU time per mapping (a loaded machine inflates it far less than criterion's wall time).
fn cpu_per_request() {
    let w = Work::new();
    // `TRANSCODE_RUNS` and `TRANSCODE_PHASE` (a name's first word: POST, GET or 1): for
    // instruction counts under callgrind, one phase at a time.
    let n = std::env::var("TRANSCODE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000u32);
    let phase = std::env::var("TRANSCODE_PHASE").unwrap_or_default();
    let array = w.array();
    let runs: [(&str, &dyn Fn() -> Vec<u8>); 4] = [
        ("POST 1 kB JSON body -> message", &|| {
            Work::post(&w.t, &w.body)
        }),
        ("GET path + query -> message", &|| w.get()),
        ("1 kB message -> JSON answer", &|| w.answer()),
        ("STREAM 10 x 1 kB array -> 10 messages", &|| {
            w.stream(&array)
        }),
    ];
    for (name, f) in runs {
        if !name.starts_with(phase.as_str()) {
            continue;
        }
        per_run(name, "request", n, f);
    }
}

criterion_group!(benches, transcoding);

fn main() {
    if std::env::var_os("TRANSCODE_CPU_ONLY").is_none() {
        benches();
    }
    cpu_per_request();
    Criterion::default().configure_from_args().final_summary();
}
