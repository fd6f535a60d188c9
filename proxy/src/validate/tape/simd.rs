//! The fast path of [`Doc::parse_with`](super::Doc): a body's structure found by `simd-json`
//! (its SIMD structural index and tape), and our [`Doc`](super::Doc) filled from that tape with
//! the same [`Builder`] calls that `serde_json`'s parser makes through our `Visitor`.
//!
//! Why the care: `serde_json`'s parse is the reference. Its errors (message, line, column) are
//! what a refusal quotes, and its reading of a number is what `minimum` or `multipleOf`
//! compare. So this path never produces an error and never reads a number on its own: it either
//! builds exactly the document `serde_json`'s parse would have built, or gives up (`None`) and
//! the body is parsed again by `serde_json`, which then decides. It gives up on
//!
//! - anything `simd-json` refuses (including control characters in strings, trailing bytes);
//! - a body over [`FAST_MAX`] (the thread's scratch buffers stay small) or containing any `\`
//!   (escapes are rare in API bodies; without them every string is the body's own bytes, so
//!   invalid escapes, lone surrogates and unescaping need no second opinion);
//! - nesting deeper than [`DEPTH_MAX`] (`serde_json` refuses past 128 levels);
//! - a number or literal whose text is not what `serde_json` reads: every number's text is
//!   read again here, an integer by its digits (the same `u64`/`i64` split as `serde_json`,
//!   `-0` and integers beyond `u64`/`i64` handed to `serde_json`'s own number parser) and any
//!   other number by `serde_json`'s own number parser ([`Number::from_str`]), so no float is
//!   rounded by `simd-json`; the byte after a number must end it (whitespace, `,`, `]`, `}`).
//!
//! The body is valid UTF-8 here (checked by the caller), which `serde_json` and `simd-json`
//! both require. `simd-json` wants a mutable copy of the body (it unescapes in place) and
//! scratch buffers: kept per thread and reused, so a body costs a `memcpy` and no allocation.

use std::borrow::Cow;
use std::cell::RefCell;
use std::str::FromStr;

use serde_json::Number;
use simd_json::{Buffers, Node, StaticNode};

use super::{Builder, Slot, SMALL};

/// The largest body read by the fast path: the per-thread copies (body, `simd-json`'s aligned
/// input and string buffer, structural index, tape) then stay under about 3 MB per thread.
pub(super) const FAST_MAX: usize = 64 * 1024;

/// Deeper documents are left to `serde_json`, whose limit (128) makes the error.
const DEPTH_MAX: usize = 100;

/// What `simd-json` needs, kept between bodies on a thread.
struct Scratch {
    copy: Vec<u8>,
    buffers: Buffers,
    /// Empty between uses (its lifetime is that of the copy while in use).
    tape: Option<simd_json::Tape<'static>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        copy: Vec::new(),
        buffers: Buffers::new(4096),
        tape: Some(simd_json::Tape(Vec::new())),
    });
}

/// Fills `b` with `text`'s document as `serde_json` would, and gives its root; `None` where
/// this path gives up (`b` is then left dirty: the caller starts over).
pub(super) fn parse<'a>(text: &'a str, b: &mut Builder<'a>) -> Option<usize> {
    if text.len() > FAST_MAX || memchr::memchr(b'\\', text.as_bytes()).is_some() {
        return None;
    }
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.try_borrow_mut().ok()?;
        let Scratch {
            copy,
            buffers,
            tape,
        } = &mut *scratch;
        copy.clear();
        copy.extend_from_slice(text.as_bytes());
        let base = copy.as_ptr() as usize;
        let mut nodes = tape.take()?.reset();
        let root = match simd_json::fill_tape(copy, buffers, &mut nodes) {
            Ok(()) => Fill::new(text, base, &nodes.0, b).document(),
            Err(_) => None,
        };
        *tape = Some(nodes.reset());
        root
    })
}

/// One walk over the tape, in document order, with a cursor in the body's text for the
/// numbers' and literals' own bytes.
struct Fill<'t, 'n, 'a, 'b> {
    text: &'a str,
    /// Where the copy `simd-json` parsed starts: its strings point into it.
    base: usize,
    nodes: &'t [Node<'n>],
    at: usize,
    /// Just past the last token read.
    cursor: usize,
    b: &'b mut Builder<'a>,
}

