//! Access control on the inbound sidecar, over real sidecars and mTLS: API keys of consumers
//! (valid, wrong, missing, revoked), JWT (valid, expired, wrong issuer, wrong audience, bad
//! signature) with claims forwarded to the app, authorization by identity, consumer, scope
//! and route in enforce and audit modes, the sidecar's deny default, and consumer quotas.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::Request;
use trellis_policies::MeshDocument;
use trellis_proxy::config::AuthzDefault;
use trellis_proxy::policy::access::key_digest;
use trellis_proxy::state::snapshot::Snapshot;
use trellis_tests::backend::Backend;
use trellis_tests::client::{self, metric};
use trellis_tests::{init_logs, Pki, Sidecar};

const KEY: &str = "tk_live_3b1f0c9e6d2a4f8b";
const SECRET: &[u8] = b"an-hs256-secret-of-32-bytes-long";
const ISSUER: &str = "https://idp.example";

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// An HS256 token signed with `secret`.
fn token(claims: serde_json::Value, secret: &[u8]) -> String {
    let header = b64(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#);
    let payload = b64(claims.to_string().as_bytes());
    let input = format!("{header}.{payload}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let sig = ring::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(sig.as_ref()))
}

fn claims(sub: &str) -> serde_json::Value {
    serde_json::json!({
        "iss": ISSUER, "sub": sub, "aud": "orders-api",
        "exp": now() + 300, "scope": "orders:read orders:write", "role": "admin",
    })
}

/// `orders` at `inbound` (retries off: every answer is the inbound's own) with `policies`
/// (a YAML mapping of MeshDocument fields: authentication, consumers, authorization).
fn snapshot(inbound: SocketAddr, policies: &str) -> Arc<Snapshot> {
    let mut doc: MeshDocument = serde_norway::from_str(policies).expect("policies YAML");
    doc.services
        .insert("orders".into(), trellis_tests::unretried_service(inbound));
    trellis_policies::validate(&doc).expect("valid policies");
    trellis_tests::snapshot_of(&doc)
}

struct Orders {
    _pki: Pki,
    backend: Backend,
    server: Sidecar,
    client: Sidecar,
    other: Sidecar,
}

impl Orders {
    async fn start(default: AuthzDefault) -> Self {
        init_logs();
        let pki = Pki::new(&["client", "other", "orders"]);
        let backend = Backend::start().await;
        let server = Sidecar::start(&pki, "orders", backend.addr, |c| {
            c.authorization.default = default;
        })
        .await;
        let client = Sidecar::start(&pki, "client", backend.addr, |_| {}).await;
        let other = Sidecar::start(&pki, "other", backend.addr, |_| {}).await;
        Self {
            _pki: pki,
            backend,
            server,
            client,
            other,
        }
    }

    async fn apply(&self, policies: &str) {
        let snap = snapshot(self.server.inbound(), policies);
        self.server.apply(snap.clone()).await;
        self.client.apply(snap.clone()).await;
        self.other.apply(snap).await;
    }

    async fn call(
        &self,
        via: &Sidecar,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> client::Reply {
        let c = client::h1(via.outbound());
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://orders{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        client::send(&c, req.body(client::empty()).expect("request"))
            .await
            .expect("reply")
    }

    async fn metrics(&self) -> String {
        client::admin(self.server.admin(), "/metrics").await.body
    }
}

fn www_authenticate(r: &client::Reply) -> &str {
    r.headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn consumers(disabled: bool, with_key: bool) -> String {
    let keys = if with_key {
        format!(
            "[{{id: ci-key, sha256: '{}'}}]",
            hex(&key_digest(KEY.as_bytes()))
        )
    } else {
        "[]".into()
    };
    format!(
        "consumers:\n  acme:\n    api_keys: {keys}\n    jwt_subjects: [{{issuer: '{ISSUER}', subject: alice}}]\n    disabled: {disabled}\n"
    )
}

const API_KEY_AUTHN: &str =
    "authentication:\n  orders-keys:\n    service: orders\n    api_keys: {header: x-api-key}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_valid_wrong_missing_and_revoked() {
    let m = Orders::start(AuthzDefault::Allow).await;
    m.apply(&format!("{API_KEY_AUTHN}{}", consumers(false, true)))
        .await;

    let missing = m.call(&m.client, "GET", "/echo", &[]).await;
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert_eq!(missing.cause(), "unauthenticated");
    assert_eq!(www_authenticate(&missing), "ApiKey realm=\"orders\"");
    // The body says nothing about why (no hint for guessing keys).
    assert_eq!(missing.body.trim(), "authentication required");

    let wrong = m
        .call(&m.client, "GET", "/echo", &[("x-api-key", "tk_live_guess")])
        .await;
    assert_eq!(wrong.status, 401);

    let ok = m
        .call(
            &m.client,
            "GET",
            "/echo",
            &[("x-api-key", KEY), ("trellis-consumer", "spoofed")],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let seen = ok.json();
    assert_eq!(seen["headers"]["trellis-consumer"], "acme");
    assert!(
        seen["headers"].get("x-api-key").is_none(),
        "the key reached the app: {seen}"
    );
    assert_eq!(
        m.backend
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "refused requests never reach the app"
    );

    // Revoked: the consumer disabled, then the key removed.
    m.apply(&format!("{API_KEY_AUTHN}{}", consumers(true, true)))
        .await;
    let disabled = m
        .call(&m.client, "GET", "/echo", &[("x-api-key", KEY)])
        .await;
    assert_eq!(disabled.status, 401);
    m.apply(&format!("{API_KEY_AUTHN}{}", consumers(false, false)))
        .await;
    let removed = m
        .call(&m.client, "GET", "/echo", &[("x-api-key", KEY)])
        .await;
    assert_eq!(removed.status, 401);
    assert_eq!(
        m.backend
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let text = m.metrics().await;
    let authn = |result: &str| {
        metric(
            &text,
            &format!("trellis_authentications_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(authn("missing_credentials"), 1.0, "{text}");
    assert_eq!(authn("invalid_api_key"), 2.0);
    assert_eq!(authn("consumer_disabled"), 1.0);
    assert_eq!(authn("ok"), 1.0);
    assert_eq!(
        metric(
            &text,
            "trellis_proxy_errors_total{direction=\"inbound\",cause=\"unauthenticated\"}"
        ),
        4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_valid_expired_wrong_issuer_audience_and_signature() {
    let m = Orders::start(AuthzDefault::Allow).await;
    let jwks = serde_json::json!({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": b64(SECRET)}]});
    m.apply(&format!(
        "authentication:\n  orders-jwt:\n    service: orders\n    jwt:\n      idp:\n        issuer: '{ISSUER}'\n        audiences: [orders-api]\n        jwks: {{inline: '{jwks}'}}\n        forward_claims: {{sub: x-user}}\n{}",
        consumers(false, true)
    ))
    .await;
    let bearer = |t: &str| format!("Bearer {t}");

    let ok = m
        .call(
            &m.client,
            "GET",
            "/echo",
            &[
                ("authorization", &bearer(&token(claims("alice"), SECRET))),
                ("x-user", "mallory"),
            ],
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let seen = ok.json();
    assert_eq!(
        seen["headers"]["x-user"], "alice",
        "claim forwarded, spoofed copy replaced"
    );
    assert_eq!(
        seen["headers"]["trellis-consumer"], "acme",
        "subject mapped to its consumer"
    );
    assert!(
        seen["headers"].get("authorization").is_none(),
        "the verified token is not forwarded unless the provider says forward_token"
    );

    let mut expired = claims("alice");
    expired["exp"] = (now() - 3600).into();
    let mut wrong_iss = claims("alice");
    wrong_iss["iss"] = "https://evil.example".into();
    let mut wrong_aud = claims("alice");
    wrong_aud["aud"] = "billing-api".into();
    let cases = [
        ("expired", token(expired, SECRET)),
        ("wrong_issuer", token(wrong_iss, SECRET)),
        ("wrong_audience", token(wrong_aud, SECRET)),
        (
            "bad_signature",
            token(claims("alice"), b"another-secret-of-32-bytes-long!"),
        ),
    ];
    for (reason, t) in &cases {
        let r = m
            .call(&m.client, "GET", "/echo", &[("authorization", &bearer(t))])
            .await;
        assert_eq!(r.status, 401, "{reason}");
        assert_eq!(
            www_authenticate(&r),
            "Bearer realm=\"orders\", error=\"invalid_token\"",
            "{reason}"
        );
    }
    let missing = m.call(&m.client, "GET", "/echo", &[]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(www_authenticate(&missing), "Bearer realm=\"orders\"");
    assert_eq!(
        m.backend
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let text = m.metrics().await;
    for (reason, _) in &cases {
        let provider = if *reason == "wrong_issuer" {
            "none"
        } else {
            "idp"
        };
        assert_eq!(
            metric(&text, &format!("trellis_jwt_authentications_total{{provider=\"{provider}\",result=\"{reason}\"}}")),
            1.0,
            "{reason}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_headers_are_stripped_on_every_path_and_tokens_forwarded_only_when_asked() {
    let m = Orders::start(AuthzDefault::Allow).await;
    let jwks = serde_json::json!({"keys": [{"kty": "oct", "kid": "k1", "alg": "HS256", "k": b64(SECRET)}]});
    // The JWT policy covers /echo/api only; payments' policy forwards another claim header.
    let policies = |forward_token: bool| {
        format!(
            "authentication:\n  orders-jwt:\n    service: orders\n    match: {{path: {{prefix: /echo/api}}}}\n    jwt:\n      idp:\n        issuer: '{ISSUER}'\n        jwks: {{inline: '{jwks}'}}\n        forward_claims: {{sub: x-user}}\n        forward_token: {forward_token}\n  payments-jwt:\n    service: payments\n    jwt:\n      idp:\n        issuer: '{ISSUER}'\n        jwks: {{inline: '{jwks}'}}\n        forward_claims: {{role: x-role}}\n"
        )
    };
    m.apply(&policies(false)).await;
    let spoofed = [("x-user", "admin"), ("x-role", "admin")];
    let r = m.call(&m.client, "GET", "/echo/public", &spoofed).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = r.json();
    assert!(
        seen["headers"].get("x-user").is_none() && seen["headers"].get("x-role").is_none(),
        "claim headers a caller wrote never reach the app: {seen}"
    );
    let bearer = format!("Bearer {}", token(claims("alice"), SECRET));
    let r = m
        .call(
            &m.client,
            "GET",
            "/echo/api",
            &[("authorization", &bearer), ("x-user", "admin")],
        )
        .await;
    let seen = r.json();
    assert_eq!(seen["headers"]["x-user"], "alice");
    assert!(seen["headers"].get("authorization").is_none());
    m.apply(&policies(true)).await;
    let r = m
        .call(&m.client, "GET", "/echo/api", &[("authorization", &bearer)])
        .await;
    assert_eq!(r.json()["headers"]["authorization"], bearer.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allow_deny_audit_and_scopes() {
    let m = Orders::start(AuthzDefault::Allow).await;
    let jwks = serde_json::json!({"keys": [{"kty": "oct", "kid": "k1", "k": b64(SECRET)}]});
    m.apply(&format!(
        r#"authentication:
  orders-jwt:
    service: orders
    required: false
    jwt:
      idp: {{issuer: '{ISSUER}', jwks: {{inline: '{jwks}'}}}}
authorization:
  allow-client:
    service: orders
    action: allow
    rules:
      - from: {{identities: ["{client}"]}}
        to: {{routes: [{{methods: [GET]}}]}}
      - from: {{scopes: ["orders:write"]}}
        to: {{routes: [{{methods: [POST]}}]}}
  deny-admin:
    service: orders
    action: deny
    rules:
      - to: {{routes: [{{path: {{prefix: /admin}}}}]}}
  audit-no-token:
    service: orders
    action: allow
    mode: audit
    rules:
      - from: {{claims: {{role: admin}}}}
"#,
        client = Pki::spiffe("client")
    ))
    .await;

    assert_eq!(m.call(&m.client, "GET", "/echo", &[]).await.status, 200);
    let denied = m.call(&m.other, "GET", "/echo", &[]).await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(denied.cause(), "denied");
    let admin = m.call(&m.client, "GET", "/admin/users", &[]).await;
    assert_eq!(admin.status, 403, "deny wins over a matching allow");
    // POST needs the scope, whoever calls.
    assert_eq!(m.call(&m.client, "POST", "/echo", &[]).await.status, 403);
    let t = format!("Bearer {}", token(claims("bob"), SECRET));
    assert_eq!(
        m.call(&m.other, "POST", "/echo", &[("authorization", &t)])
            .await
            .status,
        200
    );
    let mut read_only = claims("bob");
    read_only["scope"] = "orders:read".into();
    let t = format!("Bearer {}", token(read_only, SECRET));
    assert_eq!(
        m.call(&m.other, "POST", "/echo", &[("authorization", &t)])
            .await
            .status,
        403
    );

    let text = m.metrics().await;
    let authz = |policy: &str, decision: &str| {
        metric(
            &text,
            &format!("trellis_authorization_decisions_total{{policy=\"{policy}\",decision=\"{decision}\"}}"),
        )
    };
    assert_eq!(authz("allow-client", "denied"), 3.0, "{text}");
    assert_eq!(authz("deny-admin", "denied"), 1.0);
    // Audit mode allows only tokens with role=admin: the four tokenless requests (two GETs by
    // `client` incl. /admin, `other`'s GET, `client`'s POST) would be refused; the two
    // tokens carry the claim. Audit refuses nothing itself: the statuses above prove it.
    assert_eq!(authz("audit-no-token", "audit_denied"), 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_default_and_consumer_quota() {
    let m = Orders::start(AuthzDefault::Deny).await;
    m.apply("{}").await;
    let r = m.call(&m.client, "GET", "/echo", &[]).await;
    assert_eq!(r.status, 403, "deny by default with no allow policy");

    // A consumer known by its mesh identity, with a quota of 3 a minute.
    m.apply(&format!(
        r#"{API_KEY_AUTHN}    required: false
consumers:
  client-app:
    identities: ["{client}"]
    quota: {{limit: {{requests: 3, per: minute}}}}
authorization:
  consumers-only:
    service: orders
    action: allow
    rules: [{{from: {{consumers: [client-app]}}}}]
"#,
        client = Pki::spiffe("client")
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(m.call(&m.client, "GET", "/echo", &[]).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Another caller is no consumer: denied before any quota.
    assert_eq!(m.call(&m.other, "GET", "/echo", &[]).await.status, 403);
    let text = m.metrics().await;
    assert_eq!(
        metric(
            &text,
            "trellis_ratelimit_decisions_total{policy=\"quota.client-app.orders\",decision=\"limited\"}"
        ),
        2.0,
        "{text}"
    );

    // The usage report reads the same figures from the sidecar's admin port.
    let admin = m.server.admin().to_string();
    let report = mesh_agent::usage::report(&mesh_agent::usage::Source::Targets(vec![admin]), None)
        .await
        .expect("report");
    let row = &report.consumers["client-app @ orders"];
    assert_eq!((row.requests, row.refused, row.errors), (5.0, 2.0, 0.0));
    assert!(row.p99_ms.is_some_and(|p| p > 0.0 && p < 1000.0), "{row:?}");
    // 1 (deny default) + 5 + 1 (other) inbound requests, none failed by the service.
    assert_eq!(report.services["orders"].requests, 7.0);
    assert_eq!(report.services["orders"].availability, Some(1.0));
}
