//! `format: email`, answered at once for the addresses bodies actually carry.
//!
//! `jsonschema` checks `email` by parsing the whole address with the `email_address` crate
//! (display names, quoted local parts, domain literals, punycode labels) and then the domain
//! as a hostname: about 4,700 instructions for `ada.lovelace@example.com`, a quarter of the
//! benchmark order's schema walk (docs/api-validation.md). Almost every address a client
//! sends is a plain `dot-atom@host.name`, which this accepts in one pass over its bytes.
//!
//! The fast path only ever **accepts**, and only a strict subset of what `jsonschema`'s own
//! check accepts; anything outside that subset (a quoted or non-ASCII local part, a domain
//! literal, a single-label or punycode domain, an invalid address) is answered by
//! `jsonschema`'s built-in check itself, through a validator of `{"format": "email"}` built
//! once. So an answer can never differ from the built-in one: the subset's rules are each
//! stricter than the built-in's, and `fast_subset_agrees_with_the_builtin_check` compares the
//! two on thousands of generated addresses.

use std::sync::LazyLock;

use jsonschema::{Draft, Validator};
use serde_json::Value;

/// RFC 5321's limit on a local part, which `email_address` applies.
const LOCAL_MAX: usize = 64;
/// A hostname's limit (`jsonschema`'s hostname check: 253; `email_address`'s domain: 254).
const DOMAIN_MAX: usize = 253;
/// A DNS label's limit, both checks'.
const LABEL_MAX: usize = 63;

/// The built-in check, for what the fast path does not accept. `None` only if `jsonschema`
/// could not compile a one-keyword schema, which its own tests rule out; then the format is
/// checked by the fast path alone and anything outside it refused (fails closed).
static BUILTIN: LazyLock<Option<Validator>> = LazyLock::new(|| {
    jsonschema::options()
        .with_draft(Draft::Draft202012)
        .should_validate_formats(true)
        .build(&serde_json::json!({"format": "email"}))
        .ok()
});

/// `format: email` as `jsonschema` answers it, usually without its parser.
pub fn email(s: &str) -> bool {
    plain_address(s) || builtin_email(s)
}

/// The built-in check (a `String` and a `Value` made for it: the rare path).
fn builtin_email(s: &str) -> bool {
    BUILTIN
        .as_ref()
        .is_some_and(|v| v.is_valid(&Value::String(s.to_owned())))
}

/// `local@domain` where the local part is a dot-atom of ASCII `atext` (RFC 5322) of at most 64
/// bytes and the domain at least two ASCII labels of letters, digits and inner hyphens, none
/// of them an A-label (`xn--`) or with hyphens in its 3rd and 4th places (both checked
/// further by the built-in), at most 253 bytes: every such address is valid to the built-in
/// check too.
fn plain_address(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    dot_atom(local) && plain_domain(domain)
}

/// RFC 5322 `dot-atom-text` in ASCII: atoms of `atext` joined by single dots.
fn dot_atom(local: &str) -> bool {
    let b = local.as_bytes();
    if b.is_empty() || b.len() > LOCAL_MAX || b[0] == b'.' || b[b.len() - 1] == b'.' {
        return false;
    }
    let mut last_dot = false;
    for &c in b {
        if c == b'.' {
            if last_dot {
                return false;
            }
            last_dot = true;
        } else if atext(c) {
            last_dot = false;
        } else {
            return false;
        }
    }
    true
}

/// RFC 5322 `atext`, ASCII only.
fn atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
}

/// Two or more LDH labels (letters, digits, hyphens inside), each 1..=63 bytes, with no
/// hyphen in both the 3rd and 4th places (so no `xn--` A-label either), 253 bytes at most.
fn plain_domain(domain: &str) -> bool {
    if domain.len() > DOMAIN_MAX {
        return false;
    }
    let mut labels = 0;
    for label in domain.split('.') {
        if !ldh_label(label.as_bytes()) {
            return false;
        }
        labels += 1;
    }
    labels >= 2
}

