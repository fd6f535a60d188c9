//! The JSON <-> protobuf mapping of one binding: a request's body, path variables and query
//! parameters become one JSON object, read into the input message by prost-reflect's
//! canonical proto3 JSON mapping (unknown fields refused, the failing field named); an answer's
//! message is written back the same way (lowerCamelCase names, 64-bit integers as strings,
//! enums by name, bytes in base64, well-known types in their string forms).

use prost_reflect::prost::Message as _;
use prost_reflect::{DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, SerializeOptions};
use serde_json::{Map, Value};

use super::rules::{is_string_wkt, path_field, Binding, BodyRule};

/// Why a request could not be mapped to the method's message (400), or an answer to JSON.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("the request body is not JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    BadBody(String),
    #[error("field `{field}`: {message}")]
    BadField { field: String, message: String },
    #[error("query parameter `{name}`: {message}")]
    BadQuery { name: String, message: String },
    #[error("path: {0}")]
    BadPath(String),
    #[error("the upstream's message is not a `{message}`: {error}")]
    BadUpstream { message: String, error: String },
    /// An element of a client-streaming call's array that does not map (0-based index).
    #[error("element {index} of the array: {error}")]
    InElement {
        index: usize,
        error: Box<TranscodeError>,
    },
}

// === impl TranscodeError ===

impl TranscodeError {
    /// The field (or query parameter) at fault, for the problem document.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::BadField { field, .. } => Some(field),
            Self::BadQuery { name, .. } => Some(name),
            Self::InElement { error, .. } => error.field(),
            _ => None,
        }
    }

    /// Whether the body is not JSON at all (rather than JSON that names no field, or the
    /// wrong type).
    pub fn is_bad_json(&self) -> bool {
        match self {
            Self::BadJson(_) => true,
            Self::InElement { error, .. } => error.is_bad_json(),
            _ => false,
        }
    }

    /// The array element at fault, for a client-streaming call.
    pub fn element(&self) -> Option<usize> {
        match self {
            Self::InElement { index, .. } => Some(*index),
            _ => None,
        }
    }
}

// === impl Binding ===

impl Binding {
    /// The input message, encoded, from the request's `body`, its path `vars` (as
    /// [`super::Transcoder::find`] returned them) and its `query`.
    pub fn request(
        &self,
        body: &[u8],
        vars: Vec<String>,
        query: Option<&str>,
        ignore_unknown_query: bool,
    ) -> Result<Vec<u8>, TranscodeError> {
        self.message(self.body_object(body)?, &vars, query, ignore_unknown_query)
    }

    /// One request message of a client-streaming call from its array element (which the
    /// splitter found, so never empty): as a unary body, with the same path variables and
    /// query parameters woven into every message, as Envoy does.
    pub fn stream_message(
        &self,
        index: usize,
        element: &[u8],
        vars: &[String],
        query: Option<&str>,
        ignore_unknown_query: bool,
    ) -> Result<Vec<u8>, TranscodeError> {
        let in_element = |e| TranscodeError::InElement {
            index,
            error: Box::new(e),
        };
        let root = self.body_object(element).map_err(in_element)?;
        self.message(root, vars, query, ignore_unknown_query)
            .map_err(in_element)
    }

    fn message(
        &self,
        mut root: Map<String, Value>,
        vars: &[String],
        query: Option<&str>,
        ignore_unknown_query: bool,
    ) -> Result<Vec<u8>, TranscodeError> {
        for (fields, value) in self.vars.iter().zip(vars) {
            let v = scalar(fields_last(fields), value).map_err(|message| {
                TranscodeError::BadPath(format!("`{}`: {message}", dotted(fields)))
            })?;
            set(&mut root, fields, v, false);
        }
        if let Some(q) = query {
            self.query(&mut root, q, ignore_unknown_query)?;
        }
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(Value::Object(root), &mut track);
        let msg = DynamicMessage::deserialize_with_options(
            self.input.clone(),
            de,
            &DeserializeOptions::new(),
        )
        .map_err(|e| bad_field(&track.path(), e.to_string()))?;
        Ok(msg.encode_to_vec())
    }

