//! Verification outcomes for each algorithm, with an inline JWKS (no I/O).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderMap, HeaderValue, Uri};
use serde_json::json;
use trellis_policies::{JwksSource, TokenSource};

use super::signer::{hs256_with_secret, jwks, Signer};
use super::{authenticator, claims, now, provider, AUDIENCE};
use crate::policy::auth::{AuthError, AuthMetrics, JwtAuthenticator, JwtError};

/// One signer of each algorithm, all published in one inline JWKS.
fn signers() -> Vec<Signer> {
    vec![
        Signer::rsa("rsa-1"),
        Signer::ec("ec-1"),
        Signer::ed("ed-1"),
        Signer::hmac("hs-1"),
    ]
}

fn inline_authenticator(signers: &[Signer]) -> JwtAuthenticator {
    let all: Vec<&Signer> = signers.iter().collect();
    authenticator(provider(JwksSource::Inline(jwks(&all))))
}

#[tokio::test]
async fn valid_tokens_verify_and_expose_their_claims() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    for s in &signers {
        let token = s.sign(&claims());
        let v = auth
            .authenticate(&token)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", s.alg));
        assert_eq!(&*v.provider, "main");
        assert_eq!(&*v.issuer, super::ISSUER);
        assert_eq!(v.subject.as_deref(), Some("alice"));
        assert_eq!(v.scopes, ["read", "write"]);
        assert_eq!(v.claims["tenant"], "acme");
        let headers: Vec<(&str, &str)> = v
            .forwarded_headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap_or("?")))
            .collect();
        assert_eq!(
            headers,
            [("x-user", "alice"), ("x-tenant", "acme")],
            "{}",
            s.alg
        );
    }
}

#[tokio::test]
async fn claims_that_are_not_ascii_are_not_forwarded() {
    // Fuzzing regression: a non-ASCII claim value went out as raw UTF-8 in a header.
    let signers = signers();
    let auth = inline_authenticator(&signers);
    let mut c = claims();
    c["tenant"] = json!("acm\u{4fc}e");
    c["sub"] = json!({"name": "\u{e9}"});
    let v = auth
        .authenticate(&signers[3].sign(&c))
        .await
        .expect("valid token");
    assert!(v.forwarded_headers.is_empty(), "{:?}", v.forwarded_headers);
    let mut c = claims();
    c["tenant"] = json!("ctl\u{1}");
    let v = auth
        .authenticate(&signers[3].sign(&c))
        .await
        .expect("valid token");
    let names: Vec<&str> = v
        .forwarded_headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, ["x-user"]);
}

#[tokio::test]
async fn time_claims_are_checked_with_clock_skew() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    for s in &signers {
        let mut c = claims();
        c["exp"] = json!(now() - 120);
        assert_eq!(
            auth.authenticate(&s.sign(&c)).await,
            Err(JwtError::Expired),
            "{}",
            s.alg
        );

        // Expired 30 s ago: within the 60 s skew.
        c["exp"] = json!(now() - 30);
        assert!(auth.authenticate(&s.sign(&c)).await.is_ok(), "{}", s.alg);

        let mut c = claims();
        c["nbf"] = json!(now() + 300);
        let r = auth.authenticate(&s.sign(&c)).await;
        assert_eq!(r, Err(JwtError::NotYetValid), "{}", s.alg);
        c["nbf"] = json!(now() + 30);
        assert!(auth.authenticate(&s.sign(&c)).await.is_ok(), "{}", s.alg);

        let mut c = claims();
        c.as_object_mut().map(|m| m.remove("exp"));
        let r = auth.authenticate(&s.sign(&c)).await;
        assert_eq!(r.map_err(|e| e.reason()), Err("malformed"), "{}", s.alg);
    }
}

