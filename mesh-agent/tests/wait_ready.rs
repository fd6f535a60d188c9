//! `mesh-agent wait-ready` as an app entrypoint uses it: exit codes, exec of the app once ready,
//! and the job pattern (wait for the sidecar, work, `POST /shutdown`, the sidecar exits 0).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mesh-agent"));
    c.env_remove("TRELLIS_ADMIN_ADDR").stdin(Stdio::null());
    c
}

/// An admin port that answers 503 to the first `not_ready` probes, then 200.
fn fake_admin(not_ready: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let probes = Arc::new(AtomicUsize::new(0));
    let seen = probes.clone();
    std::thread::spawn(move || {
        for mut conn in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let answer = if n < not_ready {
                "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 32\r\n\r\nnot ready: waiting for snapshot\n"
            } else {
                "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n"
            };
            let _ = conn.write_all(answer.as_bytes());
        }
    });
    (addr, probes)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn waits_for_200_then_execs_the_command_with_its_exit_code() {
    let (addr, probes) = fake_admin(3);
    let status = agent()
        .args([
            "wait-ready",
            "--admin",
            &addr.to_string(),
            "--interval",
            "20ms",
        ])
        .args(["--", "sh", "-c", "exit 7"])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(7), "the app's exit code, not ours");
    assert_eq!(probes.load(Ordering::SeqCst), 4, "three 503s, then 200");
}

#[test]
fn exit_codes_for_timeout_and_missing_command() {
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let start = Instant::now();
    let out = agent()
        .args([
            "wait-ready",
            "--admin",
            &closed.to_string(),
            "--timeout",
            "300ms",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not ready after") && err.contains("unreachable"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(5));

    let (never, _) = fake_admin(usize::MAX);
    let out = agent()
        .args([
            "wait-ready",
            "--admin",
            &never.to_string(),
            "--timeout",
            "200ms",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("503 not ready: waiting for snapshot"), "{err}");

    let (ready, _) = fake_admin(0);
    let out = agent()
        .args(["wait-ready", "--admin", &ready.to_string()])
        .args(["--", "/nonexistent/app"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(127));
}

#[test]
fn a_job_waits_for_its_sidecar_then_stops_it_with_post_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    for args in [
        vec!["cert", "init", "--trust-domain", "job.test", "--dir", &d],
        vec!["cert", "issue", "--service", "batch", "--dir", &d],
    ] {
        assert!(agent().args(&args).output().unwrap().status.success());
    }
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = dir.path().join("sidecar.yaml");
    std::fs::write(
        &cfg,
        format!(
            "service: batch\ntrust_domain: job.test\n\
             identity: {{cert: {d}/batch.pem, key: {d}/batch-key.pem, bundle: {d}/ca.pem}}\n\
             inbound: {{listen: 127.0.0.1:{}}}\noutbound: {{listen: 127.0.0.1:{}}}\n\
             admin: {{listen: {admin}}}\nstore: {{file: {d}/mesh.yaml}}\ntracing: {{enabled: false}}\n",
            free_port(),
            free_port()
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), "services: {}\n").unwrap();
    let mut sidecar = agent()
        .args(["run", "--config", &cfg.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // The job's entrypoint: `mesh-agent wait-ready -- <job>`; the job ends with POST /shutdown.
    let job = agent()
        .env("TRELLIS_ADMIN_ADDR", admin.to_string())
        .args(["wait-ready", "--timeout", "20s", "--", "true"])
        .status()
        .unwrap();
    assert!(job.success());
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(
        b"POST /shutdown HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let deadline = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Some(st) = sidecar.try_wait().unwrap() {
            break st.code();
        }
        assert!(
            Instant::now() < deadline,
            "sidecar still running after /shutdown"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0));
}
