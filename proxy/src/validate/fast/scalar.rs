//! A scalar's schema made only of `type`, numeric bounds (`minimum`, `maximum`,
//! `exclusiveMinimum`, `exclusiveMaximum`) and string lengths (`minLength`, `maxLength`),
//! checked in place: the most common scalar schemas, each of which would otherwise cost a call
//! into a `jsonschema` validator of its own (about 200 instructions). JSON Schema's rules,
//! answered only where the answer is exact; anything else is "not sure" (`false`), and the full
//! check decides:
//! - a number against a bound compares exactly (`jsonschema` compares with `num-cmp`, exactly
//!   too): integers as integers, floats as floats, and across the two only while the integer
//!   is exact in an `f64` (at most 2^53 in magnitude);
//! - `integer` admits a `u64` or `i64` number; a float (`1.0` is an integer to JSON Schema) is
//!   left to the full check;
//! - a length counts code points, as the document's strings do (`tape::string_length_within`).

use std::cmp::Ordering;

use serde_json::{Map, Number, Value};

use crate::validate::tape::Slot;

/// Integers up to this magnitude are exact in an `f64`.
const EXACT_IN_F64: u64 = 1 << 53;

pub(super) struct Scalar {
    /// `None`: no `type` keyword, any scalar type.
    types: Option<Types>,
    /// Each bound: the limit, and the orderings of the number against it that pass.
    bounds: Vec<(Limit, Pass)>,
    min_length: u64,
    max_length: u64,
}

#[derive(Clone, Copy, Default)]
struct Types {
    null: bool,
    boolean: bool,
    integer: bool,
    number: bool,
    string: bool,
}

/// A bound's limit, read once.
#[derive(Clone, Copy)]
enum Limit {
    Integer(i128),
    Float(f64),
}

#[derive(Clone, Copy)]
enum Pass {
    Ge,
    Gt,
    Le,
    Lt,
}

// === impl Scalar ===

impl Scalar {
    /// `map` as a scalar rule, if every keyword is one of these (or passes `ignored`) and
    /// well formed.
    pub(super) fn of(
        map: &Map<String, Value>,
        ignored: impl Fn(&str, &Value) -> bool,
    ) -> Option<Self> {
        let mut s = Scalar {
            types: None,
            bounds: Vec::new(),
            min_length: 0,
            max_length: u64::MAX,
        };
        for (key, value) in map {
            let pass = match key.as_str() {
                "type" => {
                    s.types = Some(Types::of(value)?);
                    continue;
                }
                "minLength" => {
                    s.min_length = value.as_u64()?;
                    continue;
                }
                "maxLength" => {
                    s.max_length = value.as_u64()?;
                    continue;
                }
                "minimum" => Pass::Ge,
                "exclusiveMinimum" => Pass::Gt,
                "maximum" => Pass::Le,
                "exclusiveMaximum" => Pass::Lt,
                k if ignored(k, value) => continue,
                _ => return None,
            };
            let Value::Number(limit) = value else {
                return None;
            };
            let limit = match integer(limit) {
                Some(i) => Limit::Integer(i),
                None => Limit::Float(limit.as_f64()?),
            };
            s.bounds.push((limit, pass));
        }
        Some(s)
    }

    /// Whether `slot` certainly passes.
    pub(super) fn admits(&self, slot: &Slot<'_>) -> bool {
        let t = self.types;
        match slot {
            Slot::Null => t.is_none_or(|t| t.null),
            Slot::Bool(_) => t.is_none_or(|t| t.boolean),
            Slot::String(s) => t.is_none_or(|t| t.string) && self.length_ok(s),
            Slot::Number(n) => {
                let typed = t.is_none_or(|t| t.number || (t.integer && !n.is_f64()));
                typed
                    && self
                        .bounds
                        .iter()
                        .all(|(limit, pass)| passes(n, limit, *pass))
            }
            Slot::Array { .. } | Slot::Object { .. } => false,
        }
    }

    fn length_ok(&self, s: &str) -> bool {
        if self.min_length == 0 && self.max_length == u64::MAX {
            return true;
        }
        let n = s.chars().count() as u64;
        (self.min_length..=self.max_length).contains(&n)
    }
}

/// `n` against `limit`, when the comparison is exact.
fn passes(n: &Number, limit: &Limit, pass: Pass) -> bool {
    let Some(ord) = compare(n, limit) else {
        return false;
    };
    match pass {
        Pass::Ge => ord.is_ge(),
        Pass::Gt => ord.is_gt(),
        Pass::Le => ord.is_le(),
        Pass::Lt => ord.is_lt(),
    }
}

fn compare(a: &Number, b: &Limit) -> Option<Ordering> {
    match (integer(a), *b) {
        (Some(x), Limit::Integer(y)) => Some(x.cmp(&y)),
        (Some(x), Limit::Float(y)) => exact_f64(x)?.partial_cmp(&y),
        (None, Limit::Integer(y)) => a.as_f64()?.partial_cmp(&exact_f64(y)?),
        (None, Limit::Float(y)) => a.as_f64()?.partial_cmp(&y),
    }
}

fn integer(n: &Number) -> Option<i128> {
    n.as_u64()
        .map(i128::from)
        .or_else(|| n.as_i64().map(i128::from))
}

fn exact_f64(n: i128) -> Option<f64> {
    // through `i64`: a machine conversion, not `i128`'s library call
    let n = i64::try_from(n).ok()?;
    (n.unsigned_abs() <= EXACT_IN_F64).then_some(n as f64)
}

// === impl Types ===

impl Types {
    /// What `type` names (a name or a list), if only scalar types.
    fn of(value: &Value) -> Option<Self> {
        let mut t = Self::default();
        let mut add = |name: &Value| {
            match name.as_str()? {
                "null" => t.null = true,
                "boolean" => t.boolean = true,
                "integer" => t.integer = true,
                "number" => t.number = true,
                "string" => t.string = true,
                _ => return None,
            }
            Some(())
        };
        match value {
            Value::Array(names) if !names.is_empty() => names.iter().try_for_each(&mut add)?,
            name => add(name)?,
        }
        Some(t)
    }
}