impl<'t, 'n, 'a, 'b> Fill<'t, 'n, 'a, 'b> {
    fn new(text: &'a str, base: usize, nodes: &'t [Node<'n>], b: &'b mut Builder<'a>) -> Self {
        Fill {
            text,
            base,
            nodes,
            at: 0,
            cursor: 0,
            b,
        }
    }

    /// The root value, which must be the whole tape.
    fn document(mut self) -> Option<usize> {
        let root = self.value(0)?;
        (self.at == self.nodes.len()).then_some(root)
    }

    /// The next value; containers recurse (`depth` levels open around it), scalars do not.
    #[inline(always)]
    fn value(&mut self, depth: usize) -> Option<usize> {
        let node = *self.nodes.get(self.at)?;
        self.at += 1;
        let slot = match node {
            Node::String(s) => Slot::String(Cow::Borrowed(self.string(s)?)),
            Node::Static(StaticNode::Null) => self.literal("null", Slot::Null)?,
            Node::Static(StaticNode::Bool(true)) => self.literal("true", Slot::Bool(true))?,
            Node::Static(StaticNode::Bool(false)) => self.literal("false", Slot::Bool(false))?,
            Node::Static(StaticNode::I64(_) | StaticNode::U64(_) | StaticNode::F64(_)) => {
                Slot::Number(self.number()?)
            }
            Node::Array { len, .. } => return self.array(len, depth + 1),
            Node::Object { len, .. } => return self.object(len, depth + 1),
            #[allow(unreachable_patterns)] // `simd-json`'s 128-bit integers, if ever enabled
            _ => return None,
        };
        Some(self.b.push(slot))
    }

    /// An array's items written in place (their count is known): `items[start..start + len]`.
    #[inline(never)]
    fn array(&mut self, len: usize, depth: usize) -> Option<usize> {
        if depth > DEPTH_MAX {
            return None;
        }
        let start = self.b.items.len();
        self.b.items.resize(start + len, 0);
        for k in start..start + len {
            let item = self.value(depth)?;
            self.b.items[k] = item;
        }
        Some(self.b.push(Slot::Array { start, len }))
    }

    /// An object's members written in place, then put as `Builder::close_object` leaves them
    /// (the last of duplicate keys kept; in key order where asked or over [`SMALL`] members).
    #[inline(never)]
    fn object(&mut self, len: usize, depth: usize) -> Option<usize> {
        if depth > DEPTH_MAX {
            return None;
        }
        let start = self.b.members.len();
        self.b.members.resize(start + len, (Cow::Borrowed(""), 0));
        for k in start..start + len {
            let Node::String(key) = *self.nodes.get(self.at)? else {
                return None;
            };
            self.at += 1;
            let key = self.string(key)?;
            let value = self.value(depth)?;
            self.b.members[k] = (Cow::Borrowed(key), value);
        }
        let ordered = self.b.ordered || len > SMALL;
        let len = settle(&mut self.b.members[start..start + len], ordered);
        Some(self.b.push(Slot::Object { start, len }))
    }

    /// The body's own bytes of a string `simd-json` found at the same place in its copy (no
    /// `\` in the body: the copy is unchanged, the string between two quotes).
    fn string(&mut self, s: &str) -> Option<&'a str> {
        let start = (s.as_ptr() as usize).checked_sub(self.base)?;
        let end = start.checked_add(s.len())?;
        let bytes = self.text.as_bytes();
        if start == 0 || bytes.get(start - 1) != Some(&b'"') || bytes.get(end) != Some(&b'"') {
            return None;
        }
        self.cursor = end + 1;
        self.text.get(start..end)
    }

    /// Where the next number or literal starts: past whitespace and punctuation.
    fn next_token(&self) -> usize {
        let bytes = self.text.as_bytes();
        let mut at = self.cursor;
        while let Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b':' | b'[' | b']' | b'{' | b'}') =
            bytes.get(at)
        {
            at += 1;
        }
        at
    }

    /// The end of a token at `end`: whitespace, what may follow a value, or the body's end.
    fn ends_token(&self, end: usize) -> bool {
        matches!(
            self.text.as_bytes().get(end),
            None | Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b']' | b'}')
        )
    }

    fn literal(&mut self, word: &str, slot: Slot<'a>) -> Option<Slot<'a>> {
        let start = self.next_token();
        let end = start + word.len();
        if self.text.get(start..end) != Some(word) || !self.ends_token(end) {
            return None;
        }
        self.cursor = end;
        Some(slot)
    }

    /// A number read from its own text, as `serde_json` reads it.
    fn number(&mut self) -> Option<Number> {
        let start = self.next_token();
        let bytes = self.text.as_bytes();
        let mut end = start;
        while let Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') = bytes.get(end) {
            end += 1;
        }
        if !self.ends_token(end) {
            return None;
        }
        self.cursor = end;
        let text = self.text.get(start..end)?;
        number(text)
    }
}

