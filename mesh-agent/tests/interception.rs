//! Transparent interception end to end, inside two network namespaces created by the test and
//! joined by a veth pair: host A runs `frontend`'s sidecar, host B runs `orders`' sidecar and
//! three servers. Both sidecars run as uid 1337 (the image's user) with `mesh-agent iptables
//! install` rules; a client in A dials B's addresses directly, with no proxy settings, and must:
//! - reach `orders` over mTLS when it says `Host: orders` (the app sees the caller's identity),
//! - reach a plain HTTP server in B as is (HTTP pass-through, counted as `passthrough`),
//! - reach a TCP echo server in B byte for byte (opaque pass-through).
//!
//! After `iptables remove` the rules are gone and the same call no longer reaches `orders`.
//! Needs root, `ip`, `iptables` and `setpriv`; without them the test says why and passes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const A_IP: &str = "10.77.0.1";
const B_IP: &str = "10.77.0.2";
const UID: &str = "1337";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mesh-agent")
}

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and iptables need CAP_NET_ADMIN)".into());
    }
    for tool in ["ip", "iptables", "iptables-restore", "setpriv"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Some(format!(
                "`{tool}` not installed (apt-get install iproute2 iptables util-linux)"
            ));
        }
    }
    None
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        common::output_text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces and their processes, torn down on drop (deleting a namespace deletes its
/// veth end, and the pair with it).
struct Hosts {
    a: String,
    b: String,
    children: Vec<Child>,
}

impl Hosts {
    fn new() -> Self {
        let id = std::process::id();
        let hosts = Hosts {
            a: format!("trl-a-{id}"),
            b: format!("trl-b-{id}"),
            children: Vec::new(),
        };
        let (va, vb) = (format!("tra{id}"), format!("trb{id}"));
        sh(&["ip", "netns", "add", &hosts.a]);
        sh(&["ip", "netns", "add", &hosts.b]);
        sh(&[
            "ip", "link", "add", &va, "netns", &hosts.a, "type", "veth", "peer", "name", &vb,
            "netns", &hosts.b,
        ]);
        for (ns, dev, ip) in [(&hosts.a, &va, A_IP), (&hosts.b, &vb, B_IP)] {
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// `mesh-agent <args>` inside a namespace, as root (iptables) or as the sidecar's uid.
    fn agent(&self, ns: &str, as_sidecar: bool, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        if as_sidecar {
            c.args(["setpriv", "--reuid", UID, "--regid", UID, "--clear-groups"]);
        }
        c.arg(bin()).args(args).env("RUST_LOG", "info");
        c
    }

    fn run_sidecar(&mut self, ns: &str, config: &Path) {
        let child = self
            .agent(
                ns,
                true,
                &["run", "--config", &config.display().to_string()],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("sidecar starts");
        self.children.push(child);
        let ok = self
            .agent(ns, true, &["wait-ready", "--timeout", "20s"])
            .status()
            .expect("wait-ready runs");
        assert!(ok.success(), "sidecar in {ns} not ready");
    }

    fn nat_rules(&self, ns: &str) -> String {
        sh(&["ip", "netns", "exec", ns, "iptables", "-t", "nat", "-S"])
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Run `f` on a thread that has entered network namespace `ns`: sockets it creates belong to
/// that namespace for their whole life, whichever thread uses them later.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("namespace file");
        // SAFETY: `file` is an open namespace file descriptor for the duration of the call, and
        // setns(CLONE_NEWNET) changes only this thread's network namespace; the thread ends
        // with `f`, so no other code runs in the namespace by surprise.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

/// A blocking HTTP/1.1 server answering every request with `body(request head)`.
fn serve_http(listener: TcpListener, body: fn(&str) -> String) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let text = body(&String::from_utf8_lossy(&head));
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
}

fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
        .unwrap_or("-")
}

/// Send raw bytes to `addr` from namespace `ns` and read until the server closes.
fn call(ns: &str, addr: &str, bytes: &'static [u8]) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().expect("address");
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(bytes)?;
        if !bytes.starts_with(b"GET") {
            s.shutdown(std::net::Shutdown::Write)?;
        }
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

fn write_config(dir: &Path, service: &str, mesh: &str) -> std::path::PathBuf {
    let d = dir.display();
    let yaml = format!(
        "service: {service}\ntrust_domain: netns.test\n\
         identity: {{cert: {d}/{service}.pem, key: {d}/{service}-key.pem, bundle: {d}/ca.pem}}\n\
         inbound: {{listen: 0.0.0.0:15006, app: 127.0.0.1:8080}}\n\
         store: {{file: {d}/{service}-mesh.yaml}}\ntracing: {{enabled: false}}\n"
    );
    let cfg = dir.join(format!("{service}.yaml"));
    std::fs::write(&cfg, yaml).expect("config");
    std::fs::write(dir.join(format!("{service}-mesh.yaml")), mesh).expect("mesh");
    cfg
}

#[test]
fn iptables_redirects_app_traffic_through_the_sidecars() {
    if let Some(why) = unsupported() {
        eprintln!("SKIPPED iptables_redirects_app_traffic_through_the_sidecars: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    sh(&[
        bin(),
        "cert",
        "init",
        "--trust-domain",
        "netns.test",
        "--dir",
        &d,
    ]);
    for svc in ["frontend", "orders"] {
        sh(&[bin(), "cert", "issue", "--service", svc, "--dir", &d]);
    }
    let cfg_a = write_config(
        dir.path(),
        "frontend",
        &format!("services:\n  orders:\n    endpoints:\n      - address: {B_IP}:15006\n"),
    );
    let cfg_b = write_config(dir.path(), "orders", "services: {}\n");
    // The sidecars run as uid 1337, like in the image: let them read their files.
    sh(&["chown", "-R", &format!("{UID}:{UID}"), &d]);

    let mut hosts = Hosts::new();
    let (a, b) = (hosts.a.clone(), hosts.b.clone());
    let (app, plain, echo) = in_netns(&b, || {
        (
            TcpListener::bind("127.0.0.1:8080").expect("app"),
            TcpListener::bind("0.0.0.0:9090").expect("plain"),
            TcpListener::bind("0.0.0.0:9091").expect("echo"),
        )
    });
    serve_http(app, |head| {
        format!(
            "orders app; caller {}",
            header(head, "trellis-peer-identity")
        )
    });
    serve_http(plain, |head| {
        format!(
            "plain server; host {} caller {}",
            header(head, "host"),
            header(head, "trellis-peer-identity")
        )
    });
    std::thread::spawn(move || {
        for mut conn in echo.incoming().flatten() {
            let mut buf = Vec::new();
            let _ = conn.read_to_end(&mut buf);
            let _ = conn.write_all(&buf);
        }
    });

    hosts.run_sidecar(&a, &cfg_a);
    hosts.run_sidecar(&b, &cfg_b);
    let clean_a = hosts.nat_rules(&a);
    let install = |ns: &str, extra: &[&str]| {
        let mut args = vec!["iptables", "install"];
        args.extend_from_slice(extra);
        let st = hosts.agent(ns, false, &args).status().expect("runs");
        assert!(st.success(), "iptables install in {ns}");
    };
    install(&a, &[]);
    let once = hosts.nat_rules(&a);
    install(&a, &[]);
    assert_eq!(hosts.nat_rules(&a), once, "install is idempotent");
    // B's non-mesh servers take plaintext from anyone: leave their ports alone.
    install(&b, &["--exclude-inbound-ports", "9090,9091"]);

    // 1. A mesh service by name, to B's app port, without any proxy setting.
    let resp = call(
        &a,
        &format!("{B_IP}:8080"),
        b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
    )
    .expect("mesh call");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("orders app; caller spiffe://netns.test/service/frontend"),
        "the call went over mTLS between the sidecars: {resp}"
    );

    // 2. HTTP to a host outside the mesh: passed through as is.
    let resp = call(
        &a,
        &format!("{B_IP}:9090"),
        b"GET / HTTP/1.1\r\nHost: plain.example:9090\r\nConnection: close\r\n\r\n",
    )
    .expect("pass-through call");
    assert!(
        resp.contains("plain server; host plain.example:9090 caller -"),
        "{resp}"
    );
    let metrics = call(
        &a,
        "127.0.0.1:15000",
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .expect("metrics");
    assert!(
        metrics.contains(r#"direction="outbound",service="passthrough""#),
        "the pass-through went through the sidecar: {metrics}"
    );

    // 3. Opaque TCP: copied byte for byte.
    let resp = call(&a, &format!("{B_IP}:9091"), b"\x00opaque bytes\n").expect("tcp");
    assert_eq!(resp, "\u{0}opaque bytes\n");

    // Removal leaves the nat table as it was, and traffic is no longer intercepted.
    for ns in [&a, &b] {
        let st = hosts
            .agent(ns, false, &["iptables", "remove"])
            .status()
            .expect("runs");
        assert!(st.success(), "iptables remove in {ns}");
    }
    assert_eq!(hosts.nat_rules(&a), clean_a);
    assert!(!hosts.nat_rules(&b).contains("TRELLIS"));
    let direct = call(
        &a,
        &format!("{B_IP}:8080"),
        b"GET /hello HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n",
    );
    assert!(
        direct.is_err(),
        "without the rules nothing listens on {B_IP}:8080: {direct:?}"
    );
}