    /// The request body as the JSON object of the message's fields.
    fn body_object(&self, body: &[u8]) -> Result<Map<String, Value>, TranscodeError> {
        let empty = body.iter().all(u8::is_ascii_whitespace);
        let parse = || {
            serde_json::from_slice::<Value>(body)
                .map_err(|e| TranscodeError::BadJson(e.to_string()))
        };
        match &self.body {
            BodyRule::None if empty => Ok(Map::new()),
            BodyRule::None => Err(TranscodeError::BadBody(format!(
                "`{} {}` takes no body (its fields come from the path and the query)",
                self.http_method, self.text
            ))),
            BodyRule::Whole if empty => Ok(Map::new()),
            BodyRule::Whole => match parse()? {
                Value::Object(m) => Ok(m),
                other => Err(TranscodeError::BadBody(format!(
                    "the body must be a JSON object (a `{}`), not {}",
                    self.input.full_name(),
                    crate::api_spec::kind(&other)
                ))),
            },
            BodyRule::Field(_) if empty => Ok(Map::new()),
            BodyRule::Field(f) => Ok(Map::from_iter([(f.json_name().to_string(), parse()?)])),
        }
    }

    /// Query parameters into `root`: `a.b=v`, repeated fields by repeating the parameter.
    fn query(
        &self,
        root: &mut Map<String, Value>,
        query: &str,
        ignore_unknown: bool,
    ) -> Result<(), TranscodeError> {
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| super::template::decode(&s.replace('+', " "), false);
            let bad = |name: &str, message: String| TranscodeError::BadQuery {
                name: name.to_string(),
                message,
            };
            let name = decode(raw_name).map_err(|m| bad(raw_name, m))?;
            let value = decode(raw_value).map_err(|m| bad(&name, m))?;
            let fields = match self.query_field(&name) {
                Ok(f) => f,
                Err(_) if ignore_unknown => continue,
                Err(m) => return Err(bad(&name, m)),
            };
            let v = scalar(fields_last(&fields), &value).map_err(|m| bad(&name, m))?;
            set(root, &fields, v, fields_last(&fields).is_list());
        }
        Ok(())
    }

    /// The fields a query parameter sets: not the body's, not the path's.
    fn query_field(&self, name: &str) -> Result<Vec<FieldDescriptor>, String> {
        if matches!(self.body, BodyRule::Whole) {
            return Err("names no field: the body is the whole message".into());
        }
        let path: Vec<String> = name.split('.').map(str::to_string).collect();
        let fields = query_path(&self.input, &path)?;
        if let (BodyRule::Field(b), Some(first)) = (&self.body, fields.first()) {
            if b == first {
                return Err(format!("`{}` is the body", b.name()));
            }
        }
        if self
            .vars
            .iter()
            .any(|v| v.first() == fields.first() && v == &fields)
        {
            return Err("is set by the path".into());
        }
        Ok(fields)
    }

    /// The output message as JSON (or its `response_body` field alone).
    pub fn response(&self, message: &[u8]) -> Result<Vec<u8>, TranscodeError> {
        let bad = |error: String| TranscodeError::BadUpstream {
            message: self.output.full_name().to_string(),
            error,
        };
        let msg =
            DynamicMessage::decode(self.output.clone(), message).map_err(|e| bad(e.to_string()))?;
        let options = SerializeOptions::new();
        let Some(field) = &self.response_body else {
            let mut out = serde_json::Serializer::new(Vec::with_capacity(message.len() * 2));
            msg.serialize_with_options(&mut out, &options)
                .map_err(|e| bad(e.to_string()))?;
            return Ok(out.into_inner());
        };
        let whole = msg
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| bad(e.to_string()))?;
        let part = whole.get(field.json_name()).cloned().unwrap_or(Value::Null);
        serde_json::to_vec(&part).map_err(|e| bad(e.to_string()))
    }
}

/// As [`path_field`], but the last field may be repeated (a query parameter given again).
fn query_path(
    msg: &prost_reflect::MessageDescriptor,
    path: &[String],
) -> Result<Vec<FieldDescriptor>, String> {
    match path_field(msg, path) {
        Ok(f) => Ok(f),
        Err(e) if e.contains("is repeated") => {
            let (last, init) = path.split_last().ok_or("is empty")?;
            let mut fields = if init.is_empty() {
                Vec::new()
            } else {
                path_field(msg, init)?
            };
            let parent = match fields.last().map(FieldDescriptor::kind) {
                Some(Kind::Message(m)) => m,
                _ => msg.clone(),
            };
            let f = parent
                .get_field_by_name(last)
                .or_else(|| parent.get_field_by_json_name(last))
                .filter(|f| !f.is_map())
                .ok_or(e)?;
            fields.push(f);
            Ok(fields)
        }
        Err(e) => Err(e),
    }
}

