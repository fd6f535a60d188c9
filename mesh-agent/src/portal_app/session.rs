//! Portal sessions: a cookie holding the account, an expiry and a random nonce, signed with
//! HMAC-SHA256 under the secret every replica reads from etcd, so any replica accepts a
//! session any other issued and nothing per session is stored. A forged or altered cookie
//! fails the tag; one of another account names that account, and the pages only ever act on
//! the account the cookie names.
//!
//! CSRF: every state-changing request with a session must carry `x-csrf-token`, an HMAC of
//! the session's nonce under the same secret (a different domain label), which the page
//! reads from `/portal/api/me`. Another site can neither read it nor set the header; the
//! cookie is also `SameSite=Strict`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// The cookie's name: `__Host-` makes browsers require Secure, Path=/ and no Domain.
pub const COOKIE: &str = "__Host-trellis-portal";

/// How long a session lasts.
pub const TTL_SECS: u64 = 8 * 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Session {
    /// The account's email.
    pub a: String,
    /// Expiry, unix seconds.
    pub x: u64,
    /// Random, per sign-in: what the CSRF token is bound to.
    pub n: String,
    /// The account's session generation when issued (`Account::generation`).
    pub g: u64,
}

pub struct Sessions {
    key: hmac::Key,
}

// === impl Sessions ===

impl Sessions {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A new session for `email` and its cookie value.
    pub fn issue(&self, email: &str, generation: u64, now: u64) -> Option<(Session, String)> {
        let mut nonce = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).ok()?;
        let s = Session {
            a: email.to_string(),
            x: now + TTL_SECS,
            n: B64.encode(nonce),
            g: generation,
        };
        let payload = serde_json::to_vec(&s).ok()?;
        let tag = hmac::sign(&self.key, &labelled(b"session", &payload));
        Some((
            s,
            format!("{}.{}", B64.encode(&payload), B64.encode(tag.as_ref())),
        ))
    }

    /// The session a cookie value holds, when its tag is ours and it has not expired.
    pub fn verify(&self, value: &str, now: u64) -> Option<Session> {
        let (payload, tag) = value.split_once('.')?;
        let payload = B64.decode(payload).ok()?;
        let tag = B64.decode(tag).ok()?;
        hmac::verify(&self.key, &labelled(b"session", &payload), &tag).ok()?;
        let s: Session = serde_json::from_slice(&payload).ok()?;
        (s.x > now).then_some(s)
    }

    /// The CSRF token of a session.
    pub fn csrf(&self, s: &Session) -> String {
        B64.encode(hmac::sign(&self.key, &labelled(b"csrf", s.n.as_bytes())).as_ref())
    }

    /// Whether `token` is the session's CSRF token (compared in constant time).
    pub fn check_csrf(&self, s: &Session, token: &str) -> bool {
        B64.decode(token)
            .is_ok_and(|t| hmac::verify(&self.key, &labelled(b"csrf", s.n.as_bytes()), &t).is_ok())
    }
}

fn labelled(label: &[u8], data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(label.len() + 1 + data.len());
    v.extend_from_slice(label);
    v.push(0);
    v.extend_from_slice(data);
    v
}

/// The session cookie's value in a request's `Cookie` headers.
pub fn cookie_value(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// `Set-Cookie` for a session; an empty value with `Max-Age=0` signs out.
pub fn set_cookie(value: &str, max_age: u64) -> String {
    format!("{COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_altered_expired_and_foreign_cookies_are_refused() {
        let s = Sessions::new(&[7u8; 32]);
        let (session, cookie) = s.issue("ann@example.com", 0, 1000).expect("issue");
        assert_eq!(s.verify(&cookie, 1001), Some(session.clone()));
        assert_eq!(s.verify(&cookie, 1000 + TTL_SECS), None, "expired");
        // Another secret (another mesh) does not accept it.
        assert_eq!(Sessions::new(&[8u8; 32]).verify(&cookie, 1001), None);
        // Naming another account without the secret: the tag no longer matches.
        let (payload, tag) = cookie.split_once('.').expect("dot");
        let text = String::from_utf8(B64.decode(payload).expect("b64")).expect("utf8");
        let forged = B64.encode(text.replace("ann@", "bob@"));
        assert_eq!(s.verify(&format!("{forged}.{tag}"), 1001), None);
        assert_eq!(s.verify("garbage", 1001), None);
        assert_eq!(s.verify("a.b.c", 1001), None);
        // CSRF tokens are per session.
        let (other, _) = s.issue("ann@example.com", 0, 1000).expect("issue");
        let token = s.csrf(&session);
        assert!(s.check_csrf(&session, &token));
        assert!(!s.check_csrf(&other, &token));
        assert!(!s.check_csrf(&session, ""));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; __Host-trellis-portal=xyz.abc".parse().expect("v"),
        );
        assert_eq!(cookie_value(&h), Some("xyz.abc"));
        assert!(set_cookie("v", 10).contains("Secure; HttpOnly; SameSite=Strict"));
    }
}
