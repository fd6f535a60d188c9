//! The container image's runtime assumptions, checked with the debug binary (the release build
//! the Dockerfile does is too slow for every test run: `bash tests/packaging/check-image.sh`
//! does it, plus hadolint). The script reads USER, ENV, EXPOSE, HEALTHCHECK and the entrypoint
//! from the Dockerfile and runs the binary that way in a fresh network namespace.

mod common;

use std::process::Command;

#[test]
fn the_binary_runs_as_the_image_says() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: not root (the check enters a network namespace and switches uid)");
        return;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new("bash")
        .arg(format!("{root}/tests/packaging/check-image.sh"))
        .env("MESH_AGENT_BIN", env!("CARGO_BIN_EXE_mesh-agent"))
        .env("SKIP_LINT", "1")
        .output()
        .expect("bash runs");
    let text = common::output_text(&out);
    if text.contains("not installed") {
        eprintln!("SKIPPED: {text}");
        return;
    }
    assert!(out.status.success() && text.contains("PASS"), "{text}");
}
