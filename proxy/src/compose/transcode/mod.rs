//! gRPC-JSON transcoding at the ingress, as Envoy's `grpc_json_transcoder`: a REST/JSON
//! request that fits one of the service's HTTP bindings becomes a gRPC call (its message
//! mapped whole before anything is sent), and the call's answer JSON again: the message of a
//! unary call, a JSON array (or newline-delimited JSON) of a server stream's, as they come;
//! a gRPC error status becomes the HTTP status of the google.rpc mapping.
//!
//! The binding table and the JSON <-> protobuf mapping are compiled once per policy in
//! `trellis_policies::compose` (the same function validation runs); this module is the HTTP
//! side: framing, headers, statuses, bounds.

mod status;
mod stream;
mod upload;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, Version};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use trellis_policies::compose::{Binding, StreamFormat, Transcoder};

use super::body::{refused_request, request_body};
use super::ComposeError;
use crate::error::ProxyError;
use crate::http::client_body::{BodyWatch, ClientBody};
use crate::ResponseBody;

pub use status::{code_name, http_status};
pub use stream::JsonStream;
pub use upload::{Failed, Upload};

/// The binding a JSON request fits, with its path variables (404 when none fits, before the
/// body is read; 400 for a variable that does not decode).
pub fn find<B>(
    t: &Transcoder,
    req: &Request<B>,
) -> Result<(Arc<Binding>, Vec<String>), ProxyError> {
    let Some((binding, vars)) = t.find(req.method().as_str(), req.uri().path()) else {
        return Err(ComposeError::NoBinding {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
        }
        .into());
    };
    let vars = vars.map_err(|m| {
        ComposeError::Transcode(trellis_policies::compose::TranscodeError::BadPath(m))
    })?;
    Ok((binding.clone(), vars))
}

/// The gRPC call for a JSON request: its body read (at most the limit: 413) and mapped to the
/// input message (400 naming the field), framed as one gRPC message (or, for a
/// client-streaming method whose body the edge read already, as all of them).
pub async fn request<B>(
    t: &Transcoder,
    binding: &Binding,
    vars: Vec<String>,
    req: Request<B>,
) -> Result<Request<Bytes>, ProxyError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut parts, body) = req.into_parts();
    let json = request_body(&mut parts, body, t.max_body)
        .await
        .map_err(|e| refused_request(e, t.max_body))?;
    let query = parts.uri.query();
    let ignore = t.ignore_unknown_query;
    let framed = if binding.client_streaming {
        upload::whole(binding, &json, &vars, query, ignore)?
    } else {
        let message = binding
            .request(&json, vars, query, ignore)
            .map_err(ComposeError::Transcode)?;
        let mut b = BytesMut::new();
        upload::put_frame(&mut b, &message);
        b.freeze()
    };
    grpc_parts(&mut parts, binding)?;
    let h = &mut parts.headers;
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(framed.len()));
    Ok(Request::from_parts(parts, framed))
}

/// The gRPC call of a client-streaming method: the client's JSON array becomes the request's
/// messages as it streams ([`Upload`]), within the body limit (a larger `Content-Length` is
/// refused before anything is sent). The [`Failed`] slot holds why the body was cut, if it
/// was.
pub fn upload(
    t: &Transcoder,
    binding: Arc<Binding>,
    vars: Vec<String>,
    req: Request<Incoming>,
) -> Result<(Request<ClientBody>, Arc<BodyWatch>, Failed), ProxyError> {
    let (mut parts, body) = req.into_parts();
    if super::body::declared_length(&parts.headers).is_some_and(|n| n > t.max_body) {
        return Err(ComposeError::RequestTooLarge { limit: t.max_body }.into());
    }
    grpc_parts(&mut parts, &binding)?;
    let query = parts.uri.query().map(str::to_string);
    let (upload, failed) = Upload::new(
        body,
        binding.clone(),
        vars,
        query,
        t.ignore_unknown_query,
        t.max_body,
    );
    let (body, watch) = ClientBody::mapped(Box::pin(upload));
    Ok((Request::from_parts(parts, body), watch, failed))
}

