//! jq filters compiled by jaq: once per policy (validation compiles them the same way, so a
//! policy that validates compiles in the data plane), run per request on a bounded body, within
//! a bounded budget (jq_bound.rs).

use std::sync::Arc;

use jaq_core::load::{Arena, File, Loader};
use jaq_core::Compiler;
use jaq_json::Val;

use super::jq_bound::{self, Bounded, Limits, Stop};
use super::jq_native;

/// Longest jq program.
pub const MAX_JQ_LEN: usize = 16 * 1024;
/// Deepest nesting of arrays and objects accepted in a body (serde_json's own limit is 128).
pub(super) const MAX_DEPTH: usize = 64;
/// Deepest nesting of an output (a body the sidecar sends on; serde_json, as most readers,
/// refuses more than 128 levels).
const MAX_OUTPUT_DEPTH: usize = 128;

/// The name the operator's program is defined under, after jaq's standard library.
const MAIN: &str = "_trellis_main";

/// A compiled jq program; shared by every request of its rule.
#[derive(Clone)]
pub struct JqFilter {
    /// jaq's program, with the bounded operators (jq_bound.rs); shared with the threads that
    /// run it.
    filter: Arc<jaq_core::Filter<Bounded>>,
    /// The same program compiled natively, when it is in the fast path's subset.
    native: Option<Arc<jq_native::Program>>,
    limits: Limits,
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
    /// The run went past one of its bounds (jq_bound.rs): the body asks for more than the
    /// transform may spend.
    #[error("{0}")]
    Limit(Stop),
    /// jaq panicked (a bug in jaq, caught: the sidecar goes on).
    #[error("the transform failed inside jaq: {0}")]
    Panic(String),
    /// No thread could be started to run jaq.
    #[error("the transform could not be run: {0}")]
    Unavailable(String),
}

/// Compile `code` with jq's standard library (jaq-std and jaq-json definitions), bounded by
/// [`Limits::default`] (see [`JqFilter::with_limits`]).
///
/// The program is compiled twice: as written, for jaq's own error messages; then with the
/// bounded operators (jq_bound.rs: `+`, `*`, `..`, string interpolation rewritten in the
/// program and in jaq's standard library), which is what runs.
pub fn compile_jq(code: &str) -> Result<JqFilter, String> {
    if code.len() > MAX_JQ_LEN {
        return Err(format!("longer than {MAX_JQ_LEN} bytes"));
    }
    let arena = Arena::default();
    let modules = Loader::new(std_defs())
        .load(&arena, File { code, path: () })
        .map_err(|errs| format!("`{code}` does not parse: {}", describe(&errs)))?;
    compile(modules).map_err(|names| not_compiled(code, &names))?;
    let term = jaq_core::load::parse(code, |p| p.term())
        .ok_or_else(|| format!("`{code}` does not parse as one jq term"))?;
    let main = jaq_core::load::parse::Def {
        name: MAIN,
        args: Vec::new(),
        body: jq_bound::rewrite(term, false),
    };
    let mut prelude = Vec::new();
    for def in std_defs() {
        prelude.push(jq_bound::rewrite_def(def));
    }
    prelude.push(main);
    let modules = Loader::new(prelude)
        .load(
            &arena,
            File {
                code: MAIN,
                path: (),
            },
        )
        .map_err(|errs| format!("`{code}` does not parse: {}", describe(&errs)))?;
    let filter = compile(modules).map_err(|names| {
        format!(
            "`{code}` (bounded) does not compile: undefined {}",
            quoted(&names)
        )
    })?;
    Ok(JqFilter {
        filter: Arc::new(filter),
        native: jq_native::compile(code).map(Arc::new),
        limits: Limits::default(),
    })
}

