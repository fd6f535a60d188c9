//! Accounts: sign-up (with an invite, or awaiting an operator's approval), sign-in with an
//! Argon2id-hashed password, sessions, and the checks every state-changing request passes
//! (origin, session, CSRF token).

use std::time::Instant;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{OnceCell, Semaphore};
use trellis_proxy::listeners::ingress::portal::{AppRequest, PortalDocs};

use super::session::{self, Session, Sessions};
use super::store::{now, Account, AccountState, Store, StoreError};
use super::throttle::Throttle;
use super::{
    body, error, json_response, refuse, too_many, PortalMetrics, Refusal, Relay, Settings,
};

/// Argon2 runs at most this many at once: each takes ~19 MiB and tens of milliseconds.
const HASHING: usize = 2;
pub const MIN_PASSWORD: usize = 10;
pub const MAX_PASSWORD: usize = 256;

pub(crate) struct Inner {
    pub store: Store,
    sessions: OnceCell<Sessions>,
    throttle: Throttle,
    hashing: Semaphore,
    pub docs: PortalDocs,
    pub relay: Relay,
    host: String,
    open_signup: bool,
    /// This gateway's service name and public URL: the public view's.
    pub gateway: String,
    pub public_url: Option<String>,
    pub metrics: PortalMetrics,
    /// Verified against when the account does not exist, so that a wrong email takes as
    /// long as a wrong password (no account discovery by timing).
    decoy: OnceCell<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    email: String,
    password: String,
    #[serde(default)]
    invite: Option<String>,
}

// === impl Inner ===

impl Inner {
    pub fn new(s: Settings) -> Self {
        Self {
            store: Store::new(s.etcd),
            sessions: OnceCell::new(),
            throttle: Throttle::default(),
            hashing: Semaphore::new(HASHING),
            docs: s.docs,
            relay: Relay {
                listener: s.ingress,
                certificates: s.certificates,
            },
            host: s.portal.host.to_ascii_lowercase(),
            open_signup: s.portal.open_signup,
            gateway: s.gateway,
            public_url: s.portal.public_url.clone(),
            metrics: s.metrics,
            decoy: OnceCell::new(),
        }
    }

    async fn sessions(&self) -> Result<&Sessions, Refusal> {
        self.sessions
            .get_or_try_init(|| async { self.store.secret().await.map(|s| Sessions::new(&s)) })
            .await
            .map_err(|e| Box::new(unavailable(&e)))
    }

