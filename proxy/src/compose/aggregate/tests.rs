use std::sync::Mutex;

use http_body_util::BodyExt;

use super::*;

fn aggregate(yaml: &str) -> Aggregate {
    let spec: AggregateSpec = serde_norway::from_str(yaml).expect("spec");
    spec.validate().expect("valid");
    Aggregate::compile(&spec).expect("compiles")
}

async fn body(resp: Response<ResponseBody>) -> Value {
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).expect("JSON")
}

const PROFILE: &str = r#"
params: /profile/{id}
calls:
  - {name: user, service: users, path: "/users/{id}"}
  - {name: recs, service: recs, path: "/recs/{id}?n={query.n}", required: false}
  - {name: team, service: teams, path: "/teams/{user.team.id}"}
"#;

#[tokio::test]
async fn calls_run_in_parallel_and_after_the_answers_they_name() {
    let a = aggregate(PROFILE);
    let inputs = a.inputs("/profile/a%20b", Some("n=5&x=1")).expect("fits");
    let log = Mutex::new(Vec::new());
    let resp = a
        .run(&inputs, |c, path| {
            log.lock().unwrap().push(path.clone());
            let name = c.name.clone();
            async move {
                match &*name {
                    "user" => Ok(serde_json::json!({"team": {"id": 7}, "name": "ana"})),
                    "recs" => Ok(serde_json::json!([1, 2])),
                    _ => Ok(serde_json::json!({"team": path})),
                }
            }
        })
        .await
        .expect("answers");
    assert!(resp.headers().get(PARTIAL_HEADER).is_none());
    let v = body(resp).await;
    assert_eq!(v["user"]["name"], "ana");
    assert_eq!(v["recs"], serde_json::json!([1, 2]));
    assert_eq!(v["team"]["team"], "/teams/7");
    // The first two left together; the third once `user` answered. The path parameter was
    // decoded, then encoded again.
    let log = log.into_inner().unwrap();
    assert_eq!(log[..2], ["/users/a%20b", "/recs/a%20b?n=5"]);
    assert_eq!(log[2], "/teams/7");
}

#[tokio::test]
async fn a_failed_optional_call_makes_a_partial_answer_and_a_required_one_fails_it() {
    let a = aggregate(PROFILE);
    let inputs = a.inputs("/profile/1", Some("n=1")).unwrap();
    let fail = |status: u16, cause: &'static str| Failure {
        status: StatusCode::from_u16(status).unwrap(),
        cause,
        message: "no".into(),
    };
    let resp = a
        .run(&inputs, |c, _| {
            let name = c.name.clone();
            async move {
                match &*name {
                    "recs" => Err(fail(504, "response-timeout")),
                    _ => Ok(serde_json::json!({"team": {"id": "x"}})),
                }
            }
        })
        .await
        .unwrap();
    assert_eq!(resp.headers()[PARTIAL_HEADER], "recs");
    let v = body(resp).await;
    assert_eq!(
        v["_partial"],
        serde_json::json!({"recs": "response-timeout"})
    );

    // `user` fails: `team` (which needs its answer) is never sent, the request fails with
    // the upstream's status and cause.
    let sent = Mutex::new(Vec::new());
    let e = a
        .run(&inputs, |c, _| {
            sent.lock().unwrap().push(c.name.to_string());
            let name = c.name.clone();
            async move {
                match &*name {
                    "user" => Err(fail(404, "upstream-status")),
                    _ => Ok(serde_json::json!({})),
                }
            }
        })
        .await
        .err()
        .expect("fails");
    assert_eq!(e.status(), StatusCode::NOT_FOUND);
    assert_eq!(e.cause(), "upstream-status");
    assert!(e.to_string().contains("call `user` to `users`"), "{e}");
    assert!(!sent.into_inner().unwrap().contains(&"team".to_string()));

    // A missing query parameter fails the (optional) call that needs it, not the request.
    let inputs = a.inputs("/profile/1", None).unwrap();
    let resp = a
        .run(&inputs, |_, _| async {
            Ok(serde_json::json!({"team": {"id": 1}}))
        })
        .await
        .unwrap();
    assert_eq!(body(resp).await["_partial"]["recs"], "bad-request");
}

