//! A one-pass check for the request body a client usually sends: valid, plainly written JSON
//! against a schema made of objects, arrays and scalars. It can only **accept**; anything it is
//! not sure of (an escape in a string, a schema keyword it does not walk itself, a value that
//! fails, a body that is not JSON) is handed to the full check (`request::check_json`: the
//! body parsed by `serde_json` into a [`Doc`](super::tape::Doc), `jsonschema` over it), which
//! answers exactly as before, errors and all.
//!
//! Why: the full check's cost for a typical 1 kB order is two thirds the document it builds
//! (every value, item and member recorded so that `jsonschema` can walk them afterwards) and a
//! third the walk; here the schema steers the scan, so nothing is recorded: each member's key
//! is looked up among its object's properties as it is read and its value checked at once
//! (docs/api-validation.md, round 7, for the figures).
//!
//! Why it cannot accept what the full check refuses:
//! - the scan reads a strict subset of JSON (RFC 8259 as `serde_json` reads it: the same four
//!   whitespace bytes, the same number grammar, no trailing characters), with no escapes, no
//!   control characters in strings and at most [`MAX_DEPTH`] levels, so `serde_json` parses
//!   whatever it accepts, into the same values;
//! - the structure is checked by the rules of JSON Schema for the keywords walked here
//!   (`type: object|array`, `properties`, `required`, `additionalProperties`, `items`,
//!   `minItems`, `maxItems`), the rest of a schema being annotations; a duplicate key's every
//!   value is checked (the full check keeps the last one: this is stricter, never looser);
//! - a scalar whose schema is only a type, numeric bounds and string lengths is checked here
//!   ([`scalar`]: exact comparisons or none); any other is checked by `jsonschema` itself,
//!   with a validator of its own schema built exactly as the body's validator is (same
//!   options, formats, regexes, `readOnly` keyword); either on the same value (a number as
//!   `serde_json` reads it: `scan::number`);
//! - a schema with anything else (`allOf`, `patternProperties`, `$ref` beside other keywords,
//!   `unevaluatedProperties`, a type list on a container...) is a leaf, and a leaf meeting an
//!   object or an array is handed over whole.
//!
//! The tests check both directions on generated documents: every body this accepts, the full
//! check accepts; the benchmark's order is accepted here (so the fast path is really taken).

mod compile;
mod scalar;
mod scan;
#[cfg(test)]
mod tests;

use jsonschema::Validator;

use super::tape::Tape;
use scalar::Scalar;

pub(super) use compile::{compile, self_contained, DocFacts};

/// Deepest body nesting scanned; deeper bodies go to the full check (`serde_json`'s own
/// limit is 128 levels).
const MAX_DEPTH: u32 = 64;

/// A body schema compiled for the scan.
pub struct FastBody {
    root: Node,
}

/// What a value at one place of the body must be.
enum Node {
    /// Anything (the empty schema, `true`, a property no schema speaks of).
    Any,
    /// Never accepted here: `false`, a recursion past the compiled depth.
    Unsure,
    /// A scalar, checked by `jsonschema` with its schema's own validator.
    Leaf(Box<Validator<Tape>>),
    /// A scalar whose schema is only a type, bounds and lengths: checked here.
    Scalar(Box<Scalar>),
    Object(Box<ObjectNode>),
    Array(Box<ArrayNode>),
}

struct ObjectNode {
    /// The properties, and the required names no property speaks of (`None`: such a member
    /// is judged by `additional`).
    props: Vec<(Box<str>, Option<Node>)>,
    /// Bit `i` for `props[i]` required (at most 64 properties are compiled).
    required: u64,
    additional: Additional,
}

/// `additionalProperties`.
enum Additional {
    Any,
    Deny,
    Schema(Node),
}

struct ArrayNode {
    items: Node,
    min: u64,
    max: u64,
}

/// An object or array whose members or items may be anything: what a value is skipped as.
static ANY_OBJECT: ObjectNode = ObjectNode {
    props: Vec::new(),
    required: 0,
    additional: Additional::Any,
};
static ANY_ARRAY: ArrayNode = ArrayNode {
    items: Node::Any,
    min: 0,
    max: u64::MAX,
};

// === impl FastBody ===

impl FastBody {
    /// Whether `body` is certainly valid: `false` means "ask the full check", not "invalid".
    pub fn accepts(&self, body: &[u8]) -> bool {
        scan::accepts(&self.root, body)
    }
}

// === impl ObjectNode ===

impl ObjectNode {
    /// The property named `key` (searched from `from` on, then from the start): its index,
    /// its required bit and its schema.
    fn find(&self, key: &str, from: usize) -> Option<(usize, u64, Option<&Node>)> {
        let (key, n) = (key.as_bytes(), self.props.len());
        let mut i = from;
        for _ in 0..n {
            if i >= n {
                i = 0;
            }
            let (name, node) = &self.props[i];
            if name.len() == key.len() && name.as_bytes() == key {
                let bit = if i < 64 { 1 << i } else { 0 };
                return Some((i, bit, node.as_ref()));
            }
            i += 1;
        }
        None
    }
}
