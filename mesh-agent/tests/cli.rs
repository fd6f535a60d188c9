//! The `mesh-agent` binary as an operator uses it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
    c.env("RUST_LOG", "info").stdin(Stdio::null());
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    http_call(addr, "GET", path)
}

fn http_call(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_config(dir: &Path, admin: u16) -> std::path::PathBuf {
    let cfg = dir.join("sidecar.yaml");
    let yaml = format!(
        "service: orders\ntrust_domain: cli.test\nidentity: {{cert: {d}/orders.pem, key: {d}/orders-key.pem, bundle: {d}/ca.pem}}\n\
         inbound: {{listen: 127.0.0.1:{}, app: 127.0.0.1:9}}\noutbound: {{listen: 127.0.0.1:{}}}\nadmin: {{listen: 127.0.0.1:{admin}}}\n\
         store: {{file: {d}/mesh.yaml}}\n",
        free_port(),
        free_port(),
        d = dir.display()
    );
    std::fs::write(&cfg, yaml).unwrap();
    std::fs::write(dir.join("mesh.yaml"), "services: {}\n").unwrap();
    cfg
}

#[test]
fn cert_init_issue_then_run_and_stop_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = run_ok(agent().args(["cert", "init", "--trust-domain", "cli.test", "--dir", d]));
    assert!(out.contains("cli.test"), "{out}");
    let again = agent()
        .args(["cert", "init", "--trust-domain", "cli.test", "--dir", d])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "init must not overwrite a CA without --force"
    );
    let out = run_ok(agent().args([
        "cert",
        "issue",
        "--service",
        "orders",
        "--dir",
        d,
        "--ttl",
        "2h",
    ]));
    assert!(out.contains("spiffe://cli.test/service/orders"), "{out}");

    let admin_port = free_port();
    let cfg = write_config(dir.path(), admin_port);
    // One worker: the sidecar runs on tokio's current-thread scheduler (mesh-agent/src/runtime.rs),
    // which must serve the admin API, take signals and drain like the multi-thread one.
    let mut child = agent()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .env("TRELLIS_WORKERS", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_ready(&mut child, admin);
    // The log filter can be read and changed at runtime; a bad filter is refused.
    let before = http_get(admin, "/log_level").unwrap();
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    let set = http_call(admin, "POST", "/log_level?filter=info,trellis_proxy=debug").unwrap();
    assert!(set.starts_with("HTTP/1.1 200"), "{set}");
    assert!(set.contains("trellis_proxy=debug"), "{set}");
    let bad = http_call(admin, "POST", "/log_level?filter=trellis_proxy=loud").unwrap();
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    let after = http_get(admin, "/log_level").unwrap();
    assert!(after.contains("trellis_proxy=debug"), "{after}");
    let (status, err) = stop(child);
    assert!(status.success(), "exit status {status}: {err}");
    assert!(
        err.contains("SIGTERM received") && err.contains("drained"),
        "{err}"
    );
    assert!(err.contains("workers=1"), "{err}");
    assert!(
        !err.contains('\x1b'),
        "no colour codes in a log that is not a terminal: {err:?}"
    );
}

#[test]
fn config_errors_name_the_field_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "service: orders\nidentity: {cert: a, key: b, bundle: c}\nlimits:\n  max_conections: 5\n",
    )
    .unwrap();
    let out = agent()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field `max_conections`") && err.contains("line 4"),
        "{err}"
    );

    std::fs::write(
        &cfg,
        "service: orders\nidentity: {cert: /nonexistent.pem, key: b, bundle: c}\n",
    )
    .unwrap();
    let out = agent()
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent.pem"), "{err}");

    let out = agent()
        .env("TRELLIS_ADMIN_ADDR", "nonsense")
        .args(["run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("TRELLIS_ADMIN_ADDR"));

    let out = agent()
        .args(["run", "--config", cfg.to_str().unwrap(), "--workers", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("from 1 to 64"), "{err}");
}

#[test]
fn demo_runs_for_a_duration_and_reports_success() {
    let out = agent()
        .args(["demo", "--duration", "2", "--rate", "20"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    assert!(
        stdout.contains("spiffe://demo.trellis.local/service/frontend"),
        "{stdout}"
    );
    assert!(
        stdout.contains("spiffe://demo.trellis.local/service/orders"),
        "{stdout}"
    );
}

#[test]
fn shipped_examples_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for cfg in [
        "examples/standalone/sidecar.yaml",
        "examples/etcd/sidecar.yaml",
        "examples/gateway/gateway.yaml",
    ] {
        let text = std::fs::read_to_string(root.join(cfg)).unwrap();
        let c = mesh_agent::config::AgentConfig::from_yaml(&text, cfg)
            .unwrap_or_else(|e| panic!("{e}"));
        c.validate().unwrap_or_else(|e| panic!("{cfg}: {e}"));
    }
    let mesh = std::fs::read_to_string(root.join("examples/standalone/mesh.yaml")).unwrap();
    trellis_policies::parse_mesh_yaml(&mesh).unwrap();
    let out = run_ok(agent().args([
        "policy",
        "validate",
        "-f",
        root.join("examples/etcd/policies.yaml").to_str().unwrap(),
    ]));
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" valid")).count(),
        6,
        "{out}"
    );
    let out = run_ok(
        agent().args([
            "policy",
            "validate",
            "-f",
            root.join("examples/gateway/policies.yaml")
                .to_str()
                .unwrap(),
        ]),
    );
    assert_eq!(
        out.lines().filter(|l| l.ends_with(" valid")).count(),
        7,
        "{out}"
    );
}

