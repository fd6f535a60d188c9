//! A real headless chromium driven over the DevTools protocol, for flows of several steps
//! (sign up, click, wait for the page's script to draw the answer, screenshot): the page's
//! own scripts run, against the real server, with real cookies.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    child: Child,
    ws: Ws,
    next: u64,
    /// Uncaught exceptions and console errors seen so far.
    pub errors: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start chromium on `about:blank` with `args` (e.g. `--host-resolver-rules=...`), and
    /// attach to its page.
    pub async fn launch(args: &[String]) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(crate::browser::chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--remote-allow-origins=*",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args)
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let browser_url = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium prints its DevTools address");
        let port = browser_url
            .trim_start_matches("ws://")
            .split(['/', ':'])
            .nth(1)
            .expect("port")
            .to_string();
        let list = crate::client::get(
            &crate::client::h1(format!("127.0.0.1:{port}").parse().expect("addr")),
            &format!("http://127.0.0.1:{port}/json/list"),
        )
        .await
        .json();
        let page = list
            .as_array()
            .and_then(|a| a.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(page.as_str())
            .await
            .expect("DevTools websocket");
        let mut b = Self {
            child,
            ws,
            next: 0,
            errors: Vec::new(),
            _profile: profile,
        };
        b.call("Page.enable", json!({})).await;
        b.call("Runtime.enable", json!({})).await;
        b
    }

    /// One DevTools command; its result. Events met meanwhile are scanned for errors.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::Text(msg.into())).await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("websocket open")
                .expect("frame");
            let Message::Text(text) = frame else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.event(&v);
        }
    }

    fn event(&mut self, v: &Value) {
        match v["method"].as_str() {
            Some("Runtime.exceptionThrown") => self
                .errors
                .push(v["params"]["exceptionDetails"].to_string()),
            Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                self.errors.push(v["params"]["args"].to_string())
            }
            _ => {}
        }
    }

    pub async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait("document.readyState === 'complete'", url).await;
    }

    /// Evaluate `expr` in the page (promises awaited); its value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    /// Poll `expr` until it is truthy (10 s); its value.
    pub async fn wait(&mut self, expr: &str, what: &str) -> Value {
        self.wait_up_to(expr, what, Duration::from_secs(10)).await
    }

    pub async fn wait_up_to(&mut self, expr: &str, what: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self
                .eval(&format!(
                    "(() => {{ try {{ return ({expr}); }} catch (_) {{ return null; }} }})()"
                ))
                .await;
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let body = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("timed out after {limit:?} waiting for {what}; the page shows:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Set an input's value as typing would (the `input` event fires).
    pub async fn fill(&mut self, selector: &str, value: &str) {
        let expr = format!(
            "(() => {{ const e = document.querySelector({s}); e.value = {v}; e.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()",
            s = json!(selector),
            v = json!(value)
        );
        self.eval(&expr).await;
    }

    pub async fn click(&mut self, selector: &str) {
        let expr = format!(
            "(() => {{ document.querySelector({}).click(); return true; }})()",
            json!(selector)
        );
        self.eval(&expr).await;
    }

    /// A PNG of the window, saved under `target/screenshots/<name>.png`.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        self.capture(name, json!({"format": "png"})).await
    }

    /// A PNG of the whole page, however long (at most 4000 pixels).
    pub async fn screenshot_full(&mut self, name: &str) -> PathBuf {
        let m = self.call("Page.getLayoutMetrics", json!({})).await;
        let height = m["cssContentSize"]["height"]
            .as_f64()
            .unwrap_or(900.0)
            .min(4000.0);
        let clip = json!({"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1});
        self.capture(
            name,
            json!({"format": "png", "captureBeyondViewport": true, "clip": clip}),
        )
        .await
    }

    async fn capture(&mut self, name: &str, params: Value) -> PathBuf {
        let r = self.call("Page.captureScreenshot", params).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("data"))
            .expect("base64");
        let path = crate::browser::screenshot_dir().join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
