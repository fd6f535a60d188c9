//! Response validation in audit mode: a response is checked as it passes and always passed on
//! unchanged. Its status and content type are checked when its headers arrive; a JSON body is
//! copied (up to the route's bound, then given up and counted as unchecked) as the frames go
//! by, never held back, and checked once its last frame passed: at once up to 4 KiB (cheaper
//! than a task handoff), on a task of its own above, so the client never waits for the check
//! of a large body. A mismatch is counted
//! (`trellis_validation_response_mismatches_total{route, reason}`) and logged (at most once a
//! second per process, so a broken backend cannot flood the log).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::{header, Response};

use super::compile::{is_json, response_for, Operation};
use super::metrics::ValidationMetrics;
use super::request::pointer;
use super::tape::Doc;

/// Response bodies up to this size are checked as their last frame passes, larger ones on a
/// task of their own.
const INLINE_CHECK: usize = 4096;

/// A response body being copied for its check.
pub struct AuditTap {
    op: Arc<Operation>,
    /// The response entry and the content entry within it whose schema applies.
    at: (usize, usize),
    buf: BytesMut,
    limit: usize,
    /// Over the bound: nothing more is copied.
    over: bool,
    done: bool,
    route: Arc<String>,
    metrics: Arc<ValidationMetrics>,
}

/// What the audit of one response needs.
pub struct Audit {
    pub op: Arc<Operation>,
    pub route: Arc<String>,
    pub metrics: Arc<ValidationMetrics>,
    pub limit: usize,
}

// === impl Audit ===

impl Audit {
    /// Check the status and content type of `resp`; a tap when its body is to be checked.
    pub fn start<B>(self, resp: &Response<B>) -> Option<AuditTap> {
        let status = resp.status().as_u16();
        let Some(content) = response_for(&self.op.responses, status) else {
            self.mismatch("status", &format!("status {status} is not described"));
            return None;
        };
        if content.is_empty() {
            return None;
        }
        let essence = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let Some(validator) = content.find(&essence) else {
            let m = format!("status {status}: content type `{essence}` is not described");
            self.mismatch("content_type", &m);
            return None;
        };
        if validator.is_none() || !is_json(&essence) {
            return None;
        }
        let declared = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|n| n > self.limit) {
            self.metrics.unchecked(&self.route, "too_large");
            return None;
        }
        let at = self.position(status, &essence)?;
        Some(AuditTap {
            op: self.op,
            at,
            buf: BytesMut::with_capacity(declared.unwrap_or(0)),
            limit: self.limit,
            over: false,
            done: false,
            route: self.route,
            metrics: self.metrics,
        })
    }

    /// Where the schema [`Self::start`] found is, so the tap can hold the operation only.
    fn position(&self, status: u16, essence: &str) -> Option<(usize, usize)> {
        let content = response_for(&self.op.responses, status)?;
        let i = self
            .op
            .responses
            .iter()
            .position(|(_, c)| std::ptr::eq(c, content))?;
        let wanted = content.find(essence)?;
        let j = content
            .0
            .iter()
            .position(|(_, v)| std::ptr::eq(v, wanted))?;
        Some((i, j))
    }

    fn mismatch(&self, reason: &'static str, message: &str) {
        self.metrics.mismatch(&self.route, reason);
        log_mismatch(&self.route, reason, message);
    }
}

// === impl AuditTap ===

impl AuditTap {
    /// A frame of the body went by.
    pub fn data(&mut self, data: &Bytes) {
        if self.over {
            return;
        }
        if self.buf.len() + data.len() > self.limit {
            self.over = true;
            self.buf = BytesMut::new();
            self.metrics.unchecked(&self.route, "too_large");
            return;
        }
        self.buf.extend_from_slice(data);
    }

    /// The body ended: check it off the response's path.
    pub fn finish(mut self) {
        self.done = true;
        if self.over {
            return;
        }
        let body = std::mem::take(&mut self.buf).freeze();
        let body_len = body.len();
        let (op, at) = (self.op.clone(), self.at);
        let (route, metrics) = (self.route.clone(), self.metrics.clone());
        let check = move || check_body(&op, at, &body, &route, &metrics);
        // A small body is checked at once: a few microseconds, less than handing it to a
        // task would cost. A larger one on a task of its own, not to delay the body's end.
        let small = body_len <= INLINE_CHECK;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if !small => {
                rt.spawn(async move { check() });
            }
            _ => check(),
        }
    }
}

impl Drop for AuditTap {
    fn drop(&mut self) {
        if !self.done && !self.over {
            self.metrics.unchecked(&self.route, "incomplete");
        }
    }
}

fn check_body(
    op: &Operation,
    (i, j): (usize, usize),
    body: &[u8],
    route: &Arc<String>,
    metrics: &ValidationMetrics,
) {
    let Some(Some(validator)) = op
        .responses
        .get(i)
        .and_then(|(_, c)| c.0.get(j))
        .map(|e| &e.1)
    else {
        return;
    };
    // The usual valid body, without its document (validate/fast).
    if validator.fast.as_ref().is_some_and(|f| f.accepts(body)) {
        return;
    }
    let validator = &validator.full;
    let doc = match Doc::parse(body) {
        Ok(doc) => doc,
        Err(e) => {
            metrics.mismatch(route, "body_malformed");
            log_mismatch(route, "body_malformed", &format!("not valid JSON: {e}"));
            return;
        }
    };
    if validator.is_valid(doc.root()) {
        return;
    }
    let first = validator
        .iter_errors(doc.root())
        .next()
        .map(|e| format!("body field `{}`: {e}", pointer(&e)));
    if let Some(message) = first {
        metrics.mismatch(route, "body_schema");
        log_mismatch(route, "body_schema", &message);
    }
}

/// The second of the last log line, shared by every route: at most one line a second.
static LAST_LOG: AtomicU64 = AtomicU64::new(0);

fn log_mismatch(route: &str, reason: &str, message: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_LOG.swap(now, Ordering::Relaxed) != now {
        let message: String = message.chars().take(300).collect();
        tracing::warn!(%route, %reason, %message, "response does not match the API's description (audit: passed on unchanged)");
    }
}

/// `resp` with its body audited, when `audit` applies to it.
pub fn attach(
    audit: Option<Audit>,
    resp: Response<crate::ResponseBody>,
) -> Response<crate::ResponseBody> {
    // Only bodies from a backend are audited (a locally made one is not the API's).
    let streamed = matches!(resp.body(), http_body_util::Either::Left(_));
    let Some(tap) = audit.filter(|_| streamed).and_then(|a| a.start(&resp)) else {
        return resp;
    };
    resp.map(|b| match b {
        http_body_util::Either::Left(s) => http_body_util::Either::Left(s.audited(tap)),
        full => full,
    })
}
