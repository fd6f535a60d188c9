//! 100 MB bodies stream through both sidecars without being buffered.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use trellis_tests::client::{self, BoxError};
use trellis_tests::{rss_bytes, Mesh};

const TOTAL: u64 = 100 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
/// Growth allowed for the whole test process (client, backend and both sidecars): flow-control
/// windows bound what can be in flight; buffering the body would add ~100 MB.
const MAX_RSS_GROWTH: u64 = 16 * 1024 * 1024;

/// Sample this process's RSS every 20 ms until stopped; returns the peak.
fn sample_peak_rss() -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = tokio::spawn(async move {
        let peak = AtomicU64::new(rss_bytes());
        while !s.load(Ordering::Relaxed) {
            peak.fetch_max(rss_bytes(), Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak.load(Ordering::Relaxed)
    });
    (stop, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_upload_and_download_stream_with_bounded_memory() {
    let mesh = Mesh::start().await;
    let c = client::h1(mesh.client.outbound());
    // Warm up connections and allocator pools so the baseline includes them.
    let warm = Request::post("http://echo/upload")
        .body(client::full(vec![0u8; 4 * CHUNK]))
        .unwrap();
    assert_eq!(
        client::send(&c, warm).await.unwrap().body,
        (4 * CHUNK).to_string()
    );
    let baseline = rss_bytes();

    let (stop, peak) = sample_peak_rss();
    let chunk = Bytes::from(vec![b'u'; CHUNK]);
    let chunks = (TOTAL / CHUNK as u64) as usize;
    let stream = futures_util::stream::iter(
        (0..chunks).map(move |_| Ok::<_, BoxError>(Frame::data(chunk.clone()))),
    );
    let req = Request::post("http://echo/upload")
        .header("content-length", TOTAL.to_string())
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(120), client::send(&c, req))
        .await
        .expect("upload in time")
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, TOTAL.to_string(), "every byte arrived");

    let resp = c
        .request(
            Request::get(format!("http://echo/download/{TOTAL}"))
                .body(client::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, TOTAL);

    stop.store(true, Ordering::Relaxed);
    let peak = peak.await.unwrap();
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} MB, peak {} MB, growth {} KB",
        baseline >> 20,
        peak >> 20,
        growth >> 10
    );
    assert!(
        growth < MAX_RSS_GROWTH,
        "RSS grew by {} MB while streaming 2 x 100 MB",
        growth >> 20
    );
}
