//! `mesh-agent inject` and `mesh-agent uninject`: read a manifest from a file or stdin, write
//! the rewritten manifest to stdout and warnings to stderr. On a refusal nothing is written to
//! stdout, so `kubectl apply -f <(mesh-agent inject -f app.yaml)` applies nothing.

use std::io::{Read, Write};
use std::path::Path;

use super::manifest::{self, Mode};

/// Rewrite `file` (`-`: stdin). The error is the message for the user.
pub fn run(file: &Path, mode: Mode<'_>) -> Result<(), String> {
    let text = read(file)?;
    let done = manifest::rewrite(&text, mode).map_err(|e| e.to_string())?;
    for w in &done.warnings {
        eprintln!("warning: {w}");
    }
    let mut out = std::io::stdout().lock();
    match out
        .write_all(done.output.as_bytes())
        .and_then(|()| out.flush())
    {
        // A closed pipe (`| head`) cuts the output, as with any Unix tool.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}")),
        _ => Ok(()),
    }
}

fn read(file: &Path) -> Result<String, String> {
    let mut bytes = Vec::new();
    let result = if file == Path::new("-") {
        std::io::stdin().lock().read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file).and_then(|mut f| f.read_to_end(&mut bytes))
    };
    result.map_err(|e| format!("{}: {e}", file.display()))?;
    String::from_utf8(bytes).map_err(|_| {
        format!(
            "{}: not UTF-8 text, so neither YAML nor JSON",
            file.display()
        )
    })
}
