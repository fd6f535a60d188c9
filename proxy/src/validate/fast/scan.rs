//! The scan: a recursive descent over the body steered by the compiled schema. Every function
//! answers `Err(Unsure)` at the first thing it is not certain of; nothing is recorded.

use std::borrow::Cow;

use serde_json::Number;

use super::{Additional, ArrayNode, Node, ObjectNode, ANY_ARRAY, ANY_OBJECT, MAX_DEPTH};
use crate::validate::tape::{scalar_node, Slot};

/// Not certain: the full check decides.
struct Unsure;

type Step<T = ()> = Result<T, Unsure>;

/// Integers of up to this many digits are read here (they fit a `u64`, and an `i64` negated).
const MAX_INT_DIGITS: usize = 18;
/// Decimals of up to this many digits in all are read here: their significand is below
/// 2^53 and their power of ten at most 10^15, both exact in an `f64`, so one division gives the
/// correctly rounded value, the one `serde_json` gives (`float_roundtrip` or not).
const MAX_DECIMAL_DIGITS: usize = 15;
const POW10: [f64; MAX_DECIMAL_DIGITS + 1] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

struct Scan<'a> {
    b: &'a [u8],
    text: &'a str,
    i: usize,
    depth: u32,
}

/// Whether `body` is certainly valid against `root`.
pub(super) fn accepts(root: &Node, body: &[u8]) -> bool {
    // Checked whole, at once: a string is then a slice between two ASCII quotes.
    let Ok(text) = std::str::from_utf8(body) else {
        return false;
    };
    let mut s = Scan {
        b: body,
        text,
        i: 0,
        depth: 0,
    };
    if s.value(root).is_err() {
        return false;
    }
    s.ws();
    s.i == s.b.len()
}

// === impl Scan ===

impl<'a> Scan<'a> {
    fn value(&mut self, node: &Node) -> Step {
        self.ws();
        match node {
            Node::Any => self.skip(),
            Node::Unsure => Err(Unsure),
            Node::Leaf(v) => {
                let slot = self.scalar()?;
                match v.is_valid(scalar_node(&slot)) {
                    true => Ok(()),
                    false => Err(Unsure),
                }
            }
            Node::Scalar(rule) => match rule.admits(&self.scalar()?) {
                true => Ok(()),
                false => Err(Unsure),
            },
            Node::Object(o) => self.object(o),
            Node::Array(a) => self.array(a),
        }
    }

    /// Any value, for its syntax only (and numbers in range, as `serde_json` wants them).
    fn skip(&mut self) -> Step {
        match self.peek()? {
            b'{' => self.object(&ANY_OBJECT),
            b'[' => self.array(&ANY_ARRAY),
            b'"' => self.string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            // read, not only matched: `serde_json` refuses a number out of an `f64`'s range
            _ => self.number().map(drop),
        }
    }

    fn object(&mut self, o: &ObjectNode) -> Step {
        self.eat(b'{')?;
        self.enter()?;
        let mut seen = 0u64;
        // members usually come in the schema's order: each search starts after the last found
        let mut next = 0;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
        } else {
            loop {
                self.ws();
                let key = self.string()?;
                self.ws();
                self.eat(b':')?;
                match o.find(key, next) {
                    Some((i, bit, node)) => {
                        seen |= bit;
                        next = i + 1;
                        match node {
                            Some(node) => self.value(node)?,
                            None => self.additional(&o.additional)?,
                        }
                    }
                    None => self.additional(&o.additional)?,
                }
                if self.close(b'}')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        match seen & o.required == o.required {
            true => Ok(()),
            false => Err(Unsure),
        }
    }

    fn additional(&mut self, rule: &Additional) -> Step {
        match rule {
            Additional::Any => self.value(&Node::Any),
            Additional::Deny => Err(Unsure),
            Additional::Schema(node) => self.value(node),
        }
    }

    fn array(&mut self, a: &ArrayNode) -> Step {
        self.eat(b'[')?;
        self.enter()?;
        let mut count = 0u64;
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
        } else {
            loop {
                self.value(&a.items)?;
                count += 1;
                if self.close(b']')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        match (a.min..=a.max).contains(&count) {
            true => Ok(()),
            false => Err(Unsure),
        }
    }

    /// After a member or item: `,` (another follows) or the container's end (`true`).
    fn close(&mut self, end: u8) -> Step<bool> {
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                Ok(false)
            }
            c if c == end => {
                self.i += 1;
                Ok(true)
            }
            _ => Err(Unsure),
        }
    }

