//! JSON body transforms of a forwarding rule: the request's before it is sent (refused
//! whole if it is too large or not JSON: nothing half-made reaches the backend), the
//! response's before the client sees it.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::{Either, Full};
use trellis_policies::compose::{BodyProgram, BodyTransform, JqError};

use super::body::{collect, refused_request, Collect};
use super::ComposeError;
use crate::error::ProxyError;
use crate::ResponseBody;

/// A compiled `transform`: its jq programs, compiled once per policy.
#[derive(Debug)]
pub struct Transform {
    request: Option<BodyProgram>,
    response: Option<BodyProgram>,
    max_body: u64,
}

// === impl Transform ===

impl Transform {
    pub fn compile(spec: &BodyTransform) -> Result<Self, String> {
        let limits = spec.limits();
        let compile = |s: &Option<trellis_policies::compose::TransformSpec>| {
            s.as_ref().map(|s| s.compile(limits)).transpose()
        };
        Ok(Self {
            request: compile(&spec.request).map_err(|m| format!("request.{m}"))?,
            response: compile(&spec.response).map_err(|m| format!("response.{m}"))?,
            max_body: spec.max_body_bytes,
        })
    }

    /// The request, its body read whole (at most the limit) and transformed; a bodiless
    /// request passes as it is. With a response transform the upstream is asked for an
    /// uncompressed answer.
    pub async fn request<B>(&self, req: Request<B>) -> Result<Request<Bytes>, ProxyError>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (mut parts, body) = req.into_parts();
        let bytes = super::body::request_body(&mut parts, body, self.max_body)
            .await
            .map_err(|e| refused_request(e, self.max_body))?;
        if self.response.is_some() {
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        let bytes = match &self.request {
            Some(f) if !bytes.is_empty() => {
                let out = run(f, bytes).await.map_err(ComposeError::BadRequestBody)?;
                set_length(&mut parts.headers, out.len());
                Bytes::from(out)
            }
            _ => bytes,
        };
        Ok(Request::from_parts(parts, bytes))
    }

    /// The response, its body transformed when it is a successful, uncompressed JSON answer
    /// (an error page or a compressed body passes as it is).
    pub async fn response(
        &self,
        resp: Response<ResponseBody>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let Some(f) = &self.response else {
            return Ok(resp);
        };
        let h = resp.headers();
        if !resp.status().is_success() || !is_json(h) || h.contains_key(header::CONTENT_ENCODING) {
            return Ok(resp);
        }
        let (mut parts, body) = resp.into_parts();
        let bytes = collect(&parts.headers, body, self.max_body)
            .await
            .map_err(|e| match e {
                Collect::TooLarge => ComposeError::UpstreamTooLarge {
                    limit: self.max_body,
                },
                Collect::Failed(m) => ComposeError::UpstreamBodyFailed(m),
            })?;
        let out = run(f, bytes).await.map_err(ComposeError::BadUpstreamBody)?;
        // Validators of the upstream's representation do not describe this one.
        parts.headers.remove(header::ETAG);
        parts.headers.remove(header::LAST_MODIFIED);
        set_length(&mut parts.headers, out.len());
        Ok(Response::from_parts(
            parts,
            Either::Right(Full::new(Bytes::from(out))),
        ))
    }
}

/// Transform `body`: on this task when the program runs natively (field operations, the jq
/// fast path: microseconds), else on a jaq thread (policies' jq_bound.rs: bounded in steps,
/// sizes, memory and stack), awaited, so that this worker serves other requests meanwhile.
pub(super) async fn run(f: &BodyProgram, body: Bytes) -> Result<Vec<u8>, JqError> {
    if let Some(out) = f.apply_inline(&body) {
        return out;
    }
    let Some(jaq) = f.jaq() else {
        return Err(JqError::NoOutput);
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if let Err(e) = jaq.spawn_jaq(body, move |out| {
        // The request may be gone (client closed): nothing to tell.
        let _ = tx.send(out);
    }) {
        tracing::warn!(error = %e, "jq transform could not be run");
        return Err(e);
    }
    let out = rx.await.unwrap_or_else(|_| {
        Err(JqError::Panic(
            "the jaq thread ended without an answer".into(),
        ))
    });
    // A bound a body runs into is counted by cause like any refusal; jaq itself failing is
    // ours to look at.
    if let Err(e @ (JqError::Panic(_) | JqError::Unavailable(_))) = &out {
        tracing::warn!(error = %e, "jq transform failed inside jaq");
    }
    out
}

fn set_length(h: &mut HeaderMap, n: usize) {
    h.remove(header::TRANSFER_ENCODING);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
}

/// `application/json` or any `+json` type.
fn is_json(h: &HeaderMap) -> bool {
    let Some(ct) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}
