//! Field operations (`remove`, `rename`, `add` by JSON pointer) without jq: a transform that
//! needs nothing else runs natively on serde_json's values, several times faster than the same
//! operations interpreted by jaq (docs/composition.md#cost).

use serde_json::Value;

use super::jq::{check, JqError};

/// Pointers parsed into segments once per policy.
#[derive(Debug, Default)]
pub struct FieldOps {
    pub(super) remove: Vec<Vec<String>>,
    pub(super) rename: Vec<(Vec<String>, Vec<String>)>,
    pub(super) add: Vec<(Vec<String>, Value)>,
}

/// A JSON pointer's segments (RFC 6901 escapes undone).
pub(super) fn segments(pointer: &str) -> Result<Vec<String>, String> {
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "`{pointer}` is not a JSON pointer (starts with '/')"
        ));
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

// === impl FieldOps ===

impl FieldOps {
    /// `remove`, then `rename`, then `add`; a missing field is not an error for the first two.
    pub fn apply(&self, body: &[u8]) -> Result<Vec<u8>, JqError> {
        check(body)?;
        let mut v: Value =
            serde_json::from_slice(body).map_err(|e| JqError::Json(e.to_string()))?;
        for p in &self.remove {
            take(&mut v, p);
        }
        for (from, to) in &self.rename {
            if let Some(x) = take(&mut v, from) {
                put(&mut v, to, x)?;
            }
        }
        for (p, x) in &self.add {
            put(&mut v, p, x.clone())?;
        }
        serde_json::to_vec(&v).map_err(|e| JqError::Run(e.to_string()))
    }
}

/// Remove and return the value at `path`, if there is one.
fn take(v: &mut Value, path: &[String]) -> Option<Value> {
    let (last, parents) = path.split_last()?;
    let mut at = v;
    for seg in parents {
        at = match at {
            Value::Object(m) => m.get_mut(seg)?,
            Value::Array(a) => a.get_mut(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match at {
        Value::Object(m) => m.remove(last),
        Value::Array(a) => {
            let i = last.parse::<usize>().ok().filter(|i| *i < a.len())?;
            Some(a.remove(i))
        }
        _ => None,
    }
}

/// Set the value at `path`, creating missing objects on the way; an array index must exist
/// (or be the array's length, to append).
fn put(v: &mut Value, path: &[String], x: Value) -> Result<(), JqError> {
    let mut at = v;
    for seg in path {
        if at.is_null() {
            *at = Value::Object(Default::default());
        }
        at = match at {
            Value::Object(m) => m.entry(seg.clone()).or_insert(Value::Null),
            Value::Array(a) => {
                let i = seg.parse::<usize>().ok().filter(|i| *i <= a.len());
                let i = i.ok_or_else(|| JqError::Run(format!("no index `{seg}` in an array")))?;
                if i == a.len() {
                    a.push(Value::Null);
                }
                &mut a[i]
            }
            other => {
                let kind = match other {
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    _ => "a string",
                };
                return Err(JqError::Run(format!("cannot set field `{seg}` of {kind}")));
            }
        };
    }
    *at = x;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::TransformSpec;

    #[test]
    fn native_operations_agree_with_jq() {
        let spec: TransformSpec = serde_norway::from_str(
            "{remove: [/secret, /items/0, /missing/x], rename: {/user/name: /name, /nope: /x}, \
             add: {/meta/source: edge, /items/2: 9}}",
        )
        .unwrap();
        let native = spec.compile(Default::default()).unwrap();
        let with_jq = TransformSpec {
            jq: Some(".".into()),
            ..spec
        }
        .compile(Default::default())
        .unwrap();
        let body = br#"{"secret": 1, "user": {"name": "ana"}, "items": [1, 2, 3]}"#;
        let a: serde_json::Value = serde_json::from_slice(&native.apply(body).unwrap()).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&with_jq.apply(body).unwrap()).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a,
            serde_json::json!({"user": {}, "items": [2, 3, 9], "name": "ana",
                "meta": {"source": "edge"}})
        );
        // The same refusals as jq's path.
        assert!(native.apply(b"{\"a\": ").is_err());
        let deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert_eq!(native.apply(deep.as_bytes()), Err(super::JqError::TooDeep));
        assert!(native.apply(b"\"\xff\"").is_err());
        assert!(native.apply(br#"{"meta": 3}"#).is_err());
    }
}
