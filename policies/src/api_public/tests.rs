use serde_json::json;

use super::*;

fn route(yaml: &str) -> HttpRouteSpec {
    serde_norway::from_str(yaml).expect("route")
}

fn orders_doc() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {"title": "Orders", "version": "1.2.0"},
        "paths": {
            "/orders": {
                "get": {"operationId": "listOrders", "responses": {"200": {"description": "ok",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Order"}}}}}},
                "post": {"operationId": "createOrder", "responses": {"201": {"description": "made"}}}
            },
            "/orders/{id}": {
                "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "get": {"operationId": "getOrder", "responses": {"200": {"description": "ok"}}}
            },
            "/internal/reindex": {
                "post": {"operationId": "reindex", "responses": {"204": {"description": "done"}}}
            }
        },
        "components": {"schemas": {"Order": {"type": "object"}}}
    })
}

fn gateway<'a>(auth: Vec<&'a AuthenticationSpec>) -> Gateway<'a> {
    Gateway {
        name: "edge",
        public_url: Some("https://api.example.com/"),
        auth,
    }
}

/// The orders document through `r` at gateway `edge`.
fn through(r: &HttpRouteSpec, auth: Vec<&AuthenticationSpec>) -> Vec<PublicApi> {
    let doc = orders_doc();
    public_apis(
        &gateway(auth),
        &[RouteInput { name: "r", spec: r }],
        &[SpecInput {
            service: "orders",
            version: "v1",
            doc: &doc,
        }],
    )
}

fn paths(api: &PublicApi) -> Vec<(String, Vec<String>)> {
    let paths = api.document["paths"].as_object().expect("paths");
    paths
        .iter()
        .map(|(p, item)| {
            let mut ops: Vec<String> = item
                .as_object()
                .expect("item")
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .cloned()
                .collect();
            ops.sort();
            (p.clone(), ops)
        })
        .collect()
}

#[test]
fn a_prefix_rewrite_is_put_back_and_unrouted_paths_stay_internal() {
    let r = route(
        "hosts: [api.example.com]\ngateways: [edge]\nrules:\n- matches: [{path: {prefix: /shop/v1}}]\n  rewrite: {path_prefix: /orders}\n  backends: [{service: orders}]\n",
    );
    let apis = through(&r, vec![]);
    assert_eq!(apis.len(), 1);
    assert_eq!(
        paths(&apis[0]),
        vec![
            (
                "/shop/v1".to_string(),
                vec!["get".to_string(), "post".to_string()]
            ),
            ("/shop/v1/{id}".to_string(), vec!["get".to_string()]),
        ]
    );
    assert_eq!(
        apis[0].document["servers"],
        json!([{"url": "https://api.example.com"}])
    );
    // The rest of the document is kept: info, components, parameters.
    assert_eq!(apis[0].document["info"]["title"], "Orders");
    assert!(apis[0].document["components"]["schemas"]["Order"].is_object());
    assert!(apis[0].document["paths"]["/shop/v1/{id}"]["parameters"].is_array());
}

#[test]
fn a_service_no_route_of_the_gateway_reaches_does_not_appear() {
    let mesh_only = route("hosts: [orders]\nrules:\n- backends: [{service: orders}]\n");
    let other_gateway = route(
        "hosts: [a.example]\ngateways: [partner-edge]\nrules:\n- backends: [{service: orders}]\n",
    );
    let doc = orders_doc();
    let apis = public_apis(
        &gateway(vec![]),
        &[
            RouteInput {
                name: "mesh",
                spec: &mesh_only,
            },
            RouteInput {
                name: "partner",
                spec: &other_gateway,
            },
        ],
        &[SpecInput {
            service: "orders",
            version: "v1",
            doc: &doc,
        }],
    );
    assert!(apis.is_empty(), "{apis:?}");
}

#[test]
fn method_and_exact_matches_limit_what_is_shown() {
    let r = route(
        "hosts: [api.example.com]\ngateways: [edge]\nrules:\n- matches: [{path: {exact: /orders}, method: GET}, {path: {exact: /checkout}, method: POST}]\n  backends: [{service: orders}]\n- matches: [{path: {exact: /buy}}]\n  rewrite: {path: /orders}\n  backends: [{service: orders}]\n",
    );
    let apis = through(&r, vec![]);
    assert_eq!(
        paths(&apis[0]),
        vec![
            (
                "/buy".to_string(),
                vec!["get".to_string(), "post".to_string()]
            ),
            ("/orders".to_string(), vec!["get".to_string()]),
        ],
        "/checkout is no path of the app; /internal/reindex is not routed"
    );
}

#[test]
fn regex_matches_and_redirects_are_reported_not_guessed() {
    let r = route(
        "hosts: [api.example.com]\ngateways: [edge]\nrules:\n- name: by-regex\n  matches: [{path: {regex: '/orders/[0-9]+'}}]\n  backends: [{service: orders}]\n",
    );
    let apis = through(&r, vec![]);
    assert_eq!(apis.len(), 1);
    assert!(paths(&apis[0]).is_empty());
    assert_eq!(apis[0].skipped.len(), 1);
    assert!(
        apis[0].skipped[0].contains("by-regex"),
        "{:?}",
        apis[0].skipped
    );
}

