//! What the local app speaks, for `inbound.app_protocol: auto`.
//!
//! Between sidecars every request travels as HTTP/2, and a caller's HTTP/1.x is marked with
//! the `trellis-orig-proto` header so the far side can restore it. A caller that spoke HTTP/2
//! (an h2 client at the ingress, an app using h2c towards its sidecar) says nothing about the
//! app behind the far side, which may speak only HTTP/1.1 (most web frameworks), only h2c
//! (gRPC servers), or both. Sending h2c to an HTTP/1.1-only app fails every request, so `auto`
//! finds out instead of guessing:
//!
//! - A *prior-knowledge probe* ([`probe_h2c`]) opens a connection, sends the HTTP/2 preface
//!   and an empty SETTINGS frame, and reads the answer: an h2c server answers with its SETTINGS
//!   frame (RFC 9113 §3.4), an HTTP/1.1 server with an error status line (`PRI * HTTP/2.0` is
//!   no valid HTTP/1.1 request). No request reaches the app's handlers.
//! - An `OPTIONS *` probe ([`probe_h1`], RFC 9110 §9.3.7, a request about the server rather
//!   than a resource) tells whether an h2c-capable app also speaks HTTP/1.1. It is sent only
//!   when a caller's HTTP/1.1 request with a body is about to reach an app known to speak h2c
//!   and not yet known to speak HTTP/1.1, or to confirm a fallback (see below).
//! - Every answered request teaches the protocol it used ([`AppKnowledge::learn`]).
//!
//! A failed attempt is repeated in the other protocol only when fresh probes prove the app
//! does not speak the protocol of the failed attempt (so the app cannot have acted on it), and
//! only if the request body was never handed to the failed attempt (or is empty): see
//! [`crate::http::replay::Replay`]. A body is never sent twice.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The protocol of one attempt towards the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    H2c,
}

/// A yes/no fact about the app, or not known yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    Unknown,
    Yes,
    No,
}

const UNKNOWN: u8 = 0;
const YES: u8 = 1;
const NO: u8 = 2;

impl Known {
    fn load(a: &AtomicU8) -> Self {
        match a.load(Ordering::Acquire) {
            YES => Self::Yes,
            NO => Self::No,
            _ => Self::Unknown,
        }
    }
}

/// What the local app was seen or probed to speak. Shared by all connections of one sidecar
/// (one sidecar fronts one app); probes are single-flight so that a burst of first requests
/// opens one probe connection, not one each.
#[derive(Debug)]
pub struct AppKnowledge {
    addr: SocketAddr,
    timeout: Duration,
    h1: AtomicU8,
    h2c: AtomicU8,
    probing: tokio::sync::Mutex<()>,
}

/// What a prior-knowledge probe heard back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum H2cAnswer {
    /// A SETTINGS frame: the app speaks h2c.
    Settings,
    /// An HTTP/1.x status line: the app speaks HTTP/1.x and not h2c.
    Http1,
    /// Something else, or the connection closed: not h2c.
    Other,
}

impl AppKnowledge {
    /// `timeout` bounds each probe's connect and each probe's wait for an answer.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        Self {
            addr,
            timeout,
            h1: AtomicU8::new(UNKNOWN),
            h2c: AtomicU8::new(UNKNOWN),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn h1(&self) -> Known {
        Known::load(&self.h1)
    }

    pub fn h2c(&self) -> Known {
        Known::load(&self.h2c)
    }

    fn set(&self, proto: Proto, speaks: bool) {
        let (cell, name) = match proto {
            Proto::Http1 => (&self.h1, "HTTP/1.1"),
            Proto::H2c => (&self.h2c, "h2c"),
        };
        let new = if speaks { YES } else { NO };
        if cell.swap(new, Ordering::AcqRel) != new {
            tracing::info!(app = %self.addr, protocol = name, speaks, "learned the app's protocol");
        }
    }

    /// For `/config_dump`: what is known of the app.
    pub fn dump(&self) -> serde_json::Value {
        let word = |k: Known| match k {
            Known::Unknown => "unknown",
            Known::Yes => "yes",
            Known::No => "no",
        };
        serde_json::json!({"http1": word(self.h1()), "h2c": word(self.h2c())})
    }

    /// An attempt in `proto` got a response: the app speaks it.
    pub fn learn(&self, proto: Proto) {
        self.set(proto, true);
    }

    /// Whether the app speaks h2c, probing if nobody knows (or if `fresh`, whatever is known).
    /// `Unknown` when the probe could not tell (app down, no answer in time).
    pub async fn speaks_h2c(&self, fresh: bool) -> Known {
        if !fresh && self.h2c() != Known::Unknown {
            return self.h2c();
        }
        let _one = self.probing.lock().await;
        if !fresh && self.h2c() != Known::Unknown {
            return self.h2c();
        }
        match probe_h2c(self.addr, self.timeout).await {
            Ok(H2cAnswer::Settings) => self.set(Proto::H2c, true),
            Ok(H2cAnswer::Http1) => {
                self.set(Proto::H2c, false);
                self.set(Proto::Http1, true);
            }
            Ok(H2cAnswer::Other) => self.set(Proto::H2c, false),
            Err(e) => {
                tracing::debug!(app = %self.addr, error = %e, "h2c probe failed");
                return Known::Unknown;
            }
        }
        self.h2c()
    }

