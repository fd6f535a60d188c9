//! `examples/local/walkthrough.sh` as an end-to-end test with this build's binary: etcd,
//! certificates, two sidecars with their apps, policies, a request end to end and a graceful
//! stop, each step checked by the script (about a second or two).

mod common;

use std::process::Command;

#[test]
fn local_walkthrough_passes() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for tool in ["etcd", "curl"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        if !found {
            eprintln!("SKIPPED: `{tool}` not installed (apt-get install etcd-server curl)");
            return;
        }
    }
    let out = Command::new("bash")
        .arg(format!("{root}/examples/local/walkthrough.sh"))
        .env("MESH_AGENT", env!("CARGO_BIN_EXE_mesh-agent"))
        .env_remove("KEEP")
        .env_remove("TRELLIS_ETCD_ENDPOINTS")
        .output()
        .expect("bash runs");
    let text = common::output_text(&out);
    assert!(
        out.status.success() && text.contains("PASS: walkthrough complete"),
        "{text}"
    );
}