/// `members` (in the client's order) as `Builder::close_object` leaves them, in place: the
/// last of duplicate keys kept, in key order if `ordered`, else in the client's order (then
/// at most [`SMALL`] members). How many are kept, at the front.
fn settle(members: &mut [(Cow<'_, str>, usize)], ordered: bool) -> usize {
    let len = members.len();
    let mut keep = [true; SMALL];
    let dropped = if ordered {
        // `BTreeMap` order; the sort is stable, so of equal keys the last is the last written
        members.sort_by(|x, y| x.0.cmp(&y.0));
        (0..len).any(|j| j + 1 < len && members[j].0 == members[j + 1].0)
    } else {
        for j in 0..len {
            keep[j] = !members[j + 1..]
                .iter()
                .any(|(later, _)| *later == members[j].0);
        }
        keep[..len].contains(&false)
    };
    if !dropped {
        return len;
    }
    // keep a member if it is not followed by an equal key (sorted) or if `keep` says so
    let mut kept = 0;
    for j in 0..len {
        let last = match ordered {
            true => j + 1 == len || members[j + 1].0 != members[j].0,
            false => keep[j],
        };
        if last {
            members.swap(kept, j);
            kept += 1;
        }
    }
    kept
}

/// A number's text read as `serde_json` reads it: an integer by its digits (the same
/// `u64`/`i64` split), a short decimal by one exact division, anything else (exponents, more
/// than 15 digits, `-0`, integers beyond 64 bits, malformed text) by `serde_json`'s own number
/// parser, which also refuses what it refuses.
fn number(text: &str) -> Option<Number> {
    let (negative, digits) = match text.as_bytes() {
        [b'-', rest @ ..] => (true, rest),
        digits => (false, digits),
    };
    let exact = match (digits, digits.iter().position(|&c| c == b'.')) {
        ([b'0'], _) if !negative => Some(Number::from(0u64)),
        (_, None) => integer(negative, digits),
        (_, Some(dot)) => decimal(negative, digits, dot),
    };
    exact.or_else(|| Number::from_str(text).ok())
}

/// Digits only, first not `0`: a `u64` (not negative) or an `i64` (negative; beyond `i64`,
/// `None`: `serde_json` makes those `f64`).
fn integer(negative: bool, digits: &[u8]) -> Option<Number> {
    let [b'1'..=b'9', ..] = digits else {
        return None;
    };
    let mut value: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    match negative {
        false => Some(Number::from(value)),
        true => 0i64.checked_sub_unsigned(value).map(Number::from),
    }
}

/// `int.frac` (`int` being `0` or not starting with `0`, both parts non-empty, no exponent)
/// with at most 15 digits in all: the digits as an integer below 2^53 and a power of ten up to
/// 10^15 are both exact in an `f64`, so their quotient is the correctly rounded value, which
/// `serde_json` (`float_roundtrip`: correctly rounded) gives too. Else `None`.
fn decimal(negative: bool, digits: &[u8], dot: usize) -> Option<Number> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    let (int, frac) = (&digits[..dot], &digits[dot + 1..]);
    let int_ok = matches!(int, [b'0'] | [b'1'..=b'9', ..]);
    if !int_ok || frac.is_empty() || int.len() + frac.len() > 15 {
        return None;
    }
    let mut m: u64 = 0;
    for &d in int.iter().chain(frac) {
        if !d.is_ascii_digit() {
            return None;
        }
        m = m * 10 + u64::from(d - b'0');
    }
    #[allow(clippy::cast_precision_loss)] // below 10^15 < 2^53: exact
    let value = m as f64 / POW10[frac.len()];
    Number::from_f64(if negative { -value } else { value })
}
