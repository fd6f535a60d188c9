//! The document's path templates (`/orders/{id}`), matched against a request's path as the
//! backend will see it (after the route's rewrite). Concrete paths win over templated ones
//! (OpenAPI: "when matching URLs, concrete (non-templated) paths would be matched before
//! their templated counterparts"); then fewer parameters first, then document order.
//!
//! Templates are grouped by segment count, so a request compares only with paths as long as
//! its own; a match allocates only the captured values.

use std::borrow::Cow;
use std::collections::HashMap;

use percent_encoding::percent_decode_str;

/// All the paths of one document.
#[derive(Debug, Default)]
pub struct PathTable<T> {
    by_len: HashMap<usize, Vec<(Template, T)>>,
}

/// One path template, split on `/`.
#[derive(Debug)]
pub struct Template {
    segments: Vec<Segment>,
    params: usize,
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    /// `{name}`, possibly with literal text around it in the segment (`{file}.json`).
    Param {
        prefix: String,
        name: String,
        suffix: String,
    },
}

/// Path parameters captured by a match, percent-decoded.
pub type Captures<'a> = Vec<(&'a str, Cow<'a, str>)>;

// === impl PathTable ===

impl<T> PathTable<T> {
    pub fn new() -> Self {
        Self {
            by_len: HashMap::new(),
        }
    }

    /// Add `path` (a key of the document's `paths`).
    pub fn insert(&mut self, path: &str, value: T) {
        let template = Template::parse(path);
        let entries = self.by_len.entry(template.segments.len()).or_default();
        entries.push((template, value));
        // Stable: equal parameter counts keep document order.
        entries.sort_by_key(|(t, _)| t.params);
    }

    /// The first template `path` matches, and what its parameters captured.
    pub fn find<'t, 'p>(&'t self, path: &'p str) -> Option<(&'t T, Captures<'p>)>
    where
        't: 'p,
    {
        let count = path.split('/').count();
        let entries = self.by_len.get(&count)?;
        entries
            .iter()
            .find_map(|(template, value)| template.matches(path).map(|captures| (value, captures)))
    }
}

// === impl Template ===

impl Template {
    fn parse(path: &str) -> Self {
        let segments: Vec<Segment> = path.split('/').map(Segment::parse).collect();
        let params = segments
            .iter()
            .filter(|s| matches!(s, Segment::Param { .. }))
            .count();
        Self { segments, params }
    }

    fn matches<'t, 'p>(&'t self, path: &'p str) -> Option<Captures<'p>>
    where
        't: 'p,
    {
        let mut captures = Vec::new();
        for (segment, part) in self.segments.iter().zip(path.split('/')) {
            match segment {
                Segment::Literal(l) => {
                    if l != part && decode(part) != l.as_str() {
                        return None;
                    }
                }
                Segment::Param {
                    prefix,
                    name,
                    suffix,
                } => {
                    let value = part.strip_prefix(prefix.as_str())?;
                    let value = value.strip_suffix(suffix.as_str())?;
                    // An empty value is no value (`/orders/` does not match `/orders/{id}`).
                    if value.is_empty() {
                        return None;
                    }
                    captures.push((name.as_str(), decode(value)));
                }
            }
        }
        Some(captures)
    }
}

// === impl Segment ===

impl Segment {
    fn parse(s: &str) -> Self {
        let param = s.find('{').and_then(|open| {
            let close = open + s[open..].find('}')?;
            Some(Segment::Param {
                prefix: s[..open].to_string(),
                name: s[open + 1..close].to_string(),
                suffix: s[close + 1..].to_string(),
            })
        });
        param.unwrap_or_else(|| Segment::Literal(s.to_string()))
    }
}

fn decode(s: &str) -> Cow<'_, str> {
    percent_decode_str(s).decode_utf8_lossy()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concrete_paths_first_then_templates_with_captures() {
        let mut t = PathTable::new();
        t.insert("/orders/{id}", "one");
        t.insert("/orders/mine", "mine");
        t.insert("/orders", "all");
        t.insert("/files/{name}.json", "file");
        t.insert("/orders/{id}/lines/{line}", "line");
        let find = |p: &str| {
            t.find(p).map(|(v, c)| {
                let c: Vec<(String, String)> = c
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.into_owned()))
                    .collect();
                (*v, c)
            })
        };
        assert_eq!(find("/orders"), Some(("all", vec![])));
        assert_eq!(find("/orders/mine"), Some(("mine", vec![])));
        assert_eq!(
            find("/orders/42"),
            Some(("one", vec![("id".into(), "42".into())]))
        );
        assert_eq!(
            find("/orders/a%20b/lines/3"),
            Some((
                "line",
                vec![("id".into(), "a b".into()), ("line".into(), "3".into())]
            ))
        );
        assert_eq!(
            find("/files/report.json"),
            Some(("file", vec![("name".into(), "report".into())]))
        );
        for none in ["/orders/", "/files/report.xml", "/nope", "/orders/1/lines"] {
            assert_eq!(find(none), None, "{none}");
        }
    }
}
