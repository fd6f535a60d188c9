//! The request body of a client-streaming (or bidirectional) method: a JSON array whose
//! elements are the request messages, as Envoy's transcoder takes it. The body is split into
//! its elements as its bytes arrive, so each message can be encoded and sent as soon as its
//! element is complete, instead of after the whole array has been read.
//!
//! The splitter only finds where an element ends (brackets, braces and strings, with their
//! escapes, at depth 0); each element is then read by serde_json like a unary body, which
//! checks everything else (strict JSON, UTF-8, nesting). It holds one element at a time; the
//! caller bounds the body as a whole.

use super::json::TranscodeError;

/// Deepest nesting inside one element, as serde_json's own limit for a unary body: an
/// element that opens more is refused without being held.
const MAX_DEPTH: u32 = 128;

/// Splits a JSON array into its elements' bytes.
#[derive(Debug, Default)]
pub struct ArraySplitter {
    state: State,
    /// Brackets and braces open inside the current element.
    depth: u32,
    in_string: bool,
    escaped: bool,
    element: Vec<u8>,
    /// Elements completed.
    count: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the array's `[`.
    #[default]
    Start,
    /// After `[`: an element or `]`.
    First,
    /// After `,`: an element.
    Next,
    /// Inside an element.
    In,
    /// After an element: `,` or `]`.
    After,
    /// After `]`: only whitespace.
    Done,
}

// === impl ArraySplitter ===

/// What one byte did to the current element.
enum Step {
    /// Kept; the element goes on.
    Kept,
    /// Kept, and it closed the element (its closing quote, brace or bracket).
    Closed,
    /// It ended a bare scalar (`1`, `true`) and is not the element's: `,`, `]` or space.
    EndedBefore,
}

impl ArraySplitter {
    /// Feed the next bytes of the body; `each` gets every element they complete, with its
    /// index. The first error (the splitter's, or `each`'s) ends the body.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut each: impl FnMut(usize, &[u8]) -> Result<(), TranscodeError>,
    ) -> Result<(), TranscodeError> {
        let mut at = 0;
        while at < chunk.len() {
            // Inside a string, everything up to the next quote or backslash is the element's
            // as it is: copied at once rather than byte by byte (most of a message's bytes).
            if self.in_string && !self.escaped {
                let rest = &chunk[at..];
                let run = rest
                    .iter()
                    .position(|&c| c == b'"' || c == b'\\')
                    .unwrap_or(rest.len());
                if run > 0 {
                    self.element.extend_from_slice(&rest[..run]);
                    at += run;
                    continue;
                }
            }
            let b = chunk[at];
            at += 1;
            if self.state != State::In {
                self.between(b)?;
                continue;
            }
            let step = self.element_byte(b)?;
            if matches!(step, Step::Kept) {
                continue;
            }
            each(self.count, &self.element)?;
            self.element.clear();
            self.count += 1;
            self.state = State::After;
            if matches!(step, Step::EndedBefore) {
                self.between(b)?;
            }
        }
        Ok(())
    }

    /// The body ended: the array must be closed.
    pub fn finish(&self) -> Result<(), TranscodeError> {
        match self.state {
            State::Done => Ok(()),
            State::Start => Err(bad(
                "the body is empty: a client-streaming method takes a JSON array of its request messages",
            )),
            _ => Err(bad("the body ended before the array was closed")),
        }
    }

    /// Elements completed so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// A byte outside any element.
    fn between(&mut self, b: u8) -> Result<(), TranscodeError> {
        if is_space(b) {
            return Ok(());
        }
        match (self.state, b) {
            (State::Start, b'[') => self.state = State::First,
            (State::Start, _) => {
                return Err(bad(
                    "a client-streaming method takes a JSON array of its request messages",
                ))
            }
            (State::First | State::After, b']') => self.state = State::Done,
            (State::After, b',') => self.state = State::Next,
            (State::First | State::Next, b']' | b',' | b'}') => {
                return Err(bad(&format!(
                    "element {}: a value is missing (a trailing or doubled comma?)",
                    self.count
                )))
            }
            (State::First | State::Next, _) => {
                self.state = State::In;
                // An element's first byte opens it or is a scalar's: never an end.
                self.element_byte(b)?;
            }
            (State::After, _) => {
                return Err(bad(&format!(
                    "`,` or `]` expected after element {}",
                    self.count.saturating_sub(1)
                )))
            }
            (State::Done, _) => return Err(bad("data after the array's closing `]`")),
            (State::In, _) => {}
        }
        Ok(())
    }

    /// One byte of the current element.
    fn element_byte(&mut self, b: u8) -> Result<Step, TranscodeError> {
        if self.in_string {
            self.element.push(b);
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    return Ok(Step::Closed);
                }
            }
            return Ok(Step::Kept);
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(bad(&format!(
                        "element {}: nested deeper than {MAX_DEPTH} levels",
                        self.count
                    )));
                }
            }
            b'}' | b']' if self.depth > 0 => {
                self.depth -= 1;
                self.element.push(b);
                return Ok(if self.depth == 0 {
                    Step::Closed
                } else {
                    Step::Kept
                });
            }
            b',' | b']' | b'}' if self.depth == 0 => return Ok(Step::EndedBefore),
            b if is_space(b) && self.depth == 0 => return Ok(Step::EndedBefore),
            _ => {}
        }
        self.element.push(b);
        Ok(Step::Kept)
    }
}

