//! YAML for Kubernetes: read as YAML 1.2 by serde_norway, written so that YAML 1.1 readers
//! (kubectl and the API server use go-yaml, PyYAML-based tools too) read the same values.
//!
//! serde_norway writes `yes`, `on`, `off`, `y`, `NO`, `1_000` or `12:30` as plain scalars:
//! strings to a YAML 1.2 reader, but booleans or numbers to kubectl, which then refuses an
//! annotation or env value that is not a string. So the output is written here: a string
//! stays plain only when it cannot be read as anything else under either version, otherwise it
//! is quoted; multi-line strings become literal blocks. Mappings keep their order. On input,
//! values are taken as Kubernetes takes them ([`as_kubernetes_reads`]): a plain octal file mode
//! (`defaultMode: 0440`) is a number, custom tags are dropped. Unquoted YAML 1.1 booleans
//! (`readOnly: yes`) are read as the strings YAML 1.2 makes of them, and written quoted.

use std::fmt::Write as _;

use serde_norway::{Mapping, Value};

/// The words YAML 1.1 reads as booleans or null (any case), and 1.2's null.
const RESERVED: &[&str] = &[
    "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~",
];
/// Longer keys are written as explicit keys (`? key`), below YAML's 1024-character limit on
/// implicit ones.
const MAX_SIMPLE_KEY: usize = 1000;
/// The integer fields of volumes (secret, configMap, projected, downwardAPI items) that
/// manifests write in octal.
const MODE_KEYS: &[&str] = &["defaultMode", "mode"];

/// One document, ending with a newline.
pub fn to_string(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Mapping(m) if !m.is_empty() => mapping(&mut out, m, 0, false),
        Value::Sequence(s) if !s.is_empty() => sequence(&mut out, s, 0, false),
        // A literal block's lines are indented even at the top: at column 0 they would read
        // as a new document's keys or comments.
        _ => {
            inline(&mut out, v, 2);
            out.push('\n');
        }
    }
    out
}

/// Read values as Kubernetes does: `defaultMode: 0440` (a string to a YAML 1.2 reader) is the
/// number it means, and a custom tag (`!thing value`, which Kubernetes' decoding drops) leaves
/// only its value.
pub fn as_kubernetes_reads(v: &mut Value) {
    if let Value::Tagged(t) = v {
        let inner = std::mem::replace(&mut t.value, Value::Null);
        *v = inner;
        return as_kubernetes_reads(v);
    }
    match v {
        Value::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                let is_mode = k.as_str().is_some_and(|k| MODE_KEYS.contains(&k));
                if let (true, Value::String(s)) = (is_mode, &*val) {
                    if let Some(n) = octal(s) {
                        *val = Value::from(n);
                    }
                }
                as_kubernetes_reads(val);
            }
        }
        Value::Sequence(s) => s.iter_mut().for_each(as_kubernetes_reads),
        _ => {}
    }
}

fn octal(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0o").or_else(|| s.strip_prefix('0'))?;
    (!digits.is_empty())
        .then(|| u64::from_str_radix(digits, 8).ok())
        .flatten()
}

fn indent(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

/// `continued`: the cursor is already at column `at`, after `- `.
fn mapping(out: &mut String, m: &Mapping, at: usize, continued: bool) {
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 || !continued {
            indent(out, at);
        }
        let mut written = String::new();
        key(&mut written, k);
        if written.len() > MAX_SIMPLE_KEY {
            // YAML allows implicit keys up to 1024 characters; longer ones are explicit.
            out.push_str("? ");
            out.push_str(&written);
            out.push('\n');
            indent(out, at);
        } else {
            out.push_str(&written);
        }
        out.push(':');
        match v {
            Value::Mapping(child) if !child.is_empty() => {
                out.push('\n');
                mapping(out, child, at + 2, false);
            }
            // Lists under a key at the key's own indentation, as kubectl writes them.
            Value::Sequence(items) if !items.is_empty() => {
                out.push('\n');
                sequence(out, items, at, false);
            }
            _ => {
                out.push(' ');
                inline(out, v, at + 2);
                out.push('\n');
            }
        }
    }
}

