//! A JSON body as `jsonschema` validates it, without a `serde_json::Value` tree: one pass of
//! `serde_json`'s own parser (so the same strict JSON, the same errors and positions, the same
//! 128-level nesting limit, the same numbers) into a flat [`Doc`] whose strings and keys borrow
//! from the body's bytes (a string with an escape is the exception: it is unescaped into its
//! own `String`). A document is a handful of vectors (values, array items, object members),
//! not an allocation per key, string, array and object; `jsonschema` reads it through its
//! [`Json`] trait ([`Tape`]), the validators of bodies being built for it
//! (`jsonschema::options_for::<Tape>()`).
//!
//! It behaves exactly like the `Value` it replaces, which the tests check on the table of cases
//! and on generated documents: an object's members are kept in key order with the last of
//! duplicate keys winning (what `serde_json::Map`, a `BTreeMap` here, does), so that errors
//! come in the same order with the same messages, and an error's instance is the same `Value`
//! ([`Node::to_value`], built only for errors, `enum`/`const` on containers and
//! `uniqueItems`).
//!
//! Written here rather than taken from a crate: `jsonschema`'s own other representations are
//! for Python, Ruby and Postgres `jsonb` bytes, and a borrowing parser (`simd-json`'s tape,
//! `serde_json::value::RawValue`) would either be a second JSON parser with its own errors
//! and rules, or still need the tree. This is `serde_json`'s parser with a different
//! `Visitor`: about 500 lines with their comments, no `unsafe`.

use std::borrow::Cow;
use std::fmt;

use jsonschema::json::{Array, Json, Node, NodeIdentity, Object};
use jsonschema::JsonType;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The representation, for `jsonschema::options_for::<Tape>()`.
pub struct Tape;

/// A parsed body: every value in one vector (a container after its children), the items of
/// each array and the members of each object contiguous in two others.
pub struct Doc<'a> {
    slots: Vec<Slot<'a>>,
    /// Each array's items, as indices into `slots`.
    items: Vec<usize>,
    /// Each object's members, sorted by key, without duplicates; values as indices into `slots`.
    members: Vec<(Cow<'a, str>, usize)>,
    root: usize,
    /// Every object's members in key order; else those of objects up to [`SMALL`] members are
    /// in the client's order ([`Doc::parse_unordered`]).
    ordered: bool,
}

/// Objects of up to this many members are searched by key linearly ([`TapeObject::get`]),
/// and may keep their members in the client's order; larger ones are always sorted.
const SMALL: usize = 8;

pub(super) enum Slot<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    /// `items[start..start + len]`.
    Array {
        start: usize,
        len: usize,
    },
    /// `members[start..start + len]`.
    Object {
        start: usize,
        len: usize,
    },
}

/// One value of a [`Doc`]: cheap to copy.
#[derive(Clone, Copy)]
pub struct TapeNode<'a> {
    doc: &'a Doc<'a>,
    slot: &'a Slot<'a>,
}

#[derive(Clone, Copy)]
pub struct TapeObject<'a> {
    doc: &'a Doc<'a>,
    members: &'a [(Cow<'a, str>, usize)],
}

#[derive(Clone, Copy)]
pub struct TapeArray<'a> {
    doc: &'a Doc<'a>,
    items: &'a [usize],
}

/// A document without values: where a lone scalar's node lives ([`scalar_node`]).
static EMPTY: Doc<'static> = Doc {
    slots: Vec::new(),
    items: Vec::new(),
    members: Vec::new(),
    root: 0,
    ordered: true,
};

/// A scalar (not an array or object: those index their document) as a node of its own, for
/// the validator of a scalar's schema (`validate/fast`): no document is built for it.
pub(super) fn scalar_node<'a>(slot: &'a Slot<'a>) -> TapeNode<'a> {
    debug_assert!(!matches!(slot, Slot::Array { .. } | Slot::Object { .. }));
    TapeNode { doc: &EMPTY, slot }
}

// === impl Doc ===

impl<'a> Doc<'a> {
    /// Parse `body` as `serde_json::from_slice` does (same errors), borrowing its strings.
    pub fn parse(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        Self::parse_with(body, true)
    }

    /// As [`Doc::parse`], but an object of up to [`SMALL`] members keeps them in the client's
    /// order (the last of duplicate keys kept, as always): what [`Validator::is_valid`] needs,
    /// whose answer does not depend on the order, without a sort per object. Errors are listed
    /// in the members' order: ask for them on [`Doc::into_ordered`].
    ///
    /// [`Validator::is_valid`]: jsonschema::Validator::is_valid
    pub fn parse_unordered(body: &'a [u8]) -> Result<Self, serde_json::Error> {
        Self::parse_with(body, false)
    }

