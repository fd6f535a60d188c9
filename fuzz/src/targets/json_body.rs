//! JSON bodies as edge validation reads them (`proxy/src/validate/tape.rs`): parsed into the
//! flat document that borrows from the body, and validated through `jsonschema`'s `Json` trait,
//! against `serde_json::Value` doing the same.
//!
//! Input: a request body. Finding: any difference, in the parse (the `Value`, or the error's
//! text) or in the validation against schemas using most keywords (validity, each error's
//! message, instance and paths, in order).

use trellis_proxy::validate::tape::equivalence;

use crate::outcome;

pub const DICT: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b":",
    b",",
    b"\\u0061",
    b"\\ud83e\\udd80",
    b"\\\"",
    b"\"a\":",
    b"\"b\":",
    b"\"lines\":",
    b"null",
    b"true",
    b"1e400",
    b"-0",
    b"18446744073709551616",
    b"2.5",
    b"\xc3\xa9",
    b"\xff",
];

pub fn run(data: &[u8]) -> u64 {
    outcome(&equivalence::fuzz(data))
}
