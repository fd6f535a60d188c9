//! Open-loop traffic at a fixed rate: requests start on schedule whether or not earlier ones
//! have finished (closed-loop load would slow down when limited and hide over-admission).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{self, HttpClient};

/// Requests in flight per generator beyond which a tick's requests are skipped (and counted).
const MAX_IN_FLIGHT: usize = 200;
/// A generator stops on its own after this long.
const MAX_RUN: Duration = Duration::from_secs(120);
const TICK: Duration = Duration::from_millis(10);

#[derive(Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub limited: AtomicU64,
    pub other: AtomicU64,
    pub skipped: AtomicU64,
}

pub struct Paced {
    pub counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

// === impl Paced ===

impl Paced {
    /// Send `GET uri` through `client` at `per_second`, evenly spaced.
    pub fn start(client: HttpClient, uri: &'static str, per_second: f64) -> Self {
        let counts = Arc::new(Counts::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (counts.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let in_flight = Arc::new(AtomicUsize::new(0));
            let start = Instant::now();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut started = 0u64;
            while !s.load(Relaxed) && start.elapsed() < MAX_RUN {
                tick.tick().await;
                let due = start.elapsed().as_secs_f64() * per_second;
                while (started as f64) < due {
                    started += 1;
                    if in_flight.load(Relaxed) >= MAX_IN_FLIGHT {
                        c.skipped.fetch_add(1, Relaxed);
                        continue;
                    }
                    in_flight.fetch_add(1, Relaxed);
                    c.sent.fetch_add(1, Relaxed);
                    let (client, c, in_flight) = (client.clone(), c.clone(), in_flight.clone());
                    tokio::spawn(async move {
                        let req = http::Request::get(uri)
                            .body(client::empty())
                            .expect("request");
                        match client::send(&client, req).await {
                            Ok(r) if r.status == 200 => c.ok.fetch_add(1, Relaxed),
                            Ok(r) if r.status == 429 => c.limited.fetch_add(1, Relaxed),
                            _ => c.other.fetch_add(1, Relaxed),
                        };
                        in_flight.fetch_sub(1, Relaxed);
                    });
                }
            }
        });
        Self { counts, stop, task }
    }

    pub async fn stop(self) {
        self.stop.store(true, Relaxed);
        let _ = self.task.await;
    }
}