/// JSON's whitespace (RFC 8259: not form feed, which `is_ascii_whitespace` counts).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn bad(message: &str) -> TranscodeError {
    TranscodeError::BadJson(message.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;

    /// The elements of `body` fed in pieces of `step` bytes, or the first error.
    fn split(body: &[u8], step: usize) -> Result<Vec<String>, TranscodeError> {
        let mut s = ArraySplitter::default();
        let mut out = Vec::new();
        for chunk in body.chunks(step.max(1)) {
            s.feed(chunk, |i, e| {
                assert_eq!(i, out.len());
                out.push(String::from_utf8_lossy(e).into_owned());
                Ok(())
            })?;
        }
        s.finish()?;
        Ok(out)
    }

    #[test]
    fn elements_are_found_whatever_the_chunks() {
        let body = br#" [ {"a": "x,]}\"[" , "b": [1, {"c": []}]}, 12 ,"s\\",true,null, [[]] ,{}] "#;
        let want = [
            r#"{"a": "x,]}\"[" , "b": [1, {"c": []}]}"#,
            "12",
            r#""s\\""#,
            "true",
            "null",
            "[[]]",
            "{}",
        ];
        for step in 1..=body.len() {
            assert_eq!(split(body, step).unwrap(), want, "step {step}");
        }
        assert_eq!(split(b"[]", 1).unwrap(), Vec::<String>::new());
        // Form feed is not JSON's whitespace: it stays in the element, which then fails.
        assert_eq!(split(b"[\x0c1]", 1).unwrap(), ["\u{c}1"]);
        assert_eq!(split(b" [ ]\n", 2).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn what_is_not_an_array_of_values_is_refused() {
        for (body, want) in [
            (&b""[..], "the body is empty"),
            (b"  ", "the body is empty"),
            (b"{}", "takes a JSON array"),
            (b"[1,]", "element 1: a value is missing"),
            (b"[,1]", "element 0: a value is missing"),
            (b"[1,,2]", "element 1: a value is missing"),
            (b"[{} {}]", "`,` or `]` expected after element 0"),
            (b"[{}}]", "`,` or `]` expected after element 0"),
            (b"[1 2]", "`,` or `]` expected after element 0"),
            (b"[1] x", "data after the array"),
            (b"[1][2]", "data after the array"),
            (b"[{}", "the body ended before the array was closed"),
            (
                b"[{\"a\": \"]",
                "the body ended before the array was closed",
            ),
        ] {
            let e = split(body, 1).unwrap_err();
            assert!(e.is_bad_json(), "{e}");
            assert!(
                e.to_string().contains(want),
                "{:?}: {e}",
                String::from_utf8_lossy(body)
            );
        }
        let deep = format!("[{}{}]", "[".repeat(129), "]".repeat(129));
        let e = split(deep.as_bytes(), 7).unwrap_err();
        assert!(e.to_string().contains("nested deeper than 128"), "{e}");
        let ok = format!("[{}{}]", "[".repeat(128), "]".repeat(128));
        assert_eq!(split(ok.as_bytes(), 7).unwrap().len(), 1);
    }

    #[test]
    fn each_element_is_one_message_with_the_path_woven_in() {
        let t = spec().compile().unwrap();
        let (b, vars) = t.find("POST", "/v1/shelves/2/items:collect").unwrap();
        let vars = vars.unwrap();
        let message = |i, e: &str| b.stream_message(i, e.as_bytes(), &vars, None, false);
        let m = message(0, r#"{"title": "a", "id": 3}"#).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&b.response(&m).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"name": "shelves/2", "title": "a", "id": "3"})
        );
        let e = message(4, r#"{"nope": 1}"#).unwrap_err();
        assert_eq!((e.element(), e.field()), (Some(4), Some("nope")), "{e}");
        assert!(e.to_string().starts_with("element 4 of the array: "), "{e}");
        assert!(!e.is_bad_json());
        let e = message(1, "[1]").unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
        let e = message(2, "{\"title\": \"\u{1}\"}").unwrap_err();
        assert!(e.is_bad_json() && e.element() == Some(2), "{e}");
    }
}
