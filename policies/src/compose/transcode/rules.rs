//! A service's HTTP bindings from its methods' `google.api.http` options (with their
//! `additional_bindings`), each checked against the method's input message: a path variable
//! must name a singular scalar field (or a well-known type written as a string), `body` a
//! field of the message.
//!
//! A method without the option is bound as Envoy binds it: `POST /package.Service/Method`
//! with the whole body as the message.

use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, MethodDescriptor,
    ServiceDescriptor, Value,
};

use super::template::PathTemplate;

/// The option's full name.
const HTTP_OPTION: &str = "google.api.http";
/// Most bindings of one method (`additional_bindings` included).
const MAX_BINDINGS: usize = 16;

/// One HTTP method and path template bound to a gRPC method.
#[derive(Debug)]
pub struct Binding {
    pub http_method: String,
    /// The template as written.
    pub text: String,
    pub template: PathTemplate,
    /// `/package.Service/Method`.
    pub grpc_path: String,
    pub input: MessageDescriptor,
    pub output: MessageDescriptor,
    pub server_streaming: bool,
    /// The request is a stream of messages: the body is a JSON array of them.
    pub client_streaming: bool,
    pub body: BodyRule,
    /// The path variables' fields, in the template's order.
    pub(super) vars: Vec<Vec<FieldDescriptor>>,
    /// `response_body`: the output field sent instead of the whole message.
    pub(super) response_body: Option<FieldDescriptor>,
}

/// What the request body is.
#[derive(Debug)]
pub enum BodyRule {
    /// No body: every field not in the path comes from the query string.
    None,
    /// `body: "*"`: the message (but the path's fields).
    Whole,
    /// `body: "field"`: that field of the message.
    Field(FieldDescriptor),
}

/// Every binding of `service`'s methods.
pub fn bindings(
    pool: &DescriptorPool,
    service: &ServiceDescriptor,
) -> Result<Vec<Binding>, String> {
    let option = pool.get_extension_by_name(HTTP_OPTION);
    let mut out = Vec::new();
    for method in service.methods() {
        let name = method.name().to_string();
        let rule = option.as_ref().and_then(|ext| {
            let options = method.options();
            options
                .has_extension(ext)
                .then(|| options.get_extension(ext).as_message().cloned())
                .flatten()
        });
        let Some(rule) = rule else {
            let path = format!("/{}/{}", service.full_name(), name);
            out.push(binding(&method, "POST", &path, "*", "").map_err(|m| format!("{name}: {m}"))?);
            continue;
        };
        let mut rules = vec![rule.clone()];
        if let Some(Value::List(more)) = rule.get_field_by_name("additional_bindings").as_deref() {
            rules.extend(more.iter().filter_map(|v| v.as_message().cloned()));
        }
        if rules.len() > MAX_BINDINGS {
            return Err(format!("{name}: more than {MAX_BINDINGS} bindings"));
        }
        for r in &rules {
            let (verb, path) = pattern(r).map_err(|m| format!("{name}: {m}"))?;
            let body = text(r, "body");
            let response = text(r, "response_body");
            let b = binding(&method, &verb, &path, &body, &response)
                .map_err(|m| format!("{name}: {m}"))?;
            out.push(b);
        }
    }
    Ok(out)
}

/// The HTTP method and template of one `HttpRule`.
fn pattern(rule: &DynamicMessage) -> Result<(String, String), String> {
    for verb in ["get", "put", "post", "delete", "patch"] {
        if rule.has_field_by_name(verb) {
            return Ok((verb.to_ascii_uppercase(), text(rule, verb)));
        }
    }
    if let Some(custom) = rule
        .get_field_by_name("custom")
        .and_then(|v| v.as_message().cloned())
    {
        let kind = text(&custom, "kind");
        if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(format!("custom kind `{kind}` is not an HTTP method"));
        }
        return Ok((kind.to_ascii_uppercase(), text(&custom, "path")));
    }
    Err(format!(
        "`{HTTP_OPTION}` sets no pattern (get, put, post, delete, patch or custom)"
    ))
}