#[test]
fn output_into_a_closed_pipe_is_cut_without_a_panic() {
    // `mesh-agent ... | head -1`: the reader is gone before the first write (EPIPE).
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = agent()
        .args(["apikey", "--id", "k"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn help_describes_every_command_with_its_own_words() {
    let out = run_ok(agent().arg("--help"));
    let line = |cmd: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
            .unwrap_or_else(|| panic!("no `{cmd}` in --help:\n{out}"))
            .to_string()
    };
    assert!(line("report").contains("API usage"), "{out}");
    assert!(!line("report").contains("demo"), "{out}");
    assert!(line("demo").contains("demo mesh"), "{out}");
    // Every command has a description.
    let commands = out
        .split("Commands:")
        .nth(1)
        .and_then(|s| s.split("Options:").next())
        .unwrap_or_default();
    for l in commands.lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            l.split_whitespace().count() > 1,
            "command without description: {l:?}"
        );
    }
}

/// `mesh-agent run` under `sh -c 'ulimit ...'`, its stderr piped; returns once `/ready` answers.
fn run_with_nofile(dir: &Path, soft: u64, hard: u64) -> (std::process::Child, SocketAddr) {
    let d = dir.to_str().unwrap();
    run_ok(agent().args(["cert", "init", "--trust-domain", "cli.test", "--dir", d]));
    run_ok(agent().args(["cert", "issue", "--service", "orders", "--dir", d]));
    let admin_port = free_port();
    let cfg = write_config(dir, admin_port);
    let mut child = Command::new("sh")
        .args([
            "-c",
            &format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" run --config \"$1\""),
            env!("CARGO_BIN_EXE_mesh-agent"),
            cfg.to_str().unwrap(),
        ])
        .env("RUST_LOG", "info")
        .env("TRELLIS_WORKERS", "1")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    wait_ready(&mut child, admin);
    (child, admin)
}

/// Wait until the sidecar's `/ready` answers 200; panic with its stderr if it exits first.
fn wait_ready(child: &mut std::process::Child, admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !http_get(admin, "/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("sidecar exited early ({status}): {}", stderr_of(child));
        }
        assert!(Instant::now() < deadline, "sidecar never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Everything the (exited) sidecar wrote to its piped stderr.
fn stderr_of(child: &mut std::process::Child) -> String {
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut err).unwrap();
    }
    err
}

/// SIGTERM, then the exit status and everything the sidecar wrote to stderr.
fn stop(mut child: std::process::Child) -> (std::process::ExitStatus, String) {
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success(), "kill -TERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "sidecar did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, stderr_of(&mut child))
}

/// The soft limit on open files is raised to the hard one at startup (no privilege needed),
/// and a hard limit below what `max_connections` allows is named in a warning.
#[test]
fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = run_with_nofile(dir.path(), 256, 4096);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let (_, err) = stop(child);
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{line}");
    assert!(
        err.contains("open-file limit is below what max_connections allows")
            && err.contains("needed=41024"),
        "{err}"
    );
}

/// Out of file descriptors: connections past the limit wait in the backlog, each failed
/// `accept` is counted, the log says so once (not every 20 ms), and once descriptors are free
/// the sidecar accepts and answers again.
#[test]
fn running_out_of_file_descriptors_is_counted_logged_once_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let (child, admin) = run_with_nofile(dir.path(), 64, 64);
    let yaml = std::fs::read_to_string(dir.path().join("sidecar.yaml")).unwrap();
    let outbound: SocketAddr = yaml
        .split("outbound: {listen: ")
        .nth(1)
        .and_then(|r| r.split('}').next())
        .unwrap()
        .parse()
        .unwrap();
    // More connections than descriptors: the kernel completes them all (backlog), the sidecar
    // accepts until it has none left.
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect_timeout(&outbound, Duration::from_secs(1)).ok())
        .collect();
    assert!(held.len() >= 80, "only {} connected", held.len());
    // Long enough for about 75 retries of `accept` at 20 ms.
    std::thread::sleep(Duration::from_millis(1500));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        if let Some(m) = http_get(admin, "/metrics").filter(|m| m.starts_with("HTTP/1.1 200")) {
            break m;
        }
        assert!(Instant::now() < deadline, "admin never answered again");
        std::thread::sleep(Duration::from_millis(50));
    };
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("trellis_accept_errors_total{direction=\"outbound\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(errors >= 10.0, "accept errors counted: {errors}");
    // Serving again: an answer (503, no such service) through the outbound listener.
    let mut s = TcpStream::connect_timeout(&outbound, Duration::from_secs(1)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let (_, err) = stop(child);
    let warnings = err
        .lines()
        .filter(|l| l.contains("accept failed") && l.contains("outbound"))
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings for {errors} failures:\n{err}"
    );
    assert!(err.contains("accepting connections again"), "{err}");
}