    fn parse_with(body: &'a [u8], ordered: bool) -> Result<Self, serde_json::Error> {
        let b = Builder::for_body(body.len(), ordered);
        match std::str::from_utf8(body) {
            // The usual case: valid UTF-8 as a whole, checked at once (word by word), so that
            // the `str` reader does not check each string again as the byte reader does.
            Ok(text) => b.parse_from(serde_json::Deserializer::from_str(text)),
            // The byte reader finds the error where `from_slice` does, with the same message.
            Err(_) => b.parse_from(serde_json::Deserializer::from_slice(body)),
        }
    }

    /// The same document with every object's members in key order (as [`Doc::parse`] makes
    /// it): for the errors of a document read by [`Doc::parse_unordered`].
    pub fn into_ordered(mut self) -> Self {
        if !self.ordered {
            for slot in &self.slots {
                if let Slot::Object { start, len } = *slot {
                    // no duplicate keys left: an unstable sort orders them all the same
                    self.members[start..start + len].sort_unstable_by(|x, y| x.0.cmp(&y.0));
                }
            }
            self.ordered = true;
        }
        self
    }

    /// The document's value, for a validator built with `options_for::<Tape>()`.
    pub fn root(&self) -> TapeNode<'_> {
        self.node(self.root)
    }

    fn node(&self, i: usize) -> TapeNode<'_> {
        TapeNode {
            doc: self,
            slot: &self.slots[i],
        }
    }
}

/// The vectors being filled, and the children of the containers still open (a stack each:
/// a container moves its own to `items`/`members` when it closes).
struct Builder<'a> {
    /// Every object's members sorted by key (else only those of objects over [`SMALL`]).
    ordered: bool,
    slots: Vec<Slot<'a>>,
    items: Vec<usize>,
    members: Vec<(Cow<'a, str>, usize)>,
    open_items: Vec<usize>,
    open_members: Vec<(Cow<'a, str>, usize)>,
}

impl<'a> Builder<'a> {
    /// About one value per 12 bytes of a typical body, one member per 16; a guess (the
    /// vectors grow if need be) that keeps a body to five allocations.
    fn for_body(len: usize, ordered: bool) -> Self {
        Builder {
            ordered,
            slots: Vec::with_capacity(len / 12 + 1),
            items: Vec::with_capacity(len / 32 + 1),
            members: Vec::with_capacity(len / 16 + 1),
            open_items: Vec::with_capacity(32),
            open_members: Vec::with_capacity(32),
        }
    }

    fn parse_from<R: serde_json::de::Read<'a>>(
        mut self,
        mut de: serde_json::Deserializer<R>,
    ) -> Result<Doc<'a>, serde_json::Error> {
        let root = ValueSeed(&mut self).deserialize(&mut de)?;
        de.end()?;
        Ok(self.finish(root))
    }

    fn finish(self, root: usize) -> Doc<'a> {
        Doc {
            slots: self.slots,
            items: self.items,
            members: self.members,
            root,
            ordered: self.ordered,
        }
    }

    fn push(&mut self, slot: Slot<'a>) -> usize {
        self.slots.push(slot);
        self.slots.len() - 1
    }

    /// The object whose members are `open_members[mark..]` (at most [`SMALL`]): kept in the
    /// client's order, a member dropped when its key comes again later (the last one wins, as
    /// in the sorted case).
    fn close_object_unordered(&mut self, mark: usize) -> usize {
        let open = &self.open_members[mark..];
        let mut keep = [true; SMALL];
        for (j, (key, _)) in open.iter().enumerate() {
            keep[j] = !open[j + 1..].iter().any(|(later, _)| later == key);
        }
        let start = self.members.len();
        let members = self.open_members.drain(mark..).zip(keep);
        self.members
            .extend(members.filter(|(_, keep)| *keep).map(|(m, _)| m));
        let len = self.members.len() - start;
        self.push(Slot::Object { start, len })
    }

    /// The array whose items are `open_items[mark..]`.
    fn close_array(&mut self, mark: usize) -> usize {
        let start = self.items.len();
        self.items.extend(self.open_items.drain(mark..));
        let len = self.items.len() - start;
        self.push(Slot::Array { start, len })
    }

    /// The object whose members are `open_members[mark..]`, in the client's order.
    fn close_object(&mut self, mark: usize) -> usize {
        if !self.ordered && self.open_members.len() - mark <= SMALL {
            return self.close_object_unordered(mark);
        }
        // `serde_json::Map` (a `BTreeMap`): key order, the last of equal keys kept. The sort
        // is stable, so of a run of equal keys the last is the last written.
        self.open_members[mark..].sort_by(|x, y| x.0.cmp(&y.0));
        let start = self.members.len();
        let mut open = self.open_members.drain(mark..).peekable();
        while let Some(member) = open.next() {
            if open.peek().is_none_or(|next| next.0 != member.0) {
                self.members.push(member);
            }
        }
        drop(open);
        let len = self.members.len() - start;
        self.push(Slot::Object { start, len })
    }
}

