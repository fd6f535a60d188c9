//! The fast path of [`Doc::parse`](super::Doc::parse): a scanner for the JSON a typical body
//! is (no escapes in strings, numbers of up to 15 digits), about a third of `serde_json`'s
//! instructions for the benchmark's order, because it builds the [`Builder`]'s vectors
//! directly instead of going through `serde`'s `Visitor`/`MapAccess` calls per value.
//!
//! It is not a second JSON parser with rules of its own: it gives up (`None`) at anything it
//! does not handle or that might be an error (an escape, a control character, a long or
//! unusual number, nesting past [`MAX_DEPTH`], anything malformed), and the body is then parsed
//! by `serde_json` from the start, whose errors and positions the answers quote. So it only
//! ever accepts texts `serde_json` accepts, and makes of them the same document: the same
//! builder (members sorted, the last of duplicate keys winning), the same numbers (integers
//! as `u64`/`i64`, a decimal computed exactly where one rounding is exact, anything else read
//! by `serde_json` itself). The tests hold it to that on the equivalence table, on generated
//! documents and on random numbers, bit for bit.

use std::borrow::Cow;

use serde::de::DeserializeSeed;
use serde_json::Number;

use super::{Builder, Slot, ValueSeed};

/// Containers nested deeper are left to `serde_json` (its limit is 128).
const MAX_DEPTH: usize = 64;
/// Powers of ten that are exact as `f64` (10^22 is the largest).
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// The root's index in `b`, or `None` (the builder then holds a partial document: clear it).
pub(super) fn parse<'a>(text: &'a str, b: &mut Builder<'a>) -> Option<usize> {
    let mut s = Scanner { text, pos: 0, b };
    let root = s.value(0)?;
    s.skip_ws();
    (s.pos == text.len()).then_some(root)
}

struct Scanner<'a, 'b> {
    text: &'a str,
    pos: usize,
    b: &'b mut Builder<'a>,
}

