//! jq filters compiled by jaq: once per policy (validation compiles them the same way, so a
//! policy that validates compiles in the data plane), run per request on a bounded body.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, unwrap_valr, Compiler, Ctx, Vars};
use jaq_json::Val;

/// Longest jq program.
pub const MAX_JQ_LEN: usize = 16 * 1024;
/// Deepest nesting of arrays and objects accepted in a body (serde_json's own limit is 128).
const MAX_DEPTH: usize = 64;

type Data = data::JustLut<Val>;

/// A compiled jq program; shared by every request of its rule.
pub struct JqFilter {
    filter: jaq_core::compile::Filter<jaq_core::Native<Data>>,
}

/// Why a body could not be transformed: the client's (or upstream's) body is not the JSON the
/// transform reads, or the program failed on it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JqError {
    #[error("the body is not UTF-8 (byte {0})")]
    Utf8(usize),
    #[error("the body is not JSON: {0}")]
    Json(String),
    #[error("the body nests arrays and objects deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("the transform failed: {0}")]
    Run(String),
    #[error("the transform gave no value")]
    NoOutput,
}

/// Compile `code` with jq's standard library (jaq-std and jaq-json definitions).
pub fn compile_jq(code: &str) -> Result<JqFilter, String> {
    if code.len() > MAX_JQ_LEN {
        return Err(format!("longer than {MAX_JQ_LEN} bytes"));
    }
    let defs = jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs());
    let funs = jaq_core::funs::<Data>()
        .chain(jaq_std::funs::<Data>())
        .chain(jaq_json::funs::<Data>());
    let loader = Loader::new(defs);
    let arena = Arena::default();
    let program = File { code, path: () };
    let modules = loader
        .load(&arena, program)
        .map_err(|errs| format!("`{code}` does not parse: {}", describe(&errs)))?;
    let filter = Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|errs| {
            let names: Vec<String> = errs
                .iter()
                .flat_map(|(_, es)| es.iter().map(|(name, _)| format!("`{name}`")))
                .collect();
            format!("`{code}` does not compile: undefined {}", names.join(", "))
        })?;
    Ok(JqFilter { filter })
}

fn describe<P>(errs: &jaq_core::load::Errors<&str, P>) -> String {
    use jaq_core::load::Error;
    let mut out = Vec::new();
    for (_, e) in errs {
        match e {
            Error::Io(es) => out.extend(es.iter().map(|(path, m)| format!("{path}: {m}"))),
            Error::Lex(es) => out.extend(
                es.iter()
                    .map(|(expect, at)| format!("expected {} at `{}`", expect.as_str(), clip(at))),
            ),
            Error::Parse(es) => out.extend(
                es.iter()
                    .map(|(expect, at)| format!("expected {} at `{}`", expect.as_str(), clip(at))),
            ),
        }
    }
    out.join("; ")
}

/// The start of the text an error points at.
fn clip(s: &str) -> &str {
    let end = s.char_indices().nth(24).map_or(s.len(), |(i, _)| i);
    &s[..end]
}

// === impl JqFilter ===

impl JqFilter {
    /// Transform a JSON body: strict JSON (UTF-8, no NaN, at most [`MAX_DEPTH`] levels) in, the
    /// program's first output out, as compact JSON.
    pub fn apply(&self, body: &[u8]) -> Result<Vec<u8>, JqError> {
        let input = parse(body)?;
        let ctx = Ctx::<Data>::new(&self.filter.lut, Vars::new([]));
        let mut out = self.filter.id.run((ctx, input)).map(unwrap_valr);
        let value = match out.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => return Err(JqError::Run(e.to_string())),
            None => return Err(JqError::NoOutput),
        };
        let mut out = Vec::with_capacity(body.len());
        write(&mut out, &value);
        Ok(out)
    }
}

impl std::fmt::Debug for JqFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JqFilter")
    }
}

/// Strict JSON (serde_json's reader, not jaq's, which accepts a superset such as `NaN`, and
/// is several times slower).
fn parse(body: &[u8]) -> Result<Val, JqError> {
    check(body)?;
    serde_json::from_slice::<Val>(body).map_err(|e| JqError::Json(e.to_string()))
}

/// What any body must be before a parser sees it: UTF-8, nested at most [`MAX_DEPTH`] deep.
pub(super) fn check(body: &[u8]) -> Result<(), JqError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(JqError::Utf8(e.valid_up_to()));
    }
    if depth(body) > MAX_DEPTH {
        return Err(JqError::TooDeep);
    }
    Ok(())
}