/// Builtins of jq and jaq a transform may not call, and why: they read the sidecar's process
/// state or write to its log. The operator's program is trusted but may be careless, and the
/// body is hostile: `{data: ., env: env}` in a response transform would send the sidecar's
/// environment (tokens, keys) to every client, and `debug` or `stderr` writes each body to
/// the sidecar's log (jaq-std's `log` calls, which the sidecar's subscriber prints), as often
/// and as large as clients like. Refused rather than made inert: a program that reads `env`
/// would otherwise run and quietly give `null`s, which hides the mistake.
///
/// The definitions and natives of these names are left out of what programs compile against
/// (so a name jaq adds later under one of them is left out too), and a program calling one is
/// refused when the policy is validated, naming it. A program's own `def env: ...;` or
/// `... as $ENV` is its own and compiles. jaq 3 defines neither `input`, `inputs`,
/// `input_filename`, `$ENV` nor `$__loc__`: they are listed for the message and in case it
/// does. Kept: `halt` (the run ends with no output; it cannot end the sidecar), `now` and
/// the local-time builtins (the clock and the time zone are no secret), `error` (fails the
/// transform: the client gets the program's message, which the operator wrote).
pub(super) const REFUSED: &[(&str, &str)] = &[
    ("env", ENVIRONMENT),
    ("$ENV", ENVIRONMENT),
    ("debug", LOG),
    ("debug_empty", LOG),
    ("stderr", LOG),
    ("stderr_empty", LOG),
    ("halt_error", LOG),
    ("input", INPUTS),
    ("inputs", INPUTS),
    ("input_filename", PROCESS),
    ("input_line_number", PROCESS),
    ("$__loc__", PROCESS),
    ("$__prog_args", PROCESS),
    ("get_search_list", PROCESS),
    ("get_prog_origin", PROCESS),
    ("get_jq_origin", PROCESS),
];
const ENVIRONMENT: &str = "it reads the sidecar's environment variables, which may hold secrets";
const LOG: &str = "it writes to the sidecar's log (`error(...)` fails the transform instead)";
const INPUTS: &str = "a transform has one input, the body";
const PROCESS: &str = "it reads the sidecar's process state, not the body";

/// Why `name` (a variable with its `$`) is refused, if it is.
fn refused(name: &str) -> Option<&'static str> {
    REFUSED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
}

/// The message for a program that does not compile: a refused builtin by name and reason,
/// else the undefined names.
fn not_compiled(code: &str, names: &[String]) -> String {
    if let Some((name, why)) = names.iter().find_map(|n| refused(n).map(|why| (n, why))) {
        return format!("`{code}` calls `{name}`, which transforms may not use: {why}");
    }
    format!("`{code}` does not compile: undefined {}", quoted(names))
}

fn quoted(names: &[String]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    quoted.join(", ")
}

fn std_defs() -> impl Iterator<Item = jaq_core::load::parse::Def<&'static str>> {
    jaq_core::defs()
        .chain(jaq_std::defs())
        .chain(jaq_json::defs())
        .filter(|def| refused(def.name).is_none())
}

