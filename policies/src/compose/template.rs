//! Path templates of aggregate calls: `/users/{id}/orders?since={query.since}&team={user.team.id}`.
//!
//! A placeholder names a path parameter of the aggregate's `params` template (`{id}`), a query
//! parameter of the public request (`{query.since}`), or a field of an earlier call's JSON answer
//! (`{user.team.id}`: the call `user`, then object keys). Values are percent-encoded when
//! substituted, so a client cannot add a path segment or a query parameter through them.

/// A parsed template: literal text and placeholders, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    /// A path parameter of the public request.
    Param(String),
    /// A query parameter of the public request.
    Query(String),
    /// A field of an earlier call's answer: the call's name, then object keys.
    Answer {
        call: String,
        fields: Vec<String>,
    },
}

/// Longest template.
const MAX_TEMPLATE: usize = 2048;

// === impl Template ===

impl Template {
    /// Parse `text`; `is_call` tells the names of earlier calls from path parameters.
    pub fn parse(text: &str, is_call: impl Fn(&str) -> bool) -> Result<Self, String> {
        if text.len() > MAX_TEMPLATE {
            return Err(format!("longer than {MAX_TEMPLATE} bytes"));
        }
        if !text.starts_with('/') || text.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "`{text}` must start with '/' and contain no spaces"
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`{text}`: a `{{` is not closed"));
            };
            let name = &rest[open + 1..open + close];
            parts.push(Self::placeholder(name, &is_call)?);
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{text}`: a `}}` is not opened"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        Ok(Self { parts })
    }

    fn placeholder(name: &str, is_call: &impl Fn(&str) -> bool) -> Result<Part, String> {
        let mut fields = name.split('.');
        let head = fields.next().unwrap_or("");
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !name.split('.').all(ok) {
            return Err(format!(
                "`{{{name}}}` is not a placeholder: dot-separated names of [A-Za-z0-9_-]"
            ));
        }
        let fields: Vec<String> = fields.map(str::to_string).collect();
        match (head, fields.len()) {
            ("query", 1) => Ok(Part::Query(fields[0].clone())),
            ("query", _) => Err(format!("`{{{name}}}`: write `{{query.<name>}}`")),
            (call, n) if n > 0 && is_call(call) => Ok(Part::Answer {
                call: call.to_string(),
                fields,
            }),
            (call, n) if n > 0 => Err(format!(
                "`{{{name}}}`: `{call}` is not the name of an earlier call"
            )),
            (param, _) => Ok(Part::Param(param.to_string())),
        }
    }

    /// Path parameters the template names.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Param(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Earlier calls whose answers the template needs.
    pub fn calls(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Answer { call, .. } => Some(call.as_str()),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_told_apart() {
        let t = Template::parse("/u/{id}/t/{user.team.id}?q={query.q}", |c| c == "user").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Literal("/u/".into()),
                Part::Param("id".into()),
                Part::Literal("/t/".into()),
                Part::Answer {
                    call: "user".into(),
                    fields: vec!["team".into(), "id".into()]
                },
                Part::Literal("?q=".into()),
                Part::Query("q".into()),
            ]
        );
        for (bad, want) in [
            ("u/{id}", "must start with '/'"),
            ("/u/{id", "not closed"),
            ("/u/id}", "not opened"),
            ("/u/{a b}", "must start"),
            ("/u/{}", "not a placeholder"),
            ("/u/{other.x}", "not the name of an earlier call"),
            ("/u/{query}", "write `{query.<name>}`"),
        ] {
            let e = Template::parse(bad, |c| c == "user").unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