    /// Whether the app speaks HTTP/1.1, probing with `OPTIONS *` if nobody knows (or if
    /// `fresh`).
    pub async fn speaks_h1(&self, fresh: bool) -> Known {
        if !fresh && self.h1() != Known::Unknown {
            return self.h1();
        }
        let _one = self.probing.lock().await;
        if !fresh && self.h1() != Known::Unknown {
            return self.h1();
        }
        match probe_h1(self.addr, self.timeout).await {
            Ok(Some(speaks)) => self.set(Proto::Http1, speaks),
            Ok(None) => return Known::Unknown,
            Err(e) => {
                tracing::debug!(app = %self.addr, error = %e, "HTTP/1.1 probe failed");
                return Known::Unknown;
            }
        }
        self.h1()
    }

    /// The protocol for a request of a caller that spoke HTTP/2 (`caller_h2`) or HTTP/1.x,
    /// whose body can be replayed (`replayable`) if the first attempt fails.
    ///
    /// The caller's protocol is kept when the app speaks it (an app speaking both sees what
    /// its client sent, as before). An HTTP/2 caller's request goes as h2c only to an app known
    /// (or probed) to speak h2c, else as HTTP/1.1, the protocol of most apps. An HTTP/1.x
    /// caller's request goes as HTTP/1.1 unless the app is known to lack it; before a body
    /// that could not be replayed is sent to an app that speaks h2c, HTTP/1.1 is confirmed.
    pub async fn choose(&self, caller_h2: bool, replayable: bool) -> Proto {
        if let Some(p) = self.known_choice(caller_h2, replayable) {
            return p;
        }
        if caller_h2 {
            return match self.speaks_h2c(false).await {
                Known::Yes => Proto::H2c,
                Known::No | Known::Unknown => Proto::Http1,
            };
        }
        match self.h1() {
            Known::Yes => Proto::Http1,
            Known::No => Proto::H2c,
            Known::Unknown if replayable => Proto::Http1,
            Known::Unknown => {
                if self.speaks_h2c(false).await != Known::Yes {
                    return Proto::Http1;
                }
                match self.speaks_h1(false).await {
                    Known::No => Proto::H2c,
                    Known::Yes | Known::Unknown => Proto::Http1,
                }
            }
        }
    }

    /// [`AppKnowledge::choose`]'s answer when what is known decides it without a probe (every
    /// request once the app's protocol has been learned): no future to build and await.
    pub fn known_choice(&self, caller_h2: bool, replayable: bool) -> Option<Proto> {
        if caller_h2 {
            return match self.h2c() {
                Known::Yes => Some(Proto::H2c),
                Known::No => Some(Proto::Http1),
                Known::Unknown => None,
            };
        }
        match self.h1() {
            Known::Yes => Some(Proto::Http1),
            Known::No => Some(Proto::H2c),
            Known::Unknown if replayable => Some(Proto::Http1),
            Known::Unknown => None,
        }
    }

    /// After an attempt in `failed` ended without a response (not a connect error, not a
    /// timeout, not the client's fault): the protocol to repeat it in, if fresh probes prove
    /// that the app does not speak `failed` (so it cannot have acted on the request) and does
    /// speak the other one. `None` keeps the failure. `answered_otherwise`: the failed
    /// HTTP/1.1 attempt was answered with bytes that are no HTTP/1.1 (an h2c server's
    /// SETTINGS frame, sent before or instead of reading the request).
    pub async fn fallback(&self, failed: Proto, answered_otherwise: bool) -> Option<Proto> {
        match failed {
            Proto::H2c => match self.speaks_h2c(true).await {
                // No h2c, so nothing of the attempt was a request to the app. HTTP/1.1 is
                // the only protocol left; it is confirmed by the probe's status line or, if
                // the app said nothing useful, by the repeated attempt itself.
                Known::No => Some(Proto::Http1),
                Known::Yes | Known::Unknown => None,
            },
            Proto::Http1 => {
                if self.speaks_h2c(true).await != Known::Yes {
                    return None;
                }
                match self.speaks_h1(true).await {
                    Known::No => Some(Proto::H2c),
                    // The `OPTIONS *` probe heard nothing: an h2c-only server may reset the
                    // connection on a preface it cannot parse before its SETTINGS frame is
                    // read (seen under load). The attempt itself was answered in something
                    // else than HTTP/1.1 by an app that speaks h2c: that is the answer.
                    Known::Unknown if answered_otherwise => {
                        self.set(Proto::Http1, false);
                        Some(Proto::H2c)
                    }
                    Known::Yes | Known::Unknown => None,
                }
            }
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4) and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// GOAWAY, last stream 0, NO_ERROR: the polite end of a probe connection.
const H2_GOAWAY: &[u8] = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
/// Frame type of SETTINGS.
const SETTINGS: u8 = 0x4;

async fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to app {addr} timed out"),
            )
        })?
}

