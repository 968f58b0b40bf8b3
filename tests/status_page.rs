//! The admin listener's live status page, read by a person's browser: headless Chromium
//! (Debian's `chromium`) driven over the DevTools protocol loads `/` from a running hybrid,
//! with no console errors, shows the instance's feed and a bot count that follows a bot
//! connecting; a screenshot is kept in `target/artifacts/status-page.png`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use common::*;

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("chromium not found: install it with `apt-get install -y chromium` (./scripts/test.sh does)")
        })
}

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts headless Chromium and returns it with its DevTools port.
fn start_browser() -> (Browser, u16) {
    use std::io::BufRead;
    let profile = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the DevTools address, then keeps draining so Chromium never blocks on stderr.
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(rest) = line.split("ws://127.0.0.1:").nth(1) {
                if let Some(port) = rest.split('/').next().and_then(|p| p.parse::<u16>().ok()) {
                    let _ = tx.send(port);
                }
            }
        }
    });
    let browser = Browser {
        child,
        _profile: profile,
    };
    let port = rx
        .recv_timeout(WAIT)
        .expect("chromium printed no DevTools address");
    (browser, port)
}

/// A DevTools protocol session on one page.
struct Cdp {
    ws: Ws,
    next: u64,
    /// Console errors, uncaught exceptions and failed loads seen so far.
    errors: Vec<String>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("send to chromium");
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"));
            let Some(Ok(Message::Text(text))) = frame else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method}: {e}");
                }
                return v["result"].clone();
            }
            self.note(&v);
        }
    }

    fn note(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.exceptionThrown") => self.errors.push(format!(
                "exception: {}",
                p["exceptionDetails"]["exception"]["description"]
            )),
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                self.errors.push(format!("console.error: {}", p["args"]))
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => {
                self.errors.push(format!("log: {}", p["entry"]["text"]))
            }
            _ => {}
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits until `expression` evaluates to `want` in the page.
    async fn wait_for(&mut self, what: &str, expression: &str, want: Value) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.eval(expression).await;
            if got == want {
                return;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}: {expression} is {got}, want {want}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

#[tokio::test]
async fn status_page_shows_feeds_and_live_bot_count_without_console_errors() {
    let chromium = chromium();
    assert!(chromium.is_file());
    let bridge = sim_hybrid("200", &["BTC-USDT"], &["trade", "book"], "").await;
    let (_browser, port) = start_browser();
    let pages: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
        .await
        .expect("DevTools /json/list")
        .text()
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .expect("JSON");
    let page_ws = pages
        .as_array()
        .and_then(|a| a.iter().find(|t| t["type"] == "page"))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .expect("a page target")
        .to_string();
    let (ws, _) = tokio_tungstenite::connect_async(&page_ws)
        .await
        .expect("DevTools socket");
    let mut cdp = Cdp {
        ws,
        next: 0,
        errors: Vec::new(),
    };
    cdp.call("Runtime.enable", json!({})).await;
    cdp.call("Log.enable", json!({})).await;
    cdp.call("Page.enable", json!({})).await;
    cdp.call("Page.navigate", json!({"url": bridge.hybrid.http_url("/")}))
        .await;

    cdp.wait_for(
        "the page to go live",
        "document.getElementById('live').textContent",
        json!("live"),
    )
    .await;
    cdp.wait_for(
        "the Binance feed, up",
        "(function(){var r=document.querySelector('tr[data-feed=\"feed:binance:0\"]');return r?r.children[1].textContent:null})()",
        json!("up"),
    )
    .await;
    cdp.wait_for(
        "trade events counted",
        "Array.from(document.querySelectorAll('#rates tr')).some(function(r){return r.children[1]&&r.children[1].textContent==='trade'&&r.children[3].textContent!=='0'})",
        json!(true),
    )
    .await;
    cdp.wait_for(
        "no bots",
        "document.getElementById('bots-clients').textContent",
        json!("0"),
    )
    .await;
    let instance = cdp
        .eval("document.getElementById('instance').textContent")
        .await;
    assert_eq!(instance, json!("test"));

    let mut bot = Bot::connect(&bridge.hybrid.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    cdp.wait_for(
        "one bot",
        "document.getElementById('bots-clients').textContent",
        json!("1"),
    )
    .await;
    cdp.wait_for(
        "its subscription",
        "document.getElementById('bots-subscriptions').textContent",
        json!("1"),
    )
    .await;

    let shot = cdp
        .call("Page.captureScreenshot", json!({"format": "png"}))
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64 PNG");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(artifacts().join("status-page.png"), &png).expect("write screenshot");

    drop(bot);
    cdp.wait_for(
        "the bot gone",
        "document.getElementById('bots-clients').textContent",
        json!("0"),
    )
    .await;
    assert!(cdp.errors.is_empty(), "console errors: {:?}", cdp.errors);
}
