//! jq filters compiled by jaq: once per policy (validation compiles them the same way, so a
//! policy that validates compiles in the data plane), run per request on a bounded body.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{data, unwrap_valr, Compiler, Ctx, Vars};
use jaq_json::Val;

use super::jq_native;

/// Longest jq program.
pub const MAX_JQ_LEN: usize = 16 * 1024;
/// Deepest nesting of arrays and objects accepted in a body (serde_json's own limit is 128).
pub(super) const MAX_DEPTH: usize = 64;

type Data = data::JustLut<Val>;

/// A compiled jq program; shared by every request of its rule.
pub struct JqFilter {
    filter: jaq_core::compile::Filter<jaq_core::Native<Data>>,
    /// The same program compiled natively, when it is in the fast path's subset.
    native: Option<jq_native::Program>,
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
    let native = jq_native::compile(code);
    Ok(JqFilter { filter, native })
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
    ///
    /// A program in the native subset (jq_native.rs) runs natively, and by jaq whenever the
    /// native run gives up (an error to report, a value it does not hold): the output is the
    /// same either way.
    pub fn apply(&self, body: &[u8]) -> Result<Vec<u8>, JqError> {
        if let Some(native) = &self.native {
            if let Ok(out) = jq_native::apply(native, body) {
                return Ok(out);
            }
        }
        check(body)?;
        self.apply_jaq(body)
    }

    /// With the native form of a program jaq compiled as `self` (field operations in front).
    pub(super) fn with_native(self, native: Option<jq_native::Program>) -> Self {
        Self { native, ..self }
    }

