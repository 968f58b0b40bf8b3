//! The command line as a user meets it: bad config, unreachable Redis, normalize, demo,
//! graceful shutdown with a Close frame.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

#[test]
fn bad_config_exits_2_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[bots]\nqueue_size = 0\nslow_client = \"disconnect\"\nlisten = \"nowhere\"\n",
    )
    .expect("write");
    let out = Command::new(bin())
        .args(["executor", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(
        err.contains(&format!("{file}: bots.queue_size: must be at least 1")),
        "{err}"
    );
    assert!(err.contains(&format!("{file}: bots.listen: ")), "{err}");

    std::fs::write(&path, "[bots]\nqueue_sise = 5\n").expect("write");
    let out = Command::new(bin())
        .args(["executor", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue_sise"));

    // The environment is a config source too, and named as such.
    let out = Command::new(bin())
        .args(["executor", "--config"])
        .arg(dir.path().join("missing.toml"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("file not found"));
    std::fs::write(&path, "").expect("write");
    let out = Command::new(bin())
        .args(["executor", "--config"])
        .arg(&path)
        .env("MDBRIDGE_BOTS_QUEUE_SIZE", "lots")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("MDBRIDGE_BOTS_QUEUE_SIZE") && err.contains("bots.queue_size"),
        "{err}"
    );
    // A value of the right type that fails validation names the variable, not the file
    // (the file does not even set it).
    let out = Command::new(bin())
        .args(["executor", "--config"])
        .arg(&path)
        .env("MDBRIDGE_BOTS_QUEUE_SIZE", "0")
        .env("MDBRIDGE_HTTP_LISTEN", "nowhere")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("environment MDBRIDGE_BOTS_QUEUE_SIZE: bots.queue_size: must be at least 1"),
        "{err}"
    );
    assert!(
        err.contains("environment MDBRIDGE_HTTP_LISTEN: http.listen: `nowhere`"),
        "{err}"
    );
    assert!(!err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn unreachable_redis_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    let port = free_port();
    std::fs::write(&path, "").expect("write");
    let out = Command::new(bin())
        .args(["executor", "--config"])
        .arg(&path)
        .env("MDBRIDGE_REDIS_URL", format!("redis://127.0.0.1:{port}/0"))
        .env("MDBRIDGE_BOTS_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("MDBRIDGE_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("RUST_LOG", "off")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("cannot reach Redis at redis://127.0.0.1:{port}/0")),
        "{err}"
    );
    // Said once: no error chain repeating its own cause.
    assert_eq!(err.matches("cannot reach Redis").count(), 1, "{err}");
    assert_eq!(
        err.matches(&format!("127.0.0.1:{port}")).count(),
        1,
        "{err}"
    );

    // With JSON logs the same one error is a JSON record, like every other line.
    let out = Command::new(bin())
        .args(["executor", "--config"])
        .arg(&path)
        .env("MDBRIDGE_REDIS_URL", format!("redis://127.0.0.1:{port}/0"))
        .env("MDBRIDGE_BOTS_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("MDBRIDGE_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("MDBRIDGE_LOG_FORMAT", "json")
        .env_remove("RUST_LOG")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
    assert_eq!(err.matches("cannot reach Redis").count(), 1, "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn normalize_reads_raw_frames_and_reports_bad_lines() {
    let input = concat!(
        r#"{"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}"#,
        "\n",
        "this is not json\n",
        r#"{"result":null,"id":1}"#,
        "\n",
        r#"{"stream":"bnbbtc@depth","data":{"e":"depthUpdate","E":1672515782136,"s":"BNBBTC","U":157,"u":160,"b":[["0.0024","10"]],"a":[["0.0026","100"]]}}"#,
        "\n",
    );
    let mut child = Command::new(bin())
        .args(["normalize", "--exchange", "binance"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(events.len(), 2, "{stdout}");
    assert_eq!(events[0]["type"], "trade");
    assert_eq!(events[0]["price"], "0.001");
    assert_eq!(events[0]["side"], "sell");
    assert_eq!(events[1]["type"], "book");
    assert_eq!(events[1]["action"], "delta");
    assert_eq!(events[1]["seq"], 160);
    assert_eq!(events[1]["prev_seq"], 156);
    assert_eq!(events[1]["bids"], serde_json::json!([["0.0024", "10"]]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 2"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_bots_with_a_close_frame_and_exits_0() {
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let mut executor = Proc::role("executor", &role_config(&redis.url(), h, b, ""), h, Some(b));
    executor.wait_healthy().await;
    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    executor.sigterm();
    let mut saw_close = false;
    while let Ok(Some(msg)) = tokio::time::timeout(WAIT, bot.ws.next()).await {
        match msg {
            Ok(Message::Close(_)) => {
                saw_close = true;
                break;
            }
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a Close frame: {e}"),
        }
    }
    assert!(saw_close, "no Close frame");
    assert_eq!(executor.wait_exit().await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_with_no_dependencies_and_stops_cleanly() {
    let (bots, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let log = std::fs::File::create(dir.path().join("stderr.log")).expect("log");
    let child = Command::new(bin())
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{bots}"),
            "--http",
            &format!("127.0.0.1:{http}"),
        ])
        .args(["--summary-secs", "1"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn demo");
    let mut demo = Proc {
        child,
        dir,
        http: Some(http),
        bots: Some(bots),
        name: "demo".into(),
    };
    // Collect stdout on a thread so the test can wait for the summary line.
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    if let Some(out) = demo.child.stdout.take() {
        let printed = printed.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mut p) = printed.lock() {
                    p.push_str(&line);
                    p.push('\n');
                }
            }
        });
    }
    demo.wait_healthy().await;
    let mut bot = Bot::connect(&demo.bots_url()).await;
    bot.subscribe(&["trade:sim:BTC-USDT", "book:sim:BTC-USDT", "ticker:sim:*"])
        .await;
    // The first book message a subscriber sees is a snapshot, wherever it falls among trades.
    let (book, _) = bot.until(WAIT, |v| v["type"] == "book").await;
    assert_eq!(book["action"], "snapshot");
    let (trade, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
    assert_eq!(trade["exchange"], "sim");
    assert_eq!(trade["symbol"], "BTC-USDT");
    // The Coinbase-format simulator runs alongside, labelled `sim` too, with its own products.
    let mut coinbase = Bot::connect(&demo.bots_url()).await;
    coinbase
        .subscribe(&["book:sim:BTC-USD", "candle:sim:BTC-USD:5m"])
        .await;
    let (book, _) = coinbase.until(WAIT, |v| v["type"] == "book").await;
    assert_eq!(
        (&book["action"], &book["symbol"]),
        (
            &serde_json::json!("snapshot"),
            &serde_json::json!("BTC-USD")
        )
    );
    // `mdbridge watch` prints what a bot receives, one JSON object per line; `-n` counts
    // events, not the server's replies.
    let watched = Command::new(bin())
        .args([
            "watch",
            "--url",
            &demo.bots_url(),
            "-n",
            "3",
            "trade:sim:BTC-USDT",
        ])
        .output()
        .expect("run watch");
    assert!(watched.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[0]["type"], "subscribed");
    assert!(lines[1..]
        .iter()
        .all(|v| v["type"] == "trade" && v["exchange"] == "sim"));
    // An error reply is printed and ends the watch with a failure exit.
    let refused = Command::new(bin())
        .args(["watch", "--url", &demo.bots_url(), "-n", "1", "nonsense"])
        .output()
        .expect("run watch");
    assert!(
        !refused.status.success(),
        "watch exited 0 on an error reply"
    );
    let out = String::from_utf8_lossy(&refused.stdout);
    let first: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(first["type"], "error", "{out}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("refused"), "{err}");
    let text = || printed.lock().map(|p| p.clone()).unwrap_or_default();
    wait_until("a summary line", WAIT, || async {
        text().contains("[demo] clients")
    })
    .await;
    demo.sigterm();
    assert_eq!(demo.wait_exit().await, Some(0));
    let stdout = text();
    assert!(
        stdout.contains(&format!("ws://127.0.0.1:{bots}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("[demo] clients"),
        "summary line missing: {stdout}"
    );
    // Under `cargo` (cargo test and cargo run set CARGO) the hint is a cargo command.
    assert!(
        stdout.contains(&format!("cargo run -- watch --url ws://127.0.0.1:{bots}")),
        "{stdout}"
    );
}

#[test]
fn demo_watch_hint_names_a_command_that_runs() {
    use std::io::BufRead;
    let (bots, http) = (free_port(), free_port());
    let mut child = Command::new(bin())
        .args(["demo", "--listen", &format!("127.0.0.1:{bots}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .env_remove("CARGO")
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let out = child.stdout.take().expect("stdout");
    let hint = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| {
            l.trim()
                .strip_prefix("watch:")
                .map(|h| h.trim().to_string())
        });
    let _ = child.kill();
    let _ = child.wait();
    let hint = hint.expect("a watch hint in the banner");
    // Not on the PATH and not under cargo: the binary's own path.
    let program = hint.split(" watch ").next().expect("program");
    let exe = std::fs::canonicalize(bin()).expect("binary path");
    assert_eq!(std::path::Path::new(program), exe, "{hint}");
    assert!(
        hint.contains(&format!("watch --url ws://127.0.0.1:{bots}")),
        "{hint}"
    );
    let version = Command::new(program)
        .arg("--version")
        .output()
        .expect("run the hint");
    assert!(version.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_still_ends_with_a_close_frame() {
    let SimHybrid {
        mut hybrid,
        redis: _redis,
        sim: _sim,
    } = sim_hybrid("0", &["BTC-USDT"], &["trade", "book"], "").await;
    let mut bot = Bot::connect(&hybrid.bots_url()).await;
    bot.subscribe(&["trade:*:*", "book:*:*"]).await;
    for _ in 0..200 {
        bot.next(WAIT).await.expect("market data");
    }
    hybrid.sigterm();
    let mut frames_after = 0u64;
    loop {
        match tokio::time::timeout(WAIT, bot.ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map(|f| u16::from(f.code));
                assert_eq!(code, Some(1001), "going away");
                break;
            }
            Ok(Some(Ok(_))) => frames_after += 1,
            other => panic!("no Close frame after {frames_after} frames: {other:?}"),
        }
    }
    assert_eq!(hybrid.wait_exit().await, Some(0));
}
