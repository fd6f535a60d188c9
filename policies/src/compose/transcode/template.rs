//! `google.api.http` path templates: `/v1/{name=shelves/*}/books/{id}:publish`.
//!
//! The grammar (googleapis' `http.proto`):
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! Parsed once per policy into segments and the ranges of segments each variable captures;
//! a request path is then matched segment by segment, without allocating until it matches.

/// Longest template, and most segments in one.
const MAX_TEMPLATE: usize = 1024;
const MAX_SEGMENTS: usize = 64;

/// A parsed path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
    /// The variables, in order: the field path and the segments they capture.
    pub vars: Vec<Variable>,
    verb: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: one segment.
    One,
    /// `**`: the rest of the path (zero or more segments); the last segment only.
    Rest,
}

/// `{field.path=segments}`: the value of a field, taken from segments `start..end` (to the
/// end of the path for a variable ending in `**`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Variable {
    pub field_path: Vec<String>,
    start: usize,
    end: usize,
}

// === impl PathTemplate ===

impl PathTemplate {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_TEMPLATE {
            return Err(format!("`{text}`: longer than {MAX_TEMPLATE} bytes"));
        }
        let Some(body) = text.strip_prefix('/') else {
            return Err(format!("`{text}` does not start with '/'"));
        };
        let (body, verb) = split_verb(body);
        let mut t = Self {
            segments: Vec::new(),
            vars: Vec::new(),
            verb: verb.map(str::to_string),
        };
        if verb.is_some_and(|v| !is_literal(v)) {
            return Err(format!("`{text}`: the verb is not a literal"));
        }
        for piece in split_top(body).map_err(|m| format!("`{text}`: {m}"))? {
            if let Some(inner) = piece.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                t.variable(inner).map_err(|m| format!("`{text}`: {m}"))?;
            } else {
                let s = segment(piece).map_err(|m| format!("`{text}`: {m}"))?;
                t.segments.push(s);
            }
        }
        if t.segments.len() > MAX_SEGMENTS {
            return Err(format!("`{text}`: more than {MAX_SEGMENTS} segments"));
        }
        let rest = t.segments.iter().position(|s| *s == Segment::Rest);
        if rest.is_some_and(|i| i + 1 != t.segments.len()) {
            return Err(format!("`{text}`: `**` must be the last segment"));
        }
        Ok(t)
    }

    fn variable(&mut self, inner: &str) -> Result<(), String> {
        let (path, segs) = match inner.split_once('=') {
            Some((p, s)) => (p, s),
            None => (inner, "*"),
        };
        let field_path: Vec<String> = path.split('.').map(str::to_string).collect();
        if field_path.iter().any(|f| !is_ident(f)) {
            return Err(format!("`{path}` is not a field path"));
        }
        let start = self.segments.len();
        for s in segs.split('/') {
            if s.contains(['{', '}']) {
                return Err(format!("`{{{inner}}}`: variables do not nest"));
            }
            self.segments.push(segment(s)?);
        }
        self.vars.push(Variable {
            field_path,
            start,
            end: self.segments.len(),
        });
        Ok(())
    }

    /// How specific the template is, to try the most specific first: literal segments count
    /// most, then a verb, then fewer wildcards.
    pub fn specificity(&self) -> (usize, bool, usize) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        let rest = self.segments.contains(&Segment::Rest);
        (literals, self.verb.is_some(), usize::from(!rest))
    }

    /// The variables' values when `path` (without its query) fits, percent-decoded (a
    /// variable of several segments keeps `%2F` encoded, so its slashes stay where they
    /// were); `Some(Err)` for a value that does not decode to UTF-8.
    pub fn matches(&self, path: &str) -> Option<Result<Vec<String>, String>> {
        let body = path.strip_prefix('/')?;
        let body = match &self.verb {
            Some(verb) => body.strip_suffix(verb.as_str())?.strip_suffix(':')?,
            None => body,
        };
        // Where each segment of the template lies in `body`.
        let mut spans = Vec::with_capacity(self.segments.len());
        let mut at = 0;
        let mut parts = body.split('/');
        for seg in &self.segments {
            if *seg == Segment::Rest {
                spans.push((at.min(body.len()), body.len()));
                return Some(self.values(body, &spans));
            }
            let part = parts.next()?;
            let fits = match seg {
                Segment::Literal(l) => part == l,
                Segment::One => !part.is_empty(),
                Segment::Rest => true,
            };
            if !fits {
                return None;
            }
            spans.push((at, at + part.len()));
            at += part.len() + 1;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(self.values(body, &spans))
    }

    /// The variables' values, from where the template's segments lie in `body`.
    fn values(&self, body: &str, spans: &[(usize, usize)]) -> Result<Vec<String>, String> {
        self.vars
            .iter()
            .map(|v| {
                let (from, to) = (spans[v.start].0, spans[v.end - 1].1);
                let several = v.end - v.start > 1 || self.segments[v.end - 1] == Segment::Rest;
                decode(&body[from..to], several)
            })
            .collect()
    }
}