    /// A state-changing request from a page must come from the portal's own origin (when the
    /// browser names one; other clients have no cookie to abuse).
    pub fn check_origin(&self, req: &AppRequest) -> Result<(), Refusal> {
        let Some(origin) = req.headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let host = origin
            .to_str()
            .ok()
            .and_then(|o| {
                o.strip_prefix("https://")
                    .or_else(|| o.strip_prefix("http://"))
            })
            .map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h));
        match host {
            Some(h) if h.eq_ignore_ascii_case(&self.host) => Ok(()),
            _ => {
                self.metrics.refused("origin");
                Err(refuse(
                    StatusCode::FORBIDDEN,
                    "cross-origin request refused",
                ))
            }
        }
    }

    /// The signed-in account; with `csrf`, the request must also carry the session's token.
    pub async fn account(
        &self,
        req: &AppRequest,
        csrf: bool,
    ) -> Result<(Session, Account), Refusal> {
        let sessions = self.sessions().await?;
        let Some(cookie) = session::cookie_value(&req.headers) else {
            return Err(refuse(StatusCode::UNAUTHORIZED, "sign in first"));
        };
        // A cookie that is not a session of ours: forged, altered, expired, another mesh's.
        let session = sessions.verify(cookie, now()).ok_or_else(|| {
            self.metrics.refused("session");
            error(StatusCode::UNAUTHORIZED, "sign in again")
        })?;
        if csrf {
            let token = req
                .headers
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !sessions.check_csrf(&session, token) {
                self.metrics.refused("csrf");
                return Err(refuse(StatusCode::FORBIDDEN, "missing or wrong CSRF token"));
            }
        }
        match self.store.account(&session.a).await {
            Ok(Some((a, _))) if a.state == AccountState::Active && session.g == a.generation => {
                Ok((session, a))
            }
            Ok(_) => {
                self.metrics.refused("session");
                Err(refuse(
                    StatusCode::UNAUTHORIZED,
                    "this account cannot sign in",
                ))
            }
            Err(e) => Err(Box::new(unavailable(&e))),
        }
    }

    pub async fn me(&self, req: &AppRequest) -> Response<Bytes> {
        let (session, account) = match self.account(req, false).await {
            Ok(x) => x,
            Err(resp) => return *resp,
        };
        let csrf = match self.sessions().await {
            Ok(s) => s.csrf(&session),
            Err(resp) => return *resp,
        };
        json_response(
            StatusCode::OK,
            &json!({"email": account.email, "consumer": account.consumer, "csrf": csrf}),
        )
    }

    pub async fn signup(&self, req: &AppRequest) -> Response<Bytes> {
        if let Err(wait) = self.throttle.attempt(req.peer.ip(), Instant::now()) {
            self.metrics.refused("throttled");
            return too_many(wait);
        }
        let c: Credentials = match body(req) {
            Ok(c) => c,
            Err(resp) => return *resp,
        };
        let email = match check_email(&c.email).and_then(|e| check_password(&c.password).map(|_| e))
        {
            Ok(e) => e,
            Err(m) => return error(StatusCode::BAD_REQUEST, &m),
        };
        let (digest, consumer, state) = match self.invited(&c, &email).await {
            Ok(x) => x,
            Err(resp) => return *resp,
        };
        let password = match self.hash(c.password).await {
            Ok(p) => p,
            Err(resp) => return *resp,
        };
        let account = Account {
            email: email.clone(),
            password,
            consumer,
            state,
            created: now(),
            generation: 0,
        };
        match self.store.create_account(&account, digest.as_deref()).await {
            Ok(()) => {}
            Err(StoreError::Exists) => {
                return error(StatusCode::CONFLICT, "an account with this email exists")
            }
            Err(StoreError::BadInvite) => {
                self.metrics.refused("invite");
                return error(
                    StatusCode::FORBIDDEN,
                    "the invite is unknown, used or expired",
                );
            }
            Err(e) => return unavailable(&e),
        }
        tracing::info!(email = %email, consumer = %account.consumer, state = ?state, "portal: account created");
        match state {
            AccountState::Active => self.signed_in(&account, StatusCode::CREATED).await,
            _ => json_response(
                StatusCode::ACCEPTED,
                &json!({"email": email, "state": "pending",
                        "message": "your account waits for an operator's approval"}),
            ),
        }
    }

    /// The invite's digest, the consumer the account manages, and its first state.
    async fn invited(
        &self,
        c: &Credentials,
        email: &str,
    ) -> Result<(Option<String>, String, AccountState), Refusal> {
        let Some(token) = c.invite.as_deref().filter(|t| !t.is_empty()) else {
            if self.open_signup {
                return Ok((None, consumer_name(email), AccountState::Pending));
            }
            self.metrics.refused("invite");
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "an invite is required to sign up",
            ));
        };
        let digest = crate::apikey::digest_hex(token);
        match self.store.invite(&digest).await {
            Ok(Some(inv)) if inv.expires > now() => Ok((
                Some(digest),
                inv.consumer.unwrap_or_else(|| consumer_name(email)),
                AccountState::Active,
            )),
            Ok(_) => {
                self.metrics.refused("invite");
                Err(refuse(
                    StatusCode::FORBIDDEN,
                    "the invite is unknown, used or expired",
                ))
            }
            Err(e) => Err(Box::new(unavailable(&e))),
        }
    }

    pub async fn signin(&self, req: &AppRequest) -> Response<Bytes> {
        let start = Instant::now();
        if let Err(wait) = self.throttle.attempt(req.peer.ip(), start) {
            self.metrics.signin("throttled");
            return too_many(wait);
        }
        let c: Credentials = match body(req) {
            Ok(c) => c,
            Err(resp) => return *resp,
        };
        // Not an address anyone could have signed up with: refused like a wrong password,
        // and never used as an etcd key.
        let Ok(email) = check_email(&c.email) else {
            self.metrics.signin("wrong_password");
            return error(StatusCode::UNAUTHORIZED, "wrong email or password");
        };
        if let Err(wait) = self.throttle.account_open(&email, start) {
            self.metrics.signin("throttled");
            return too_many(wait);
        }
        let found = match self.store.account(&email).await {
            Ok(a) => a.map(|(a, _)| a),
            Err(e) => return unavailable(&e),
        };
        let hash = match &found {
            Some(a) => a.password.clone(),
            None => match self.decoy().await {
                Ok(d) => d,
                Err(resp) => return *resp,
            },
        };
        let ok = match self.verify(c.password, hash).await {
            Ok(ok) => ok && found.is_some(),
            Err(resp) => return *resp,
        };
        let Some(account) = found.filter(|_| ok) else {
            self.throttle.failed(&email, Instant::now());
            self.metrics.signin("wrong_password");
            tracing::info!(email = %email, peer = %req.peer, "portal: sign-in refused");
            return error(StatusCode::UNAUTHORIZED, "wrong email or password");
        };
        self.throttle.succeeded(&email);
        match account.state {
            AccountState::Active => {
                self.metrics.signin("ok");
                self.signed_in(&account, StatusCode::OK).await
            }
            AccountState::Pending => {
                self.metrics.signin("pending");
                error(
                    StatusCode::FORBIDDEN,
                    "your account waits for an operator's approval",
                )
            }
            AccountState::Suspended => {
                self.metrics.signin("suspended");
                error(StatusCode::FORBIDDEN, "this account is suspended")
            }
        }
    }

    /// Ends every session of the account.
    pub async fn signout(&self, req: &AppRequest) -> Response<Bytes> {
        let (session, _) = match self.account(req, true).await {
            Ok(x) => x,
            Err(resp) => return *resp,
        };
        for _ in 0..3 {
            match self.store.account(&session.a).await {
                Ok(Some((mut a, rev))) => {
                    a.generation += 1;
                    match self.store.update_account(&a, rev).await {
                        Ok(true) => break,
                        Ok(false) => continue,
                        Err(e) => return unavailable(&e),
                    }
                }
                Ok(None) => break,
                Err(e) => return unavailable(&e),
            }
        }
        let mut resp = json_response(StatusCode::OK, &json!({"signed_out": true}));
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie("", 0)) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        resp
    }

    /// A new session for `account`: the cookie, and the CSRF token for the page.
    async fn signed_in(&self, account: &Account, status: StatusCode) -> Response<Bytes> {
        let sessions = match self.sessions().await {
            Ok(s) => s,
            Err(resp) => return *resp,
        };
        let Some((s, cookie)) = sessions.issue(&account.email, account.generation, now()) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no randomness for a session",
            );
        };
        let mut resp = json_response(
            status,
            &json!({"email": account.email, "consumer": account.consumer, "csrf": sessions.csrf(&s)}),
        );
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&cookie, session::TTL_SECS)) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        resp
    }

    async fn decoy(&self) -> Result<String, Refusal> {
        self.decoy
            .get_or_try_init(|| self.hash("decoy password, never anyone's".into()))
            .await
            .cloned()
    }

    async fn hash(&self, password: String) -> Result<String, Refusal> {
        let _permit = self.hashing.acquire().await.map_err(|_| busy())?;
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|_| busy())?
            .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, &e))
    }

    async fn verify(&self, password: String, hash: String) -> Result<bool, Refusal> {
        let _permit = self.hashing.acquire().await.map_err(|_| busy())?;
        tokio::task::spawn_blocking(move || verify_password(&password, &hash))
            .await
            .map_err(|_| Box::new(busy()))
    }
}