fn text(m: &DynamicMessage, field: &str) -> String {
    m.get_field_by_name(field)
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn binding(
    method: &MethodDescriptor,
    verb: &str,
    path: &str,
    body: &str,
    response_body: &str,
) -> Result<Binding, String> {
    let template = PathTemplate::parse(path)?;
    let input = method.input();
    let vars = template
        .vars
        .iter()
        .map(|v| path_field(&input, &v.field_path).map_err(|m| format!("`{path}`: {m}")))
        .collect::<Result<Vec<_>, _>>()?;
    let body = match body {
        "" if method.is_client_streaming() => {
            return Err(format!(
                "`{verb} {path}`: a client-streaming method takes its messages from the body (a JSON array): set `body`"
            ))
        }
        "" => BodyRule::None,
        "*" => BodyRule::Whole,
        f => BodyRule::Field(
            input
                .get_field_by_name(f)
                .ok_or_else(|| format!("body: `{f}` is not a field of `{}`", input.full_name()))?,
        ),
    };
    let output = method.output();
    let response_body = match response_body {
        "" => None,
        f => Some(output.get_field_by_name(f).ok_or_else(|| {
            format!(
                "response_body: `{f}` is not a field of `{}`",
                output.full_name()
            )
        })?),
    };
    Ok(Binding {
        http_method: verb.to_string(),
        text: path.to_string(),
        template,
        grpc_path: format!("/{}/{}", method.parent_service().full_name(), method.name()),
        input,
        output,
        server_streaming: method.is_server_streaming(),
        client_streaming: method.is_client_streaming(),
        body,
        vars,
        response_body,
    })
}

/// The fields a path names (`shelf.name`), each a singular field; the last one a value a
/// path segment can hold.
pub(super) fn path_field(
    msg: &MessageDescriptor,
    path: &[String],
) -> Result<Vec<FieldDescriptor>, String> {
    let mut out = Vec::with_capacity(path.len());
    let mut at = msg.clone();
    for (i, name) in path.iter().enumerate() {
        let field = at
            .get_field_by_name(name)
            .or_else(|| at.get_field_by_json_name(name))
            .ok_or_else(|| {
                format!(
                    "`{}` is not a field of `{}`",
                    path.join("."),
                    msg.full_name()
                )
            })?;
        let last = i + 1 == path.len();
        match (field.kind(), last) {
            (Kind::Message(m), false) if !field.is_list() && !field.is_map() => at = m,
            (_, false) => {
                return Err(format!(
                    "`{}`: `{name}` is not a singular message field",
                    path.join(".")
                ))
            }
            (_, true) if field.is_list() || field.is_map() => {
                return Err(format!(
                    "`{}` is repeated: a path segment holds one value",
                    path.join(".")
                ))
            }
            (Kind::Message(m), true) if !is_string_wkt(m.full_name()) => {
                return Err(format!(
                    "`{}` is a message (`{}`): a path segment holds a scalar",
                    path.join("."),
                    m.full_name()
                ))
            }
            _ => {}
        }
        out.push(field);
    }
    Ok(out)
}

/// Well-known types whose JSON form is a string or a scalar, which a path segment or a query
/// parameter can hold.
pub(super) fn is_string_wkt(name: &str) -> bool {
    matches!(
        name,
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::DESCRIPTOR_SET;
    use super::*;

    fn method(name: &str) -> MethodDescriptor {
        let pool = DescriptorPool::decode(DESCRIPTOR_SET).unwrap();
        let svc = pool.get_service_by_name("test.Echo").unwrap();
        let m = svc.methods().find(|m| m.name() == name).unwrap();
        m
    }

    #[test]
    fn path_variables_must_name_scalar_fields_of_the_input() {
        let m = method("Say");
        for (path, want) in [
            ("/v1/{nope}", "`nope` is not a field of `test.Item`"),
            ("/v1/{meta}", "`meta` is a message (`test.Meta`)"),
            ("/v1/{tags}", "`tags` is repeated"),
            ("/v1/{name.x}", "`name` is not a singular message field"),
            ("/v1/{meta.nope}", "`meta.nope` is not a field"),
        ] {
            let e = binding(&m, "GET", path, "", "").unwrap_err();
            assert!(e.contains(want), "{path}: {e}");
        }
        assert!(binding(&m, "GET", "/v1/{meta.author}/{created}/{count}", "", "").is_ok());
        let e = binding(&m, "POST", "/v1/x", "nope", "").unwrap_err();
        assert!(
            e.contains("body: `nope` is not a field of `test.Item`"),
            "{e}"
        );
        let e = binding(&m, "POST", "/v1/x", "*", "nope").unwrap_err();
        assert!(e.contains("response_body: `nope`"), "{e}");
    }

    #[test]
    fn client_streaming_methods_take_their_messages_from_the_body() {
        let m = method("Collect");
        let e = binding(&m, "POST", "/v1/x", "", "").unwrap_err();
        assert!(
            e.contains("`POST /v1/x`: a client-streaming method takes its messages from the body"),
            "{e}"
        );
        let b = binding(&m, "POST", "/v1/{name}", "meta", "").unwrap();
        assert!(b.client_streaming && matches!(b.body, BodyRule::Field(_)));
    }
}
