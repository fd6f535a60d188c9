//! `transform`: JSON body transforms of a forwarding rule, for the request (before it is sent)
//! and the response (before the client sees it).
//!
//! The field operations (`remove`, `rename`, `add`, by JSON pointer) are compiled into jq in
//! front of the rule's own `jq`, so one program runs per body and is compiled once per policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::fields::{segments, FieldOps};
use super::jq::{compile_jq, JqError, JqFilter};
use super::jq_bound::{default_steps, Limits, MAX_STEPS};
use super::jq_native;

/// Default and largest body a transform buffers.
const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
pub const MAX_TRANSFORM_BODY: u64 = 16 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BodyTransform {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<TransformSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<TransformSpec>,
    /// The largest body buffered to transform, in bytes (default 1 MiB): a larger request
    /// answers 413, a larger upstream answer 502.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// The step budget of one jq run (jaq's evaluation steps; docs/composition.md): by default
    /// 4 per byte of `max_body_bytes`, at least 1 million, at most 64 Mi. A body that makes
    /// the program run longer fails the transform (`transform-budget`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_jq_steps: Option<u64>,
}

/// Field operations, applied in the order `remove`, `rename`, `add`, then `jq`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformSpec {
    /// JSON pointers (`/a/b`, `/items/0`) of fields to delete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// From pointer to pointer; a missing field is left missing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
    /// Pointer to the JSON value set there (replacing what is there).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, serde_json::Value>,
    /// A jq program whose first output is the new body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jq: Option<String>,
}

/// A compiled body transform.
#[derive(Debug)]
pub enum BodyProgram {
    Fields(FieldOps),
    Jq(JqFilter),
}

impl BodyProgram {
    /// Transform a JSON body (UTF-8, at most 64 levels deep, strict JSON), waiting for jaq's
    /// thread when jaq runs (tests, benches; the proxy uses [`Self::apply_inline`]).
    pub fn apply(&self, body: &[u8]) -> Result<Vec<u8>, JqError> {
        match self {
            Self::Fields(f) => f.apply(body),
            Self::Jq(f) => f.apply(body),
        }
    }

    /// What runs on the caller's thread, in microseconds: the field operations, or the jq fast
    /// path. `None`: jaq must run ([`Self::jaq`], on a jaq thread).
    pub fn apply_inline(&self, body: &[u8]) -> Option<Result<Vec<u8>, JqError>> {
        match self {
            Self::Fields(f) => Some(f.apply(body)),
            Self::Jq(f) => f.apply_native(body).map(Ok),
        }
    }

    /// The jq program, when there is one.
    pub fn jaq(&self) -> Option<&JqFilter> {
        match self {
            Self::Fields(_) => None,
            Self::Jq(f) => Some(f),
        }
    }
}

fn default_max_body() -> u64 {
    DEFAULT_MAX_BODY
}

// === impl BodyTransform ===

impl BodyTransform {
    /// The bounds of one jq run of this transform (jq_bound.rs): steps as set or by default,
    /// sizes from `max_body_bytes`.
    pub fn limits(&self) -> Limits {
        let steps = self
            .max_jq_steps
            .unwrap_or_else(|| default_steps(self.max_body_bytes));
        Limits::for_body(self.max_body_bytes, steps)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.request.is_none() && self.response.is_none() {
            return Err("set `request`, `response` or both".into());
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > MAX_TRANSFORM_BODY {
            return Err(format!(
                "max_body_bytes: between 1 and {MAX_TRANSFORM_BODY}"
            ));
        }
        if let Some(n) = self.max_jq_steps {
            if !(1_000..=MAX_STEPS).contains(&n) {
                return Err(format!("max_jq_steps: between 1000 and {MAX_STEPS}"));
            }
        }
        for (field, spec) in [("request", &self.request), ("response", &self.response)] {
            if let Some(s) = spec {
                s.compile(self.limits())
                    .map_err(|m| format!("{field}.{m}"))?;
            }
        }
        Ok(())
    }
}

// === impl TransformSpec ===

impl TransformSpec {
    /// The transform compiled: field operations alone run natively; with `jq`, everything
    /// is one jq program, run within `limits` (see [`BodyTransform::limits`]). The error names
    /// the field.
    pub fn compile(&self, limits: Limits) -> Result<BodyProgram, String> {
        let Some(jq) = &self.jq else {
            let program = self.program()?;
            return Ok(BodyProgram::Fields(self.field_ops(program)?));
        };
        // The operator's own program alone first, so that an error quotes what they wrote.
        compile_jq(jq).map_err(|m| format!("jq: {m}"))?;
        let program = self.program()?;
        let filter = compile_jq(&program).map_err(|m| format!("jq: {m}"))?;
        // The same, run natively when `jq` is in the fast path's subset (jq_native.rs).
        let native = jq_native::compile_with_fields(&self.remove, &self.rename, &self.add, jq);
        Ok(BodyProgram::Jq(
            filter.with_native(native).with_limits(limits),
        ))
    }

