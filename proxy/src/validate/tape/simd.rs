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

use super::{Builder, Slot};

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
    if text.len() > FAST_MAX || text.as_bytes().contains(&b'\\') {
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
            Node::Array { len, .. } if depth < DEPTH_MAX => return self.array(len, depth + 1),
            Node::Object { len, .. } if depth < DEPTH_MAX => return self.object(len, depth + 1),
            #[allow(unreachable_patterns)] // `simd-json`'s 128-bit integers, if ever enabled
            _ => return None,
        };
        Some(self.b.push(slot))
    }

    fn array(&mut self, len: usize, depth: usize) -> Option<usize> {
        let mark = self.b.open_items.len();
        for _ in 0..len {
            let item = self.value(depth)?;
            self.b.open_items.push(item);
        }
        Some(self.b.close_array(mark))
    }

    fn object(&mut self, len: usize, depth: usize) -> Option<usize> {
        let mark = self.b.open_members.len();
        for _ in 0..len {
            let Node::String(key) = *self.nodes.get(self.at)? else {
                return None;
            };
            self.at += 1;
            let key = self.string(key)?;
            let value = self.value(depth)?;
            self.b.open_members.push((Cow::Borrowed(key), value));
        }
        Some(self.b.close_object(mark))
    }

    /// The body's own bytes of a string `simd-json` found at the same place in its copy (no
    /// `\` in the body: the copy is unchanged, the string between two quotes).
    fn string(&mut self, s: &str) -> Option<&'a str> {
        let start = (s.as_ptr() as usize).checked_sub(self.base)?;
        let end = start.checked_add(s.len())?;
        let bytes = self.text.as_bytes();
        if start == 0 || bytes[start - 1] != b'"' || bytes.get(end) != Some(&b'"') {
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
        match integer(text) {
            Some(n) => Some(n),
            // floats, `-0`, integers beyond 64 bits: `serde_json`'s own reading (and refusal)
            None => Number::from_str(text).ok(),
        }
    }
}

/// An integer's text (`-`? then `0` or a digit 1-9 and digits) that `serde_json` reads as a
/// `u64` (not negative) or an `i64` (negative, not `-0`): its value; else `None`.
fn integer(text: &str) -> Option<Number> {
    let (negative, digits) = match text.as_bytes() {
        [b'-', rest @ ..] => (true, rest),
        digits => (false, digits),
    };
    match digits {
        [b'0'] if !negative => return Some(Number::from(0u64)),
        [b'1'..=b'9', ..] => {}
        _ => return None,
    }
    let mut value: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    match negative {
        false => Some(Number::from(value)),
        // `-9223372036854775808` is the last `i64`; `serde_json` makes larger ones `f64`
        true => 0i64
            .checked_sub_unsigned(value)
            .map(Number::from),
    }
}
