//! Heap allocations per proxied request, per hop, over real sockets: an HTTP/1.1 keep-alive
//! client, sidecar A (outbound, plain HTTP in, HTTP/2 over mTLS out), sidecar B (inbound, mTLS
//! in, HTTP/1.1 keep-alive to the app) and a minimal app. Each sidecar runs on its own tokio
//! runtime whose threads count their allocations into their own bucket; the client and the app
//! are plain threads that do not count. This is the path `bench/run.sh` measures ("Trellis
//! 2-hop mTLS", and "Trellis 1-hop": the client straight to B's permissive inbound listener).
//!
//! Allocation counts are exact and machine-independent (unlike time), so the bounds below are
//! firm: a change that adds allocations on the request path fails here and must say why.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;
use trellis_proxy::app::{Proxy, Running};
use trellis_proxy::config::{AppProtocol, InboundMode};
use trellis_proxy::state::snapshot::Snapshot;
use trellis_proxy::testing;

#[path = "support/counting.rs"]
mod counting;

const WARMUP: usize = 300;
const REQUESTS: usize = 2_000;

/// Upper bounds on allocations per request (the measured figures are printed by the test).
///
/// With tracing on (the default: every request gets a span and carries its context on, none
/// sampled here), measured 13.1 (A), 14.2 (B) and 8.0 (1-hop) since each connection's
/// forwarding values, the mesh authority and the app's `Host` value are made once and shared
/// (15.2, 17.3 and 9.1 before; 21.1, 18.4 and 10.0 before the forwarding headers shared one
/// buffer). The 1-hop bound keeps it in single digits.
const TRACED: Bounds = Bounds {
    a: 14.0,
    b: 15.0,
    one_hop: 9.0,
};
/// With tracing off (what `bench/run.sh` measures), measured 12.1 (A), 10.1 (B) and 7.0
/// (1-hop). Tracing's share is the `traceparent` each sidecar writes (one shared value each)
/// and, on B, the span's remote parent (an `Arc` in OpenTelemetry's context) and h2 copying
/// that header's new value out of HPACK and again into its table (2). What remains is listed
/// per allocation in docs/performance.md ("Where the allocations are").
const UNTRACED: Bounds = Bounds {
    a: 12.5,
    b: 10.5,
    one_hop: 7.5,
};

struct Bounds {
    a: f64,
    b: f64,
    one_hop: f64,
}

#[test]
fn allocations_per_proxied_request_are_bounded() {
    counting::assert_active();
    check("tracing on", true, [0, 1], &TRACED);
    check("tracing off", false, [2, 3], &UNTRACED);
}

/// Measure the two paths through sidecars A and B (their runtimes counting into `buckets`)
/// with tracing on or off, and check the figures against `bounds`.
fn check(name: &str, tracing: bool, [bucket_a, bucket_b]: [usize; 2], bounds: &Bounds) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = testing::ca();
    testing::write_identity(&ca, dir.path(), "client").expect("client identity");
    testing::write_identity(&ca, dir.path(), "backend").expect("backend identity");
    let app = spawn_app();

    let rt_b = sidecar_runtime(bucket_b);
    let mut cfg_b = testing::config("backend", dir.path(), app);
    cfg_b.inbound.mode = InboundMode::Permissive;
    cfg_b.inbound.app_protocol = AppProtocol::Http1;
    cfg_b.tracing.enabled = tracing;
    let (b, _b_snapshots) = start(&rt_b, cfg_b, &[]);

    let rt_a = sidecar_runtime(bucket_a);
    let mut cfg_a = testing::config("client", dir.path(), app);
    cfg_a.tracing.enabled = tracing;
    let (a, _a_snapshots) = start(&rt_a, cfg_a, &[("backend", &[b.bound.inbound])]);

    // Two hops: client -> A outbound -> (h2, mTLS) -> B inbound -> app.
    let mut conn = Client::connect(a.bound.outbound);
    for _ in 0..WARMUP {
        conn.get();
    }
    let (a0, b0) = (counting::bucket(bucket_a), counting::bucket(bucket_b));
    for _ in 0..REQUESTS {
        conn.get();
    }
    let per_a = (counting::bucket(bucket_a) - a0) as f64 / REQUESTS as f64;
    let per_b = (counting::bucket(bucket_b) - b0) as f64 / REQUESTS as f64;

    // One hop: client -> B inbound (permissive, plain HTTP/1.1) -> app.
    let mut direct = Client::connect(b.bound.inbound);
    for _ in 0..WARMUP {
        direct.get();
    }
    let b1 = counting::bucket(bucket_b);
    for _ in 0..REQUESTS {
        direct.get();
    }
    let per_one_hop = (counting::bucket(bucket_b) - b1) as f64 / REQUESTS as f64;

    println!(
        "allocations per request, {name}: 2-hop sidecar A (outbound) {per_a:.2}, sidecar B \
         (inbound, mTLS) {per_b:.2}; 1-hop (inbound, plain) {per_one_hop:.2}"
    );
    assert!(
        per_a <= bounds.a,
        "{name}: sidecar A allocates {per_a:.2} times per request (bound {})",
        bounds.a
    );
    assert!(
        per_b <= bounds.b,
        "{name}: sidecar B allocates {per_b:.2} times per request (bound {})",
        bounds.b
    );
    assert!(
        per_one_hop <= bounds.one_hop,
        "{name}: the 1-hop inbound path allocates {per_one_hop:.2} times per request (bound {})",
        bounds.one_hop
    );
    // The counters really saw the sidecars' work: a proxied request cannot cost nothing.
    assert!(
        per_a > 0.0 && per_b > 0.0,
        "the sidecars' runtimes were not counted"
    );
    drop((a, b));
}