/// Parses one value into the builder; its index in `slots`.
struct ValueSeed<'b, 'a>(&'b mut Builder<'a>);

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, 'de> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        d.deserialize_any(self)
    }
}

/// The same callbacks, with the same results, as `serde_json::Value`'s own visitor.
impl<'de> Visitor<'de> for ValueSeed<'_, 'de> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<usize, E> {
        Ok(self.0.push(Slot::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<usize, E> {
        Ok(self.0.push(Slot::Number(v.into())))
    }

    fn visit_u64<E>(self, v: u64) -> Result<usize, E> {
        Ok(self.0.push(Slot::Number(v.into())))
    }

    fn visit_f64<E>(self, v: f64) -> Result<usize, E> {
        // As `Value` does: a non-finite number is `null` (serde_json's parser makes none).
        let slot = Number::from_f64(v).map_or(Slot::Null, Slot::Number);
        Ok(self.0.push(slot))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<usize, E> {
        Ok(self.0.push(Slot::String(Cow::Borrowed(v))))
    }

    fn visit_str<E>(self, v: &str) -> Result<usize, E> {
        Ok(self.0.push(Slot::String(Cow::Owned(v.to_owned()))))
    }

    fn visit_string<E>(self, v: String) -> Result<usize, E> {
        Ok(self.0.push(Slot::String(Cow::Owned(v))))
    }

    fn visit_unit<E>(self) -> Result<usize, E> {
        Ok(self.0.push(Slot::Null))
    }

    fn visit_none<E>(self) -> Result<usize, E> {
        Ok(self.0.push(Slot::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let b = self.0;
        let mark = b.open_items.len();
        while let Some(i) = seq.next_element_seed(ValueSeed(&mut *b))? {
            b.open_items.push(i);
        }
        Ok(b.close_array(mark))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let b = self.0;
        let mark = b.open_members.len();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value_seed(ValueSeed(&mut *b))?;
            b.open_members.push((key, value));
        }
        Ok(b.close_object(mark))
    }
}

/// An object's key: borrowed from the body unless it has an escape.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(v))
    }
}

// === impl Tape ===

impl Json for Tape {
    type Node<'a> = TapeNode<'a>;
    /// A member is found by comparing keys (sorted: a binary search past a few), as in
    /// `serde_json`'s `BTreeMap`.
    type PreparedKey = Box<str>;
    type StringBuffer = ();

    /// As `SerdeJson`'s: a lookup compares keys, like its `BTreeMap`.
    const KEYS_PER_LOOKUP: usize = 2;
    /// A node's children are after it in no vector: no node is its own descendant.
    const ACYCLIC: bool = true;

    fn prepare_key(key: &str) -> Box<str> {
        key.into()
    }

    /// `propertyNames` only (no schema of ours uses it): a one-value document, allocated.
    fn with_string_node<T>((): &mut (), string: &str, f: impl FnOnce(TapeNode<'_>) -> T) -> T {
        let doc = Doc {
            slots: vec![Slot::String(Cow::Borrowed(string))],
            items: Vec::new(),
            members: Vec::new(),
            root: 0,
            ordered: true,
        };
        f(doc.root())
    }
}

// === impl TapeNode ===

impl<'a> Node<'a, Tape> for TapeNode<'a> {
    type Object = TapeObject<'a>;
    type Array = TapeArray<'a>;
    type Number = &'a Number;

    fn as_object(&self) -> Option<TapeObject<'a>> {
        match *self.slot {
            Slot::Object { start, len } => Some(TapeObject {
                doc: self.doc,
                members: &self.doc.members[start..start + len],
            }),
            _ => None,
        }
    }

    fn as_array(&self) -> Option<TapeArray<'a>> {
        match *self.slot {
            Slot::Array { start, len } => Some(TapeArray {
                doc: self.doc,
                items: &self.doc.items[start..start + len],
            }),
            _ => None,
        }
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        match self.slot {
            Slot::String(s) => Some(Cow::Borrowed(s.as_ref())),
            _ => None,
        }
    }

