//! `readOnly` and `writeOnly` as OpenAPI 3 defines them (3.0.3 "Fixed Fields" of the Schema
//! Object; 3.1 takes them from JSON Schema's meta-data vocabulary): a `readOnly` property is
//! sent by the server only, so a request carrying it is refused; a `writeOnly` one is sent by
//! the client only, so a response carrying it is a mismatch. And "if the property is marked as
//! `readOnly` being true and is in the `required` list, the `required` will take effect on the
//! response only" (and `writeOnly` on the request only).
//!
//! JSON Schema treats both as annotations, so each side gets its own view of the document,
//! made once when it is compiled: the `required` lists without the other side's properties,
//! and a keyword ([`keyword`]) that fails wherever the flagged schema meets a value. A document
//! that flags nothing has no views (the one document serves both sides, no copy is made).

use jsonschema::json::Json;
use jsonschema::paths::Location;
use jsonschema::{Keyword, ValidationError};
use serde_json::{Map, Value};

/// Keys whose values are data, not schemas.
const LITERALS: &[&str] = &["example", "examples", "enum", "const", "default"];
/// Most `$ref` hops followed to see whether a property is flagged.
const MAX_HOPS: usize = 32;

/// The two sides of an API a schema can describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A request body: `readOnly` properties are refused.
    Request,
    /// A response body: `writeOnly` properties are mismatches.
    Response,
}

// === impl Side ===

impl Side {
    /// The keyword this side refuses.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Request => "readOnly",
            Self::Response => "writeOnly",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::Request => "is read-only: set by the server, it must not be sent",
            Self::Response => "is write-only: sent by clients, it must not be returned",
        }
    }
}

/// `doc` as `side` sees it, or `None` when no schema of `doc` carries the side's flag.
pub fn view(doc: &Value, side: Side) -> Option<Value> {
    if !flags(doc, side.flag()) {
        return None;
    }
    let mut view = doc.clone();
    unrequire(&mut view, doc, side.flag());
    Some(view)
}

/// Whether any schema of `v` is `flag: true`.
fn flags(v: &Value, flag: &str) -> bool {
    match v {
        Value::Object(map) => map.iter().any(|(k, child)| {
            (k == flag && child == &Value::Bool(true))
                || (!LITERALS.contains(&k.as_str()) && flags(child, flag))
        }),
        Value::Array(items) => items.iter().any(|i| flags(i, flag)),
        _ => false,
    }
}

/// Drop from every `required` list the properties whose schema is `flag: true` (looked up in
/// `doc`, the unchanged document, through `$ref`s).
fn unrequire(v: &mut Value, doc: &Value, flag: &str) {
    match v {
        Value::Object(map) => {
            let flagged: Vec<String> = flagged_properties(map, doc, flag);
            if let Some(Value::Array(required)) = map.get_mut("required") {
                required.retain(|r| !r.as_str().is_some_and(|r| flagged.iter().any(|f| f == r)));
            }
            for (k, child) in map.iter_mut() {
                if !LITERALS.contains(&k.as_str()) {
                    unrequire(child, doc, flag);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| unrequire(i, doc, flag)),
        _ => {}
    }
}

fn flagged_properties(map: &Map<String, Value>, doc: &Value, flag: &str) -> Vec<String> {
    let Some(Value::Object(props)) = map.get("properties") else {
        return Vec::new();
    };
    props
        .iter()
        .filter(|(_, schema)| is_flagged(schema, doc, flag))
        .map(|(name, _)| name.clone())
        .collect()
}

/// `schema` is `flag: true`, itself or where its `$ref`s lead.
fn is_flagged(schema: &Value, doc: &Value, flag: &str) -> bool {
    let mut s = schema;
    for _ in 0..MAX_HOPS {
        if s.get(flag) == Some(&Value::Bool(true)) {
            return true;
        }
        let Some(target) = s
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
            .and_then(|p| doc.pointer(p))
        else {
            return false;
        };
        s = target;
    }
    false
}

/// What a keyword factory answers.
type Built<'a, F> = Result<Box<dyn for<'i> Keyword<'i, F>>, ValidationError<'a>>;

/// The factory of the side's keyword: fails on any value where the schema says `true`.
pub fn keyword<F: Json>(
    side: Side,
) -> impl for<'a> Fn(&'a Map<String, Value>, &'a Value, Location) -> Built<'a, F> + Send + Sync + 'static
{
    move |_, value, _| {
        Ok(Box::new(Refuse {
            message: (value == &Value::Bool(true)).then(|| side.message()),
        }))
    }
}

/// A flagged schema (`message`), or one that says `false` (no message: passes).
struct Refuse {
    message: Option<&'static str>,
}

impl<'i, F: Json> Keyword<'i, F> for Refuse {
    fn validate(&self, _: F::Node<'i>) -> Result<(), ValidationError<'i>> {
        match self.message {
            None => Ok(()),
            Some(m) => Err(ValidationError::custom(m)),
        }
    }

    fn is_valid(&self, _: F::Node<'i>) -> bool {
        self.message.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn required_lists_lose_the_other_sides_properties_through_refs() {
        let doc = json!({
            "components": {"schemas": {
                "Id": {"type": "integer", "readOnly": true},
                "User": {"type": "object", "required": ["id", "name", "password", "created"], "properties": {
                    "id": {"$ref": "#/components/schemas/Id"},
                    "name": {"type": "string"},
                    "password": {"type": "string", "writeOnly": true},
                    "created": {"type": "string", "readOnly": true}
                }},
                "Example": {"example": {"readOnly": true}}
            }}
        });
        let req = view(&doc, Side::Request).expect("flags readOnly");
        assert_eq!(
            req["components"]["schemas"]["User"]["required"],
            json!(["name", "password"])
        );
        let resp = view(&doc, Side::Response).expect("flags writeOnly");
        assert_eq!(
            resp["components"]["schemas"]["User"]["required"],
            json!(["id", "name", "created"])
        );
        // A flag inside an example is data: no view.
        let plain = json!({"components": {"schemas": {"E": {"example": {"readOnly": true}}}}});
        assert!(view(&plain, Side::Request).is_none());
    }
}
