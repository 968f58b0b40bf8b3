//! Shared helpers for the integration tests: a private `redis-server` per test, the real
//! `mdbridge` binary in each role, bot WebSocket clients, and condition waits.
//!
//! Nothing here mocks anything: Redis is a real server on a free port (never the shared
//! one on 6379), roles are real processes, bots are real WebSocket clients.

#![allow(dead_code)]

pub mod book_chain;
pub mod exchange;
pub mod redis_extra;
pub mod sentinel;
pub mod streams;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(20);

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The redis-server to run. Same rule as `src/bus/redis_test_server.rs` and
/// `scripts/test.sh`: `REDIS_SERVER_BIN`, else the PATH, else /usr/bin, /usr/local/bin.
pub fn find_redis_server() -> PathBuf {
    if let Ok(p) = std::env::var("REDIS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("redis-server"))
                .collect()
        })
        .unwrap_or_default();
    candidates.extend(["/usr/bin/redis-server", "/usr/local/bin/redis-server"].map(PathBuf::from));
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "redis-server not found (looked at $REDIS_SERVER_BIN, PATH, /usr/bin, /usr/local/bin). \
             Install it with `apt-get install -y redis-server` or run ./scripts/test.sh, which does."
        )
    })
}

/// A private redis-server on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = RedisServer {
            port: free_port(),
            dir,
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let bin = find_redis_server();
        let child = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn ping(&self) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    }

    /// Bytes this server has sent to its clients so far (`INFO stats`
    /// `total_net_output_bytes`): shows whether a value was transferred.
    pub fn bytes_sent(&self) -> u64 {
        let mut c = self.conn();
        let info: String = redis::cmd("INFO").arg("stats").query(&mut c).expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("total_net_output_bytes")
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("connect to test redis")
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mdbridge")
}

/// A running `mdbridge` process (any subcommand), killed on drop.
pub struct Proc {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub http: Option<u16>,
    pub bots: Option<u16>,
    pub name: String,
}

impl Proc {
    /// Starts `mdbridge <role> --config <file>` with `config` (TOML) written to a temp dir.
    pub fn role(role: &str, config: &str, http: u16, bots: Option<u16>) -> Proc {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = Command::new(bin())
            .arg(role)
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "mdbridge=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mdbridge");
        Proc {
            child,
            dir,
            http: Some(http),
            bots,
            name: role.to_string(),
        }
    }

    /// Starts `mdbridge simulate` (Binance) on a free port and waits until it answers.
    pub async fn simulator(extra: &[&str]) -> Proc {
        Proc::simulator_of("binance", extra).await
    }

    /// Starts `mdbridge simulate --exchange <exchange>` on a free port and waits until its
    /// control API answers.
    pub async fn simulator_of(exchange: &str, extra: &[&str]) -> Proc {
        let port = free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log file");
        let child = Command::new(bin())
            .args([
                "simulate",
                "--exchange",
                exchange,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn simulator");
        let p = Proc {
            child,
            dir,
            http: Some(port),
            bots: None,
            name: "simulate".into(),
        };
        let url = format!("http://127.0.0.1:{port}/_sim/stats");
        wait_until("simulator up", WAIT, || async {
            reqwest::get(&url).await.is_ok()
        })
        .await;
        p
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    pub fn http_url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}{path}",
            self.http.expect("no http port")
        )
    }

    pub fn bots_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.bots.expect("no bot port"))
    }

    /// Waits until `/health` answers 200.
    pub async fn wait_healthy(&mut self) {
        let url = self.http_url("/health");
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before becoming healthy:\n{}",
                    self.name,
                    self.log()
                );
            }
            if let Ok(r) = reqwest::get(&url).await {
                if r.status().is_success() {
                    return;
                }
            }
            if start.elapsed() > WAIT {
                let body = match reqwest::get(&url).await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                panic!(
                    "{} not healthy after {WAIT:?}: {body}\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of one Prometheus sample, e.g. `mdbridge_envelopes_lost_total` or
    /// `mdbridge_bot_disconnects_total{reason="slow"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = match reqwest::get(self.http_url("/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => return 0.0,
        };
        metric_in(&text, sample)
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if start.elapsed() > WAIT {
                panic!("{} did not exit:\n{}", self.name, self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn post(&self, path: &str) {
        let r = reqwest::Client::new()
            .post(self.http_url(path))
            .send()
            .await
            .expect("post to simulator");
        assert!(r.status().is_success(), "POST {path}: {}", r.status());
    }

    pub async fn get_json(&self, path: &str) -> Value {
        reqwest::get(self.http_url(path))
            .await
            .expect("GET")
            .text()
            .await
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .expect("JSON body")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- {} log ----\n{}", self.name, self.log());
        }
    }
}

/// Finds `sample` (name with optional `{labels}`) in a Prometheus text exposition.
pub fn metric_in(text: &str, sample: &str) -> f64 {
    let (name, labels) = match sample.split_once('{') {
        Some((n, l)) => (n, Some(l.trim_end_matches('}'))),
        None => (sample, None),
    };
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (kname, klabels) = match key.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (key, ""),
        };
        if kname != name {
            continue;
        }
        if let Some(want) = labels {
            if !want.split(',').all(|w| klabels.split(',').any(|k| k == w)) {
                continue;
            }
        }
        total += value.parse::<f64>().unwrap_or(0.0);
    }
    total
}