/// Argon2id with the crate's defaults (19 MiB, 2 passes: OWASP's recommendation), PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no randomness for a salt".to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// Lower-cased; a plausible address that is safe as an etcd key segment.
pub fn check_email(email: &str) -> Result<String, String> {
    let e = email.trim().to_ascii_lowercase();
    let ok = (3..=254).contains(&e.len())
        && e.split('@').count() == 2
        && e.split('@').all(|p| !p.is_empty())
        && e.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"@.+-_".contains(&b));
    match ok {
        true => Ok(e),
        false => Err("email: an address like name@example.com (letters, digits, . + - _)".into()),
    }
}

pub fn check_password(p: &str) -> Result<(), String> {
    match p.chars().count() {
        n if n < MIN_PASSWORD => Err(format!("password: at least {MIN_PASSWORD} characters")),
        _ if p.len() > MAX_PASSWORD => Err(format!("password: at most {MAX_PASSWORD} bytes")),
        _ => Ok(()),
    }
}

/// The consumer a new account manages: `portal-<name>-<8 hex of the email's digest>`.
pub fn consumer_name(email: &str) -> String {
    let local: String = email
        .split('@')
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(20)
        .collect();
    let local = local.trim_matches('-');
    let digest = crate::apikey::digest_hex(email);
    match local.is_empty() {
        true => format!("portal-{}", &digest[..8]),
        false => format!("portal-{local}-{}", &digest[..8]),
    }
}

fn busy() -> Response<Bytes> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the portal is shutting down",
    )
}

pub(crate) fn unavailable(e: &dyn std::fmt::Display) -> Response<Bytes> {
    tracing::warn!(error = %e, "portal: etcd unavailable");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the portal cannot reach its store; try again shortly",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_argon2id_and_verify() {
        let h = hash_password("correct horse battery").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(!h.contains("correct horse"));
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse battery!", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn emails_passwords_and_consumer_names() {
        assert_eq!(
            check_email(" Ann@Example.com ").as_deref(),
            Ok("ann@example.com")
        );
        for bad in ["ann", "@x", "a@", "a@b@c", "a/b@c.d", "a b@c.d", ""] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_password("short").is_err());
        assert!(check_password(&"x".repeat(300)).is_err());
        assert!(check_password("long enough pass").is_ok());
        let name = consumer_name("ann.lee+x@example.com");
        assert!(name.starts_with("portal-ann-lee-x-"), "{name}");
        assert!(name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    }
}