#[test]
fn the_gateway_credentials_become_security_schemes() {
    let keys: AuthenticationSpec =
        serde_norway::from_str("service: edge\napi_keys: {header: x-api-key}\n").expect("authn");
    let jwt: AuthenticationSpec = serde_norway::from_str(
        "service: edge\nrequired: false\njwt:\n  idp:\n    issuer: https://idp.example\n    jwks: {uri: https://idp.example/jwks}\n",
    )
    .expect("authn");
    let r = route(
        "hosts: [api.example.com]\ngateways: [edge]\nrules:\n- backends: [{service: orders}]\n",
    );
    let apis = through(&r, vec![&keys, &jwt]);
    let d = &apis[0].document;
    assert_eq!(
        d["components"]["securitySchemes"]["apiKey"],
        json!({"type": "apiKey", "in": "header", "name": "x-api-key"})
    );
    assert_eq!(
        d["components"]["securitySchemes"]["jwt"]["scheme"],
        "bearer"
    );
    // One of them, or none (the JWT policy does not require a credential).
    assert_eq!(d["security"], json!([{"apiKey": []}, {"jwt": []}, {}]));
    // Every routed path is public here, the internal one included: the route says so.
    assert!(d["paths"]["/internal/reindex"].is_object());
}

#[test]
fn public_paths_match_whole_segments() {
    let prefix = |p: &str| HttpRouteMatch {
        path: Some(crate::http_route::HttpPathMatch {
            prefix: Some(p.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let rw = |p: &str| Rewrite {
        path_prefix: Some(p.to_string()),
        ..Default::default()
    };
    assert_eq!(public_path("/orders", &prefix("/ord"), None), None);
    assert_eq!(
        public_path("/orders/1", &prefix("/orders/"), None).as_deref(),
        Some("/orders/1")
    );
    assert_eq!(
        public_path("/", &prefix("/api"), Some(&rw("/"))).as_deref(),
        Some("/api")
    );
    assert_eq!(
        public_path("/x/y", &prefix("/api"), Some(&rw("/"))).as_deref(),
        Some("/api/x/y")
    );
    assert_eq!(
        public_path("/v2/x", &prefix("/"), Some(&rw("/v2"))).as_deref(),
        Some("/x")
    );
    assert_eq!(
        public_path("/v2", &prefix("/"), Some(&rw("/v2"))).as_deref(),
        Some("/")
    );
    assert_eq!(public_path("/v20", &prefix("/"), Some(&rw("/v2"))), None);
}

#[test]
fn the_combined_document_keeps_each_service_apart() {
    let r = route(
        "hosts: [api.example.com]\ngateways: [edge]\nrules:\n- matches: [{path: {prefix: /orders}}]\n  backends: [{service: orders}]\n- matches: [{path: {prefix: /users}}]\n  backends: [{service: users}]\n",
    );
    let orders = orders_doc();
    let users = json!({
        "openapi": "3.1.0",
        "info": {"title": "Users", "version": "2"},
        "paths": {"/users": {"get": {"operationId": "listOrders", "security": [{"own": []}],
            "responses": {"200": {"description": "ok", "content": {"application/json":
            {"schema": {"$ref": "#/components/schemas/Order"}}}}}}}},
        "components": {"schemas": {"Order": {"type": "string"}}}
    });
    let gw = gateway(vec![]);
    let apis = public_apis(
        &gw,
        &[RouteInput {
            name: "r",
            spec: &r,
        }],
        &[
            SpecInput {
                service: "orders",
                version: "v1",
                doc: &orders,
            },
            SpecInput {
                service: "users",
                version: "v2",
                doc: &users,
            },
        ],
    );
    assert_eq!(apis.len(), 2);
    let (doc, skipped) = combined(&gw, "Example APIs", &apis);
    assert!(skipped.is_empty(), "{skipped:?}");
    let schemas = &doc["components"]["schemas"];
    assert_eq!(schemas["orders.Order"]["type"], "object");
    assert_eq!(schemas["users.Order"]["type"], "string");
    let users_get = &doc["paths"]["/users"]["get"];
    assert_eq!(users_get["operationId"], "users.listOrders");
    assert_eq!(
        users_get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/users.Order"
    );
    assert!(users_get.get("security").is_none());
    assert_eq!(
        doc["paths"]["/orders"]["get"]["operationId"],
        "orders.listOrders"
    );
    assert_eq!(doc["servers"], json!([{"url": "https://api.example.com"}]));
    assert!(doc["paths"].get("/internal/reindex").is_none());
    // What it produces is a document `api put` accepts.
    crate::api_spec::validate_document(&doc).expect("valid OpenAPI");
}
