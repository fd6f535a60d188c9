//! The JSONPatch (RFC 6902) that turns one pod into another, for the webhook's answer.
//!
//! Objects are compared member by member; anything else that differs (lists included) is
//! replaced whole. Only object members are addressed, so every operation means the same
//! whatever the API server's copy of a list looks like by the time it applies the patch.

use serde_json::{json, Value};

/// The operations taking `old` to `new`, in a stable order (removals and changes in `old`'s
/// key order, then additions).
pub fn diff(old: &Value, new: &Value) -> Vec<Value> {
    let mut ops = Vec::new();
    walk("", old, new, &mut ops);
    ops
}

fn walk(path: &str, old: &Value, new: &Value, ops: &mut Vec<Value>) {
    let (Value::Object(a), Value::Object(b)) = (old, new) else {
        if old != new {
            ops.push(json!({"op": "replace", "path": path, "value": new}));
        }
        return;
    };
    for (k, va) in a {
        let p = format!("{path}/{}", escape(k));
        match b.get(k) {
            None => ops.push(json!({"op": "remove", "path": p})),
            Some(vb) => walk(&p, va, vb, ops),
        }
    }
    for (k, vb) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
        let p = format!("{path}/{}", escape(k));
        ops.push(json!({"op": "add", "path": p, "value": vb}));
    }
}

/// A JSON Pointer reference token (RFC 6901): annotation keys contain `/`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_added_replaced_and_removed_lists_replaced_whole() {
        let old =
            json!({"metadata": {"annotations": {"x": "1"}}, "spec": {"a": [1], "gone": true}});
        let new = json!({"metadata": {"annotations": {"x": "1", "trellis.dev/injected": "{}"}},
                         "spec": {"a": [0, 1]}});
        assert_eq!(
            diff(&old, &new),
            vec![
                json!({"op": "add", "path": "/metadata/annotations/trellis.dev~1injected", "value": "{}"}),
                json!({"op": "replace", "path": "/spec/a", "value": [0, 1]}),
                json!({"op": "remove", "path": "/spec/gone"}),
            ]
        );
        assert!(diff(&old, &old).is_empty());
    }
}
