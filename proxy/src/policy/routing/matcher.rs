//! One compiled `HTTPRoute` match: path, method, headers, query. Matching reads the request
//! in place (no allocation, no copy of the path or the query), and each match knows its rank in
//! the precedence order, so a host's table is sorted once per snapshot.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;
use trellis_policies::{compile_regex, HttpPathMatch, HttpRouteMatch, ValueMatch};

/// A compiled match. All conditions must hold.
#[derive(Debug)]
pub struct Matcher {
    path: PathCond,
    method: Option<Method>,
    headers: Vec<(HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
}

#[derive(Debug)]
enum PathCond {
    Exact(String),
    /// Without its trailing '/'; empty for `/` (every path).
    Prefix(String),
    /// The regex, its pattern length (for precedence) and a literal prefix every match starts
    /// with (a cheap filter before running the regex).
    Regex(Regex, usize, String),
}

#[derive(Debug)]
enum ValueCond {
    Exact(String),
    Regex(Regex),
    Present,
}

/// Where a match ranks: compared in this field order, greater first (Gateway API precedence,
/// with regexes ranked with prefixes by pattern length, after a prefix of equal length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence {
    /// 1 for an exact path, 0 otherwise.
    exact: u8,
    /// Prefix (normalized) or regex pattern length.
    path_len: usize,
    /// 1 for a prefix, 0 for a regex (at equal length).
    prefix: u8,
    method: u8,
    headers: usize,
    query: usize,
}

// === impl Matcher ===

impl Matcher {
    /// Matches every request (a rule without `matches`).
    pub fn any() -> Self {
        Self {
            path: PathCond::Prefix(String::new()),
            method: None,
            headers: Vec::new(),
            query: Vec::new(),
        }
    }

    pub fn compile(m: &HttpRouteMatch) -> Result<Self, String> {
        let path = match &m.path {
            None => PathCond::Prefix(String::new()),
            Some(HttpPathMatch {
                exact: Some(e),
                prefix: None,
                regex: None,
            }) => PathCond::Exact(e.clone()),
            Some(HttpPathMatch {
                exact: None,
                prefix: Some(p),
                regex: None,
            }) => PathCond::Prefix(p.trim_end_matches('/').to_string()),
            Some(HttpPathMatch {
                exact: None,
                prefix: None,
                regex: Some(r),
            }) => PathCond::Regex(compile_regex(r)?, r.len(), literal_prefix(r)),
            Some(_) => return Err("path: set exactly one of exact, prefix, regex".into()),
        };
        let method = m
            .method
            .as_deref()
            .map(|s| Method::from_bytes(s.as_bytes()).map_err(|e| format!("method: {e}")))
            .transpose()?;
        let headers = m
            .headers
            .iter()
            .map(|v| {
                let name = HeaderName::from_bytes(v.name.as_bytes())
                    .map_err(|e| format!("headers: `{}`: {e}", v.name))?;
                Ok((name, ValueCond::compile(v)?))
            })
            .collect::<Result<_, String>>()?;
        let query = m
            .query
            .iter()
            .map(|v| Ok((v.name.clone(), ValueCond::compile(v)?)))
            .collect::<Result<_, String>>()?;
        Ok(Self {
            path,
            method,
            headers,
            query,
        })
    }

    /// If the request matches, the length of the path prefix it matched (0 unless a prefix
    /// match), for `rewrite.path_prefix`.
    pub fn matches(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
    ) -> Option<usize> {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return None;
        }
        let matched = match &self.path {
            PathCond::Exact(e) => (path == e).then_some(0)?,
            PathCond::Prefix(p) => {
                let rest = path.strip_prefix(p.as_str())?;
                if !(rest.is_empty() || rest.starts_with('/')) {
                    return None;
                }
                p.len()
            }
            PathCond::Regex(r, _, literal) => {
                (path.starts_with(literal.as_str()) && r.is_match(path)).then_some(0)?
            }
        };
        for (name, cond) in &self.headers {
            let v = headers.get(name);
            if !cond.matches_header(v) {
                return None;
            }
        }
        for (name, cond) in &self.query {
            if !cond.matches(query_param(query, name)) {
                return None;
            }
        }
        Some(matched)
    }

    pub fn precedence(&self) -> Precedence {
        let (exact, path_len, prefix) = match &self.path {
            PathCond::Exact(e) => (1, e.len(), 0),
            PathCond::Prefix(p) => (0, p.len(), 1),
            PathCond::Regex(_, len, _) => (0, *len, 0),
        };
        Precedence {
            exact,
            path_len,
            prefix,
            method: u8::from(self.method.is_some()),
            headers: self.headers.len(),
            query: self.query.len(),
        }
    }
}

// === impl ValueCond ===

impl ValueCond {
    fn compile(v: &ValueMatch) -> Result<Self, String> {
        match (&v.exact, &v.regex, v.present) {
            (Some(e), None, false) => Ok(Self::Exact(e.clone())),
            (None, Some(r), false) => Ok(Self::Regex(compile_regex(r)?)),
            (None, None, true) => Ok(Self::Present),
            _ => Err(format!(
                "`{}`: set exactly one of exact, regex, present",
                v.name
            )),
        }
    }

    fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (_, None) => false,
            (Self::Present, Some(_)) => true,
            (Self::Exact(e), Some(v)) => e == v,
            (Self::Regex(r), Some(v)) => r.is_match(v),
        }
    }

    /// Headers compare their first value; a value that is not text matches only `present`.
    fn matches_header(&self, value: Option<&HeaderValue>) -> bool {
        match (self, value) {
            (_, None) => false,
            (Self::Present, Some(_)) => true,
            (_, Some(v)) => v.to_str().is_ok_and(|s| self.matches(Some(s))),
        }
    }
}