/// A one-worker runtime whose threads (workers and blocking pool) count into `bucket`.
fn sidecar_runtime(bucket: usize) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .on_thread_start(move || counting::count_thread_into(bucket))
        .build()
        .expect("runtime")
}

/// A started sidecar, with the sender of its snapshots (a closed channel would read as "no
/// source").
type Started = (Running, tokio::sync::watch::Sender<Option<Arc<Snapshot>>>);

/// Start a sidecar on `rt` (its tasks, not the test thread) with a snapshot of `services`.
fn start(
    rt: &Runtime,
    cfg: trellis_proxy::config::Config,
    services: &[(&str, &[SocketAddr])],
) -> Started {
    let snapshot = testing::snapshot(services, 1);
    rt.block_on(rt.spawn(async move {
        let (tx, rx) = tokio::sync::watch::channel(Some(snapshot));
        let running = Proxy::new(cfg, rx).start().await.expect("sidecar starts");
        let mut applied = running.applied.clone();
        tokio::time::timeout(Duration::from_secs(10), applied.wait_for(|v| *v >= 1))
            .await
            .expect("snapshot applied in time")
            .expect("applied channel open");
        (running, tx)
    }))
    .expect("start task")
}

/// The app: answers every HTTP/1.1 request on a connection with `200 ok`, one thread per
/// connection. Plain std I/O, so nothing here is counted.
fn spawn_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_app(stream));
        }
    });
    addr
}

fn serve_app(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut out = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let mut reader = BufReader::new(stream);
    while let Some(len) = read_head(&mut reader) {
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err()
            || out
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok",
                )
                .is_err()
        {
            return;
        }
    }
}

/// Read one message head; `Some(content-length)` or `None` at end of stream.
fn read_head(reader: &mut BufReader<TcpStream>) -> Option<usize> {
    let mut len = 0;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" && !first {
            return Some(len);
        }
        first = false;
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                len = value.trim().parse().ok()?;
            }
        }
    }
}

/// An HTTP/1.1 keep-alive client on one connection, like each of wrk's connections.
struct Client {
    out: TcpStream,
    reader: BufReader<TcpStream>,
    request: Arc<[u8]>,
}

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let out = stream.try_clone().expect("clone");
        Self {
            out,
            reader: BufReader::new(stream),
            request: Arc::from(&b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"[..]),
        }
    }

    /// One request; panics unless the answer is `200 ok`.
    fn get(&mut self) {
        self.out.write_all(&self.request).expect("send request");
        let mut status = String::new();
        self.reader.read_line(&mut status).expect("status line");
        assert!(status.starts_with("HTTP/1.1 200"), "answer: {status:?}");
        let mut len = None;
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header line");
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    len = value.trim().parse::<usize>().ok();
                }
            }
        }
        let mut body = vec![0; len.expect("content-length in the answer")];
        self.reader.read_exact(&mut body).expect("body");
        assert_eq!(body, b"ok");
    }
}
