//! The answer to a request validation refuses: `application/problem+json` (RFC 9457) naming
//! what failed: `type`, `title`, `status`, `detail`, and each failing field with where it is
//! (`in`: `path`, `query`, `header`, `cookie` or `body`) and its name (a parameter) or JSON pointer (a
//! body field).

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};
use serde_json::{json, Value};

use super::compile::In;
use crate::http::headers::ERROR_HEADER;
use crate::ResponseBody;

/// Most field errors listed in one answer.
pub const MAX_ERRORS: usize = 8;
/// Longest `detail` of one field (the message may quote the client's value).
const MAX_DETAIL: usize = 256;

/// Why a request was refused.
#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    /// The metric's `reason` and the last segment of `type`.
    pub reason: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub fields: Vec<FieldError>,
    /// `Allow` of a 405.
    pub allow: Option<String>,
}

/// One failing field.
#[derive(Debug)]
pub struct FieldError {
    pub location: Location,
    /// A parameter's name, or a body field's JSON pointer (`""` is the whole body).
    pub name: String,
    pub detail: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    Param(In),
    Body,
}

// === impl Problem ===

impl Problem {
    pub fn new(status: StatusCode, reason: &'static str, title: &'static str) -> Self {
        Self {
            status,
            reason,
            title,
            detail: String::new(),
            fields: Vec::new(),
            allow: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// 400 for the fields that failed; the first names the reason and the detail.
    pub fn invalid(fields: Vec<FieldError>) -> Self {
        let first = fields.first();
        let reason = first.map_or("body_schema", |f| f.location.reason());
        let detail = first.map_or_else(String::new, FieldError::describe);
        Self {
            detail,
            fields,
            ..Self::new(
                StatusCode::BAD_REQUEST,
                reason,
                "The request does not match the API's description",
            )
        }
    }

    pub fn response(&self) -> Response<ResponseBody> {
        let mut body = json!({
            "type": format!("https://trellis.dev/problems/validation/{}", self.reason.replace('_', "-")),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        if let Some(first) = self.fields.first() {
            body["in"] = json!(first.location.as_str());
            body[first.location.name_key()] = json!(first.name);
            let errors: Vec<Value> = self.fields.iter().map(FieldError::to_json).collect();
            body["errors"] = Value::Array(errors);
        }
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(bytes))));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(ERROR_HEADER, HeaderValue::from_static("request-invalid"));
        if let Some(allow) = self
            .allow
            .as_deref()
            .and_then(|a| HeaderValue::from_str(a).ok())
        {
            h.insert(header::ALLOW, allow);
        }
        resp
    }
}

// === impl FieldError ===

impl FieldError {
    pub fn new(location: Location, name: impl Into<String>, detail: impl Into<String>) -> Self {
        let mut detail = detail.into();
        if detail.len() > MAX_DETAIL {
            let mut cut = MAX_DETAIL;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
            detail.push_str("...");
        }
        Self {
            location,
            name: name.into(),
            detail,
        }
    }

    /// `query parameter `limit`: ...`, `body field `/lines/0/qty`: ...`.
    pub fn describe(&self) -> String {
        match self.location {
            Location::Body if self.name.is_empty() => format!("body: {}", self.detail),
            Location::Body => format!("body field `{}`: {}", self.name, self.detail),
            Location::Param(_) => format!(
                "{} parameter `{}`: {}",
                self.location.as_str(),
                self.name,
                self.detail
            ),
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({ "in": self.location.as_str(), "detail": self.detail });
        v[self.location.name_key()] = json!(self.name);
        v
    }
}

// === impl Location ===

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Param(In::Path) => "path",
            Self::Param(In::Query) => "query",
            Self::Param(In::Header) => "header",
            Self::Param(In::Cookie) => "cookie",
            Self::Body => "body",
        }
    }

    fn name_key(self) -> &'static str {
        match self {
            Self::Body => "pointer",
            Self::Param(_) => "name",
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Self::Param(In::Path) => "path_param",
            Self::Param(In::Query) => "query_param",
            Self::Param(In::Header) => "header",
            Self::Param(In::Cookie) => "cookie_param",
            Self::Body => "body_schema",
        }
    }
}