#[tokio::test]
async fn issuer_and_audience_must_match() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    for s in &signers {
        let mut c = claims();
        c["iss"] = json!("https://evil.test");
        let r = auth.authenticate(&s.sign(&c)).await;
        assert_eq!(r, Err(JwtError::WrongIssuer), "{}", s.alg);

        let mut c = claims();
        c["aud"] = json!("payments");
        let r = auth.authenticate(&s.sign(&c)).await;
        assert_eq!(r, Err(JwtError::WrongAudience), "{}", s.alg);
        c["aud"] = json!(["payments", AUDIENCE]);
        assert!(auth.authenticate(&s.sign(&c)).await.is_ok(), "{}", s.alg);
        c.as_object_mut().map(|m| m.remove("aud"));
        let r = auth.authenticate(&s.sign(&c)).await;
        assert_eq!(r, Err(JwtError::WrongAudience), "{}", s.alg);
    }
}

#[tokio::test]
async fn bad_signatures_are_refused() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    for s in &signers {
        // Same kid and algorithm, another private key (there is one RSA fixture key: the
        // corrupted and swapped signatures below cover RS256).
        let impostor = match s.alg {
            "ES256" => Some(Signer::ec(&s.kid)),
            "EdDSA" => Some(Signer::ed(&s.kid)),
            "HS256" => Some(Signer::hmac(&s.kid)),
            _ => None,
        };
        if let Some(impostor) = impostor {
            let r = auth.authenticate(&impostor.sign(&claims())).await;
            assert_eq!(r, Err(JwtError::BadSignature), "{}", s.alg);
        }
        // One signature byte changed.
        let token = s.sign(&claims());
        let (message, sig) = token.rsplit_once('.').expect("three parts");
        let mut sig = URL_SAFE_NO_PAD.decode(sig).expect("base64url");
        sig[0] ^= 1;
        let corrupted = format!("{message}.{}", URL_SAFE_NO_PAD.encode(&sig));
        let r = auth.authenticate(&corrupted).await;
        assert_eq!(r, Err(JwtError::BadSignature), "{}", s.alg);
        // A valid token with its payload changed (here: a later exp) fails, for every alg.
        let token = s.sign(&claims());
        let mut parts: Vec<&str> = token.split('.').collect();
        let mut c = claims();
        c["exp"] = json!(now() + 86_400);
        let forged = URL_SAFE_NO_PAD.encode(c.to_string());
        parts[1] = &forged;
        let r = auth.authenticate(&parts.join(".")).await;
        assert_eq!(r, Err(JwtError::BadSignature), "{}", s.alg);
        // An expired forgery is still a bad signature: claims are trusted only once signed.
        c["exp"] = json!(now() - 3600);
        let forged = URL_SAFE_NO_PAD.encode(c.to_string());
        parts[1] = &forged;
        let r = auth.authenticate(&parts.join(".")).await;
        assert_eq!(r, Err(JwtError::BadSignature), "{}", s.alg);
    }
}

