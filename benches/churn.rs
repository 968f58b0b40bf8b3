//! Churn benchmark (issue 9, "bounded state"): one bot subscribes and unsubscribes a stream
//! of new channel names while a normal bot on the same executor pings and receives trades.
//!
//! It starts everything itself, as separate processes: a private `redis-server` on a free
//! port, `mdbridge simulate`, a publisher and an executor (the binary of this build). It
//! reports the normal bot's ping round trip and trade latency (p50 / p99 / max) before and
//! during the churn, and the executor's RSS before, right after, and some seconds after.
//!
//!     cargo bench --bench churn -- --names 100000
//!
//! The executor's request rate limit is lifted (the churn is the point); other `[bots]`
//! lines can be given in `CHURN_BOTS_EXTRA` (set it empty for the defaults). Run by `cargo test` (no `--bench` argument) it does a small smoke
//! run that only checks that the bots were served.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> PathBuf {
    if let Ok(p) = std::env::var("REDIS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

fn spawn(dir: &std::path::Path, name: &str, args: &[&str]) -> Kill {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    Kill(
        Command::new(env!("CARGO_BIN_EXE_mdbridge"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mdbridge"),
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Samples {
    ping_us: Vec<u64>,
    trade_us: Vec<u64>,
    trades: u64,
}

fn quantiles(v: &mut [u64]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.sort_unstable();
    let q = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0;
    format!(
        "p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (n={})",
        q(0.5),
        q(0.99),
        *v.last().unwrap_or(&0) as f64 / 1000.0,
        v.len()
    )
}

async fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

/// The normal bot: trades of one symbol, and a ping every 20 ms.
async fn normal_bot(url: String, samples: Arc<Mutex<Samples>>, stop: Arc<AtomicBool>) {
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("normal bot connects");
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(
        r#"{"op":"subscribe","channels":["trade:binance:BTC-USDT"],"req":0}"#,
    ))
    .await
    .expect("subscribe");
    let sent: Arc<Mutex<std::collections::HashMap<u64, Instant>>> = Arc::default();
    let pinger = {
        let sent = sent.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 1u64;
            while !stop.load(Ordering::Relaxed) {
                sent.lock().unwrap().insert(n, Instant::now());
                let text = format!(r#"{{"op":"ping","req":{n}}}"#);
                if tx.send(Message::text(text)).await.is_err() {
                    break;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    while let Some(Ok(msg)) = rx.next().await {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let now = now_us();
        match v["type"].as_str() {
            Some("pong") => {
                if let Some(at) = v["req"]
                    .as_u64()
                    .and_then(|r| sent.lock().unwrap().remove(&r))
                {
                    samples
                        .lock()
                        .unwrap()
                        .ping_us
                        .push(at.elapsed().as_micros() as u64);
                }
            }
            Some("trade") => {
                let mut s = samples.lock().unwrap();
                s.trades += 1;
                if let Some(ts) = v["ts_recv"].as_u64() {
                    s.trade_us.push(now.saturating_sub(ts));
                }
            }
            _ => {}
        }
    }
    pinger.abort();
}

/// The churning bot: subscribe then unsubscribe `names` new channels, `window` requests in
/// flight. Returns the replies it got.
async fn churn_bot(url: String, names: u64) -> u64 {
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("churn bot connects");
    let (mut tx, mut rx) = ws.split();
    let window = 64u64;
    let total = names * 2;
    let mut sent = 0u64;
    let mut replies = 0u64;
    let request = |i: u64| {
        let name = format!("trade:binance:C{}-USDT", i / 2);
        let op = if i % 2 == 0 {
            "subscribe"
        } else {
            "unsubscribe"
        };
        format!(r#"{{"op":"{op}","channels":["{name}"],"req":{i}}}"#)
    };
    while replies < total {
        while sent < total && sent - replies < window {
            if tx.send(Message::text(request(sent))).await.is_err() {
                return replies;
            }
            sent += 1;
        }
        match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                // Every request gets exactly one reply: subscribed, unsubscribed or an error
                // (a `rate_limited` error carries no `req`: the request was not parsed).
                if t.contains(r#""type":"subscribed""#)
                    || t.contains(r#""type":"unsubscribed""#)
                    || t.contains(r#""type":"error""#)
                {
                    replies += 1;
                }
            }
            Ok(Some(Ok(_))) => {}
            _ => return replies,
        }
    }
    replies
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let names: u64 = args
        .iter()
        .position(|a| a == "--names")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 100_000 } else { 300 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(names, bench));
}

async fn run(names: u64, bench: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis_port = free_port();
    let _redis = Kill(
        Command::new(redis_server())
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)"),
    );
    wait_port(redis_port).await;

    let sim_port = free_port();
    let _sim = spawn(
        dir.path(),
        "simulate",
        &[
            "simulate",
            "--exchange",
            "binance",
            "--listen",
            &format!("127.0.0.1:{sim_port}"),
            "--rate",
            "1000",
            "--symbols",
            "BTC-USDT,ETH-USDT",
        ],
    );
    wait_port(sim_port).await;

    let redis = format!("redis://127.0.0.1:{redis_port}/0");
    let pub_http = free_port();
    let publisher_toml = format!(
        "[redis]\nurl = \"{redis}\"\n[http]\nlisten = \"127.0.0.1:{pub_http}\"\n\
         [[feeds]]\nexchange = \"binance\"\nurl = \"ws://127.0.0.1:{sim_port}/stream\"\n\
         rest_url = \"http://127.0.0.1:{sim_port}\"\nsymbols = [\"BTC-USDT\", \"ETH-USDT\"]\n\
         channels = [\"trade\", \"book\"]\n"
    );
    let bots_port = free_port();
    let exe_http = free_port();
    // The request rate limit is lifted by default: this measures what the router's state
    // costs, not the limiter (CHURN_BOTS_EXTRA="" keeps the defaults, 50 requests/s).
    let extra = std::env::var("CHURN_BOTS_EXTRA").unwrap_or_else(|_| {
        "max_requests_per_sec = 1000000.0\nrequest_burst = 1000000".to_string()
    });
    let executor_toml = format!(
        "[redis]\nurl = \"{redis}\"\n[http]\nlisten = \"127.0.0.1:{exe_http}\"\n\
         [bots]\nlisten = \"127.0.0.1:{bots_port}\"\n{extra}\n"
    );
    let p_cfg = dir.path().join("publisher.toml");
    let e_cfg = dir.path().join("executor.toml");
    std::fs::write(&p_cfg, publisher_toml).expect("write config");
    std::fs::write(&e_cfg, executor_toml).expect("write config");
    let _publisher = spawn(
        dir.path(),
        "publisher",
        &["publisher", "--config", p_cfg.to_str().unwrap_or_default()],
    );
    let executor = spawn(
        dir.path(),
        "executor",
        &["executor", "--config", e_cfg.to_str().unwrap_or_default()],
    );
    let pid = executor.0.id();
    wait_port(bots_port).await;
    let url = format!("ws://127.0.0.1:{bots_port}");

    let samples = Arc::new(Mutex::new(Samples::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let normal = tokio::spawn(normal_bot(url.clone(), samples.clone(), stop.clone()));
    // Warm up, then a baseline without churn.
    tokio::time::sleep(Duration::from_secs(if bench { 3 } else { 1 })).await;
    *samples.lock().unwrap() = Samples::default();
    tokio::time::sleep(Duration::from_secs(if bench { 5 } else { 1 })).await;
    let mut base = std::mem::take(&mut *samples.lock().unwrap());
    let rss_before = rss_kib(pid);
    let cpu_before = cpu_ticks(pid);

    let started = Instant::now();
    let replies = churn_bot(url.clone(), names).await;
    let churn_secs = started.elapsed().as_secs_f64();
    let mut during = std::mem::take(&mut *samples.lock().unwrap());
    let rss_after = rss_kib(pid);
    let cpu = cpu_ticks(pid).saturating_sub(cpu_before);
    tokio::time::sleep(Duration::from_secs(if bench { 5 } else { 1 })).await;
    let mut settled = std::mem::take(&mut *samples.lock().unwrap());
    let rss_settled = rss_kib(pid);
    stop.store(true, Ordering::Relaxed);
    normal.abort();

    println!("churn: {names} names subscribed+unsubscribed by one bot in {churn_secs:.1} s ({replies} replies; executor CPU {:.1} s)", cpu as f64 / 100.0);
    println!(
        "  normal bot ping,  baseline: {}",
        quantiles(&mut base.ping_us)
    );
    println!(
        "  normal bot ping,  churn:    {}",
        quantiles(&mut during.ping_us)
    );
    println!(
        "  normal bot ping,  after:    {}",
        quantiles(&mut settled.ping_us)
    );
    println!(
        "  normal bot trade, baseline: {} ({} trades)",
        quantiles(&mut base.trade_us),
        base.trades
    );
    println!(
        "  normal bot trade, churn:    {} ({} trades)",
        quantiles(&mut during.trade_us),
        during.trades
    );
    println!(
        "  normal bot trade, after:    {} ({} trades)",
        quantiles(&mut settled.trade_us),
        settled.trades
    );
    println!(
        "  executor RSS: before {} KiB, right after {} KiB, 5 s later {} KiB",
        rss_before, rss_after, rss_settled
    );
    if !bench {
        assert!(replies > 0, "the churning bot got no replies");
        assert!(
            base.trades + during.trades + settled.trades > 0,
            "the normal bot got no trades"
        );
    }
}
