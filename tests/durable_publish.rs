//! Durable channels, publisher side, end to end: the real `mdbridge publisher` reading the
//! simulator, a real redis-server killed with SIGKILL and restarted on the same port.
//!
//! - With `appendonly yes` + `appendfsync always` no acknowledged append is lost, and the
//!   envelopes published while Redis was down arrive after it, in order: the stream holds
//!   every `seq` from 1 exactly once.
//! - With a full buffer, the overflow is counted and announced on `status:<exchange>`.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, role_config, sim_feed, wait_until, Proc, WAIT};

const CHANNEL: &str = "trade:binance:BTC-USDT";
const KEY: &str = "md:stream:trade:binance:BTC-USDT";

/// A redis-server with an append-only file in its own directory, on a fixed port, so a
/// restart finds its data again.
struct AofRedis {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl AofRedis {
    fn start() -> AofRedis {
        let mut server = AofRedis {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new(common::find_redis_server())
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        // PING answers LOADING until the AOF is read back.
        let deadline = Instant::now() + WAIT;
        while self.conn().is_none() {
            assert!(Instant::now() < deadline, "redis-server not ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn conn(&self) -> Option<redis::Connection> {
        let mut c = redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
            .ok()?;
        redis::cmd("PING").query::<String>(&mut c).ok()?;
        Some(c)
    }

    /// SIGKILL: no shutdown, no final fsync beyond what `appendfsync` already did.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn has_aof(&self) -> bool {
        fn any_aof(dir: &Path) -> bool {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    let p = e.path();
                    p.extension().is_some_and(|x| x == "aof") || (p.is_dir() && any_aof(&p))
                })
        }
        any_aof(self.dir.path())
    }
}

impl Drop for AofRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Stream entries as `XRANGE` returns them: id and field/value pairs.
type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// `seq` of every entry of the stream, oldest first.
fn stream_seqs(conn: &mut redis::Connection) -> Vec<u64> {
    let entries: Entries = redis::cmd("XRANGE")
        .arg(KEY)
        .arg("-")
        .arg("+")
        .query(conn)
        .expect("XRANGE");
    entries
        .iter()
        .map(|(id, fields)| {
            let env: serde_json::Value = serde_json::from_slice(&fields[0].1).expect("envelope");
            assert_eq!(env["id"], id.as_str(), "the envelope carries its entry id");
            env["seq"].as_u64().expect("seq")
        })
        .collect()
}

fn newest_seq(redis: &AofRedis) -> u64 {
    let Some(mut c) = redis.conn() else { return 0 };
    let newest: Entries = redis::cmd("XREVRANGE")
        .arg(KEY)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut c)
        .unwrap_or_default();
    newest
        .first()
        .and_then(|(_, f)| serde_json::from_slice::<serde_json::Value>(&f[0].1).ok())
        .and_then(|v| v["seq"].as_u64())
        .unwrap_or(0)
}

async fn publisher(redis_url: &str, sim: &Proc, durable: &str) -> Proc {
    let (h, b) = (free_port(), free_port());
    let config = role_config(redis_url, h, b, durable)
        + &sim_feed(
            sim.http.expect("port"),
            "binance",
            &["BTC-USDT"],
            &["trade"],
        );
    let mut p = Proc::role("publisher", &config, h, None);
    p.wait_healthy().await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_with_aof_loses_and_repeats_no_appended_event() {
    let mut redis = AofRedis::start();
    let sim = Proc::simulator(&["--rate", "2000", "--symbols", "BTC-USDT"]).await;
    let mut publisher = publisher(
        &redis.url(),
        &sim,
        &format!("[durable]\nchannels = [\"{CHANNEL}\"]\n"),
    )
    .await;
    wait_until("appends", WAIT, || async { newest_seq(&redis) >= 50 }).await;
    redis.kill();
    let acknowledged_before_kill = 50;
    // The publisher holds what the feed keeps producing (a few hundred envelopes).
    wait_until("durable envelopes buffered", WAIT, || async {
        publisher.metric("mdbridge_stream_buffered_bytes").await > 100_000.0
    })
    .await;
    let buffered_while_down = publisher.metric("mdbridge_stream_buffered_bytes").await;
    redis.spawn();
    assert!(redis.has_aof());
    wait_until("buffer appended", WAIT, || async {
        publisher.metric("mdbridge_stream_buffered_bytes").await == 0.0
    })
    .await;
    let after = newest_seq(&redis);
    wait_until("live appends after the restart", WAIT, || async {
        newest_seq(&redis) > after + 20
    })
    .await;
    publisher.sigterm();
    assert_eq!(publisher.wait_exit().await, Some(0));

    let mut conn = redis.conn().expect("redis up");
    let seqs = stream_seqs(&mut conn);
    let last = *seqs.last().expect("entries");
    eprintln!("stream holds seq 1..={last}; {buffered_while_down} bytes were buffered while Redis was down");
    let wrong: Vec<(usize, u64)> = seqs
        .iter()
        .enumerate()
        .filter(|&(i, &seq)| seq != i as u64 + 1)
        .map(|(i, &seq)| (i, seq))
        .take(5)
        .collect();
    assert!(
        wrong.is_empty() && seqs.len() as u64 == last,
        "every seq from 1 exactly once, in order; first misplaced (index, seq): {wrong:?}"
    );
    assert!(last > acknowledged_before_kill);
    assert_eq!(
        publisher
            .metric("mdbridge_stream_buffer_dropped_total")
            .await,
        0.0
    );
    let log = publisher.log();
    assert!(
        !log.contains("durable envelopes still buffered at shutdown"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_is_counted_and_announced_as_an_error_status() {
    let mut redis = AofRedis::start();
    let sim = Proc::simulator(&["--rate", "4000", "--symbols", "BTC-USDT"]).await;
    let publisher = publisher(
        &redis.url(),
        &sim,
        &format!("[durable]\nchannels = [\"{CHANNEL}\"]\nbuffer_bytes = 65536\n"),
    )
    .await;
    wait_until("appends", WAIT, || async { newest_seq(&redis) >= 10 }).await;
    redis.kill();
    wait_until("overflow counted", WAIT, || async {
        publisher
            .metric("mdbridge_stream_buffer_dropped_total")
            .await
            > 0.0
    })
    .await;
    redis.spawn();
    let status = || {
        redis
            .conn()
            .and_then(|mut c| {
                redis::cmd("GET")
                    .arg("md:last:status:binance")
                    .query::<Option<String>>(&mut c)
                    .ok()
                    .flatten()
            })
            .unwrap_or_default()
    };
    wait_until("gap status", WAIT, || async {
        status().contains("envelopes dropped")
    })
    .await;
    let env: serde_json::Value = serde_json::from_str(&status()).expect("status envelope");
    assert_eq!(env["event"]["state"], "error");
    let detail = env["event"]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(CHANNEL), "{detail}");
    let dropped = publisher
        .metric("mdbridge_stream_buffer_dropped_total")
        .await as u64;
    // The status is sent once Redis is back; the count it names is final by then.
    assert!(
        detail.contains(&format!(" {dropped} envelopes dropped")),
        "{detail} vs metric {dropped}"
    );
}
