//! Shared by the binary's integration tests.

use std::process::Output;

/// A finished command's stdout then stderr, for assertions and failure messages.
pub fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