#[tokio::test]
async fn alg_none_and_unknown_algorithms_are_refused() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    for s in &signers {
        let token = s.sign(&claims());
        let (_, rest) = token.split_once('.').expect("three parts");
        let (payload, _) = rest.split_once('.').expect("three parts");
        for alg in ["none", "None", "RS384", "PS256", "HS512", "ES384"] {
            let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": s.kid}).to_string());
            for sig in ["", "AAAA"] {
                let r = auth
                    .authenticate(&format!("{header}.{payload}.{sig}"))
                    .await;
                assert_eq!(r, Err(JwtError::UnsupportedAlg), "{} as {alg}", s.alg);
            }
        }
    }
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    let rsa = &signers[0];
    // The classic attack: HS256 keyed with the RSA public key's bytes, naming the RSA key.
    let jwk = rsa.jwk();
    let n = URL_SAFE_NO_PAD
        .decode(jwk["n"].as_str().expect("n"))
        .expect("n is base64url");
    let header = json!({"alg": "HS256", "kid": rsa.kid});
    for secret in [n.clone(), jwk.to_string().into_bytes()] {
        let r = auth
            .authenticate(&hs256_with_secret(&secret, &header, &claims()))
            .await;
        assert_eq!(r, Err(JwtError::UnsupportedAlg));
    }
    // Without a kid: the HS256 key in the set is tried, never the RSA key.
    let header = json!({"alg": "HS256"});
    let r = auth
        .authenticate(&hs256_with_secret(&n, &header, &claims()))
        .await;
    assert_eq!(r, Err(JwtError::BadSignature));
    // Each asymmetric key refuses every other algorithm.
    for s in &signers[1..] {
        let header = json!({"alg": "HS256", "kid": s.kid});
        let secret = s.jwk()["x"]
            .as_str()
            .unwrap_or_default()
            .as_bytes()
            .to_vec();
        let r = auth
            .authenticate(&hs256_with_secret(&secret, &header, &claims()))
            .await;
        let expected = if s.alg == "HS256" {
            JwtError::BadSignature
        } else {
            JwtError::UnsupportedAlg
        };
        assert_eq!(r, Err(expected), "{}", s.alg);
        // An RS256 token naming this key.
        let header = json!({"alg": "RS256", "kid": s.kid});
        let r = auth
            .authenticate(&rsa.sign_with_header(&header, &claims()))
            .await;
        assert_eq!(r, Err(JwtError::UnsupportedAlg), "{}", s.alg);
    }
    // A set with asymmetric keys only: an HS256 token without kid finds no key of its kind.
    let only_rsa = authenticator(provider(JwksSource::Inline(jwks(&[rsa]))));
    let r = only_rsa
        .authenticate(&hs256_with_secret(&n, &json!({"alg": "HS256"}), &claims()))
        .await;
    assert_eq!(r, Err(JwtError::UnsupportedAlg));
}

#[tokio::test]
async fn unknown_kid_is_refused() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    for s in &signers {
        let header = json!({"alg": s.alg, "kid": "rotated-away"});
        let r = auth
            .authenticate(&s.sign_with_header(&header, &claims()))
            .await;
        assert_eq!(r, Err(JwtError::UnknownKid), "{}", s.alg);
        // Without a kid, the keys of the token's algorithm are tried.
        let header = json!({"alg": s.alg});
        assert!(
            auth.authenticate(&s.sign_with_header(&header, &claims()))
                .await
                .is_ok(),
            "{}",
            s.alg
        );
    }
}

#[tokio::test]
async fn malformed_tokens_are_refused() {
    let signers = signers();
    let auth = inline_authenticator(&signers);
    let good = signers[3].sign(&claims());
    let crit = signers[3].sign_with_header(
        &json!({"alg": "HS256", "kid": "hs-1", "crit": ["b64"], "b64": false}),
        &claims(),
    );
    for token in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.e30.AAAA",
        &format!("{good}.extra"),
        &"a".repeat(super::super::MAX_TOKEN_LEN + 1),
        &crit,
    ] {
        let r = auth.authenticate(token).await;
        assert_eq!(r.map_err(|e| e.reason()), Err("malformed"), "{token:.40}");
    }
}