/// Writes a config file section for a role with the given ports and Redis.
pub fn role_config(redis_url: &str, http: u16, bots: u16, extra: &str) -> String {
    format!(
        r#"
[instance]
name = "test"
shutdown_timeout_ms = 5000
[redis]
url = "{redis_url}"
key_prefix = "md:"
probe_interval_ms = 200
probe_timeout_ms = 1000
reconnect_min_ms = 50
reconnect_max_ms = 500
snapshot_interval_ms = 200
[http]
listen = "127.0.0.1:{http}"
[bots]
listen = "127.0.0.1:{bots}"
{extra}
"#
    )
}

/// A feed section pointing at a local Binance-format server.
pub fn sim_feed(port: u16, exchange: &str, symbols: &[&str], channels: &[&str]) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"
[[feeds]]
exchange = "{exchange}"
url = "ws://127.0.0.1:{port}/stream"
rest_url = "http://127.0.0.1:{port}"
symbols = [{}]
channels = [{}]
depth_limit = 1000
reconnect_min_ms = 50
reconnect_max_ms = 500
"#,
        list(symbols),
        list(channels)
    )
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A bot: a real WebSocket client speaking the bot protocol.
pub struct Bot {
    pub ws: Ws,
}

impl Bot {
    pub async fn connect(url: &str) -> Bot {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("bot connect");
        Bot { ws }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("bot send");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .expect("bot send");
    }

    /// The next JSON text frame (pings are answered by tungstenite); None on close.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => panic!("bot: no frame within {timeout:?}"),
                Ok(None) => return None,
                Ok(Some(Err(_))) => return None,
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    return Some(serde_json::from_str(t.as_str()).expect("server sent JSON"))
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Reads frames until one satisfies `pred`; returns it and everything skipped before it.
    pub async fn until(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, Vec<Value>) {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(v) if pred(&v) => return (v, skipped),
                Some(v) => skipped.push(v),
                None => panic!("bot: connection closed while waiting; saw {skipped:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, channels: &[&str]) -> Value {
        self.send(serde_json::json!({"op":"subscribe","channels":channels,"req":"sub"}))
            .await;
        let (reply, _) = self
            .until(WAIT, |v| v["type"] == "subscribed" || v["type"] == "error")
            .await;
        assert_eq!(reply["type"], "subscribed", "subscribe refused: {reply}");
        reply
    }
}

/// Returns the path of a file in `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A simulator feeding a hybrid instance through a private Redis: the usual one-process
/// bridge of the tests. Fields drop in reverse order: hybrid, simulator, Redis.
pub struct SimHybrid {
    pub hybrid: Proc,
    pub sim: Proc,
    pub redis: RedisServer,
}

/// Starts Redis, `mdbridge simulate --rate <rate>` for `symbols`, and a healthy hybrid
/// whose Binance feed reads `channels` from it. `bots` is added to the `[bots]` section.
pub async fn sim_hybrid(rate: &str, symbols: &[&str], channels: &[&str], bots: &str) -> SimHybrid {
    let redis = RedisServer::start();
    let sim = Proc::simulator(&["--rate", rate, "--symbols", &symbols.join(",")]).await;
    let feed = sim_feed(sim.http.expect("port"), "binance", symbols, channels);
    let (h, b) = (free_port(), free_port());
    let config = role_config(&redis.url(), h, b, "")
        .replace("[bots]\n", &format!("[bots]\n{bots}\n"))
        + &feed;
    let mut hybrid = Proc::role("hybrid", &config, h, Some(b));
    hybrid.wait_healthy().await;
    SimHybrid { hybrid, sim, redis }
}

/// A bot that subscribes to `channels` with a tiny receive buffer and then never reads.
pub async fn stalled_bot(bots_port: u16, channels: &[&str]) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(2048).expect("rcvbuf");
    let stream = socket
        .connect(format!("127.0.0.1:{bots_port}").parse().expect("addr"))
        .await
        .expect("connect");
    let url = format!("ws://127.0.0.1:{bots_port}");
    let (mut ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
        .await
        .expect("ws");
    let sub = serde_json::json!({"op":"subscribe","channels":channels});
    ws.send(Message::text(sub.to_string())).await.expect("send");
    ws
}

/// A simulator, a publisher reading it, and an executor, through a private Redis.
pub struct SimBridge {
    pub executor: Proc,
    pub publisher: Proc,
    pub sim: Proc,
    pub redis: RedisServer,
}

/// A publisher with `feed` (a `[[feeds]]` section) and an executor on `redis`, both healthy.
pub async fn publisher_and_executor(redis: &RedisServer, feed: &str) -> (Proc, Proc) {
    let (ph, pb, eh, eb) = (free_port(), free_port(), free_port(), free_port());
    let mut publisher = Proc::role(
        "publisher",
        &role_config(&redis.url(), ph, pb, feed),
        ph,
        None,
    );
    let mut executor = Proc::role(
        "executor",
        &role_config(&redis.url(), eh, eb, ""),
        eh,
        Some(eb),
    );
    publisher.wait_healthy().await;
    executor.wait_healthy().await;
    (publisher, executor)
}

/// Starts Redis, `mdbridge simulate --rate <rate>` for `symbols`, a publisher whose Binance
/// feed reads `channels` from it and an executor; returns once both roles are healthy.
pub async fn sim_bridge(rate: &str, symbols: &[&str], channels: &[&str]) -> SimBridge {
    let redis = RedisServer::start();
    let sim = Proc::simulator(&["--rate", rate, "--symbols", &symbols.join(",")]).await;
    let feed = sim_feed(sim.http.expect("port"), "binance", symbols, channels);
    let (publisher, executor) = publisher_and_executor(&redis, &feed).await;
    SimBridge {
        executor,
        publisher,
        sim,
        redis,
    }
}