/// Read until `want` bytes arrived, the peer closed, or `timeout` passed; what came.
async fn read_some(tcp: &mut TcpStream, want: usize, timeout: Duration) -> Vec<u8> {
    let mut buf = vec![0u8; want];
    let mut got = 0;
    let _ = tokio::time::timeout(timeout, async {
        while got < want {
            match tcp.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    buf.truncate(got);
    buf
}

/// Classify the first bytes an app sent back to an HTTP/2 preface.
pub fn classify_h2c_answer(first: &[u8]) -> H2cAnswer {
    if first.len() >= 9 && first[3] == SETTINGS && first[4] & 0x1 == 0 && first[5..9] == [0; 4] {
        H2cAnswer::Settings
    } else if first.starts_with(b"HTTP/1.") {
        H2cAnswer::Http1
    } else {
        H2cAnswer::Other
    }
}

/// Send the HTTP/2 preface to the app at `addr` and classify its answer. An error means the
/// app could not be reached (nothing was learned).
pub async fn probe_h2c(addr: SocketAddr, timeout: Duration) -> std::io::Result<H2cAnswer> {
    let mut tcp = connect(addr, timeout).await?;
    tcp.write_all(H2_PREFACE).await?;
    let first = read_some(&mut tcp, 9, timeout).await;
    let answer = classify_h2c_answer(&first);
    if answer == H2cAnswer::Settings {
        let _ = tcp.write_all(H2_GOAWAY).await;
    }
    let _ = tcp.shutdown().await;
    Ok(answer)
}

/// Ask the app at `addr` `OPTIONS * HTTP/1.1`: `Some(true)` if it answered with an HTTP/1.x
/// status line, `Some(false)` if it answered something else (an h2c-only server's SETTINGS
/// frame), `None` if it said nothing in time.
pub async fn probe_h1(addr: SocketAddr, timeout: Duration) -> std::io::Result<Option<bool>> {
    let mut tcp = connect(addr, timeout).await?;
    let req = format!("OPTIONS * HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await?;
    let first = read_some(&mut tcp, 7, timeout).await;
    let _ = tcp.shutdown().await;
    Ok(match first.len() {
        0 => None,
        _ => Some(first.starts_with(b"HTTP/1.") || b"HTTP/1.".starts_with(&first)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An h2c-only app that resets (no answer at all) a connection that does not open with the
    /// HTTP/2 preface, as a server may under load.
    async fn resetting_h2c_app() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut first = [0u8; 3];
                    if tcp.read_exact(&mut first).await.is_err() {
                        return;
                    }
                    if &first == b"PRI" {
                        let _ = tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                        let mut rest = [0u8; 64];
                        while matches!(tcp.read(&mut rest).await, Ok(n) if n > 0) {}
                    } else {
                        let _ = tcp.set_zero_linger();
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_h1_attempt_answered_in_h2_falls_back_even_when_the_h1_probe_hears_nothing() {
        let addr = resetting_h2c_app().await;
        // Only the probes: nothing proves the app lacks HTTP/1.1, so no fallback.
        let knowledge = AppKnowledge::new(addr, Duration::from_secs(2));
        assert_eq!(knowledge.fallback(Proto::Http1, false).await, None);
        assert_eq!(knowledge.h1(), Known::Unknown);
        // The failed attempt was answered in something else than HTTP/1.1: fall back, and
        // remember it, so that the next request goes as h2c at once.
        let knowledge = AppKnowledge::new(addr, Duration::from_secs(2));
        assert_eq!(
            knowledge.fallback(Proto::Http1, true).await,
            Some(Proto::H2c)
        );
        assert_eq!(knowledge.h1(), Known::No);
        assert_eq!(knowledge.h2c(), Known::Yes);
        assert_eq!(knowledge.known_choice(false, true), Some(Proto::H2c));
    }

    #[test]
    fn an_h2_servers_settings_frame_is_told_from_an_http1_status_line() {
        // A SETTINGS frame with one setting (6 bytes), stream 0.
        let settings = [0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        assert_eq!(classify_h2c_answer(&settings), H2cAnswer::Settings);
        // A SETTINGS ACK is no server preface.
        assert_eq!(
            classify_h2c_answer(&[0, 0, 0, 4, 1, 0, 0, 0, 0]),
            H2cAnswer::Other
        );
        assert_eq!(
            classify_h2c_answer(b"HTTP/1.1 505 HTTP Version Not Supported\r\n"),
            H2cAnswer::Http1
        );
        assert_eq!(classify_h2c_answer(b"HTTP/1.0 400"), H2cAnswer::Http1);
        assert_eq!(classify_h2c_answer(b""), H2cAnswer::Other);
        assert_eq!(classify_h2c_answer(b"\x15\x03\x01"), H2cAnswer::Other);
    }
}