/// The field a deserialization error is at: the path where it failed, and for an unknown
/// field the field's own name (prost-reflect names it in its message only).
fn bad_field(path: &serde_path_to_error::Path, message: String) -> TranscodeError {
    let at = path.to_string();
    let unknown = message
        .strip_prefix("unrecognized field name '")
        .and_then(|rest| rest.split_once('\''))
        .map(|(name, _)| name.to_string());
    let field = match (unknown, at.as_str()) {
        (Some(name), ".") => name,
        (Some(name), at) => format!("{at}.{name}"),
        (None, at) => at.to_string(),
    };
    TranscodeError::BadField { field, message }
}

fn fields_last(fields: &[FieldDescriptor]) -> &FieldDescriptor {
    // Field paths are never empty (the template and query parsers split at least one name).
    &fields[fields.len() - 1]
}

fn dotted(fields: &[FieldDescriptor]) -> String {
    fields
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(".")
}

/// A path segment's or query parameter's text as the JSON the field's mapping reads: a
/// boolean for `bool` (and `BoolValue`), a string for everything else (numbers, enums by
/// name, bytes in base64, timestamps and durations are all read from strings).
fn scalar(field: &FieldDescriptor, text: &str) -> Result<Value, String> {
    let boolean = match field.kind() {
        Kind::Bool => true,
        Kind::Message(m) => {
            if !is_string_wkt(m.full_name()) {
                return Err(format!("`{}` is a message", field.name()));
            }
            m.full_name() == "google.protobuf.BoolValue"
        }
        _ => false,
    };
    if !boolean {
        return Ok(Value::String(text.to_string()));
    }
    match text {
        "true" => Ok(Value::Bool(true)),
        "false" => Ok(Value::Bool(false)),
        other => Err(format!("`{other}` is not a boolean (true or false)")),
    }
}