#[test]
fn token_is_taken_from_the_configured_place() {
    let hs = Signer::hmac("hs-1");
    let mut spec = provider(JwksSource::Inline(jwks(&[&hs])));
    let auth = authenticator(spec.clone());
    let uri: Uri = "/orders?access_token=q.q.q".parse().expect("uri");
    let mut h = HeaderMap::new();
    assert_eq!(auth.token_from(&h, &uri), None);
    h.insert("authorization", HeaderValue::from_static("bearer  a.b.c "));
    assert_eq!(auth.token_from(&h, &uri), Some("a.b.c"));
    h.insert(
        "authorization",
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert_eq!(auth.token_from(&h, &uri), None);

    spec.from = TokenSource::Query {
        name: "access_token".into(),
    };
    let auth = authenticator(spec.clone());
    assert_eq!(auth.token_from(&h, &uri), Some("q.q.q"));
    let other: Uri = "/orders?access_token_x=1&x=access_token=2"
        .parse()
        .expect("uri");
    assert_eq!(auth.token_from(&h, &other), None);

    spec.from = TokenSource::Header {
        name: "x-token".into(),
        prefix: String::new(),
    };
    let auth = authenticator(spec);
    h.insert("x-token", HeaderValue::from_static("h.h.h"));
    assert_eq!(auth.token_from(&h, &uri), Some("h.h.h"));
    let names: Vec<&str> = auth.forwarded_header_names().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-user", "x-tenant"]);
}

#[test]
fn providers_are_validated_and_issuers_distinct() {
    let hs = Signer::hmac("hs-1");
    let spec = provider(JwksSource::Inline(jwks(&[&hs])));
    let m = AuthMetrics::default();
    let dup = JwtAuthenticator::new(
        vec![("a".into(), spec.clone()), ("b".into(), spec.clone())],
        &m,
    );
    assert!(matches!(dup, Err(AuthError::DuplicateIssuer { .. })));
    let mut bad = spec.clone();
    bad.clock_skew = std::time::Duration::from_secs(3600);
    let err = JwtAuthenticator::new(vec![("a".into(), bad)], &m)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("clock_skew"), "{err}");
    let weak = Signer::hmac_with("short", vec![1; 8]);
    let err = JwtAuthenticator::new(
        vec![("a".into(), provider(JwksSource::Inline(jwks(&[&weak]))))],
        &m,
    )
    .err()
    .expect("no usable key");
    assert!(err.to_string().contains("no usable signing key"), "{err}");
}

#[tokio::test]
async fn verdicts_are_counted_per_provider_and_reason() {
    let hs = Signer::hmac("hs-1");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = AuthMetrics::register(&mut registry);
    let spec = provider(JwksSource::Inline(jwks(&[&hs])));
    let auth = JwtAuthenticator::new(vec![("main".into(), spec)], &metrics).expect("valid");
    assert!(auth.authenticate(&hs.sign(&claims())).await.is_ok());
    let mut c = claims();
    c["exp"] = json!(0);
    assert!(auth.authenticate(&hs.sign(&c)).await.is_err());
    assert!(auth.authenticate("garbage").await.is_err());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    for line in [
        r#"jwt_authentications_total{provider="main",result="ok"} 1"#,
        r#"jwt_authentications_total{provider="main",result="expired"} 1"#,
        r#"jwt_authentications_total{provider="none",result="malformed"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    let status = auth.status();
    assert_eq!(status[0].source, "inline");
    assert_eq!(status[0].keys, ["hs-1 (HS256)"]);
}

#[test]
fn authenticator_and_its_future_can_cross_threads() {
    fn assert_send_sync<T: Send + Sync>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}
    let hs = Signer::hmac("hs-1");
    let auth = authenticator(provider(JwksSource::Inline(jwks(&[&hs]))));
    assert_send_sync(&auth);
    let fut = auth.authenticate("a.b.c");
    assert_send(&fut);
}

#[tokio::test]
async fn verified_tokens_are_cached_until_they_expire() {
    let signer = Signer::ec("ec-1");
    let mut spec = provider(JwksSource::Inline(jwks(&[&signer])));
    spec.clock_skew = std::time::Duration::ZERO;
    let auth = authenticator(spec);
    let token = signer.sign(&claims());
    let first = auth.authenticate(&token).await.expect("valid");
    assert_eq!(auth.cached_tokens(), 1);
    // The same bytes hit the cache and give the same verdict.
    assert_eq!(auth.authenticate(&token).await.expect("cached"), first);
    assert_eq!(auth.cached_tokens(), 1);
    // A forged token never matches a cached one: the key is the whole token.
    let mut forged = token.clone();
    forged.push('A');
    assert!(auth.authenticate(&forged).await.is_err());
    // An entry ends with its token: 1 s left, no skew.
    let mut short = claims();
    short["exp"] = (now() + 1).into();
    let short = signer.sign(&short);
    auth.authenticate(&short).await.expect("valid for 1 s");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(auth.authenticate(&short).await, Err(JwtError::Expired));
}