/// The verb: after the last `:` that follows the last `/` and the last `}`.
fn split_verb(body: &str) -> (&str, Option<&str>) {
    let after = body.rfind(['/', '}']).map_or(0, |i| i + 1);
    match body[after..].rfind(':') {
        Some(i) => (&body[..after + i], Some(&body[after + i + 1..])),
        None => (body, None),
    }
}

/// Split on the `/` outside braces.
fn split_top(body: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in body.char_indices() {
        match c {
            '{' if depth == 0 => depth = 1,
            '{' => return Err("variables do not nest".into()),
            '}' if depth == 1 => depth = 0,
            '}' => return Err("a `}` is not opened".into()),
            '/' if depth == 0 => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("a `{` is not closed".into());
    }
    out.push(&body[start..]);
    Ok(out)
}

fn segment(s: &str) -> Result<Segment, String> {
    match s {
        "*" => Ok(Segment::One),
        "**" => Ok(Segment::Rest),
        l if is_literal(l) => Ok(Segment::Literal(l.to_string())),
        l => Err(format!("`{l}` is not a segment (a literal, `*` or `**`)")),
    }
}

fn is_literal(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%!$&'()+,;=@".contains(&b))
}

fn is_ident(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// Percent-decode a captured value; `keep_slash`: `%2F` stays encoded (a variable of
/// several segments, as googleapis specifies).
pub(super) fn decode(raw: &str, keep_slash: bool) -> Result<String, String> {
    if !raw.contains('%') {
        return Ok(raw.to_string());
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let byte = match (b[i], b.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok()),
            _ => None,
        };
        match byte {
            Some(b'/') if keep_slash => {
                out.extend_from_slice(&b[i..i + 3]);
                i += 3;
            }
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{raw}` does not decode to UTF-8 text"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &str, path: &str) -> Option<Vec<String>> {
        PathTemplate::parse(t)
            .unwrap()
            .matches(path)
            .map(|r| r.unwrap())
    }

    #[test]
    fn variables_capture_one_or_several_segments() {
        let t = "/v1/{name=shelves/*}/books/{id}";
        assert_eq!(
            vals(t, "/v1/shelves/7/books/42"),
            Some(vec!["shelves/7".to_string(), "42".to_string()])
        );
        assert_eq!(vals(t, "/v1/shelves/7/books"), None);
        assert_eq!(vals(t, "/v1/shelves/7/books/42/x"), None);
        assert_eq!(vals(t, "/v1/racks/7/books/42"), None);
        assert_eq!(vals(t, "/v1/shelves//books/42"), None, "empty segment");
        assert_eq!(vals("/v1/items", "/v1/items"), Some(vec![]));
    }

    #[test]
    fn verbs_and_double_wildcards() {
        let t = "/v1/items/{id}:stream";
        assert_eq!(vals(t, "/v1/items/9:stream"), Some(vec!["9".into()]));
        assert_eq!(vals(t, "/v1/items/9"), None);
        assert_eq!(vals(t, "/v1/items/9:other"), None);
        let t = "/files/{path=**}";
        assert_eq!(vals(t, "/files/a/b/c"), Some(vec!["a/b/c".into()]));
        assert_eq!(vals(t, "/files/"), Some(vec!["".into()]));
        let t = "/v1/{name=projects/*/files/**}:get";
        assert_eq!(
            vals(t, "/v1/projects/p/files/a/b:get"),
            Some(vec!["projects/p/files/a/b".into()])
        );
    }

    #[test]
    fn values_are_percent_decoded_but_slashes_of_long_variables_stay() {
        assert_eq!(
            vals("/v1/items/{id}", "/v1/items/a%20b%2Fc"),
            Some(vec!["a b/c".into()])
        );
        assert_eq!(
            vals("/v1/{name=shelves/*}", "/v1/shelves/a%2Fb%20c"),
            Some(vec!["shelves/a%2Fb c".into()])
        );
        let t = PathTemplate::parse("/v1/items/{id}").unwrap();
        assert!(t.matches("/v1/items/%FF").unwrap().is_err(), "not UTF-8");
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (t, want) in [
            ("v1/items", "does not start with '/'"),
            ("/v1/{id", "a `{` is not closed"),
            ("/v1/{a/{b}}", "variables do not nest"),
            ("/v1/**/items", "`**` must be the last segment"),
            ("/v1/{1x}", "`1x` is not a field path"),
            ("/v1/it ems", "is not a segment"),
        ] {
            let e = PathTemplate::parse(t).unwrap_err();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    #[test]
    fn more_literal_templates_are_more_specific() {
        let a = PathTemplate::parse("/v1/items/{id}").unwrap();
        let b = PathTemplate::parse("/v1/{a}/{b}").unwrap();
        let c = PathTemplate::parse("/v1/items/{id}:stream").unwrap();
        assert!(a.specificity() > b.specificity());
        assert!(c.specificity() > a.specificity());
    }
}
