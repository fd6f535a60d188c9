//! One slow reader must not stall anyone else. Every request to a peer shares one HTTP/2
//! connection, so a client that asks for a large response and never reads it holds flow-control
//! credit on that connection: with hyper's defaults (2 MB per stream, 5 MB per connection)
//! three of them stalled every other request to the service. Here 50 such readers each hold an
//! unread 10 MB response while small requests go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_proxy::listeners::server::H2_STREAM_WINDOW;
use trellis_tests::{client, rss_bytes, Instances};

const READERS: usize = 50;
const REQUESTS: usize = 200;

/// `REQUESTS` small requests, 4 at a time (5 s timeout each, stopping after 8 failures):
/// the failures and each latency.
/// With `post`, each carries a small body (flow-controlled, unlike a GET's headers).
async fn small_requests(c: &client::HttpClient, post: bool) -> (usize, Vec<Duration>) {
    let mut failed = 0;
    let mut latencies = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS / 4 {
        let batch: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    let started = Instant::now();
                    let req = if post {
                        // /upload reads the whole body before answering (/echo answers
                        // without reading it, racing the body's last write).
                        http::Request::post("http://echo/upload").body(client::full("x"))
                    } else {
                        http::Request::get("http://echo/echo").body(client::empty())
                    };
                    let Ok(req) = req else {
                        return (false, started.elapsed());
                    };
                    let r =
                        tokio::time::timeout(Duration::from_secs(5), client::send(&c, req)).await;
                    let ok = matches!(r, Ok(Ok(ref r)) if r.status == 200);
                    (ok, started.elapsed())
                })
            })
            .collect();
        for b in batch {
            let (ok, took) = b.await.expect("request task");
            failed += usize::from(!ok);
            latencies.push(took);
        }
        if failed >= 8 {
            // Stalled: no need to wait out every timeout.
            break;
        }
    }
    (failed, latencies)
}

/// Small requests one after another until `settled` says so (checked after each) or `limit`
/// has passed, instead of sleeping through the wait: a process left idle for seconds answers
/// its first requests slowly (on the 2-core CI machine, 3-4 ms more per idle second even
/// straight to the backend, with no proxy in the way), and that warm-up is not the stall
/// these tests measure. A real stall shows here as well: these requests would wait on it too.
/// Whether `settled` said so.
async fn keep_busy(
    c: &client::HttpClient,
    post: bool,
    limit: Duration,
    mut settled: impl FnMut() -> bool,
) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        let req = if post {
            http::Request::post("http://echo/upload").body(client::full("x"))
        } else {
            http::Request::get("http://echo/echo").body(client::empty())
        };
        let Ok(req) = req else { return false };
        let _ = tokio::time::timeout(Duration::from_secs(1), client::send(c, req)).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        if settled() {
            return true;
        }
    }
    false
}

fn p99(mut l: Vec<Duration>) -> Duration {
    l.sort();
    l[(l.len() * 99 / 100).min(l.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_stalled_readers_do_not_slow_down_other_requests() {
    let t = Instances::start(1).await;
    t.client.route(&[("echo", &[t.servers[0].inbound()])]).await;
    let outbound = t.client.outbound();
    let c = client::h1(outbound);
    // Warm up the pooled connection, then the baseline.
    let _ = small_requests(&c, false).await;
    let (failed, base) = small_requests(&c, false).await;
    assert_eq!(failed, 0);
    let baseline = p99(base);
    let rss_before = rss_bytes();

    // Readers that take the response head and then stop reading, holding their sockets.
    let mut readers = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let mut s = TcpStream::connect(outbound).await.expect("connect");
        s.write_all(b"GET /download/10000000 HTTP/1.1\r\nHost: echo\r\n\r\n")
            .await
            .expect("request");
        let mut head = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut head))
            .await
            .expect("response starts")
            .expect("read");
        assert!(
            head[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head[..n])
        );
        readers.push(s);
    }
    // Let every stalled stream fill its window and the sockets' buffers.
    keep_busy(&c, false, Duration::from_secs(1), || false).await;

    let (failed, during) = small_requests(&c, false).await;
    let stalled = p99(during);
    let growth = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "p99 {baseline:?} alone, {stalled:?} beside {READERS} stalled 10 MB responses; RSS +{} MiB",
        growth / (1 << 20)
    );
    assert_eq!(
        failed, 0,
        "no small request failed beside the stalled readers"
    );
    // 2x the baseline, with a floor for scheduling noise on a loaded 2-core machine.
    assert!(
        stalled <= (baseline * 2).max(baseline + Duration::from_millis(25)),
        "p99 {stalled:?} vs {baseline:?} alone"
    );
    // Each stalled stream holds at most its window at the receiving sidecar (and about as
    // much in flight at the sending one).
    let bound = 2 * READERS as u64 * u64::from(H2_STREAM_WINDOW) + (16 << 20);
    assert!(growth <= bound, "RSS grew {growth} bytes, bound {bound}");
    drop(readers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_stalled_uploads_do_not_slow_down_other_requests() {
    let t = Instances::start(1).await;
    t.client.route(&[("echo", &[t.servers[0].inbound()])]).await;
    let outbound = t.client.outbound();
    let c = client::h1(outbound);
    let _ = small_requests(&c, true).await;
    let (failed, base) = small_requests(&c, true).await;
    assert_eq!(failed, 0);
    let baseline = p99(base);

    // Uploads of 10 MB to an app that does not read them (it answers after 10 s): each
    // stalls once the buffers on its way are full, holding its stream's window.
    let written = Arc::new(AtomicUsize::new(0));
    let uploaders: Vec<_> = (0..READERS)
        .map(|_| {
            let written = written.clone();
            tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(outbound).await else {
                    return;
                };
                let head =
                    b"POST /slow/10000 HTTP/1.1\r\nHost: echo\r\nContent-Length: 10000000\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    return;
                }
                let chunk = vec![b'u'; 64 * 1024];
                let mut sent = 0;
                while sent < 10_000_000 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len();
                    written.fetch_add(chunk.len(), Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Until every upload has filled the buffers on its way and stalls, that is until no
    // upload has written for 500 ms (at most 6 s: the app answers at 10 s): the copying
    // before that is CPU work, not the stall this test is about.
    let mut last = (0, Instant::now());
    let stalled = keep_busy(&c, true, Duration::from_secs(6), || {
        let now = written.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        last.1.elapsed() >= Duration::from_millis(500)
    })
    .await;
    assert!(
        written.load(Ordering::Relaxed) < READERS * 10_000_000,
        "the app reads nothing: the uploads cannot have completed"
    );

    let (failed, during) = small_requests(&c, true).await;
    let p99_stalled = p99(during);
    eprintln!(
        "p99 {baseline:?} alone, {p:?} beside {READERS} 10 MB uploads (stalled before measuring: {stalled}, {} MiB written)",
        written.load(Ordering::Relaxed) >> 20,
        p = p99_stalled
    );
    assert_eq!(
        failed, 0,
        "no small request failed beside the stalled uploads"
    );
    assert!(
        p99_stalled <= (baseline * 2).max(baseline + Duration::from_millis(25)),
        "p99 {p99_stalled:?} vs {baseline:?} alone"
    );
    for u in uploaders {
        u.abort();
    }
}