impl<'a> Scanner<'a, '_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn value(&mut self, depth: usize) -> Option<usize> {
        self.skip_ws();
        let slot = match self.peek()? {
            b'{' => return self.object(depth + 1),
            b'[' => return self.array(depth + 1),
            b'"' => Slot::String(Cow::Borrowed(self.string()?)),
            b't' => self.literal("true", Slot::Bool(true))?,
            b'f' => self.literal("false", Slot::Bool(false))?,
            b'n' => self.literal("null", Slot::Null)?,
            b'-' | b'0'..=b'9' => return self.number(),
            _ => return None,
        };
        Some(self.b.push(slot))
    }

    fn literal(&mut self, word: &str, slot: Slot<'a>) -> Option<Slot<'a>> {
        let rest = self.text.as_bytes().get(self.pos..)?;
        rest.starts_with(word.as_bytes()).then(|| {
            self.pos += word.len();
            slot
        })
    }

    fn array(&mut self, depth: usize) -> Option<usize> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1; // `[`
        let mark = self.b.open_items.len();
        self.skip_ws();
        if self.peek()? == b']' {
            self.pos += 1;
            return Some(self.b.close_array(mark));
        }
        loop {
            let item = self.value(depth)?;
            self.b.open_items.push(item);
            self.skip_ws();
            match self.next()? {
                b',' => continue,
                b']' => return Some(self.b.close_array(mark)),
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<usize> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1; // `{`
        let mark = self.b.open_members.len();
        self.skip_ws();
        if self.peek()? == b'}' {
            self.pos += 1;
            return Some(self.b.close_object(mark));
        }
        loop {
            self.skip_ws();
            if self.peek()? != b'"' {
                return None;
            }
            let key = self.string()?;
            self.skip_ws();
            if self.next()? != b':' {
                return None;
            }
            let value = self.value(depth)?;
            self.b.open_members.push((Cow::Borrowed(key), value));
            self.skip_ws();
            match self.next()? {
                b',' => continue,
                b'}' => return Some(self.b.close_object(mark)),
                _ => return None,
            }
        }
    }

    /// A string without escapes or control characters, at its opening quote: borrowed.
    fn string(&mut self) -> Option<&'a str> {
        let start = self.pos + 1;
        let bytes = self.text.as_bytes().get(start..)?;
        let len = bytes
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        if bytes[len] != b'"' {
            return None;
        }
        self.pos = start + len + 1;
        // Both ends are ASCII quotes: character boundaries.
        self.text.get(start..start + len)
    }

    /// A number: its text checked against JSON's grammar, its value computed here when that
    /// is exact, else by `serde_json` (the same code path as the whole body's parse).
    fn number(&mut self) -> Option<usize> {
        let start = self.pos;
        let negative = self.peek() == Some(b'-');
        self.pos += usize::from(negative);
        // integer part: `0`, or a digit 1-9 and more digits
        let int_start = self.pos;
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let int_end = self.pos;
        let mut frac = (int_end, int_end);
        if self.peek() == Some(b'.') {
            self.pos += 1;
            frac.0 = self.pos;
            self.digits_one_or_more()?;
            frac.1 = self.pos;
        }
        let mut exp = None;
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            let sign = match self.peek() {
                Some(b'-') => -1,
                Some(b'+') => 1,
                _ => 0,
            };
            self.pos += usize::from(sign != 0);
            let at = self.pos;
            self.digits_one_or_more()?;
            exp = Some((sign, at));
        }
        let text = self.text.get(start..self.pos)?;
        let digits = (
            self.text.get(int_start..int_end)?,
            self.text.get(frac.0..frac.1)?,
        );
        let exp = match exp {
            None => None,
            Some((sign, at)) => match exponent(self.text.get(at..self.pos)?, sign) {
                None => return self.number_by_serde(text),
                e => e,
            },
        };
        let slot = match exact(negative, digits, exp) {
            Some(n) => Slot::Number(n),
            None => return self.number_by_serde(text),
        };
        Some(self.b.push(slot))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn digits_one_or_more(&mut self) -> Option<()> {
        let at = self.pos;
        self.digits();
        (self.pos > at).then_some(())
    }

    /// A number outside the exact cases, read by `serde_json` alone (so `1e400` is its error,
    /// and this scanner gives up).
    fn number_by_serde(&mut self, text: &'a str) -> Option<usize> {
        let mut de = serde_json::Deserializer::from_str(text);
        let i = ValueSeed(&mut *self.b).deserialize(&mut de).ok()?;
        de.end().ok()?;
        Some(i)
    }
}

/// An exponent of at most 3 digits, signed (`sign` 0: none written).
fn exponent(digits: &str, sign: i32) -> Option<i32> {
    if digits.len() > 3 {
        return None;
    }
    let n = digits.parse::<i32>().ok()?;
    Some(if sign < 0 { -n } else { n })
}

/// The value `serde_json` makes of a number, when computing it here is exact:
/// - an integer (no fraction, no exponent) of up to 18 digits: `u64`, or `i64` when negative
///   (`-0` is left to serde, which makes it the float `-0.0`);
/// - a decimal of up to 15 significant digits and a power of ten up to 22 (Clinger's fast
///   path: both are exact `f64`s, so one multiplication or division rounds once, correctly,
///   as `serde_json`'s `float_roundtrip` parsing does). Zero is left to serde (its sign).
///
/// `exp`: the exponent written, `None` for none.
fn exact(negative: bool, (int, frac): (&str, &str), exp: Option<i32>) -> Option<Number> {
    let n_digits = int.len() + frac.len();
    if n_digits > 18 {
        return None;
    }
    let m = int
        .bytes()
        .chain(frac.bytes())
        .fold(0u64, |m, c| m * 10 + u64::from(c - b'0'));
    if frac.is_empty() && exp.is_none() {
        return match (negative, m) {
            (false, m) => Some(Number::from(m)),
            (true, 0) => None,
            // at most 18 digits: fits
            (true, m) => Some(Number::from(-i64::try_from(m).ok()?)),
        };
    }
    let e = exp.unwrap_or(0) - i32::try_from(frac.len()).ok()?;
    if m == 0 || n_digits > 15 || e.unsigned_abs() > 22 {
        return None;
    }
    let p = POW10[e.unsigned_abs() as usize];
    let v = m as f64;
    let v = if e < 0 { v / p } else { v * p };
    Number::from_f64(if negative { -v } else { v })
}
