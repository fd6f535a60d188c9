//! Reading Prometheus / OpenMetrics text exposition back into samples.
//!
//! The sidecar's own summary ([`super::summary`]) is computed from the text its registry writes,
//! because `prometheus-client` families cannot be iterated; the dashboard reads what sidecars
//! serve with the same parser (and re-labels it for federation). The input may come from the
//! network, so nothing here panics: a malformed line is an error naming its line number.

use std::borrow::Cow;
use std::fmt;

/// One sample: `name{labels} value`, borrowed from the text it was read from (a label value
/// is copied only when it had escapes): a read of a whole registry allocates one label list
/// per sample, not two strings per label.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    pub labels: Vec<(&'a str, Cow<'a, str>)>,
    pub value: f64,
}

/// A family's declared type (`# TYPE name type`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyType<'a> {
    pub name: &'a str,
    pub kind: &'a str,
}

/// What a text exposition holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Exposition<'a> {
    pub types: Vec<FamilyType<'a>>,
    pub samples: Vec<Sample<'a>>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("metrics text, line {line}: {message}")]
pub struct ExpositionError {
    pub line: usize,
    pub message: &'static str,
}

/// Most lines and bytes accepted: a sidecar's exposition is tens of KB; anything much larger is
/// not one.
pub const MAX_BYTES: usize = 8 << 20;

// === impl Sample ===

impl<'a> Sample<'a> {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// Parse `text`; exemplars and timestamps after the value are ignored.
pub fn parse(text: &str) -> Result<Exposition<'_>, ExpositionError> {
    if text.len() > MAX_BYTES {
        return Err(ExpositionError {
            line: 0,
            message: "larger than 8 MiB",
        });
    }
    let mut out = Exposition::default();
    for (i, line) in text.lines().enumerate() {
        let err = |message| ExpositionError {
            line: i + 1,
            message,
        };
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let c = comment.trim_start();
            if let Some(t) = c
                .strip_prefix("TYPE")
                .filter(|t| t.is_empty() || t.starts_with(' '))
            {
                let mut parts = t.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    return Err(err("TYPE line without a name and a type"));
                };
                out.types.push(FamilyType { name, kind });
            }
            continue;
        }
        out.samples.push(sample(line).map_err(err)?);
    }
    Ok(out)
}

fn sample(line: &str) -> Result<Sample<'_>, &'static str> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err("invalid metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("a sample without a value")?;
    Ok(Sample {
        name,
        labels,
        value: parse_value(value)?,
    })
}

/// Labels up to the closing brace; returns what follows it.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut Vec<(&'a str, Cow<'a, str>)>,
) -> Result<&'a str, &'static str> {
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').ok_or("a label without a value")?;
        let key = s[..eq].trim();
        if key.is_empty() || labels.len() >= 64 {
            return Err("invalid label");
        }
        let after = s[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let (value, rest) = quoted(after)?;
        labels.push((key, value));
        s = rest;
    }
}

/// A label value up to its closing quote, unescaped (`\\`, `\"`, `\n`): borrowed unless it
/// had an escape.
fn quoted(s: &str) -> Result<(Cow<'_, str>, &str), &'static str> {
    match s.find(['"', '\\']) {
        Some(i) if s.as_bytes()[i] == b'"' => return Ok((Cow::Borrowed(&s[..i]), &s[i + 1..])),
        None => return Err("an unterminated label value"),
        Some(_) => {}
    }
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((Cow::Owned(out), &s[i + 1..])),
            '\\' => match chars.next() {
                Some((_, 'n')) => out.push('\n'),
                Some((_, c)) => out.push(c),
                None => break,
            },
            c => out.push(c),
        }
    }
    Err("an unterminated label value")
}

fn parse_value(v: &str) -> Result<f64, &'static str> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        v => v.parse().map_err(|_| "a value that is not a number"),
    }
}

/// Write `value` the way the exposition format does.
pub fn format_value(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        v.to_string()
    }
}

/// Escape a label value for the exposition format.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_registry_writes() {
        let text = "# HELP trellis_requests HTTP requests.\n\
            # TYPE trellis_requests counter\n\
            trellis_requests_total{direction=\"inbound\",service=\"a\\\"b\",route=\"default\",status_code=\"200\"} 12\n\
            trellis_request_duration_seconds_bucket{le=\"+Inf\"} 3 # {trace_id=\"x\"} 1.0\n\
            trellis_up 1 1700000000\n\
            # EOF\n";
        let e = parse(text).expect("parses");
        assert_eq!(
            e.types,
            vec![FamilyType {
                name: "trellis_requests",
                kind: "counter"
            }]
        );
        assert_eq!(e.samples.len(), 3);
        assert_eq!(e.samples[0].label("service"), Some("a\"b"));
        assert_eq!(e.samples[0].value, 12.0);
        assert_eq!(e.samples[1].label("le"), Some("+Inf"));
        assert_eq!(e.samples[1].value, 3.0);
        assert_eq!(e.samples[2].value, 1.0);
    }

    #[test]
    fn garbage_is_an_error_naming_its_line() {
        for (text, line) in [
            ("ok 1\nbad{a=\"1\" 2\n", 2),
            ("x{a=1} 2", 1),
            ("x{a=\"1\"} nope", 1),
            ("# TYPE\n", 1),
            ("{a=\"b\"} 1", 1),
        ] {
            let e = parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text}: {e}");
        }
    }

    #[test]
    fn escapes_round_trip() {
        let v = "a\"b\\c\nd";
        let text = format!("m{{l=\"{}\"}} 1", Escaped(v));
        assert_eq!(parse(&text).expect("parses").samples[0].label("l"), Some(v));
    }
}