fn sequence(out: &mut String, items: &[Value], at: usize, continued: bool) {
    for (i, item) in items.iter().enumerate() {
        if i > 0 || !continued {
            indent(out, at);
        }
        out.push_str("- ");
        match item {
            Value::Mapping(m) if !m.is_empty() => mapping(out, m, at + 2, true),
            Value::Sequence(s) if !s.is_empty() => sequence(out, s, at + 2, true),
            _ => {
                inline(out, item, at + 2);
                out.push('\n');
            }
        }
    }
}

/// A value on the current line: scalars, empty collections, a literal block's header and its
/// lines (indented at `block_at`).
fn inline(out: &mut String, v: &Value, block_at: usize) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => string(out, s, block_at),
        Value::Mapping(_) => out.push_str("{}"),
        Value::Sequence(_) => out.push_str("[]"),
        // [`as_kubernetes_reads`] removed the tags of what was read; one made in code is
        // written as its value alone (flow style is valid YAML).
        Value::Tagged(t) => {
            let flow = serde_json::to_string(&t.value).unwrap_or_else(|_| "null".into());
            out.push_str(&flow);
        }
    }
}

fn key(out: &mut String, k: &Value) {
    match k {
        Value::String(s) if plain(s) => out.push_str(s),
        Value::String(s) => quoted(out, s),
        Value::Number(_) | Value::Bool(_) | Value::Null => inline(out, k, 0),
        other => {
            let flow = serde_json::to_string(other).unwrap_or_else(|_| "null".into());
            out.push_str(&flow);
        }
    }
}

fn string(out: &mut String, s: &str, block_at: usize) {
    if plain(s) {
        out.push_str(s);
    } else if literal_ok(s) {
        literal(out, s, block_at);
    } else {
        quoted(out, s);
    }
}

/// Single quotes for printable text (only `'` is escaped, as `''`); double quotes with JSON's
/// escapes, which YAML shares, for the rest.
fn quoted(out: &mut String, s: &str) {
    if s.chars().any(char::is_control) {
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
    } else {
        let _ = write!(out, "'{}'", s.replace('\'', "''"));
    }
}

/// A string that reads back as the same string under YAML 1.1 and 1.2: no reserved word,
/// nothing YAML would read as structure (`: `, ` #`, a trailing `:`), and a safe start: a
/// letter, `_`, `/`, `$`, dashes then a letter (`--flag`), or a digit when a letter no
/// number, date or time uses follows (`50m`, `32Mi`, `2s`; not `1e3`, `0x1F`, `2001-12-14T1`:
/// hex digits, exponents, radix prefixes and date-time letters do not count).
/// Anything else starting with a digit, sign or dot is quoted: every number form is.
fn plain(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let after_dashes = s.trim_start_matches('-').chars().next();
    let starts_ok = match first {
        '-' => after_dashes.is_some_and(|c| c.is_ascii_alphabetic()),
        '0'..='9' => s
            .chars()
            .any(|c| c.is_ascii_alphabetic() && !"aAbBcCdDeEfFoOtTxXzZ".contains(c)),
        c => c.is_ascii_alphabetic() || matches!(c, '_' | '/' | '$'),
    };
    let chars_ok = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_./-:@+=$(),* ".contains(c));
    starts_ok
        && chars_ok
        && !s.ends_with([':', ' '])
        && !s.contains(": ")
        && !s.contains(" #")
        && !RESERVED.iter().any(|r| r.eq_ignore_ascii_case(s))
}

/// Multi-line text that a literal block keeps exactly.
fn literal_ok(s: &str) -> bool {
    s.contains('\n')
        && !s.starts_with([' ', '\n'])
        && !s.chars().any(|c| c.is_control() && c != '\n' && c != '\t')
        && !s.contains(" \n")
}