    /// Whether the program runs natively (when the body lets it).
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// [`Self::apply`] by jaq alone, on a body [`check`]ed already.
    pub(super) fn apply_jaq(&self, body: &[u8]) -> Result<Vec<u8>, JqError> {
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

/// The native fast path against jaq: for every program of a generated set in (and around)
/// the subset and every body of a generated set, `apply` gives what jaq alone gives, byte for
/// byte, errors included; and the fast path does run for most of them.
#[cfg(test)]
pub(super) mod differential {
    use super::*;

    impl JqFilter {
        /// The native path alone (`None`: it gave up, or there is none).
        pub(in crate::compose) fn apply_native(&self, body: &[u8]) -> Option<Vec<u8>> {
            jq_native::apply(self.native.as_ref()?, body).ok()
        }
    }

    /// xorshift64*: deterministic, so that a failure replays.
    pub(in crate::compose) struct Rng(pub u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        pub(in crate::compose) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        pub(in crate::compose) fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
            xs[self.below(xs.len())]
        }
    }

    const KEYS: &[&str] = &["a", "b", "items", "price", "qty", "sku", "n"];

    fn program(r: &mut Rng, depth: usize) -> String {
        let k = r.pick(KEYS);
        let k2 = r.pick(KEYS);
        let leaf = |r: &mut Rng| match r.below(9) {
            0 => ".".to_string(),
            1 => format!(".{k}"),
            2 => format!(".{k}.{k2}"),
            3 => ".[]".to_string(),
            4 => format!(".{k}[]"),
            5 => ["null", "true", "false", "0", "7", "9223372036854775807"][r.below(6)].into(),
            6 => ["\"s\"", "\"a\\nb\\u00e9\"", "\"\"", "\"x\\\"y\""][r.below(4)].into(),
            7 => "add".to_string(),
            _ => format!(".[\"{k}\"]"),
        };
        if depth == 0 {
            return leaf(r);
        }
        let g = |r: &mut Rng| program(r, depth - 1);
        match r.below(12) {
            0 | 1 => leaf(r),
            2 => format!("[{}]", g(r)),
            3 => format!("{{{k}, {k2}: {}}}", g(r)),
            4 => format!("{{\"k y\": {}, {k}: ({})}}", g(r), g(r)),
            5 => format!("{} | {}", g(r), g(r)),
            6 => format!("({}, {})", g(r), g(r)),
            7 => format!("({} + {})", g(r), g(r)),
            8 => format!("({} - {})", g(r), g(r)),
            9 => format!("({} * {})", g(r), g(r)),
            10 => format!("map({})", g(r)),
            // Around the subset: jaq alone runs these.
            _ => [
                "(.a // 1)",
                ".[0]",
                "length",
                ".a?",
                "-1",
                "1.5",
                "{(.a): 1}",
                "[.[] | . / 2]",
            ][r.below(8)]
            .into(),
        }
    }

    fn value(r: &mut Rng, depth: usize) -> serde_json::Value {
        use serde_json::{json, Value};
        let leafs = [
            json!(null),
            json!(true),
            json!(3),
            json!(-4),
            json!(0),
            json!(2.5),
            json!(1.0),
            json!(1e-7),
            json!(i64::MAX),
            json!(u64::MAX),
            json!("x"),
            json!("tab\there \"q\" é \u{1F600}"),
        ];
        if depth == 0 || r.below(3) == 0 {
            return leafs[r.below(leafs.len())].clone();
        }
        if r.below(2) == 0 {
            Value::Array((0..r.below(4)).map(|_| value(r, depth - 1)).collect())
        } else {
            let mut m = serde_json::Map::new();
            for _ in 0..r.below(5) {
                m.insert(r.pick(KEYS).to_string(), value(r, depth - 1));
            }
            Value::Object(m)
        }
    }

    pub(in crate::compose) fn bodies(r: &mut Rng) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = [
            // Duplicate keys (the last value, in the first place), escapes in keys and values,
            // numbers at jaq's integer limits and floats as serde_json reads them.
            r#"{"a": 1, "b": 2, "a": 3}"#,
            r#"{"items": [{"price": 10, "qty": 2, "sku": "x"}, {"price": 2.5, "qty": 3}], "a": {"b": "c"}}"#,
            r#"{"a\nb": "\u00e9\"", "b": [1, 2.0, -0.0, 1e300, 1.5e-300, 9223372036854775807]}"#,
            r#"{"a": 9223372036854775807, "b": 1, "n": -9223372036854775808, "price": 9223372036854775808}"#,
            r#"{"items": [1, 2, 3], "price": 4611686018427387904, "qty": 2}"#,
            r#"{"items": ["a", "b"], "a": [[1], [2]], "b": {"x": 1}, "n": null}"#,
            r#"{"items": [{"a": 1}, {"b": 2}, {"a": 3}], "a": {}, "b": []}"#,
            r#"[1, 2, 3]"#,
            r#"[{"a": 1}, {"a": 2}]"#,
            r#"[[1, 2], [3]]"#,
            r#""just a string""#,
            "3",
            "null",
            r#"{}"#,
            // Invalid bodies, whatever the program.
            r#"{"a": 1,}"#,
            r#"{"a": NaN}"#,
            r#"{"a": 1} {"b": 2}"#,
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        // What `check` refuses: nesting past 64 levels, bytes that are not UTF-8 (the fast
        // path reads the body without `check`), and what it accepts at the limit.
        for n in [63, 64, 65, 70] {
            out.push(format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes());
            out.push(format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n)).into_bytes());
        }
        out.push(b"{\"a\": \"\xff\"}".to_vec());
        out.push(b"{\"a\": 1, \xc3\xa9: 2}".to_vec());
        out.push(b"[\"\xed\xa0\x80\", \"\\ud800\"]".to_vec());
        // An object past the fast path's key limit.
        let wide: serde_json::Map<String, serde_json::Value> =
            (0..70).map(|i| (format!("k{i}"), i.into())).collect();
        let mut wide = serde_json::Value::Object(wide);
        wide["a"] = serde_json::json!([1, 2]);
        out.push(serde_json::to_vec(&wide).unwrap());
        out.extend((0..25).map(|_| {
            let mut v = value(r, 4);
            if r.below(2) == 0 {
                v = serde_json::json!({"a": v, "items": [value(r, 2), value(r, 2)], "price": value(r, 1)});
            }
            serde_json::to_vec(&v).unwrap()
        }));
        out
    }

    #[test]
    fn the_native_path_gives_what_jaq_gives() {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        let bodies = bodies(&mut r);
        let mut programs: Vec<String> = [
            ".",
            "{id, customer: .customer.name, lines: [.items[] | {sku, total: (.price * .qty)}], \
             total: ([.items[] | .price * .qty] | add)}",
            ". + {total: (.items | map(.price) | add)}",
            "{data: ., served_by: \"edge\"}",
            "[.items[] | .price]",
            "{a: 1, b: 2, a: 3}",
            ".a, .b",
            "empty",
            "{a: (1, 2)}",
            ".items | add",
            "[.[] | . * 2]",
            ".a.b.c",
            "[.items[].price] | add",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        programs.extend((0..400).map(|i| program(&mut r, 1 + i % 4)));
        // jaq's panics are caught below; their messages would bury the test's own.
        thread_local!(static IN_JAQ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
        std::panic::set_hook(Box::new(|info| {
            if !IN_JAQ.get() {
                eprintln!("{info}");
            }
        }));
        let (mut runs, mut native) = (0, 0);
        for code in &programs {
            let Ok(f) = compile_jq(code) else {
                continue;
            };
            for body in &bodies {
                runs += 1;
                // jaq panics on a few inputs (`"s" * 9223372036854775807`: a string repeated
                // past memory); the fast path must leave those to it.
                IN_JAQ.set(true);
                let jaq = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check(body).and_then(|()| f.apply_jaq(body))
                }));
                IN_JAQ.set(false);
                let fast = f.native.as_ref().and_then(|n| {
                    check(body)
                        .ok()
                        .and_then(|()| jq_native::apply(n, body).ok())
                });
                let Ok(jaq) = jaq else {
                    assert_eq!(fast, None, "`{code}` panics in jaq");
                    continue;
                };
                if let Some(fast) = &fast {
                    native += 1;
                    assert_eq!(
                        Ok(fast),
                        jaq.as_ref(),
                        "`{code}` on {}",
                        String::from_utf8_lossy(body)
                    );
                }
                assert_eq!(f.apply(body), jaq, "`{code}`");
            }
        }
        // Not vacuous: the fast path took a good share of the runs (most of the others are
        // errors on bodies of the wrong shape or refused bodies, which jaq reports).
        assert!(
            runs > 20_000 && native > 4_000,
            "{native} of {runs} runs native"
        );
    }

    #[test]
    fn the_subset_is_recognised() {
        for code in [
            ".",
            ". + {total: (.items | map(.price) | add)}",
            "{id, customer: .customer.name, lines: [.items[] | {sku, total: (.price * .qty)}]}",
        ] {
            assert!(compile_jq(code).unwrap().is_native(), "{code}");
        }
        for code in [
            "def f: .; f",
            ".a?",
            "length",
            "1.5",
            ".[0]",
            "\"\\(.a)\"",
            "$__loc__",
        ] {
            let f = compile_jq(code);
            assert!(f.map_or(true, |f| !f.is_native()), "{code}");
        }
    }
}
