//! The table of valid and invalid requests (types, required, enums, formats, nested body
//! fields, extra query parameters) against one API written in both dialects, and the audit of
//! responses.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use serde_json::{json, Value};

use super::audit::Audit;
use super::problem::Problem;
use super::{CompiledSpec, ValidationMetrics};

const TENANT: &str = "6f1c1f5e-8d52-4a4e-9d2b-1f3c0f7a9b10";

/// The API, in OpenAPI 3.1 (`v31`) or 3.0 with the same meaning.
fn api(v31: bool) -> Value {
    let (note, qty) = match v31 {
        true => (
            json!({"type": ["string", "null"]}),
            json!({"type": "integer", "exclusiveMinimum": 0}),
        ),
        false => (
            json!({"type": "string", "nullable": true}),
            json!({"type": "integer", "minimum": 0, "exclusiveMinimum": true}),
        ),
    };
    let order_list = json!({"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}}}});
    json!({
        "openapi": if v31 { "3.1.0" } else { "3.0.3" },
        "info": {"title": "Orders", "version": "2"},
        "paths": {
            "/orders": {
                "get": {
                    "parameters": [
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": ["open", "closed"]}},
                        {"name": "tags", "in": "query", "schema": {"type": "array", "items": {"type": "string", "maxLength": 5}}},
                        {"$ref": "#/components/parameters/Tenant"}
                    ],
                    "responses": {"200": {"description": "ok", "content": order_list}}
                },
                "post": {
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NewOrder"}}}},
                    "responses": {"201": {"description": "created"}, "4XX": {"description": "refused"}}
                }
            },
            "/orders/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "format": "int32"}}],
                "get": {"responses": {
                    "200": {"description": "one", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}},
                    "default": {"description": "error", "content": {"application/problem+json": {"schema": {"type": "object"}}}}
                }}
            }
        },
        "components": {
            "parameters": {"Tenant": {"name": "X-Tenant", "in": "header", "required": true, "schema": {"type": "string", "format": "uuid"}}},
            "schemas": {
                "NewOrder": {"type": "object", "required": ["customer", "lines"], "properties": {
                    "customer": {"type": "string", "format": "email"},
                    "lines": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Line"}},
                    "note": note,
                    "when": {"type": "string", "format": "date-time"}
                }},
                "Line": {"type": "object", "required": ["sku", "qty"], "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"},
                    "qty": qty
                }},
                "Order": {"type": "object", "required": ["id", "status"], "properties": {
                    "id": {"type": "integer"}, "status": {"type": "string", "enum": ["open", "closed"]}
                }}
            }
        }
    })
}

/// The request checks in order, as `EdgeValidation::check` runs them (the body given whole).
fn check(
    spec: &CompiledSpec,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), Problem> {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let uri: Uri = uri.parse().unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    super::check_request(spec, &method, &uri, &h, body)
}