fn literal(out: &mut String, s: &str, at: usize) {
    let body = s.trim_end_matches('\n');
    let chomp = match s.len() - body.len() {
        0 => "-",
        1 => "",
        _ => "+",
    };
    let _ = write!(out, "|{chomp}");
    for line in body.split('\n') {
        out.push('\n');
        if !line.is_empty() {
            indent(out, at);
            out.push_str(line);
        }
    }
    // `|+` keeps the extra final newlines as empty lines.
    for _ in 1..(s.len() - body.len()) {
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::sidecar::{map, s};

    fn round_trip(yaml: &str) -> (Value, String) {
        let v: Value = serde_norway::from_str(yaml).expect("input");
        let text = to_string(&v);
        let back: Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(back, v, "{text}");
        (v, text)
    }

    #[test]
    fn strings_yaml_1_1_reads_otherwise_are_quoted() {
        let (_, text) = round_trip(
            r#"{a: "yes", b: "on", c: "0755", d: "1e3", e: "y", f: "NO", g: "~", h: "0x1F",
               i: "1_000", j: "12:30", k: "true", l: "", m: "-1", n: ".5", o: "a: b", p: "a #b",
               q: "ok", r: "registry.example.com/orders:1.0", s: "$(POD_IP):15006", t: "50m",
               u: "2001-12-14", v: "off", w: "--timeout", x: "---", z: "it's",
               aa: "tab\there"}"#,
        );
        for plain in [
            "q: ok",
            "r: registry.example.com/orders:1.0",
            "s: $(POD_IP):15006",
            "t: 50m",
            "w: --timeout",
        ] {
            assert!(text.contains(&format!("{plain}\n")), "{plain} in {text}");
        }
        for quoted in [
            "'yes'",
            "'on'",
            "'0755'",
            "'y'",
            "'NO'",
            "'1_000'",
            "'12:30'",
            "'2001-12-14'",
            "'off'",
            "'1e3'",
            "'0x1F'",
            "'-1'",
            "'---'",
            "'it''s'",
            "\"tab\\there\"",
        ] {
            assert!(text.contains(quoted), "{quoted} in {text}");
        }
    }

    #[test]
    fn structure_and_multi_line_text_round_trip() {
        let (_, text) = round_trip(
            "a:\n  b: [1, 2.5, true, null]\n  c: []\n  d: {}\nlist:\n- x: 1\n  y: [[1, 2], []]\n- plain\n- \"two\\nlines\\n\"\n- \"keep\\n\\n\"\n- \"no end\\nnewline\"\n- \" leading\\nspace\"\ndata:\n  f.yaml: |\n    k: v\n\n    other: 2\n",
        );
        assert!(
            text.contains("  f.yaml: |\n    k: v\n\n    other: 2\n"),
            "{text}"
        );
    }

    /// Found by the `inject` fuzz target: a document that is only a multi-line string had its
    /// lines at column 0, where `# ...` reads as a comment.
    #[test]
    fn a_document_that_is_text_keeps_its_lines() {
        round_trip("|\n  # Several documents: a workload,ms: {app: a}}\n");
        round_trip("\"a\\n# b\\n\\nc: d\\n\"");
    }

    /// Found by the `inject` fuzz target: a key over 1024 characters cannot be implicit.
    #[test]
    fn long_keys_are_explicit() {
        let long = s("k".repeat(1100));
        let mut item = Mapping::new();
        item.insert(long.clone(), map([("a", Value::from(1))]));
        item.insert(s("b"), Value::from(2));
        let mut m = Mapping::new();
        m.insert(long, Value::from(1));
        m.insert(s("list"), Value::Sequence(vec![Value::Mapping(item)]));
        let v = Value::Mapping(m);
        let text = to_string(&v);
        let back: Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(back, v, "{text}");
    }

    /// Found by the `inject` fuzz target: a custom tag was written in a form that does not
    /// parse.
    #[test]
    fn custom_tags_leave_their_value() {
        let mut v: Value = serde_norway::from_str("! Existing\n").expect("yaml");
        as_kubernetes_reads(&mut v);
        assert_eq!(v, Value::from("Existing"));
        let mut v: Value = serde_norway::from_str("a: !thing {b: !other 1}\n").expect("yaml");
        as_kubernetes_reads(&mut v);
        assert_eq!(round_trip(&to_string(&v)).0, v);
    }

    #[test]
    fn octal_modes_are_the_numbers_kubernetes_reads() {
        let mut v: Value =
            serde_norway::from_str("secret: {defaultMode: 0440, items: [{mode: 0400}]}\nx: '0440'")
                .expect("yaml");
        as_kubernetes_reads(&mut v);
        assert_eq!(v["secret"]["defaultMode"], Value::from(0o440));
        assert_eq!(v["secret"]["items"][0]["mode"], Value::from(0o400));
        assert_eq!(v["x"], Value::from("0440"));
    }
}