/// The gRPC request line and headers of a transcoded call (its query is dropped: it was read
/// into the message).
fn grpc_parts(parts: &mut http::request::Parts, binding: &Binding) -> Result<(), ProxyError> {
    parts.method = Method::POST;
    parts.uri = grpc_uri(&parts.uri, &binding.grpc_path)?;
    // gRPC is HTTP/2 whatever the client spoke: no `trellis-orig-proto` for the far side.
    parts.version = Version::HTTP_2;
    let h = &mut parts.headers;
    for name in &super::NOT_CARRIED {
        h.remove(name);
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert("grpc-accept-encoding", HeaderValue::from_static("identity"));
    Ok(())
}

/// The request's URI with the gRPC method's path (its authority kept, its query dropped).
fn grpc_uri(uri: &http::Uri, path: &str) -> Result<http::Uri, ProxyError> {
    let mut b = http::Uri::builder();
    if let (Some(s), Some(a)) = (uri.scheme(), uri.authority()) {
        b = b.scheme(s.clone()).authority(a.clone());
    }
    b.path_and_query(path)
        .build()
        .map_err(|_| ProxyError::BadRequest("the gRPC method's path is not a URI path"))
}

/// The gRPC answer as JSON: a unary call's message read whole (at most the limit: 502), its
/// status from the trailers; a server stream's messages as they come. An error status
/// answers its mapped HTTP status.
pub async fn response(
    t: &Transcoder,
    binding: Arc<Binding>,
    resp: Response<ResponseBody>,
) -> Result<Response<ResponseBody>, ProxyError> {
    if !resp.status().is_success() || !crate::http::grpc::is_grpc(resp.headers()) {
        let ct = resp.headers().get(header::CONTENT_TYPE).cloned();
        return Err(ComposeError::BadUpstreamGrpc(format!(
            "answered {} with content-type {:?}, not gRPC",
            resp.status(),
            ct
        ))
        .into());
    }
    // Trailers-only: the status is in the headers and there is no message.
    if let Some(code) = grpc_code(resp.headers()) {
        if code != 0 {
            return Err(status::failed(code, resp.headers()).into());
        }
        if !binding.server_streaming {
            let m = "a unary call answered no message".to_string();
            return Err(ComposeError::BadUpstreamGrpc(m).into());
        }
        // An empty stream.
        let (mut parts, _) = resp.into_parts();
        let status = parts.headers.clone();
        json_headers(&mut parts.headers, true, t.stream);
        let mut encoder = JsonStream::new(binding, t.stream, t.max_message);
        let body = Full::new(encoder.trailers(&status));
        return Ok(Response::from_parts(parts, Either::Right(body)));
    }
    let (mut parts, body) = resp.into_parts();
    json_headers(&mut parts.headers, binding.server_streaming, t.stream);
    let mut encoder = JsonStream::new(binding.clone(), t.stream, t.max_message);
    if binding.server_streaming {
        let body = match body {
            Either::Left(streamed) => Either::Left(streamed.grpc_json(encoder)),
            Either::Right(full) => {
                let (data, trailers) = read_whole(full, t.max_message).await?;
                let mut out = encoder
                    .data(&data, false)
                    .map_err(ComposeError::from)?
                    .to_vec();
                out.extend_from_slice(&encoder.trailers(&trailers.unwrap_or_default()));
                Either::Right(Full::new(Bytes::from(out)))
            }
        };
        return Ok(Response::from_parts(parts, body));
    }
    let (data, trailers) = read_whole(body, t.max_message.saturating_add(5)).await?;
    let trailers = trailers.unwrap_or_default();
    match grpc_code(&trailers) {
        Some(0) => {}
        Some(code) => return Err(status::failed(code, &trailers).into()),
        None => {
            let m = "the answer ended without a grpc-status".to_string();
            return Err(ComposeError::BadUpstreamGrpc(m).into());
        }
    }
    let json = encoder.unary(&data).map_err(ComposeError::from)?;
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(json.len()));
    Ok(Response::from_parts(parts, Either::Right(Full::new(json))))
}

/// A body read whole, with its trailers, at most `limit` bytes of data.
async fn read_whole<B>(body: B, limit: u64) -> Result<(Bytes, Option<HeaderMap>), ComposeError>
where
    B: Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let max = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, max).collect().await {
        Ok(c) => {
            let trailers = c.trailers().cloned();
            Ok((c.to_bytes(), trailers))
        }
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ComposeError::UpstreamTooLarge { limit })
        }
        Err(e) => Err(ComposeError::UpstreamBodyFailed(e.to_string())),
    }
}

/// `grpc-status`, when present.
fn grpc_code(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The answer's headers as JSON's: its content type, without gRPC's own headers and length.
fn json_headers(h: &mut HeaderMap, streaming: bool, format: StreamFormat) {
    for name in [
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-status",
        "grpc-message",
    ] {
        h.remove(name);
    }
    h.remove(header::CONTENT_LENGTH);
    h.remove(header::TRAILER);
    let ct = match (streaming, format) {
        (true, StreamFormat::Ndjson) => "application/x-ndjson",
        _ => "application/json",
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
}

#[cfg(test)]
mod tests;