/// Set `fields` (a path of singular message fields, then the value's field) in `root`,
/// creating objects on the way; `append`: add to the field's array. A value from the path
/// replaces what the body said (under its proto or JSON name).
fn set(root: &mut Map<String, Value>, fields: &[FieldDescriptor], value: Value, append: bool) {
    let mut at = root;
    for (i, f) in fields.iter().enumerate() {
        if f.name() != f.json_name() {
            // The body may have used the other spelling: one field, one value.
            let other = at.remove(f.name());
            if let (Some(o), false) = (other, at.contains_key(f.json_name())) {
                at.insert(f.json_name().to_string(), o);
            }
        }
        let key = f.json_name().to_string();
        if i + 1 == fields.len() {
            if append {
                let slot = at.entry(key).or_insert_with(|| Value::Array(Vec::new()));
                match slot {
                    Value::Array(a) => a.push(value),
                    other => *other = Value::Array(vec![value]),
                }
            } else {
                at.insert(key, value);
            }
            return;
        }
        let slot = at.entry(key).or_insert_with(|| Value::Object(Map::new()));
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        let Value::Object(next) = slot else { return };
        at = next;
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::super::Transcoder;
    use super::*;

    fn table() -> Transcoder {
        spec().compile().unwrap()
    }

    /// Map a request, then read the message back as JSON through the same binding's output
    /// (every method of the test service returns its input type).
    fn roundtrip(
        t: &Transcoder,
        method: &str,
        uri: &str,
        body: &str,
    ) -> Result<Value, TranscodeError> {
        let (path, query) = match uri.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (uri, None),
        };
        let (b, vars) = t.find(method, path).expect("a binding");
        let bytes = b.request(
            body.as_bytes(),
            vars.unwrap(),
            query,
            t.ignore_unknown_query,
        )?;
        Ok(serde_json::from_slice(&b.response(&bytes).unwrap()).unwrap())
    }

    #[test]
    fn path_query_and_body_make_one_message() {
        let t = table();
        let v = roundtrip(
            &t,
            "GET",
            "/v1/shelves/7/items/42?title=a+b%21&tags=x&tags=y&meta.pages=3&draft=true&kind=BOOK",
            "",
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "shelves/7", "id": "42", "title": "a b!", "tags": ["x", "y"],
                "meta": {"pages": 3}, "draft": true, "kind": "BOOK"})
        );
        // body "*": the path wins over the body.
        let v = roundtrip(
            &t,
            "POST",
            "/v1/shelves/1/items",
            r#"{"name": "x", "title": "t", "id": 5}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "shelves/1", "title": "t", "id": "5"})
        );
        // body "meta": the body is that field.
        let v = roundtrip(
            &t,
            "PATCH",
            "/v1/items/9/meta",
            r#"{"author": "ana", "pages": 12}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "9", "meta": {"author": "ana", "pages": 12}})
        );
    }

    #[test]
    fn well_known_types_use_their_canonical_json() {
        let t = table();
        let body = r#"{"created": "2026-12-03T10:00:00.5Z", "ttl": "1.5s", "count": 7,
            "kind": "MAGAZINE", "data": "aGk=", "big": "18446744073709551615", "id": "-9007199254740993",
            "price": 2.5}"#;
        let v = roundtrip(&t, "POST", "/test.Echo/Plain", body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"created": "2026-12-03T10:00:00.500Z", "ttl": "1.500s", "count": 7,
                "kind": "MAGAZINE", "data": "aGk=", "big": "18446744073709551615",
                "id": "-9007199254740993", "price": 2.5})
        );
        // Numbers for 64-bit integers, enum numbers and snake_case names are read too.
        let v = roundtrip(
            &t,
            "POST",
            "/test.Echo/Plain",
            r#"{"id": 12, "kind": 1, "meta": {"pages": "4"}}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "12", "kind": "BOOK", "meta": {"pages": 4}})
        );
        // Wrappers and timestamps from the query string.
        let v = roundtrip(
            &t,
            "GET",
            "/v1/items/1?count=0&created=1970-01-01T00:00:01Z",
            "",
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "1", "count": 0, "created": "1970-01-01T00:00:01Z"})
        );
    }

    #[test]
    fn bad_input_is_refused_naming_the_field() {
        let t = table();
        let err = |m: &str, uri: &str, body: &str| roundtrip(&t, m, uri, body).unwrap_err();
        let e = err("POST", "/test.Echo/Plain", r#"{"nope": 1}"#);
        assert_eq!(e.field(), Some("nope"), "{e}");
        let e = err("POST", "/test.Echo/Plain", r#"{"meta": {"nope": 1}}"#);
        assert_eq!(e.field(), Some("meta.nope"), "{e}");
        let e = err("POST", "/test.Echo/Plain", r#"{"meta": {"pages": "many"}}"#);
        assert_eq!(e.field(), Some("meta.pages"), "{e}");
        let e = err("POST", "/test.Echo/Plain", r#"{"id": true}"#);
        assert_eq!(e.field(), Some("id"), "{e}");
        let e = err("POST", "/test.Echo/Plain", r#"{"kind": "NOVEL"}"#);
        assert_eq!(e.field(), Some("kind"), "{e}");
        let e = err("POST", "/test.Echo/Plain", r#"{"created": "yesterday"}"#);
        assert_eq!(e.field(), Some("created"), "{e}");
        let e = err("POST", "/test.Echo/Plain", r#"{"title": "a",}"#);
        assert!(matches!(e, TranscodeError::BadJson(_)), "{e}");
        let e = err("POST", "/test.Echo/Plain", "[1]");
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
        // A raw control character is not JSON; escaped, it is.
        let e = err("POST", "/test.Echo/Plain", "{\"title\": \"\u{0}\"}");
        assert!(matches!(e, TranscodeError::BadJson(_)), "{e}");
        assert!(roundtrip(&t, "POST", "/test.Echo/Plain", r#"{"title": "\u0000"}"#).is_ok());
        let bad_utf8 = t.find("POST", "/test.Echo/Plain").unwrap().0;
        let e = bad_utf8
            .request(b"{\"title\": \"\xff\"}", vec![], None, false)
            .unwrap_err();
        assert!(matches!(e, TranscodeError::BadJson(_)), "{e}");
        let e = err("GET", "/v1/items/abc", "");
        assert_eq!(e.field(), Some("id"), "{e}");
        let e = err("GET", "/v1/items/1?nope=1", "");
        assert_eq!(e.field(), Some("nope"), "{e}");
        let e = err("GET", "/v1/items/1?draft=yes", "");
        assert!(e.to_string().contains("`yes` is not a boolean"), "{e}");
        let e = err("GET", "/v1/items/1?id=2", "");
        assert!(e.to_string().contains("is set by the path"), "{e}");
        let e = err("GET", "/v1/items/1", "{}");
        assert!(e.to_string().contains("takes no body"), "{e}");
        let e = err("POST", "/v1/shelves/1/items?title=x", "{}");
        assert!(
            e.to_string().contains("the body is the whole message"),
            "{e}"
        );
        let mut lenient = spec();
        lenient.ignore_unknown_query_parameters = true;
        let t = lenient.compile().unwrap();
        assert!(roundtrip(&t, "GET", "/v1/items/1?key=abc", "").is_ok());
    }

    #[test]
    fn an_answer_that_is_not_the_output_message_is_refused() {
        let t = table();
        let b = t.find("GET", "/v1/items/1").unwrap().0;
        let e = b.response(b"\xff\xff\xff").unwrap_err();
        assert!(e.to_string().contains("is not a `test.Item`"), "{e}");
    }
}