    fn as_number(&self) -> Option<&'a Number> {
        match self.slot {
            Slot::Number(n) => Some(n),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.slot {
            Slot::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        matches!(self.slot, Slot::Null)
    }

    fn json_type(&self) -> JsonType {
        match self.slot {
            Slot::Null => JsonType::Null,
            Slot::Bool(_) => JsonType::Boolean,
            Slot::Number(_) => JsonType::Number,
            Slot::String(_) => JsonType::String,
            Slot::Array { .. } => JsonType::Array,
            Slot::Object { .. } => JsonType::Object,
        }
    }

    fn string_length_within(&self, min: u64, max: u64) -> Option<bool> {
        let Slot::String(s) = self.slot else {
            return None;
        };
        // A code point takes one to four bytes: the byte length often decides without counting.
        let bytes = s.len() as u64;
        let fewest = bytes.div_ceil(4);
        if bytes < min || fewest > max {
            return Some(false);
        }
        if min <= fewest && bytes <= max {
            return Some(true);
        }
        Some((min..=max).contains(&(s.chars().count() as u64)))
    }

    /// `enum` and `const`: scalars compared in place (numbers mathematically, as
    /// `jsonschema::json::cmp` does), containers through their `Value`.
    fn equals_value(&self, expected: &Value) -> bool {
        match (self.slot, expected) {
            (Slot::Null, _) => expected.is_null(),
            (Slot::Bool(b), _) => expected.as_bool() == Some(*b),
            (Slot::String(s), _) => expected.as_str() == Some(s.as_ref()),
            (Slot::Number(n), Value::Number(e)) => jsonschema::json::cmp::equal_numbers(n, e),
            (Slot::Number(_), _) => false,
            _ => jsonschema::json::cmp::equal(&self.to_value(), expected),
        }
    }

    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(self.doc.value(self.slot))
    }

    fn identity(&self) -> Option<NodeIdentity> {
        // Each node has its own slot, alive as long as the document.
        Some(NodeIdentity::new(std::ptr::from_ref(self.slot) as usize))
    }
}

impl Doc<'_> {
    /// The `Value` that `serde_json` would have made (errors only: it allocates).
    fn value(&self, slot: &Slot<'_>) -> Value {
        match slot {
            Slot::Null => Value::Null,
            Slot::Bool(b) => Value::Bool(*b),
            Slot::Number(n) => Value::Number(n.clone()),
            Slot::String(s) => Value::String(s.to_string()),
            Slot::Array { start, len } => Value::Array(
                self.items[*start..start + len]
                    .iter()
                    .map(|&i| self.value(&self.slots[i]))
                    .collect(),
            ),
            Slot::Object { start, len } => Value::Object(
                self.members[*start..start + len]
                    .iter()
                    .map(|(k, i)| (k.to_string(), self.value(&self.slots[*i])))
                    .collect::<Map<String, Value>>(),
            ),
        }
    }
}

// === impl TapeObject ===

impl<'a> Object<'a, Tape> for TapeObject<'a> {
    type Node = TapeNode<'a>;
    type MemberName = &'a str;
    type MembersIter = Members<'a>;

    fn len(&self) -> usize {
        self.members.len()
    }

    fn get(&self, key: &Box<str>) -> Option<TapeNode<'a>> {
        let key: &str = key;
        let found = if self.members.len() <= 8 {
            self.members.iter().find(|(k, _)| k == key)
        } else {
            self.members
                .binary_search_by(|(k, _)| k.as_ref().cmp(key))
                .ok()
                .map(|i| &self.members[i])
        };
        found.map(|(_, i)| self.doc.node(*i))
    }

    fn members(&self) -> Members<'a> {
        Members {
            doc: self.doc,
            members: self.members.iter(),
        }
    }
}

pub struct Members<'a> {
    doc: &'a Doc<'a>,
    members: std::slice::Iter<'a, (Cow<'a, str>, usize)>,
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, TapeNode<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let doc = self.doc;
        self.members.next().map(|(k, i)| (k.as_ref(), doc.node(*i)))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.members.size_hint()
    }
}

// === impl TapeArray ===

impl<'a> Array<'a, Tape> for TapeArray<'a> {
    type Node = TapeNode<'a>;
    type ElementsIter = Items<'a>;

    fn len(&self) -> usize {
        self.items.len()
    }

    fn elements(&self) -> Items<'a> {
        Items {
            doc: self.doc,
            items: self.items.iter(),
        }
    }
}