    /// A scalar as `serde_json` reads it; a container is not one.
    fn scalar(&mut self) -> Step<Slot<'a>> {
        Ok(match self.peek()? {
            b'"' => Slot::String(Cow::Borrowed(self.string()?)),
            b't' => self.literal(b"true").map(|()| Slot::Bool(true))?,
            b'f' => self.literal(b"false").map(|()| Slot::Bool(false))?,
            b'n' => self.literal(b"null").map(|()| Slot::Null)?,
            _ => Slot::Number(self.number()?),
        })
    }

    /// A string without escapes or control characters (those go to the full check).
    fn string(&mut self) -> Step<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let rest = self.b.get(start..).ok_or(Unsure)?;
        let len = string_end(rest).ok_or(Unsure)?;
        if rest[len] != b'"' {
            return Err(Unsure);
        }
        self.i = start + len + 1;
        self.text.get(start..start + len).ok_or(Unsure)
    }

    /// A number, read to the `Number` `serde_json` makes of it.
    fn number(&mut self) -> Step<Number> {
        let start = self.i;
        let shape = self.number_text()?;
        let text = self.text.get(start..self.i).ok_or(Unsure)?;
        number(text, shape)
    }

    /// JSON's number grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number_text(&mut self) -> Step<Shape> {
        let negative = self.b.get(self.i) == Some(&b'-');
        if negative {
            self.i += 1;
        }
        let mut significand = 0u64;
        let int_digits = match self.peek()? {
            b'0' => {
                self.i += 1;
                1
            }
            b'1'..=b'9' => self.digits(&mut significand),
            _ => return Err(Unsure),
        };
        let mut frac_digits = 0;
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            frac_digits = self.digits(&mut significand);
            if frac_digits == 0 {
                return Err(Unsure);
            }
        }
        let exponent = matches!(self.b.get(self.i), Some(b'e' | b'E'));
        if exponent {
            self.i += 1;
            if matches!(self.b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if self.digits(&mut 0) == 0 {
                return Err(Unsure);
            }
        }
        Ok(Shape {
            negative,
            int_digits,
            frac_digits,
            exponent,
            significand,
        })
    }

    /// Digits, appended to `value` (which wraps past 19 digits: [`number`] does not use it
    /// then); how many.
    fn digits(&mut self, value: &mut u64) -> usize {
        let from = self.i;
        while let Some(&c @ b'0'..=b'9') = self.b.get(self.i) {
            *value = value.wrapping_mul(10).wrapping_add(u64::from(c - b'0'));
            self.i += 1;
        }
        self.i - from
    }

    fn literal(&mut self, word: &[u8]) -> Step {
        match self.b[self.i..].starts_with(word) {
            true => {
                self.i += word.len();
                Ok(())
            }
            false => Err(Unsure),
        }
    }

    fn enter(&mut self) -> Step {
        self.depth += 1;
        match self.depth <= MAX_DEPTH {
            true => Ok(()),
            false => Err(Unsure),
        }
    }

    fn eat(&mut self, c: u8) -> Step {
        match self.b.get(self.i) == Some(&c) {
            true => {
                self.i += 1;
                Ok(())
            }
            false => Err(Unsure),
        }
    }

    fn peek(&self) -> Step<u8> {
        self.b.get(self.i).copied().ok_or(Unsure)
    }

    /// The four whitespace bytes of JSON (and of `serde_json`).
    fn ws(&mut self) {
        while matches!(self.b.get(self.i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.i += 1;
        }
    }
}

/// The bytes that end the plain part of a string: `"`, `\\` and the control characters.
static SPECIAL: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = true;
        c += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// Where the first `"`, `\\` or control character of `b` is. Byte by byte with a table:
/// strings in bodies are short (keys, codes, names), shorter than a word-at-a-time loop's
/// setup pays for (measured: 20 against 90 instructions a string).
fn string_end(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| SPECIAL[usize::from(c)])
}

/// What [`Scan::number_text`] saw of a number.
#[derive(Clone, Copy)]
struct Shape {
    negative: bool,
    int_digits: usize,
    frac_digits: usize,
    exponent: bool,
    /// The integer and fraction digits as one integer (meaningful up to 19 digits).
    significand: u64,
}

/// The `Number` `serde_json` reads `text` (of `shape`) as: short integers and short decimals
/// here, anything else by `serde_json`'s own reading (`Number::from_str`, its parser's).
fn number(text: &str, shape: Shape) -> Step<Number> {
    let all = shape.int_digits + shape.frac_digits;
    if !shape.exponent && shape.frac_digits == 0 && all <= MAX_INT_DIGITS {
        return match (shape.negative, shape.significand) {
            (false, n) => Ok(Number::from(n)),
            // `-0` is the float -0.0 to serde_json
            (true, 0) => text.parse().map_err(|_| Unsure),
            (true, n) => i64::try_from(n)
                .map(|n| Number::from(-n))
                .map_err(|_| Unsure),
        };
    }
    if !shape.exponent && all <= MAX_DECIMAL_DIGITS {
        // exact: at most 15 digits
        let n = shape.significand as f64 / POW10[shape.frac_digits];
        let n = if shape.negative { -n } else { n };
        return Number::from_f64(n).ok_or(Unsure);
    }
    if shape.frac_digits > 0 || shape.exponent {
        // Any other float: `core`'s reading is correctly rounded, and so is `serde_json`'s
        // with `float_roundtrip` (which the tree builds it with: `tests.rs` checks both on
        // 100,000 long decimals), so the two are the same value. One out of range is refused
        // by `serde_json`: not sure here.
        let n: f64 = text.parse().map_err(|_| Unsure)?;
        return Number::from_f64(n).filter(|_| n.is_finite()).ok_or(Unsure);
    }
    // integers past 18 digits: `u64` up to its limit, else a float
    text.parse().map_err(|_| Unsure)
}

#[cfg(test)]
pub(super) fn number_for_tests(text: &str) -> Option<Number> {
    let mut s = Scan {
        b: text.as_bytes(),
        text,
        i: 0,
        depth: 0,
    };
    let shape = s.number_text().ok()?;
    (s.i == text.len())
        .then(|| number(text, shape).ok())
        .flatten()
}
