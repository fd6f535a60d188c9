//! Pages in a real headless browser: Debian's `chromium`, run once per page with scripts
//! executed, for the DOM they produced, a screenshot (kept under `target/screenshots/`, to be
//! looked at), and the console errors they logged.

use std::path::PathBuf;
use std::process::Command;

/// What a page turned into.
pub struct Rendered {
    /// The DOM after scripts ran.
    pub dom: String,
    /// Console lines at error level and uncaught exceptions.
    pub console_errors: Vec<String>,
    pub screenshot: PathBuf,
}

/// The browser, or a failure saying how to get it (CI installs it; a test that needs it never
/// passes without it).
pub fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Ok(out) = Command::new("which").arg(name).output() {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !path.is_empty() {
                return PathBuf::from(path);
            }
        }
    }
    panic!("no chromium found: install Debian's `chromium` package (.ci/run does)");
}

/// Where screenshots go: `<workspace>/target/screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir
}

/// Load `url` (scripts get `budget_ms` of virtual time), save a screenshot as `<name>.png`.
pub fn render(url: &str, name: &str, budget_ms: u32) -> Rendered {
    render_tall(url, name, budget_ms, 1000)
}

/// As [`render`], in a window `height` pixels tall: a screenshot shows only the window, and a
/// long page's lower sections are what some tests need to see.
pub fn render_tall(url: &str, name: &str, budget_ms: u32, height: u32) -> Rendered {
    let browser = chromium();
    let shot = screenshot_dir().join(format!("{name}.png"));
    let profile = tempfile::tempdir().expect("browser profile dir");
    let run = |extra: &[String]| {
        let mut cmd = Command::new(&browser);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--window-size=1280,{height}"))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(extra)
        .arg(url);
        let out = cmd.output().expect("chromium runs");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (dom, log) = run(&["--dump-dom".to_string()]);
    let (_, _) = run(&[format!("--screenshot={}", shot.display())]);
    assert!(
        shot.exists(),
        "no screenshot of {url} at {}",
        shot.display()
    );
    let console_errors = log
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Uncaught") || l.contains(":ERROR:")))
        .map(str::to_string)
        .collect();
    Rendered {
        dom,
        console_errors,
        screenshot: shot,
    }
}