/// Compile with our natives first (they replace jaq's of the same name), then jaq's, less
/// the [`REFUSED`] ones. Fails with the undefined names (jaq's variables keep their `$`).
fn compile(
    modules: jaq_core::load::Modules<&str, ()>,
) -> Result<jaq_core::Filter<Bounded>, Vec<String>> {
    let funs = jq_bound::funs()
        .chain(jaq_core::funs::<Bounded>())
        .chain(jaq_std::funs::<Bounded>())
        .chain(jaq_json::funs::<Bounded>())
        .filter(|(name, ..)| refused(name).is_none());
    Compiler::default()
        .with_funs(funs)
        .compile(modules)
        .map_err(|errs| {
            errs.iter()
                .flat_map(|(_, es)| es.iter().map(|(name, _)| name.to_string()))
                .collect()
        })
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
    /// same either way. jaq runs on a jaq thread (see [`Self::spawn_jaq`]); this waits
    /// for it (an async caller uses [`Self::apply_native`] and [`Self::spawn_jaq`] instead).
    pub fn apply(&self, body: &[u8]) -> Result<Vec<u8>, JqError> {
        if let Some(out) = self.apply_native(body) {
            return Ok(out);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.spawn_jaq(body.to_vec(), move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv().unwrap_or_else(|_| {
            Err(JqError::Panic(
                "the jaq thread ended without an answer".into(),
            ))
        })
    }

    /// The native fast path alone: `None` when the program is not in its subset or the run
    /// gave up (then jaq must run).
    pub fn apply_native(&self, body: &[u8]) -> Option<Vec<u8>> {
        jq_native::apply(self.native.as_deref()?, body).ok()
    }

    /// Run jaq on `body` on one of the jaq threads (jq_bound.rs: a few threads with a large
    /// stack), and give `done` the outcome there.
    pub fn spawn_jaq<B, F>(&self, body: B, done: F) -> Result<(), JqError>
    where
        B: AsRef<[u8]> + Send + 'static,
        F: FnOnce(Result<Vec<u8>, JqError>) + Send + 'static,
    {
        let this = self.clone();
        jq_bound::submit(Box::new(move || {
            let body = body.as_ref();
            let out = check(body).and_then(|()| this.apply_jaq(body));
            let retire = matches!(out, Err(JqError::Limit(_) | JqError::Panic(_)));
            done(out);
            retire
        }))
        .map_err(|e| JqError::Unavailable(e.to_string()))
    }

    /// The same filter with other bounds.
    pub fn with_limits(self, limits: Limits) -> Self {
        Self { limits, ..self }
    }

    /// With the native form of a program jaq compiled as `self` (field operations in front).
    pub(super) fn with_native(self, native: Option<jq_native::Program>) -> Self {
        Self {
            native: native.map(Arc::new),
            ..self
        }
    }

    /// Whether the program runs natively (when the body lets it).
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    /// [`Self::apply`] by jaq alone, on a body [`check`]ed already, on this thread (which
    /// needs [`jq_bound::STACK_BYTES`] of stack for the worst bodies).
    pub(super) fn apply_jaq(&self, body: &[u8]) -> Result<Vec<u8>, JqError> {
        let input = parse(body)?;
        let value = jq_bound::run(&self.filter, input, self.limits)?;
        let mut out = Vec::with_capacity(body.len());
        let written = write(&mut out, &value, 0, self.limits.output_bytes);
        // A deep output is freed on this (large) stack, not the caller's.
        drop(value);
        written.map_err(JqError::Limit)?;
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

/// A JSON body read as a transform reads it: UTF-8, strict JSON, nested at most
/// [`MAX_DEPTH`] deep (an aggregate's public body, whose parts its calls send).
pub fn read_json(body: &[u8]) -> Result<serde_json::Value, JqError> {
    check(body)?;
    serde_json::from_slice(body).map_err(|e| JqError::Json(e.to_string()))
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
///
/// At most `limit` bytes (checked after each string and between elements, so a value that
/// shares one array many times over is refused before it is written out whole) and
/// [`MAX_OUTPUT_DEPTH`] levels.
fn write(out: &mut Vec<u8>, v: &Val, level: usize, limit: usize) -> Result<(), Stop> {
    use jaq_json::Num;
    if level > MAX_OUTPUT_DEPTH {
        return Err(Stop::Depth);
    }
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
                write(out, item, level + 1, limit)?;
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
                        write(&mut key, other, level + 1, limit)?;
                        write_str(out, &key);
                    }
                }
                out.push(b':');
                write(out, item, level + 1, limit)?;
            }
            out.push(b'}');
        }
    }
    if out.len() > limit {
        return Err(Stop::Output(limit));
    }
    Ok(())
}

fn write_str(out: &mut Vec<u8>, b: &[u8]) {
    let s = String::from_utf8_lossy(b);
    // Writing JSON for a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &*s);
}