pub struct Items<'a> {
    doc: &'a Doc<'a>,
    items: std::slice::Iter<'a, usize>,
}

impl<'a> Iterator for Items<'a> {
    type Item = TapeNode<'a>;

    fn next(&mut self) -> Option<TapeNode<'a>> {
        let doc = self.doc;
        self.items.next().map(|i| doc.node(*i))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.items.size_hint()
    }
}

/// Both representations side by side: the tests' and the fuzz target's (`fuzz/src/targets/
/// json_body.rs`) check that a body parses and validates the same as a `serde_json::Value`.
#[cfg(any(test, feature = "fuzzing"))]
pub mod equivalence {
    use jsonschema::json::SerdeJson;
    use jsonschema::{Draft, PatternOptions, Validator};
    use serde_json::json;

    use super::*;

    /// Both representations' validators of `schema`, configured as the ingress's are.
    pub fn validators(schema: &Value) -> (Validator<SerdeJson>, Validator<Tape>) {
        let serde = jsonschema::options()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            .with_pattern_options(PatternOptions::regex())
            .build(schema)
            .unwrap();
        let tape = jsonschema::options_for::<Tape>()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            .with_format("email", crate::validate::formats::email)
            .with_pattern_options(PatternOptions::regex())
            .build(schema)
            .unwrap();
        (serde, tape)
    }