#[tokio::test]
async fn top_level_merges_objects_and_a_missing_field_fails_the_dependent() {
    let a = aggregate(
        r#"
merge: top_level
calls:
  - {name: a, service: a, path: /a}
  - {name: b, service: b, path: /b}
  - {name: c, service: c, path: "/c/{a.ref}", required: false}
"#,
    );
    let inputs = a.inputs("/anything", None).unwrap();
    let resp = a
        .run(&inputs, |c, _| {
            let name = c.name.clone();
            async move {
                match &*name {
                    "a" => Ok(serde_json::json!({"x": 1, "y": 1, "ref": {"nested": true}})),
                    _ => Ok(serde_json::json!({"y": 2})),
                }
            }
        })
        .await
        .unwrap();
    let v = body(resp).await;
    assert_eq!(v["x"], 1);
    assert_eq!(v["y"], 2, "later calls win");
    assert_eq!(v["_partial"]["c"], "aggregate-missing-field");
}

#[test]
fn paths_must_fit_the_params_and_values_stay_in_their_segment() {
    let a = aggregate(PROFILE);
    for bad in [
        "/profile",
        "/profile/",
        "/profile/1/x",
        "/other/1",
        "/profile/%ff",
    ] {
        let e = a.inputs(bad, None).err().expect(bad);
        assert_eq!(e.status(), StatusCode::NOT_FOUND, "{bad}");
    }
    let mut out = String::new();
    push_value(&mut out, "a/b?c=d#e").unwrap();
    assert_eq!(out, "a%2Fb%3Fc%3Dd%23e");
    assert!(push_value(&mut String::new(), "..").is_err());
    assert_eq!(
        query_value(Some("a=1&q=x+y%2F"), "q").as_deref(),
        Some("x y/")
    );
    assert_eq!(query_value(Some("a=1"), "q"), None);
}

#[tokio::test]
async fn call_bodies_are_built_from_the_public_body_before_any_call() {
    let a = aggregate(
        r#"
calls:
  - {name: order, service: orders, path: /orders, method: POST, body: {pointer: /order}}
  - {name: bill, service: billing, path: /bills, method: PUT, body: {transform: {jq: '{total: (.order.items | map(.price) | add), who: .customer}'}}}
  - {name: audit, service: audit, path: /audit, method: POST, body: {whole: true}}
  - {name: user, service: users, path: /users/1}
"#,
    );
    assert!(a.reads_body());
    assert_eq!(a.calls[1].method, http::Method::PUT);
    let public = r#"{"order": {"items": [{"price": 2}, {"price": 3}]}, "customer": "ana"}"#;
    let bodies = a.call_bodies(Bytes::from(public)).await.expect("built");
    let json = |i: usize| -> Value {
        serde_json::from_slice(bodies[i].as_ref().expect("a body")).unwrap()
    };
    assert_eq!(
        json(0),
        serde_json::json!({"items": [{"price": 2}, {"price": 3}]})
    );
    assert_eq!(json(1), serde_json::json!({"total": 5, "who": "ana"}));
    assert_eq!(bodies[2].as_deref(), Some(public.as_bytes()));
    assert!(bodies[3].is_none());

    // The client's body at fault: 400, whatever the call.
    for (body, cause, detail) in [
        ("{\"order\": ", "bad-json-body", "not JSON"),
        ("", "bad-json-body", "not JSON"),
        ("{\"order\": \"\u{0}\"}", "bad-json-body", "not JSON"),
        (
            r#"{"customer": "ana"}"#,
            "bad-json-body",
            "call `order`: the request body has nothing at `/order`",
        ),
        (
            r#"{"order": {"items": 3}}"#,
            "bad-json-body",
            "cannot be transformed",
        ),
    ] {
        let e = a.call_bodies(Bytes::from(body)).await.expect_err(body);
        assert_eq!(
            (e.status().as_u16(), e.cause()),
            (400, cause),
            "{body}: {e}"
        );
        assert!(e.to_string().contains(detail), "{body}: {e}");
    }
}