fn ldh_label(l: &[u8]) -> bool {
    let (Some(first), Some(last)) = (l.first(), l.last()) else {
        return false;
    };
    l.len() <= LABEL_MAX
        && first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && l.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && !(l.len() >= 4 && l[2] == b'-' && l[3] == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(s: &str) -> bool {
        builtin_email(s)
    }

    #[test]
    fn the_builtin_check_is_there() {
        assert!(BUILTIN.is_some());
        assert!(builtin("ada.lovelace@example.com"));
        assert!(!builtin("ada.lovelace@"));
    }

    #[test]
    fn plain_addresses_take_the_fast_path() {
        for s in [
            "ada.lovelace@example.com",
            "a@b.co",
            "first+tag@mail.example.org",
            "o'brien@example.ie",
            "x_y-z@sub-domain.example.com",
            "1234@123.example",
        ] {
            assert!(plain_address(s), "{s}");
            assert!(email(s), "{s}");
        }
    }

    #[test]
    fn others_are_answered_by_the_builtin_check() {
        for (s, valid) in [
            ("\"quoted local\"@example.com", true),
            ("\"\"@example.com", true),
            ("user@[127.0.0.1]", true),
            ("user@[IPv6:::1]", true),
            ("user@localhost", true),
            ("user@xn--bcher-kva.example", true),
            ("user@xn--invalid-.example", false),
            ("a..b@example.com", false),
            (".a@example.com", false),
            ("a@-example.com", false),
            ("a@example.com.", false),
            ("a@@example.com", false),
            ("no-at-sign", false),
            ("", false),
            // `email_address` allows a display name by default, and so the built-in check.
            ("Ada <ada@example.com>", true),
            ("ümlaut@example.com", false),
            ("a@exa_mple.com", false),
            ("a@ab--cd.example", false),
        ] {
            assert!(!plain_address(s), "{s} must not take the fast path");
            assert_eq!(email(s), builtin(s), "{s}");
            assert_eq!(email(s), valid, "{s}");
        }
    }

    /// The fast path accepts nothing the built-in check refuses: addresses generated from
    /// an alphabet of every character class either path cares about, at lengths around each
    /// limit.
    #[test]
    fn fast_subset_agrees_with_the_builtin_check() {
        // A small deterministic generator (xorshift), so that a failure repeats.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: Vec<char> = "aZ09.-_+!#$%&'*/=?^`{|}~@\"[]:<> \\,;ü\u{0}xn"
            .chars()
            .collect();
        // Mostly short parts, sometimes around a limit (63, 64).
        let pick = |n: u64| {
            if n.is_multiple_of(5) {
                [62usize, 63, 64, 65, 70][(n >> 8) as usize % 5]
            } else {
                1 + (n >> 8) as usize % 12
            }
        };
        let (mut fast, mut total) = (0, 0);
        for _ in 0..40_000 {
            let local_len = pick(next());
            let mut s: String = (0..local_len)
                .map(|_| {
                    let r = next();
                    // Mostly letters, so that many samples are plausible addresses.
                    if r.is_multiple_of(16) {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    } else {
                        'a'
                    }
                })
                .collect();
            s.push('@');
            let labels = 1 + next() % 5;
            for i in 0..labels {
                if i > 0 {
                    s.push('.');
                }
                let len = pick(next());
                for _ in 0..len {
                    let r = next();
                    s.push(if r.is_multiple_of(24) {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    } else {
                        'b'
                    });
                }
            }
            total += 1;
            if plain_address(&s) {
                fast += 1;
                assert!(
                    builtin(&s),
                    "fast path accepted {s:?}, the built-in refuses it"
                );
            }
        }
        // The generator must exercise the fast path, or this test proves nothing.
        assert!(fast > total / 10, "{fast} of {total} took the fast path");
    }
}