    /// What a validation says, in full: validity, and each error's message, instance,
    /// instance path, schema path and kind, in order.
    pub fn outcome<'i, F: Json>(
        v: &'i Validator<F>,
        node: F::Node<'i>,
    ) -> (bool, Vec<String>, String) {
        let errors = v
            .iter_errors(node.clone())
            .map(|e| {
                format!(
                    "{e} | {} | {} | {} | {:?}",
                    e.instance(),
                    e.instance_path().as_str(),
                    e.schema_path().as_str(),
                    e.kind(),
                )
            })
            .collect();
        let first = match v.validate(node.clone()) {
            Ok(()) => String::new(),
            Err(e) => format!("{e} at {}", e.instance_path().as_str()),
        };
        (v.is_valid(node), errors, first)
    }

    /// The text parsed both ways: the same `Value`, or the same error; and validated both
    /// ways against each schema: the same outcome.
    pub fn assert_same(text: &[u8], schemas: &[(Validator<SerdeJson>, Validator<Tape>)]) {
        let value = serde_json::from_slice::<Value>(text);
        let doc = Doc::parse(text);
        match (&value, &doc) {
            (Ok(value), Ok(doc)) => {
                assert_eq!(&doc.root().to_value().into_owned(), value);
                for (serde, tape) in schemas {
                    assert_eq!(
                        outcome(tape, doc.root()),
                        outcome(serde, value),
                        "{}",
                        String::from_utf8_lossy(text)
                    );
                }
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!(
                "{}: serde_json {:?}, tape {:?}",
                String::from_utf8_lossy(text),
                value.as_ref().map(|_| ()),
                doc.as_ref().map(|_| ())
            ),
        }
        assert_same_unordered(text, &value, schemas);
    }

    /// The request path's reading ([`Doc::parse_unordered`], then [`Doc::into_ordered`] for
    /// the errors): the same validity before ordering, the same outcome after, the same error.
    fn assert_same_unordered(
        text: &[u8],
        value: &Result<Value, serde_json::Error>,
        schemas: &[(Validator<SerdeJson>, Validator<Tape>)],
    ) {
        let doc = Doc::parse_unordered(text);
        match (value, doc) {
            (Ok(value), Ok(doc)) => {
                for (serde, tape) in schemas {
                    let valid = tape.is_valid(doc.root());
                    assert_eq!(
                        valid,
                        serde.is_valid(value),
                        "{}",
                        String::from_utf8_lossy(text)
                    );
                }
                let doc = doc.into_ordered();
                assert_eq!(&doc.root().to_value().into_owned(), value);
                for (serde, tape) in schemas {
                    assert_eq!(outcome(tape, doc.root()), outcome(serde, value));
                }
            }
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!("{a:?} {:?}", b.map(|_| ())),
        }
    }

    /// A small deterministic generator (xorshift): no dependency for a fuzz-ish loop.
    pub struct Gen(pub u64);

    impl Gen {
        pub fn bits(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        pub fn below(&mut self, n: u64) -> u64 {
            self.bits() % n
        }

        pub fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
            from[self.below(from.len() as u64) as usize]
        }

        /// A JSON text: the rich schema's keys (and others, duplicated, escaped), every type.
        pub fn value(&mut self, depth: u32, out: &mut String) {
            let kind = if depth >= 4 {
                self.below(4)
            } else {
                self.below(7)
            };
            match kind {
                0 => out.push_str(self.pick(&["null", "true", "false"])),
                1 => {
                    let n = self.pick(&[
                        "0",
                        "1",
                        "3",
                        "-1",
                        "2.5",
                        "3.0",
                        "1e2",
                        "-0",
                        "0.1",
                        "99",
                        "101",
                        "18446744073709551615",
                        "18446744073709551616",
                        "-9223372036854775809",
                        "1E-2",
                        "6",
                        "2",
                    ]);
                    out.push_str(n);
                }
                2 | 3 => {
                    let s = self.pick(&[
                        "\"\"",
                        "\"ab\"",
                        "\"x\"",
                        "\"é\"",
                        "\"ABC-0001\"",
                        "\"a\\u0062\"",
                        "\"ada@example.com\"",
                        "\"2026-12-04T03:00:00Z\"",
                        "\"EUR\"",
                        "\"toolongstring\"",
                        "\"\\\"q\\\"\"",
                        "\"🦀🦀\"",
                        "\"s\"",
                    ]);
                    out.push_str(s);
                }
                4 => {
                    out.push('[');
                    for i in 0..self.below(5) {
                        if i > 0 {
                            out.push(',');
                        }
                        self.value(depth + 1, out);
                    }
                    out.push(']');
                }
                _ => {
                    out.push('{');
                    for i in 0..self.below(7) {
                        if i > 0 {
                            out.push(',');
                        }
                        let key = self.pick(&[
                            "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n",
                            "o", "x", "v", "next", "n1", "é", "\\u0061", "zz", "lines", "qty",
                            "sku", "customer", "currency", "price", "",
                        ]);
                        out.push('"');
                        out.push_str(key);
                        out.push_str("\":");
                        self.value(depth + 1, out);
                    }
                    out.push('}');
                }
            }
        }
    }

    /// A schema using most keywords, each with the instance's members, items or scalars.
    pub fn rich_schema() -> Value {
        json!({
            "type": "object",
            "required": ["a", "b"],
            "properties": {
                "a": {"type": "integer", "minimum": 1, "maximum": 100, "multipleOf": 3},
                "b": {"type": "string", "minLength": 2, "maxLength": 5, "pattern": "^[a-z]+$"},
                "c": {"enum": ["x", "é", 1, 2.5, null, true, [1, 2], {"k": 1}]},
                "d": {"const": {"k": [1, 2.0]}},
                "e": {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0},
                      "uniqueItems": true, "minItems": 1, "maxItems": 3},
                "f": {"type": ["string", "null"], "format": "email"},
                "g": {"type": "string", "format": "date-time"},
                "h": {"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 2}]},
                "i": {"type": "object", "additionalProperties": false,
                      "properties": {"x": {"type": "boolean"}}},
                "j": {"type": "object", "propertyNames": {"maxLength": 1},
                      "patternProperties": {"^n": {"type": "number"}}},
                "k": {"anyOf": [{"type": "array", "contains": {"const": 3}}, {"type": "boolean"}]},
                "l": {"$ref": "#/$defs/node"},
                "m": {"type": "array", "prefixItems": [{"type": "string"}], "items": false},
                "n": {"not": {"type": "null"}, "dependentRequired": {"a": ["b"]}},
                "o": {"type": "object", "minProperties": 1, "maxProperties": 2,
                      "required": ["a", "é"]}
            },
            "additionalProperties": {"type": ["number", "string", "boolean"]},
            "$defs": {"node": {"type": "object", "properties": {
                "v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}},
                "unevaluatedProperties": false}}
        })
    }

    /// `bench/validation.sh`'s order schema.
    pub fn order_schema() -> Value {
        json!({
            "type": "object", "required": ["customer", "currency", "lines"],
            "properties": {
                "customer": {"type": "string", "format": "email"},
                "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
                "placed": {"type": "string", "format": "date-time"},
                "note": {"type": ["string", "null"], "maxLength": 200},
                "lines": {"type": "array", "minItems": 1, "maxItems": 100, "items": {
                    "type": "object", "required": ["sku", "qty", "price"], "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "price": {"type": "number", "exclusiveMinimum": 0}}}}
            }
        })
    }

    pub fn all_schemas() -> Vec<(Validator<SerdeJson>, Validator<Tape>)> {
        vec![
            validators(&rich_schema()),
            validators(&order_schema()),
            validators(&json!(true)),
            validators(&json!({"type": "array", "items": {"$ref": "#"}, "maxItems": 2})),
            // the rich schema without `required` and `additionalProperties`: passed more often
            validators(&{
                let mut lenient = rich_schema();
                lenient.as_object_mut().unwrap().remove("required");
                lenient
                    .as_object_mut()
                    .unwrap()
                    .remove("additionalProperties");
                lenient
            }),
        ]
    }

    /// The fuzz target: `data` parsed and validated both ways against [`all_schemas`] (built
    /// once); panics where the two differ. The outcome: the parse error, or the type and which
    /// schemas passed.
    pub fn fuzz(data: &[u8]) -> String {
        static SCHEMAS: std::sync::OnceLock<Vec<(Validator<SerdeJson>, Validator<Tape>)>> =
            std::sync::OnceLock::new();
        let schemas = SCHEMAS.get_or_init(all_schemas);
        assert_same(data, schemas);
        match serde_json::from_slice::<Value>(data) {
            Err(e) => e.to_string(),
            Ok(v) => {
                let passed: Vec<&str> = schemas
                    .iter()
                    .map(|(s, _)| if s.is_valid(&v) { "pass" } else { "fail" })
                    .collect();
                let kind = match &v {
                    Value::Object(_) => "object",
                    Value::Array(_) => "array",
                    _ => "scalar",
                };
                format!("{kind} {}", passed.join(" "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::equivalence::*;
    use super::*;

    #[test]
    fn validates_exactly_like_value_on_a_table_of_cases() {
        let schemas = all_schemas();
        let cases: &[&str] = &[
            // valid, and each keyword failing
            r#"{"a": 3, "b": "ab"}"#,
            r#"{"a": 0, "b": "a"}"#,
            r#"{"a": 3.0, "b": "abcdef"}"#,
            r#"{"a": 4, "b": "AB", "z": null}"#,
            r#"{"a": 1e2, "b": "ab", "c": "é"}"#,
            r#"{"a": 3, "b": "ab", "c": {"k": 1.0}, "d": {"k": [1, 2]}}"#,
            r#"{"a": 3, "b": "ab", "c": [1, 2, 3], "d": {"k": [1, 3]}}"#,
            r#"{"a": 3, "b": "ab", "c": 2.50, "e": [1, 1.0]}"#,
            r#"{"a": 3, "b": "ab", "e": [], "f": "not an email"}"#,
            r#"{"a": 3, "b": "ab", "e": [0, -1, 2, 3], "f": null, "g": "2026-13-01T00:00:00Z"}"#,
            r#"{"a": 3, "b": "ab", "g": "2026-12-04T03:00:00Z", "h": 1}"#,
            r#"{"a": 3, "b": "ab", "h": 1.5, "i": {"x": true, "y": 1, "w": 2}}"#,
            r#"{"a": 3, "b": "ab", "j": {"n": "s", "nn": 1, "o": 2}}"#,
            r#"{"a": 3, "b": "ab", "k": [1, 2], "l": {"v": 1, "next": {"v": "x", "w": 1}}}"#,
            r#"{"a": 3, "b": "ab", "m": ["s", 1], "n": null, "o": {}}"#,
            r#"{"a": 3, "b": "ab", "n": {"a": 1}, "o": {"a": 1, "b": 2, "c": 3}}"#,
            r#"{"b": "ab", "zz": [], "yy": {}}"#,
            // duplicate keys: the last one counts
            r#"{"a": 3, "b": "ab", "a": "three"}"#,
            r#"{"a": "three", "b": "ab", "a": 3}"#,
            // escapes in keys and strings
            r#"{"\u0061": 3, "b": "a\u0062", "c\n": "\"", "\ud83e\udd80": "🦀"}"#,
            // numbers: large, negative, exponents, fractions
            r#"{"a": 18446744073709551615, "b": "ab", "z": -9223372036854775808}"#,
            r#"{"a": 18446744073709551616, "b": "ab", "z": -0, "y": 1E400}"#,
            r#"{"a": 99.0000000000000000001, "b": "ab", "z": 1e-400, "y": -0.0}"#,
            // not objects
            "[]",
            "[[[1]]]",
            "null",
            "\"é\"",
            "12.5",
            // malformed: the same errors at the same places
            "",
            "{",
            r#"{"a": 1,}"#,
            r#"{"a" 1}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1} x"#,
            r#"{"a": "\x"}"#,
            r#"{"a": "\ud800"}"#,
            r#"{1: 2}"#,
            "[1, 2",
            "nul",
            "  ",
        ];
        for case in cases {
            assert_same(case.as_bytes(), &schemas);
        }
        // invalid UTF-8 in a string and in a key; nesting past the limit and at it.
        assert_same(b"{\"customer\": \"\xff\xfe\"}", &schemas);
        assert_same(b"{\"\xc3\": 1}", &schemas);
        let deep = |n| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for n in [127, 128, 129, 100_000] {
            assert_same(deep(n).as_bytes(), &schemas);
        }
    }

    #[test]
    fn meets_the_contract_jsonschema_checks_representations_for() {
        let text = serde_json::to_vec(&jsonschema::json::conformance::document()).unwrap();
        let doc = Doc::parse(&text).unwrap();
        jsonschema::json::conformance::assert_conformance::<Tape>(&doc.root());
    }

    #[test]
    fn strings_borrow_from_the_body_unless_escaped() {
        let body = br#"{"plain": "text", "esc\u0061ped": "a\nb"}"#;
        let doc = Doc::parse(body).unwrap();
        let range = body.as_ptr_range();
        let borrowed =
            |s: &Cow<'_, str>| matches!(s, Cow::Borrowed(b) if range.contains(&b.as_ptr()));
        let keys: Vec<bool> = doc.members.iter().map(|(k, _)| borrowed(k)).collect();
        assert_eq!(keys, [false, true]); // sorted: "escaped", "plain"
        let strings: Vec<bool> = doc
            .slots
            .iter()
            .filter_map(|s| match s {
                Slot::String(s) => Some(borrowed(s)),
                _ => None,
            })
            .collect();
        assert_eq!(strings, [true, false]);
    }

    #[test]
    fn small_objects_keep_the_clients_order_until_ordered_and_the_last_duplicate_wins() {
        let keys = |doc: &Doc<'_>| -> Vec<String> {
            let obj = doc.root().as_object().unwrap();
            obj.members()
                .map(|(k, v)| format!("{k}={:?}", v.to_value().as_u64()))
                .collect()
        };
        let body = br#"{"b": 1, "c": 2, "a": 3, "b": 4}"#;
        let doc = Doc::parse_unordered(body).unwrap();
        assert_eq!(keys(&doc), ["c=Some(2)", "a=Some(3)", "b=Some(4)"]);
        let doc = doc.into_ordered();
        assert_eq!(keys(&doc), ["a=Some(3)", "b=Some(4)", "c=Some(2)"]);
        assert_eq!(keys(&Doc::parse(body).unwrap()), keys(&doc));
        // over `SMALL` members: sorted either way (found by binary search)
        let big: Vec<String> = (0..=SMALL)
            .rev()
            .map(|i| format!("\"k{i}\": {i}"))
            .collect();
        let body = format!("{{{}}}", big.join(", "));
        let doc = Doc::parse_unordered(body.as_bytes()).unwrap();
        let sorted: Vec<String> = (0..=SMALL).map(|i| format!("k{i}=Some({i})")).collect();
        assert_eq!(keys(&doc), sorted);
    }

    #[test]
    fn validates_exactly_like_value_on_generated_documents() {
        let schemas = all_schemas();
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        // What the loop covered: the lenient schema passed and failed, errors in bytes that
        // are not UTF-8 and in bytes that are.
        let (mut valid, mut invalid, mut not_utf8, mut malformed) = (0, 0, 0, 0);
        for _ in 0..3000 {
            let mut text = String::new();
            g.value(0, &mut text);
            assert_same(text.as_bytes(), &schemas);
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                match schemas[4].0.is_valid(&v) {
                    true => valid += 1,
                    false => invalid += 1,
                }
            }
            // and broken: cut short, or a byte changed
            let mut bytes = text.into_bytes();
            let at = g.below(bytes.len() as u64) as usize;
            match g.below(2) {
                0 => bytes.truncate(at),
                _ => bytes[at] = *b"\"{}[],:x\\\xff".get(g.below(10) as usize).unwrap(),
            }
            assert_same(&bytes, &schemas);
            match std::str::from_utf8(&bytes) {
                Err(_) => not_utf8 += 1,
                Ok(t) => malformed += usize::from(serde_json::from_str::<Value>(t).is_err()),
            }
        }
        assert!(
            valid > 20 && invalid > 1000 && not_utf8 > 100 && malformed > 1000,
            "{valid} {invalid} {not_utf8} {malformed}"
        );
    }
}