/// The deepest nesting of `[` and `{` outside strings; linear, no recursion.
pub(super) fn depth(body: &[u8]) -> usize {
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
// compiled filter may be shared: values never leave the run). Checked at compile time.
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
    fn builtins_that_read_the_process_or_write_its_log_are_refused_by_name() {
        for (code, name) in [
            ("env", "env"),
            ("$ENV", "$ENV"),
            ("$ENV.HOME", "$ENV"),
            ("env.PATH", "env"),
            ("{data: ., leak: env}", "env"),
            ("def f: env.AWS_SECRET_ACCESS_KEY; {k: f}", "env"),
            ("try env catch null", "env"),
            ("[$ENV[]]", "$ENV"),
            ("debug", "debug"),
            ("debug(\"x: \\(.)\")", "debug"),
            (".a | debug | .b", "debug"),
            ("stderr", "stderr"),
            (".[] | stderr_empty", "stderr_empty"),
            ("debug_empty", "debug_empty"),
            ("halt_error", "halt_error"),
            ("halt_error(1)", "halt_error"),
            ("input", "input"),
            ("[inputs]", "inputs"),
            ("input_filename", "input_filename"),
            ("$__loc__", "$__loc__"),
            ("$__prog_args", "$__prog_args"),
        ] {
            let e = compile_jq(code).expect_err(code);
            let want = format!("`{code}` calls `{name}`, which transforms may not use: ");
            assert!(e.starts_with(&want), "{code}: {e}");
            assert!(e.ends_with(refused(name).expect(name)), "{code}: {e}");
        }
        let e = compile_jq("env").unwrap_err();
        assert!(
            e.contains("environment variables, which may hold secrets"),
            "{e}"
        );
        let e = compile_jq("stderr").unwrap_err();
        assert!(e.contains("sidecar's log"), "{e}");
        // A refused name among undefined ones is the one reported.
        let e = compile_jq("nosuchfilter | env").unwrap_err();
        assert!(e.contains("calls `env`"), "{e}");
    }

    #[test]
    fn ordinary_programs_and_the_harmless_builtins_still_compile() {
        for code in [
            ".",
            "{id, name: .user.name} | with_entries(.value |= tostring)",
            "[.items[] | select(.price > 1)] | sort_by(.sku) | map(.sku) | join(\",\")",
            "if .a then error(\"no a\") else . end",
            ".when | todate",
            "now | type",
            "[.[] | halt]",
            "\"\\(.a)\" | test(\"x\"; \"i\") | @base64",
            "{} as $ENV | $ENV",
        ] {
            assert!(compile_jq(code).is_ok(), "{code}: {:?}", compile_jq(code));
        }
        // A program's own definitions of the names are its own.
        assert_eq!(run("def env: {PATH: 1}; env.PATH", "null").unwrap(), "1");
        assert_eq!(
            run("def debug: . + 1; {b: (.a | debug)}", r#"{"a": 1}"#).unwrap(),
            r#"{"b":2}"#
        );
        assert_eq!(run(". as $ENV | $ENV.a", r#"{"a": 3}"#).unwrap(), "3");
        // `halt` is inert: the run ends without output; it does not end the sidecar.
        assert_eq!(run(".a | halt", r#"{"a": 3}"#), Err(JqError::NoOutput));
    }

    /// Every builtin jaq offers a transform, so that a jaq upgrade that adds one is reviewed
    /// (does it read process state or write to the log? then [`REFUSED`]) before it ships.
    #[test]
    fn the_builtins_offered_are_known() {
        let mut names: Vec<&str> = std_defs()
            .map(|d| d.name)
            .chain(
                jq_bound::funs()
                    .chain(jaq_core::funs::<Bounded>())
                    .chain(jaq_std::funs::<Bounded>())
                    .chain(jaq_json::funs::<Bounded>())
                    .map(|(name, ..)| name)
                    .filter(|name| refused(name).is_none()),
            )
            .collect();
        names.sort_unstable();
        names.dedup();
        let names = names.join(" ");
        assert_eq!(
            names, KNOWN_BUILTINS,
            "review the new builtins, then update"
        );
    }

    /// The names jaq 3.1 / jaq-std 3.0 / jaq-json 2.0 offer, less [`REFUSED`] (with ours,
    /// `_trellis_*`, jq_bound.rs). Reviewed: none reads process state or writes to the log but
    /// the clock and time zone (`now`, `localtime`, `strflocaltime`) and `halt`
    /// (inert, see [`REFUSED`]).
    const KNOWN_BUILTINS: &str = "\
     @base64 @base64d @html @htmld @json @sh @text @uri @urid _trellis_add _trellis_mul \
     _trellis_tostring abs acos acosh add all any arrays ascii_downcase ascii_upcase asin \
     asinh atan atan2 atanh booleans bsearch capture capture_of_match cbrt ceil combinations \
     contains copysign cos cosh decode_base64 decode_uri del delpaths drem empty \
     encode_base64 encode_uri endswith erf erfc error error_empty escape_html escape_sh exp \
     exp10 exp2 explode expm1 fabs false fdim finites first flatten floor fma fmax fmin fmod \
     frexp from_entries fromdate fromdateiso8601 fromjson gamma getpath gmtime group_by gsub \
     halt has hypot ilogb implode in index indices infinite inside isarray isboolean isempty \
     isfinite isinfinite isnan isnormal isnumber isobject isstring iterables j0 j1 jn join \
     key_values keys keys_unsorted last ldexp length lgamma limit localtime log log10 log1p \
     log2 logb ltrim ltrimstr map map_values match matches max max_by max_by_or_empty min \
     min_by min_by_or_empty mktime modf nan nearbyint nextafter nexttoward normals not now \
     nth null nulls numbers objects path path_value paths pick pow pow10 range recurse \
     remainder repeat reverse rindex rint round rtrim rtrimstr scalars scalb scalbln scan \
     scan_ select setpath significand sin sinh skip sort sort_by split split_ split_matches \
     splits sqrt startswith strflocaltime strftime strings strptime sub tan tanh test tgamma \
     to_entries toboolean tobytes todate todateiso8601 tojson tonumber tostring totype \
     transpose trim true trunc type unescape_html unique unique_by until utf8bytelength \
     values walk while with_entries y0 y1 yn";

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

    /// jaq as it is, unbounded: what the bounded runs are compared with.
    mod plain {
        use super::super::{parse, write, JqError};
        use crate::compose::jq_bound::Clipped;
        use jaq_core::load::{Arena, File, Loader};
        use jaq_core::{data, unwrap_valr, Compiler, Ctx, Vars};
        use jaq_json::Val;

        type Data = data::JustLut<Val>;
        pub type Filter = jaq_core::compile::Filter<jaq_core::Native<Data>>;

        pub fn compile(code: &str) -> Option<Filter> {
            let defs = jaq_core::defs()
                .chain(jaq_std::defs())
                .chain(jaq_json::defs());
            let funs = jaq_core::funs::<Data>()
                .chain(jaq_std::funs::<Data>())
                .chain(jaq_json::funs::<Data>());
            let arena = Arena::default();
            let modules = Loader::new(defs)
                .load(&arena, File { code, path: () })
                .ok()?;
            Compiler::default().with_funs(funs).compile(modules).ok()
        }

        pub fn run(f: &Filter, body: &[u8]) -> Result<Vec<u8>, JqError> {
            let input = parse(body)?;
            let ctx = Ctx::<Data>::new(&f.lut, Vars::new([]));
            let mut out = f.id.run((ctx, input)).map(unwrap_valr);
            let value = match out.next() {
                Some(Ok(v)) => v,
                // Clipped as the bounded runs clip it.
                Some(Err(e)) => return Err(JqError::Run(Clipped(&e).to_string())),
                None => return Err(JqError::NoOutput),
            };
            let mut out = Vec::new();
            write(&mut out, &value, 0, usize::MAX).map_err(JqError::Limit)?;
            Ok(out)
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
        let cmp = r.pick(&["==", "!=", "<", "<=", ">", ">="]);
        match r.below(17) {
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
            11 => format!("select({} {cmp} {})", g(r), g(r)),
            12 => format!("({} // {})", g(r), g(r)),
            13 => format!("(if {} then {} else {} end)", g(r), g(r), g(r)),
            14 => format!("({} {} {})", g(r), r.pick(&["and", "or"]), g(r)),
            15 => {
                let unary = [
                    "length",
                    "keys",
                    "keys_unsorted",
                    "to_entries",
                    "from_entries",
                    "type",
                    "not",
                    "tostring",
                    "first",
                    "last",
                    "join(\",\")",
                    "values",
                    "empty",
                    ".[1]",
                    ".[-1]",
                ];
                let f = match r.below(6) {
                    0 => format!("has(\"{k}\")"),
                    1 => format!("has({})", r.pick(&["0", "-1", "2"])),
                    2 => format!("del(.{k})"),
                    3 => format!("del(.{k}.{k2})"),
                    4 => format!("\"<\\({})|\\(.{k})>\"", g(r)),
                    _ => r.pick(&unary).to_string(),
                };
                format!("({} | {f})", g(r))
            }
            // Around the subset: jaq alone runs these.
            _ => [
                "(.a // 1 | . as $x | $x)",
                "@base64 \"\\(.a)\"",
                "ascii_downcase",
                ".a?",
                "-1",
                "1.5",
                "{(.a): 1}",
                "[.[] | . / 2]",
                "del(.a, .b)",
                ".[1:]",
            ][r.below(10)]
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
            // The widened subset's edge values: booleans, zeros, empty containers, entries
            // with and without a value or a string key, nested objects for `del`.
            "true",
            r#"[true, false, null, 0, -0.0, "", [], {}, "ééx", -9223372036854775808]"#,
            r#"[{"key": "a", "value": 1}, {"key": "b"}, {"key": "a", "value": 3}]"#,
            r#"[{"key": 1, "value": 2}]"#,
            r#"{"a": {"b": {"c": 1}, "d": 2}, "b": {"b": 2}, "items": [{"price": 1}, {"price": 1.0}], "n": "x"}"#,
            r#"{"a": [1, [2], {"b": 1}], "b": [1, [2], {"b": 1.0}], "n": 0.0, "qty": -0.0}"#,
            r#"{"a": "b", "b": "a", "items": ["x", 1, true, null], "price": 1e308, "qty": 1e308}"#,
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
            // The widened subset (select, comparisons, `//`, `if`, `and`/`or`, interpolation,
            // entries, `length`, `keys`, `has`, `del`, `join`, indexes).
            "[.items[] | select(.price > 2)]",
            "map(select(. != null))",
            "select(.a == 3)",
            ".a // \"default\"",
            ".n // .a // 7",
            "(.a, .b) // 1",
            ".a // empty",
            "if .a then .b else \"no\" end",
            "if .a == 1 then 1 elif .b then 2 end",
            "[.[] | if . then 1 else 0 end]",
            ".a and .b",
            ".a or .b",
            "(.a, null) and (true, false)",
            ".a | not",
            "[.[] | type]",
            "length",
            "[.[] | length]",
            ".items | length",
            "keys",
            "keys_unsorted",
            "[.[] | keys?]",
            "has(\"a\")",
            "has(0)",
            "has(-1)",
            "to_entries",
            "from_entries",
            "with_entries({key: \"k\\(.key)\", value})",
            "to_entries | from_entries",
            "del(.a)",
            "del(.a.b)",
            "del(.items)",
            "del(.a.b.c)",
            "\"\\(.a)-\\(.b)\"",
            "\"id=\\(.n), \\(.a)\"",
            "tostring",
            "[.[] | tostring]",
            ".items | join(\",\")",
            "join(\", \")",
            ".[0]",
            ".[-1]",
            ".items[1]",
            ".a[0]",
            "first",
            "last",
            "[.[] | . < 2]",
            "[.[] | . >= \"a\"]",
            ".a == .b",
            ".a != .b",
            ".a < .b",
            "[.[] | [., .] | .[0] == .[1]]",
            "[.items[] | values]",
            "map(has(\"a\"))",
            "{order: .id, who: \"\\(.customer.name) <\\(.customer.email)>\", \
             city: (.customer.address.city // \"unknown\"), \
             lines: [.items[] | select(.qty > 1) | {sku, total: (.price * .qty)}], \
             count: (.items | length), priority: (if (.items | length) > 20 then \"high\" else \"normal\" end)}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let fixed = programs.len();
        let mut native_by_program = vec![0usize; programs.len()];
        programs.extend((0..400).map(|i| program(&mut r, 1 + i % 4)));
        // Plain jaq panics on a few inputs (`"s" * 9223372036854775807`: a string repeated
        // past memory); caught below, their messages would bury the test's own.
        thread_local!(static IN_JAQ: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
        std::panic::set_hook(Box::new(|info| {
            if !IN_JAQ.get() {
                eprintln!("{info}");
            }
        }));
        let (mut runs, mut native, mut limited) = (0, 0, 0);
        for (p, code) in programs.iter().enumerate() {
            let Ok(f) = compile_jq(code) else {
                assert!(
                    plain::compile(code).is_none(),
                    "`{code}` compiles unbounded only"
                );
                continue;
            };
            let unbounded = plain::compile(code).expect("compiles unbounded");
            for body in &bodies {
                runs += 1;
                let jaq = check(body).and_then(|()| f.apply_jaq(body));
                // The rewrite (jq_bound.rs) keeps jaq's meaning: the bounded run gives what
                // jaq alone gives, byte for byte, errors included, but where it stops.
                IN_JAQ.set(true);
                let plain = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check(body).and_then(|()| plain::run(&unbounded, body))
                }));
                IN_JAQ.set(false);
                match (&jaq, plain) {
                    (Err(JqError::Limit(_)), _) => limited += 1,
                    // jaq's own overflow (`length` of -2^63: `i64::abs`), a panic in this
                    // debug build, caught by the bounded run; the fast path leaves it to jaq.
                    (Err(JqError::Panic(_)), Err(_)) => {
                        let fast = check(body).ok().and_then(|()| f.apply_native(body));
                        assert_eq!(fast, None, "`{code}` panics in jaq");
                        continue;
                    }
                    (_, Ok(plain)) => assert_eq!(jaq, plain, "`{code}` bounded and not"),
                    (_, Err(_)) => panic!("`{code}` panics unbounded, gives {jaq:?} bounded"),
                }
                let fast = check(body).ok().and_then(|()| f.apply_native(body));
                if let Err(JqError::Limit(_)) = jaq {
                    assert_eq!(fast, None, "`{code}` runs past its bounds in jaq");
                    continue;
                }
                if let Some(fast) = &fast {
                    native += 1;
                    if p < fixed {
                        native_by_program[p] += 1;
                    }
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
        // Each fixed program ran natively on some body, but those that never give one value
        // natively (no output, a stream inside an object, `?` outside the subset).
        for (p, code) in programs[..fixed].iter().enumerate() {
            if !["empty", "{a: (1, 2)}", "[.[] | keys?]"].contains(&code.as_str()) {
                assert!(native_by_program[p] > 0, "`{code}` never ran natively");
            }
        }
        // The generated programs repeat strings by `9223372036854775807` now and then.
        assert!(
            limited > 0 && limited < runs / 100,
            "{limited} of {runs} limited"
        );
        // Not vacuous: the fast path took a good share of the runs (most of the others are
        // errors on bodies of the wrong shape or refused bodies, which jaq reports).
        assert!(
            runs > 20_000 && native > 4_000,
            "{native} of {runs} runs native"
        );
    }

    /// The widened forms' edge values, spelled out: what the fast path answers itself (and
    /// that it is jaq's answer), and where it leaves the answer (an error) to jaq.
    #[test]
    fn widened_forms_answer_natively_as_jaq_does_and_leave_errors_to_jaq() {
        let native = [
            // jaq's `swap_remove`: the last field takes the removed one's place.
            ("del(.a)", r#"{"a": 1, "b": 2, "c": 3}"#, r#"{"c":3,"b":2}"#),
            (
                "del(.x.y)",
                r#"{"x": {"y": 1, "z": 2}}"#,
                r#"{"x":{"z":2}}"#,
            ),
            ("del(.nope)", r#"{"a": 1}"#, r#"{"a":1}"#),
            // jaq-json's equality: numbers by value, objects in any key order.
            (
                "[.[0] == .[1], .[2] == .[3]]",
                "[1, 1.0, -0.0, 0]",
                "[true,true]",
            ),
            (
                "[.[0] == .[1], .[0] < .[1]]",
                r#"[{"a": 1, "b": 2}, {"b": 2, "a": 1}]"#,
                "[true,false]",
            ),
            (
                "[.[] | . < \"\"]",
                r#"[null, false, 1e308, "", [], {}]"#,
                "[true,true,true,false,false,false]",
            ),
            (".a // \"d\"", r#"{"a": false}"#, r#""d""#),
            (".a // \"d\"", r#"{"a": 0}"#, "0"),
            (
                "[.[] | select(.s == \"open\") | .id]",
                r#"[{"s": "open", "id": 1}, {"id": 2}, {"s": "open", "id": 3}]"#,
                "[1,3]",
            ),
            (
                "if .a then 1 end",
                r#"{"a": null, "b": 2}"#,
                r#"{"a":null,"b":2}"#,
            ),
            ("(true, false) and (true, false)", "null", "true"),
            (
                "[length, (.s | length), (.n | length)]",
                r#"{"s": "é😀", "n": -3}"#,
                "[2,2,3]",
            ),
            (
                "[has(\"s\"), has(\"x\"), (.a | has(-1), has(2))]",
                r#"{"s": 1, "a": [1, 2]}"#,
                "[true,false,true,false]",
            ),
            ("keys", r#"{"b": 1, "a": 2, "B": 3}"#, r#"["B","a","b"]"#),
            ("keys_unsorted", r#"{"b": 1, "a": 2}"#, r#"["b","a"]"#),
            ("to_entries", "[7]", r#"[{"key":0,"value":7}]"#),
            (
                "from_entries",
                r#"[{"key": "a"}, {"key": "b", "value": 1}, {"key": "a", "value": 2}]"#,
                r#"{"a":2,"b":1}"#,
            ),
            (
                "\"\\(.a)/\\(.b)/\\(.c)/\\(.d)\"",
                r#"{"a": "x", "b": -1, "c": null, "d": true}"#,
                r#""x/-1/null/true""#,
            ),
            (
                "join(\"-\")",
                r#"["a", 1, null, true]"#,
                r#""a-1-null-true""#,
            ),
            ("[.[-1], .[5], .[-5]]", "[1, 2]", "[2,null,null]"),
        ];
        for (code, body, want) in native {
            let f = compile_jq(code).unwrap();
            let body = body.as_bytes();
            let fast = f.apply_native(body);
            assert_eq!(fast.as_deref(), Some(want.as_bytes()), "`{code}` natively");
            assert_eq!(
                f.apply_jaq(body).as_deref(),
                Ok(want.as_bytes()),
                "`{code}` by jaq"
            );
        }
        // Errors and what jaq prints itself: the fast path gives up, `apply` answers jaq's.
        let to_jaq = [
            ("length", "true"),
            ("has(\"a\")", r#""s""#),
            ("from_entries", r#"[{"key": 1, "value": 2}]"#),
            ("from_entries", "[null]"),
            ("del(.a.b)", r#"{"a": 3}"#),
            ("\"\\(.)\"", "1.5"),
            ("join(\",\")", r#"[[1]]"#),
            ("join(1)", r#"["a", "b"]"#),
            ("select(.a == 2)", r#"{"a": 1}"#),
            ("keys", "3"),
        ];
        for (code, body) in to_jaq {
            let f = compile_jq(code).unwrap();
            assert!(f.is_native(), "`{code}` is in the subset");
            let body = body.as_bytes();
            assert_eq!(f.apply_native(body), None, "`{code}` on {body:?} is jaq's");
            assert_eq!(f.apply(body), f.apply_jaq(body), "`{code}`");
        }
        let jaq = |code: &str, body: &str| compile_jq(code).unwrap().apply(body.as_bytes());
        assert!(matches!(jaq("length", "true"), Err(JqError::Run(_))));
        assert!(matches!(
            jaq("select(.a == 2)", r#"{"a": 1}"#),
            Err(JqError::NoOutput)
        ));
    }

    #[test]
    fn the_subset_is_recognised() {
        for code in [
            ".",
            ". + {total: (.items | map(.price) | add)}",
            "{id, customer: .customer.name, lines: [.items[] | {sku, total: (.price * .qty)}]}",
            "[.items[] | select(.status == \"open\" and .qty >= 1)]",
            ".a // \"default\"",
            "if .a then 1 elif .b then 2 else 3 end",
            "if .a then 1 end",
            "length, keys, keys_unsorted, has(\"a\"), type, not, tostring, values, empty",
            "to_entries, from_entries, with_entries(.value), join(\",\")",
            "del(.a), del(.a.b), .[0], .a[-1], first, last",
            "\"\\(.a) and \\(.b | length)\"",
            "(.a < .b) or (.a != .b)",
        ] {
            assert!(compile_jq(code).unwrap().is_native(), "{code}");
        }
        for code in [
            "def f: .; f",
            ".a?",
            "1.5",
            ".[1:]",
            "@base64 \"\\(.a)\"",
            ". as $x | $x",
            "del(.a, .b)",
            "del(.[0])",
            "ascii_downcase",
            "$__loc__",
        ] {
            let f = compile_jq(code);
            assert!(f.map_or(true, |f| !f.is_native()), "{code}");
        }
    }
}