    /// The native form of the field operations (`_program` checked the pointers already).
    fn field_ops(&self, _program: String) -> Result<FieldOps, String> {
        let seg = |p: &str| segments(p);
        Ok(FieldOps {
            remove: self
                .remove
                .iter()
                .map(|p| seg(p))
                .collect::<Result<_, _>>()?,
            rename: self
                .rename
                .iter()
                .map(|(f, t)| Ok((seg(f)?, seg(t)?)))
                .collect::<Result<_, String>>()?,
            add: self
                .add
                .iter()
                .map(|(p, v)| Ok((seg(p)?, v.clone())))
                .collect::<Result<_, String>>()?,
        })
    }

    /// The field operations as jq, then the rule's own program.
    fn program(&self) -> Result<String, String> {
        let mut steps = Vec::new();
        for (i, p) in self.remove.iter().enumerate() {
            let path = jq_path(p).map_err(|m| format!("remove[{i}]: {m}"))?;
            // A missing element is no error (jaq's delpaths fails on an index past the end).
            steps.push(format!("(. as $in | try delpaths([{path}]) catch $in)"));
        }
        for (from, to) in &self.rename {
            let f = jq_path(from).map_err(|m| format!("rename.{from}: {m}"))?;
            let t = jq_path(to).map_err(|m| format!("rename.{from}: {m}"))?;
            steps.push(format!(
                "(if getpath({f}) == null then . else getpath({f}) as $v | delpaths([{f}]) | _set({t}; $v) end)"
            ));
        }
        for (p, v) in &self.add {
            let path = jq_path(p).map_err(|m| format!("add.{p}: {m}"))?;
            let value = serde_json::to_string(v).map_err(|e| format!("add.{p}: {e}"))?;
            steps.push(format!("_set({path}; {value})"));
        }
        if let Some(jq) = &self.jq {
            if jq.trim().is_empty() {
                return Err("jq: empty program".into());
            }
            steps.push(format!("({jq}\n)"));
        }
        if steps.is_empty() {
            return Err("jq: set `jq` or a field operation".into());
        }
        Ok(format!("{SET} {}", steps.join(" | ")))
    }
}

/// `_set(path; value)`: as `setpath`, creating missing objects (and arrays, for a number)
/// on the way, as jq does and jaq's `setpath` does not; an index equal to an array's length
/// appends (as the native operations do).
const SET: &str = "def _set($p; $v): if ($p | length) == 0 then $v else $p[0] as $k \
    | (if . == null then (if ($k | type) == \"number\" then [] else {} end) else . end) \
    | (if ($k | type) == \"number\" and (. | type) == \"array\" and $k == length \
       then . + [null] else . end) \
    | .[$k] |= _set($p[1:]; $v) end;";

/// A JSON pointer (RFC 6901) as a jq path: `/items/0/a~1b` -> `["items",0,"a/b"]`; segments of
/// digits index arrays.
fn jq_path(pointer: &str) -> Result<String, String> {
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "`{pointer}` is not a JSON pointer (starts with '/')"
        ));
    };
    let mut out = Vec::new();
    for seg in rest.split('/') {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.len() <= 9 && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push(seg);
        } else {
            out.push(serde_json::Value::String(seg).to_string());
        }
    }
    Ok(format!("[{}]", out.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> TransformSpec {
        serde_norway::from_str(yaml).expect("spec")
    }

    #[test]
    fn field_operations_run_before_jq() {
        let s = spec(
            r#"
remove: [/secret, /items/0]
rename: {/user/name: /name}
add: {/version: 2, /meta/source: edge}
jq: ". + {count: (.items | length)}"
"#,
        );
        let f = s.compile(Limits::default()).expect("compiles");
        let out = f
            .apply(br#"{"secret": 1, "user": {"name": "ana"}, "items": [1, 2, 3]}"#)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"user": {}, "items": [2, 3], "name": "ana", "version": 2,
                "meta": {"source": "edge"}, "count": 2})
        );
        // A missing field is not renamed into a null.
        let out = f.apply(br#"{"items": []}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v.get("name").is_none(), "{v}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("{}", "set `request`, `response`"),
            ("{request: {}}", "request.jq: set `jq`"),
            (
                "{request: {jq: '.a |'}}",
                "request.jq: `.a |` does not parse",
            ),
            (
                "{response: {jq: 'frobnicate'}}",
                "response.jq: `frobnicate` does not compile",
            ),
            (
                "{response: {jq: '{data: ., path: env.PATH}'}}",
                "response.jq: `{data: ., path: env.PATH}` calls `env`, which transforms may not use",
            ),
            (
                "{request: {add: {/a: 1}, jq: '$ENV.HOME'}}",
                "request.jq: `$ENV.HOME` calls `$ENV`",
            ),
            (
                "{request: {jq: '.a | debug'}}",
                "request.jq: `.a | debug` calls `debug`",
            ),
            (
                "{response: {remove: [a]}}",
                "response.remove[0]: `a` is not a JSON pointer",
            ),
            ("{response: {jq: .}, max_body_bytes: 0}", "max_body_bytes"),
            (
                "{response: {jq: .}, max_jq_steps: 10}",
                "max_jq_steps: between 1000",
            ),
        ];
        for (yaml, want) in cases {
            let t: BodyTransform = serde_norway::from_str(yaml).expect(yaml);
            let e = t.validate().unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}\n wanted {want}");
        }
        let e = serde_norway::from_str::<BodyTransform>("{request: {jq: ., sed: x}}").unwrap_err();
        assert!(e.to_string().contains("unknown field `sed`"), "{e}");
    }

    /// Field operations followed by a jq program of the native subset: the native path gives
    /// what jaq gives for the program `program()` writes, byte for byte, errors included.
    #[test]
    fn field_operations_run_natively_as_jaq_runs_them() {
        use super::super::jq::differential::{bodies, Rng};
        let mut r = Rng(0xD1B5_4A32_D192_ED03);
        let mut bodies = bodies(&mut r);
        bodies.push(br#"{"a": {"b": {"c": 1}, "0": 2}, "b": null, "items": [{"price": 1}, {"price": 2}], "n": 5, "x/y": 1, "": 0, "z": 9}"#.to_vec());
        bodies.push(
            br#"{"items": [1, 2, 3], "a": [{"b": 1}], "b": {"a": 1, "b": 2, "c": 3}}"#.to_vec(),
        );
        let pointers = [
            "/a",
            "/b",
            "/a/b",
            "/a/b/c",
            "/items/0",
            "/items/1",
            "/items/2",
            "/items/9",
            "/a/0",
            "/0",
            "/n",
            "/x~1y",
            "/",
            "/items/0/price",
            "/new/deep",
            "/b/a",
            "/items/-",
        ];
        let values = [
            "2",
            "edge",
            "{k: 1}",
            "[1, 2]",
            "null",
            "1.5",
            "-3",
            "true",
            "{z: 1, a: [1.0]}",
            "1e100",
            "'a\"b\\n'",
        ];
        let programs = [
            ".",
            ". + {total: (.items | map(.price) | add)}",
            "{data: ., served_by: \"edge\"}",
            "[.[]]",
            ".a, .b",
            "{n, a}",
        ];
        let (mut runs, mut native, mut native_specs) = (0, 0, 0);
        for i in 0..600 {
            let pick = |r: &mut Rng, n| -> Vec<String> {
                (0..r.below(n))
                    .map(|_| r.pick(&pointers).to_string())
                    .collect()
            };
            let remove = pick(&mut r, 3);
            let rename = pick(&mut r, 3).into_iter().zip(pick(&mut r, 3)).collect();
            let add = pick(&mut r, 3)
                .into_iter()
                .map(|p| (p, serde_norway::from_str(r.pick(&values)).expect("value")))
                .collect();
            let spec = TransformSpec {
                remove,
                rename,
                add,
                jq: Some(programs[i % programs.len()].into()),
            };
            let Ok(BodyProgram::Jq(f)) = spec.compile(Limits::default()) else {
                panic!("{spec:?} compiles");
            };
            native_specs += usize::from(f.is_native());
            for body in &bodies {
                runs += 1;
                let jaq = super::super::jq::check(body).and_then(|()| f.apply_jaq(body));
                if let Some(fast) = f.apply_native(body) {
                    native += 1;
                    assert_eq!(
                        Ok(&fast),
                        jaq.as_ref(),
                        "{spec:?} on {}",
                        String::from_utf8_lossy(body)
                    );
                }
                assert_eq!(f.apply(body), jaq, "{spec:?}");
            }
        }
        // Not vacuous: most specs have a native form (not those adding `1e100`, which jaq
        // prints as serde_json wrote it, `1e+100`), and it ran for a good share of the bodies.
        assert!(native_specs > 500, "{native_specs} of 600 specs native");
        assert!(native * 5 > runs, "{native} of {runs} runs native");
    }
}