#[test]
fn a_table_of_valid_and_invalid_requests_in_both_dialects() {
    let t = &[("x-tenant", TENANT)][..];
    let json_ct = &[("content-type", "application/json; charset=utf-8")][..];
    let order = |lines: Value| json!({"customer": "ada@example.com", "lines": lines}).to_string();
    let good = order(json!([{"sku": "ABC-1", "qty": 2}]));
    // (method, uri, headers, body, status, reason, the failing field: "in name-or-pointer")
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [(&'a str, &'a str)],
        String,
        u16,
        &'a str,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("GET", "/orders?limit=10&status=open", t, String::new(), 200, "", ""),
        ("GET", "/orders?limit=10&utm_source=mail&x=1", t, String::new(), 200, "", ""),
        ("GET", "/orders?tags=a&tags=b", t, String::new(), 200, "", ""),
        ("GET", "/orders?tags=toolong", t, String::new(), 400, "query_param", "query tags"),
        ("GET", "/orders?limit=abc", t, String::new(), 400, "query_param", "query limit"),
        ("GET", "/orders?limit=0", t, String::new(), 400, "query_param", "query limit"),
        ("GET", "/orders?limit=2.5", t, String::new(), 400, "query_param", "query limit"),
        ("GET", "/orders?status=pending", t, String::new(), 400, "query_param", "query status"),
        ("GET", "/orders", &[], String::new(), 400, "header", "header x-tenant"),
        ("GET", "/orders", &[("x-tenant", "not-a-uuid")], String::new(), 400, "header", "header x-tenant"),
        ("GET", "/orders/42", &[], String::new(), 200, "", ""),
        ("GET", "/orders/abc", &[], String::new(), 400, "path_param", "path id"),
        ("GET", "/orders/99999999999", &[], String::new(), 400, "path_param", "path id"),
        ("POST", "/orders", json_ct, good.clone(), 200, "", ""),
        ("POST", "/orders", json_ct, json!({"customer": "ada@example.com", "lines": [{"sku": "ABC-1", "qty": 1}], "note": null, "when": "2026-12-03T20:00:00Z"}).to_string(), 200, "", ""),
        ("POST", "/orders", json_ct, json!({"customer": "ada@example.com"}).to_string(), 400, "body_schema", "body /lines"),
        ("POST", "/orders", json_ct, order(json!([])), 400, "body_schema", "body /lines"),
        ("POST", "/orders", json_ct, order(json!([{"sku": "ABC-1", "qty": 0}])), 400, "body_schema", "body /lines/0/qty"),
        ("POST", "/orders", json_ct, order(json!([{"sku": "ABC-1", "qty": "2"}])), 400, "body_schema", "body /lines/0/qty"),
        ("POST", "/orders", json_ct, order(json!([{"sku": "abc", "qty": 1}])), 400, "body_schema", "body /lines/0/sku"),
        ("POST", "/orders", json_ct, order(json!([{"qty": 1}])), 400, "body_schema", "body /lines/0/sku"),
        ("POST", "/orders", json_ct, json!({"customer": "nope", "lines": [{"sku": "ABC-1", "qty": 1}]}).to_string(), 400, "body_schema", "body /customer"),
        ("POST", "/orders", json_ct, json!({"customer": "ada@example.com", "lines": [{"sku": "ABC-1", "qty": 1}], "when": "yesterday"}).to_string(), 400, "body_schema", "body /when"),
        ("POST", "/orders", json_ct, json!({"customer": "ada@example.com", "lines": [{"sku": "ABC-1", "qty": 1}], "note": 5}).to_string(), 400, "body_schema", "body /note"),
        ("POST", "/orders", json_ct, "{\"customer\": ".to_string(), 400, "body_malformed", ""),
        ("POST", "/orders", json_ct, String::new(), 400, "body_missing", "body "),
        ("POST", "/orders", &[("content-type", "text/plain")], good.clone(), 415, "content_type", ""),
        ("POST", "/orders", &[], good.clone(), 415, "content_type", ""),
        ("DELETE", "/orders", &[], String::new(), 405, "unknown_operation", ""),
        ("HEAD", "/orders/42", &[], String::new(), 200, "", ""),
        ("HEAD", "/orders/abc", &[], String::new(), 400, "path_param", "path id"),
        ("GET", "/customers", &[], String::new(), 404, "unknown_operation", ""),
    ];
    for v31 in [true, false] {
        let spec = CompiledSpec::compile(&api(v31)).expect("compiles");
        assert_eq!(spec.operations, 3);
        for (method, uri, headers, body, status, reason, field) in &cases {
            let what = format!("3.{} {method} {uri} {body}", if v31 { 1 } else { 0 });
            match check(&spec, method, uri, headers, body.as_bytes()) {
                Ok(()) => assert_eq!(*status, 200, "{what}: accepted"),
                Err(p) => {
                    assert_eq!(p.status.as_u16(), *status, "{what}: {p:?}");
                    assert_eq!(p.reason, *reason, "{what}: {p:?}");
                    if !field.is_empty() {
                        let first = p.fields.first().expect("a field");
                        let got = format!("{} {}", first.location.as_str(), first.name);
                        assert_eq!(got, *field, "{what}: {p:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn problem_json_names_the_field_and_malformed_json_its_position() {
    let spec = CompiledSpec::compile(&api(true)).unwrap();
    let ct = &[("content-type", "application/json")][..];
    let body =
        json!({"customer": "ada@example.com", "lines": [{"sku": "ABC-1", "qty": 0}]}).to_string();
    let p = check(&spec, "POST", "/orders", ct, body.as_bytes()).unwrap_err();
    let resp = p.response();
    assert_eq!(resp.headers()["content-type"], "application/problem+json");
    let v = body_json(resp);
    assert_eq!(v["status"], 400);
    assert_eq!(
        v["type"],
        "https://trellis.dev/problems/validation/body-schema"
    );
    assert_eq!(v["in"], "body");
    assert_eq!(v["pointer"], "/lines/0/qty");
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .starts_with("body field `/lines/0/qty`: 0 is less than or equal to"),
        "{v}"
    );
    assert_eq!(v["errors"][0]["pointer"], "/lines/0/qty");

    let p = check(&spec, "POST", "/orders", ct, b"{\n  \"customer\": tru }").unwrap_err();
    assert!(p.detail.contains("line 2 column"), "{}", p.detail);
    let p = check(&spec, "POST", "/orders", ct, b"{\"customer\": ").unwrap_err();
    assert_eq!(
        p.detail,
        "the body is not valid JSON: EOF while parsing a value at line 1 column 13"
    );

    let p = check(
        &spec,
        "GET",
        "/orders?limit=abc",
        &[("x-tenant", TENANT)],
        b"",
    )
    .unwrap_err();
    let v = body_json(p.response());
    assert_eq!(
        (v["in"].as_str(), v["name"].as_str()),
        (Some("query"), Some("limit"))
    );
    assert!(
        v["detail"]
            .as_str()
            .unwrap()
            .contains("\"abc\" is not of type \"integer\""),
        "{v}"
    );
}

#[test]
fn hostile_bodies_are_refused_as_malformed() {
    let spec = CompiledSpec::compile(&api(true)).unwrap();
    let ct = &[("content-type", "application/json")][..];
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let p = check(&spec, "POST", "/orders", ct, deep.as_bytes()).unwrap_err();
    assert_eq!(p.reason, "body_malformed");
    assert!(
        p.detail.contains("recursion limit exceeded"),
        "{}",
        p.detail
    );
    let mut invalid_utf8 = b"{\"customer\": \"".to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, b'"', b'}']);
    let p = check(&spec, "POST", "/orders", ct, &invalid_utf8).unwrap_err();
    assert_eq!(p.reason, "body_malformed");
    assert_eq!(
        p.detail,
        "the body is not valid JSON: invalid unicode code point at line 1 column 15"
    );
}

#[test]
fn a_document_that_does_not_compile_says_where() {
    let mut doc = api(true);
    doc["components"]["schemas"]["Line"]["properties"]["sku"]["pattern"] = json!("(?<=x)y");
    let e = CompiledSpec::compile(&doc)
        .err()
        .expect("a lookbehind is not linear-time");
    assert!(
        e.to_string()
            .contains("/paths/~1orders/post/requestBody/content/application~1json/schema"),
        "{e}"
    );
    let mut doc = api(true);
    doc["components"]["schemas"]["Line"]["properties"]["qty"] = json!({"type": "nope"});
    assert!(CompiledSpec::compile(&doc).is_err());
}

#[test]
fn responses_are_audited_by_status_content_type_and_body() {
    let spec = Arc::new(CompiledSpec::compile(&api(true)).unwrap());
    let (op, _) = spec.operation(&Method::GET, "/orders/1").unwrap();
    let metrics = Arc::new(ValidationMetrics::default());
    let route = Arc::new("orders".to_string());
    let audit = || Audit {
        op: op.clone(),
        route: route.clone(),
        metrics: metrics.clone(),
        limit: 1024,
    };
    let resp = |status: u16, ct: &str| {
        Response::builder()
            .status(status)
            .header("content-type", ct)
            .body(())
            .unwrap()
    };
    let count = |reason: &'static str| {
        metrics
            .response_mismatches
            .get_or_create(&super::metrics::ReasonLabels {
                route: route.clone(),
                reason,
            })
            .get()
    };
    // A matching body, then one missing a required field and one with a wrong enum value.
    for (body, mismatches) in [
        (json!({"id": 1, "status": "open"}), 0),
        (json!({"id": 1}), 1),
        (json!({"id": 1, "status": "lost"}), 2),
    ] {
        let mut tap = audit()
            .start(&resp(200, "application/json"))
            .expect("a JSON body to check");
        tap.data(&Bytes::from(body.to_string()));
        tap.finish();
        assert_eq!(count("body_schema"), mismatches, "{body}");
    }
    // `default` covers other statuses; a content type it does not list is a mismatch.
    let mut tap = audit()
        .start(&resp(500, "application/problem+json"))
        .expect("+json");
    tap.data(&Bytes::from_static(b"{}"));
    tap.finish();
    assert_eq!((count("content_type"), count("body_schema")), (0, 2));
    assert!(audit().start(&resp(500, "text/html")).is_none());
    assert_eq!(count("content_type"), 1);
    // A body over the bound is given up, counted as unchecked, not as a mismatch.
    let mut tap = audit().start(&resp(200, "application/json")).unwrap();
    tap.data(&Bytes::from(vec![b' '; 2000]));
    tap.finish();
    let unchecked = metrics
        .response_unchecked
        .get_or_create(&super::metrics::ReasonLabels {
            route: route.clone(),
            reason: "too_large",
        })
        .get();
    assert_eq!((unchecked, count("body_schema")), (1, 2));
    // An undocumented status on an operation without `default`.
    let (post, _) = spec.operation(&Method::POST, "/orders").unwrap();
    let a = Audit {
        op: post.clone(),
        ..audit()
    };
    assert!(a.start(&resp(302, "text/plain")).is_none());
    assert_eq!(count("status"), 1);
}

fn body_json(resp: Response<crate::ResponseBody>) -> Value {
    let http_body_util::Either::Right(full) = resp.into_body() else {
        panic!("a local body");
    };
    let bytes = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(full))
        .unwrap()
        .unwrap()
        .to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

/// An API with `readOnly`/`writeOnly` properties, cookie parameters and object and delimited
/// query parameters.
fn users_api() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Users", "version": "1"},
        "paths": {"/users": {
            "post": {
                "parameters": [
                    {"name": "session", "in": "cookie", "required": true, "schema": {"type": "string", "pattern": "^[a-f0-9]{8}$"}},
                    {"name": "debug", "in": "cookie", "schema": {"type": "boolean"}}
                ],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/User"}}}},
                "responses": {"201": {"description": "created", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/User"}}}}}
            },
            "get": {
                "parameters": [
                    {"name": "filter", "in": "query", "style": "deepObject", "explode": true, "schema": {
                        "type": "object", "additionalProperties": false, "properties": {
                            "age": {"type": "integer", "minimum": 0}, "role": {"type": "string", "enum": ["admin", "user"]}}}},
                    {"name": "page", "in": "query", "schema": {"type": "object", "properties": {
                        "size": {"type": "integer", "maximum": 100}, "after": {"type": "string"}}}},
                    {"name": "fields", "in": "query", "style": "pipeDelimited", "explode": false, "schema": {
                        "type": "array", "items": {"type": "string", "enum": ["id", "name", "email"]}}},
                    {"name": "point", "in": "query", "explode": false, "schema": {
                        "type": "object", "required": ["x", "y"], "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}}
                ],
                "responses": {"200": {"description": "ok"}}
            }
        }},
        "components": {"schemas": {
            "Id": {"type": "integer", "readOnly": true},
            "User": {"type": "object", "required": ["id", "name", "password"], "properties": {
                "id": {"$ref": "#/components/schemas/Id"},
                "name": {"type": "string"},
                "password": {"type": "string", "minLength": 8, "writeOnly": true},
                "created": {"type": "string", "format": "date-time", "readOnly": true}
            }}
        }}
    })
}

#[test]
fn read_only_fields_cookies_and_object_query_parameters() {
    let spec = CompiledSpec::compile(&users_api()).expect("compiles");
    let user = |extra: Value| {
        let mut u = json!({"name": "ada", "password": "longenough"});
        u.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        u.to_string()
    };
    let ct = "application/json";
    // (method, uri, cookie, body, status, reason, the failing field)
    type Case<'a> = (&'a str, &'a str, &'a str, String, u16, &'a str, &'a str);
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        // `id` is required, but read-only: not in requests.
        ("POST", "/users", "session=deadbeef", user(json!({})), 200, "", ""),
        ("POST", "/users", "session=deadbeef", user(json!({"id": 5})), 400, "body_schema", "body /id"),
        ("POST", "/users", "session=deadbeef", user(json!({"created": "2026-12-03T20:00:00Z"})), 400, "body_schema", "body /created"),
        ("POST", "/users", "session=deadbeef", user(json!({"password": "short"})), 400, "body_schema", "body /password"),
        ("POST", "/users", "", user(json!({})), 400, "cookie_param", "cookie session"),
        ("POST", "/users", "theme=dark", user(json!({})), 400, "cookie_param", "cookie session"),
        ("POST", "/users", "session=NOTHEX!!", user(json!({})), 400, "cookie_param", "cookie session"),
        ("POST", "/users", "theme=dark; session=deadbeef; debug=true", user(json!({})), 200, "", ""),
        ("POST", "/users", "session=deadbeef; debug=yes", user(json!({})), 400, "cookie_param", "cookie debug"),
        ("GET", "/users?filter[age]=30&filter[role]=admin", "", String::new(), 200, "", ""),
        ("GET", "/users?filter%5Bage%5D=30", "", String::new(), 200, "", ""),
        ("GET", "/users?filter[age]=-1", "", String::new(), 400, "query_param", "query filter[age]"),
        ("GET", "/users?filter[age]=old", "", String::new(), 400, "query_param", "query filter[age]"),
        ("GET", "/users?filter[role]=root", "", String::new(), 400, "query_param", "query filter[role]"),
        ("GET", "/users?filter[color]=red", "", String::new(), 400, "query_param", "query filter"),
        ("GET", "/users?size=10&after=x7", "", String::new(), 200, "", ""),
        ("GET", "/users?size=500", "", String::new(), 400, "query_param", "query page"),
        ("GET", "/users?fields=id|name", "", String::new(), 200, "", ""),
        ("GET", "/users?fields=id|age", "", String::new(), 400, "query_param", "query fields"),
        ("GET", "/users?point=x,1.5,y,2", "", String::new(), 200, "", ""),
        ("GET", "/users?point=x,1.5", "", String::new(), 400, "query_param", "query point"),
        ("GET", "/users?point=x,a,y,2", "", String::new(), 400, "query_param", "query point"),
    ];
    for (method, uri, cookie, body, status, reason, field) in &cases {
        let what = format!("{method} {uri} cookie `{cookie}` {body}");
        let mut headers = vec![("content-type", ct)];
        if !cookie.is_empty() {
            headers.push(("cookie", *cookie));
        }
        match check(&spec, method, uri, &headers, body.as_bytes()) {
            Ok(()) => assert_eq!(*status, 200, "{what}: accepted"),
            Err(p) => {
                assert_eq!(
                    (p.status.as_u16(), p.reason),
                    (*status, *reason),
                    "{what}: {p:?}"
                );
                let first = p.fields.first().expect("a field");
                let got = format!("{} {}", first.location.as_str(), first.name);
                assert_eq!(got, *field, "{what}: {p:?}");
            }
        }
    }
    // The refusal of a read-only field says why.
    let p = check(
        &spec,
        "POST",
        "/users",
        &[("content-type", ct), ("cookie", "session=deadbeef")],
        user(json!({"id": 5})).as_bytes(),
    )
    .unwrap_err();
    assert_eq!(
        p.detail,
        "body field `/id`: is read-only: set by the server, it must not be sent"
    );
}

#[test]
fn write_only_fields_in_responses_are_flagged_by_the_audit() {
    let spec = Arc::new(CompiledSpec::compile(&users_api()).unwrap());
    let (op, _) = spec.operation(&Method::POST, "/users").unwrap();
    let metrics = Arc::new(ValidationMetrics::default());
    let route = Arc::new("users".to_string());
    let mismatches = || {
        metrics
            .response_mismatches
            .get_or_create(&super::metrics::ReasonLabels {
                route: route.clone(),
                reason: "body_schema",
            })
            .get()
    };
    // `password` is required, but write-only: not in responses; `id` (read-only) is.
    for (body, expected) in [
        (json!({"id": 1, "name": "ada"}), 0),
        (json!({"id": 1, "name": "ada", "password": "longenough"}), 1),
        (json!({"name": "ada"}), 2),
    ] {
        let audit = Audit {
            op: op.clone(),
            route: route.clone(),
            metrics: metrics.clone(),
            limit: 1024,
        };
        let resp = Response::builder()
            .status(201)
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let mut tap = audit.start(&resp).expect("a JSON body to check");
        tap.data(&Bytes::from(body.to_string()));
        tap.finish();
        assert_eq!(mismatches(), expected, "{body}");
    }
}