/// The literal text every match of `pattern` starts with: its leading plain characters, less
/// the last one if a quantifier follows it; nothing for a pattern with an alternation or flags.
fn literal_prefix(pattern: &str) -> String {
    if pattern.contains('|') || pattern.starts_with("(?") {
        return String::new();
    }
    let mut out = String::new();
    for c in pattern.chars() {
        match c {
            '?' | '*' | '{' => {
                out.pop();
                break;
            }
            '\\' | '.' | '+' | '(' | ')' | '[' | ']' | '}' | '^' | '$' => break,
            c => out.push(c),
        }
    }
    out
}

/// The value of the first `name` parameter of a query string, as sent (`a` in `?a` is present
/// with an empty value).
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(yaml: &str) -> Matcher {
        let spec: HttpRouteMatch = serde_norway::from_str(yaml).unwrap();
        Matcher::compile(&spec).unwrap()
    }

    fn hit(m: &Matcher, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<usize> {
        let uri: http::Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m.matches(&method.parse().unwrap(), uri.path(), uri.query(), &h)
    }

    #[test]
    fn path_exact_prefix_regex() {
        let exact = m("path: {exact: /login}");
        assert_eq!(hit(&exact, "GET", "/login", &[]), Some(0));
        assert_eq!(hit(&exact, "GET", "/login?x=1", &[]), Some(0));
        assert_eq!(hit(&exact, "GET", "/login/", &[]), None);
        let prefix = m("path: {prefix: /api/}");
        assert_eq!(hit(&prefix, "GET", "/api", &[]), Some(4));
        assert_eq!(hit(&prefix, "GET", "/api/v1", &[]), Some(4));
        assert_eq!(hit(&prefix, "GET", "/apix", &[]), None);
        let root = m("path: {prefix: /}");
        assert_eq!(hit(&root, "GET", "/anything", &[]), Some(0));
        let re = m("path: {regex: '/users/[0-9]+'}");
        assert!(hit(&re, "GET", "/users/42", &[]).is_some());
        assert!(hit(&re, "GET", "/users/42/x", &[]).is_none());
        assert!(hit(&re, "GET", "/users/abc", &[]).is_none());
    }

    #[test]
    fn regex_literal_prefix_is_a_safe_filter() {
        assert_eq!(literal_prefix("/users/[0-9]+"), "/users/");
        assert_eq!(literal_prefix("/ab?c"), "/a");
        assert_eq!(literal_prefix("/a+"), "/a");
        assert_eq!(literal_prefix("/x|/y"), "");
        assert_eq!(literal_prefix("(?i)/a"), "");
        assert_eq!(literal_prefix(r"/a\.b"), "/a");
        let re = m("path: {regex: '/v[0-9]/(a|b)'}");
        assert!(hit(&re, "GET", "/v1/b", &[]).is_some());
        assert!(hit(&re, "GET", "/w1/b", &[]).is_none());
    }

    #[test]
    fn method_headers_and_query() {
        let x = m(r#"
method: POST
headers:
  - {name: x-env, exact: canary}
  - {name: x-user, regex: 'u[0-9]+'}
  - {name: x-debug, present: true}
query:
  - {name: v, exact: "2"}
  - {name: flag, present: true}
"#);
        let h = [("x-env", "canary"), ("x-user", "u7"), ("x-debug", "")];
        assert!(hit(&x, "POST", "/?v=2&flag", &h).is_some());
        assert!(hit(&x, "GET", "/?v=2&flag", &h).is_none(), "method");
        assert!(hit(&x, "POST", "/?v=3&flag", &h).is_none(), "query exact");
        assert!(hit(&x, "POST", "/?v=2", &h).is_none(), "query present");
        assert!(
            hit(&x, "POST", "/?flag&v=2&v=3", &h).is_some(),
            "first value"
        );
        let mut wrong = h;
        wrong[1] = ("x-user", "admin");
        assert!(
            hit(&x, "POST", "/?v=2&flag", &wrong).is_none(),
            "header regex"
        );
        assert!(
            hit(&x, "POST", "/?v=2&flag", &h[..2]).is_none(),
            "header present"
        );
        let mut case = h;
        case[0] = ("x-env", "Canary");
        assert!(
            hit(&x, "POST", "/?v=2&flag", &case).is_none(),
            "values are case-sensitive"
        );
    }

    #[test]
    fn precedence_orders_exact_then_length_then_method_headers_query() {
        let order = [
            m("path: {exact: /a}"),
            m("path: {prefix: /a/b/c}"),
            m("path: {prefix: /a/b}"),
            m("path: {regex: /a/.}"),
            m("{path: {prefix: /a}, method: GET}"),
            m("{path: {prefix: /a}, headers: [{name: x, present: true}, {name: y, present: true}]}"),
            m("{path: {prefix: /a}, headers: [{name: x, present: true}], query: [{name: q, present: true}]}"),
            m("{path: {prefix: /a}, headers: [{name: x, present: true}]}"),
            m("{path: {prefix: /a}, query: [{name: q, present: true}]}"),
            m("path: {prefix: /a}"),
            Matcher::any(),
        ];
        for w in order.windows(2) {
            assert!(
                w[0].precedence() > w[1].precedence(),
                "{:?} should rank above {:?}",
                w[0],
                w[1]
            );
        }
    }
}