/// Compact JSON, as jq prints it with `-c` (non-finite numbers as `null`, since JSON has
/// none); strings escaped by serde_json. jaq's own printer formats byte by byte.
fn write(out: &mut Vec<u8>, v: &Val) {
    use jaq_json::Num;
    match v {
        Val::Null => out.extend_from_slice(b"null"),
        Val::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Val::Num(Num::Float(f)) if !f.is_finite() => out.extend_from_slice(b"null"),
        Val::Num(Num::Float(f)) => {
            out.extend_from_slice(ryu::Buffer::new().format_finite(*f).as_bytes())
        }
        Val::Num(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Val::TStr(b) | Val::BStr(b) => write_str(out, b),
        Val::Arr(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(out, item);
            }
            out.push(b']');
        }
        Val::Obj(fields) => {
            out.push(b'{');
            for (i, (k, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match k {
                    Val::TStr(b) | Val::BStr(b) => write_str(out, b),
                    // jaq allows other keys; JSON wants strings.
                    other => {
                        let mut key = Vec::new();
                        write(&mut key, other);
                        write_str(out, &key);
                    }
                }
                out.push(b':');
                write(out, item);
            }
            out.push(b'}');
        }
    }
}

fn write_str(out: &mut Vec<u8>, b: &[u8]) {
    let s = String::from_utf8_lossy(b);
    // Writing JSON for a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &*s);
}

/// The deepest nesting of `[` and `{` outside strings; linear, no recursion.
fn depth(body: &[u8]) -> usize {
    let (mut level, mut max, mut in_str, mut escaped) = (0usize, 0usize, false, false);
    for &b in body {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                level += 1;
                max = max.max(level);
            }
            b']' | b'}' => level = level.saturating_sub(1),
            _ => {}
        }
    }
    max
}

// Shared by every request of a rule, across threads (jaq's values are `Rc`, so only the
// compiled filter may be shared: values never leave `apply`). Checked at compile time.
const _: fn() = || {
    fn is<T: Send + Sync>() {}
    is::<JqFilter>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn run(code: &str, body: &str) -> Result<String, JqError> {
        let f = compile_jq(code).expect("compiles");
        f.apply(body.as_bytes())
            .map(|b| String::from_utf8(b).expect("utf-8"))
    }

    #[test]
    fn reshapes_with_the_standard_library() {
        let out = run(
            "{id, name: .user.name, tags: (.tags | map(ascii_upcase))} | del(.id)",
            r#"{"id": 1, "user": {"name": "ana"}, "tags": ["a", "b"], "x": null}"#,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v, serde_json::json!({"name": "ana", "tags": ["A", "B"]}));
    }

    #[test]
    fn bad_programs_are_refused_with_the_reason() {
        let e = compile_jq(".a | ").unwrap_err();
        assert!(e.contains("does not parse"), "{e}");
        let e = compile_jq("nosuchfilter(1)").unwrap_err();
        assert!(e.contains("undefined `nosuchfilter`"), "{e}");
        assert!(compile_jq(&"a".repeat(MAX_JQ_LEN + 1)).is_err());
    }

    #[test]
    fn bad_bodies_are_told_apart() {
        assert_eq!(run(".", "\"\u{e9}\"").unwrap(), "\"\u{e9}\"");
        let f = compile_jq(".").unwrap();
        assert_eq!(f.apply(b"\"\xff\""), Err(JqError::Utf8(1)));
        assert!(matches!(f.apply(b"{\"a\": }"), Err(JqError::Json(_))));
        assert!(matches!(f.apply(b"NaN"), Err(JqError::Json(_))));
        assert!(matches!(f.apply(b"{} {}"), Err(JqError::Json(_))));
        assert!(matches!(f.apply(b"{'a': 1}"), Err(JqError::Json(_))));
        assert!(matches!(f.apply(b"[1,]"), Err(JqError::Json(_))));
        // Numbers, escapes and non-finite results as jq -c prints them.
        assert_eq!(
            run(
                "[., 1.5, 1e400 * 0 + infinite, (\"a\\\"b\\n\" | .), {(\"k\"): null}]",
                "12345678901234567890"
            )
            .unwrap(),
            r#"[12345678901234567890,1.5,null,"a\"b\n",{"k":null}]"#
        );
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(f.apply(deep.as_bytes()), Err(JqError::TooDeep));
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(f.apply(ok.as_bytes()).is_ok());
        // Brackets inside strings are text.
        let s = format!("\"{}\"", "[".repeat(100));
        assert!(f.apply(s.as_bytes()).is_ok());
        assert_eq!(run("empty", "{}"), Err(JqError::NoOutput));
        assert!(matches!(run(".a.b", "[1]"), Err(JqError::Run(_))));
    }
}
