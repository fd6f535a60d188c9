//! Fuzz targets for everything in Trellis that parses input a stranger controls: tokens and key
//! sets, policy documents and registrations as read from etcd, SPIFFE IDs and certificates,
//! HTTPRoute matching and rewriting, `grpc-timeout`, rate-limit keys, protocol detection and
//! JSON requests to a transcoded gRPC service.
//!
//! Each target is a `fn(&[u8]) -> u64` that must never panic whatever the bytes: it returns an
//! *outcome label* (a hash of what happened, e.g. which error) that the stable driver uses as
//! feedback, and asserts the properties that must hold (round trips, "accepted means
//! well-formed"). Two drivers run them:
//! - [`driver`]: a mutational fuzzer in plain stable Rust, used by the short pass in
//!   `tests/short.rs` (part of `cargo nextest run --workspace`) and by `bench/fuzz.sh`;
//! - `src/bin/afl.rs` (feature `afl`): AFL++ through afl.rs, coverage-guided, on stable.
//!
//! See docs/fuzzing.md.

pub mod alloc;
pub mod driver;
pub mod targets;

/// One fuzz target.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> u64,
    /// Inputs are cut to this length (the product's own limits, or what a header holds).
    pub max_len: usize,
    /// Tokens the mutator inserts: the grammar's keywords.
    pub dict: &'static [&'static [u8]],
    /// Peak bytes allocated for one input of `n` bytes: `fixed + per_byte * n`.
    pub alloc_fixed: usize,
    pub alloc_per_byte: usize,
}

impl Target {
    pub fn alloc_bound(&self, len: usize) -> usize {
        self.alloc_fixed + self.alloc_per_byte * len
    }
}

/// Every target, by name.
pub fn targets() -> &'static [Target] {
    targets::ALL
}

pub fn target(name: &str) -> Option<&'static Target> {
    targets::ALL.iter().find(|t| t.name == name)
}

/// An outcome label from a message: only its first line's words count, without digits or
/// quoted parts (names, values), cut at 64 bytes, so that "rules[3]: bad regex `a(`" and
/// "rules[4]: bad regex `b(`" are the same outcome and an error that echoes its input does
/// not make every input new.
pub fn outcome(message: &str) -> u64 {
    let mut out = Vec::with_capacity(64);
    let mut quoted = false;
    for b in message.bytes() {
        match b {
            b'\n' => break,
            b'`' | b'"' => quoted = !quoted,
            _ if quoted => {}
            b if b.is_ascii_alphabetic() || b" .:_-|".contains(&b) => out.push(b),
            _ => {}
        }
        if out.len() >= 64 {
            break;
        }
    }
    driver::fnv(&out)
}

/// A count as a word for an outcome label (labels ignore digits).
pub fn count(n: usize) -> &'static str {
    ["none", "one", "two", "three", "many"][n.min(4)]
}

/// Cut `data` into parts at each `\0` byte (at most `n` parts; the last takes the rest).
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == 0).collect()
}
