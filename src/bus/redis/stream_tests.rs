//! Durable appends against a real, private `redis-server`: bytes, ids, caps, `NOSCRIPT`,
//! outages and the buffer's overflow. Order and exactness are asserted on what Redis
//! holds (every `seq` once, in order), never on timing.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;
use crate::bus::redis::RedisPublisher;
use crate::bus::redis_test_server::RedisTestServer;
use crate::bus::{Bus, Sequencer};
use crate::config::{RedisConfig, StreamLimit};
use crate::durable::StreamId;
use crate::event::{Exchange, StatusState, Trade};
use crate::health::Health;

const WAIT: Duration = Duration::from_secs(20);
const BTC: &str = "trade:binance:BTC-USDT";

fn redis_config(url: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_string(),
        probe_interval_ms: 100,
        probe_timeout_ms: 1_000,
        reconnect_min_ms: 20,
        reconnect_max_ms: 200,
        snapshot_interval_ms: 50,
        ..RedisConfig::default()
    }
}

fn setup(channels: &[&str], limits: Vec<StreamLimit>, buffer_bytes: u64) -> StreamSetup {
    StreamSetup::from_config(&DurableConfig {
        channels: channels.iter().map(|c| c.to_string()).collect(),
        limits,
        buffer_bytes,
        ..DurableConfig::default()
    })
}

fn trade(exchange: Exchange, symbol: &str, n: u64) -> Event {
    Event::Trade(Trade {
        exchange,
        symbol: symbol.into(),
        ts: Some(n),
        ts_recv: n,
        trade_id: n.to_string(),
        price: "100.10".into(),
        size: "0.5".into(),
        side: None,
    })
}

fn btc(n: u64) -> Event {
    trade(Exchange::Binance, "BTC-USDT", n)
}

struct Running {
    bus: RedisPublisher,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
    health: Health,
    seq: Sequencer,
}

async fn start(config: RedisConfig, streams: StreamSetup) -> Running {
    let src = Uuid::new_v4();
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let (bus, task) = RedisPublisher::spawn_with_streams(
        config,
        src,
        streams,
        health.register("pub"),
        shutdown.clone(),
    );
    wait_until("publisher connected", || async { health.all_healthy() }).await;
    Running {
        bus,
        task,
        shutdown,
        health,
        seq: Sequencer::new(src),
    }
}

impl Running {
    async fn publish(&mut self, event: Event) {
        self.bus.publish(self.seq.wrap(event)).await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn raw(url: &str) -> MultiplexedConnection {
    let client = ::redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

fn key(channel: &str) -> String {
    stream_key("md:", channel)
}

type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Every entry of `channel`'s stream: its id and envelope, checked to be one field
/// `envelope` that decodes and carries that very id.
async fn entries(conn: &MultiplexedConnection, channel: &str) -> Vec<(StreamId, BusMessage)> {
    let mut c = conn.clone();
    let raw: Entries = ::redis::cmd("XRANGE")
        .arg(key(channel))
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    raw.into_iter()
        .map(|(id, fields)| {
            let id: StreamId = id.parse().unwrap();
            assert_eq!(fields.len(), 1, "{fields:?}");
            assert_eq!(fields[0].0, "envelope");
            let msg = BusMessage::decode(
                Channel::parse(channel).unwrap(),
                Bytes::from(fields[0].1.clone()),
            )
            .unwrap();
            assert_eq!(msg.id, Some(id), "the envelope carries its own entry id");
            (id, msg)
        })
        .collect()
}

async fn seqs(conn: &MultiplexedConnection, channel: &str) -> Vec<u64> {
    let all = entries(conn, channel).await;
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "ids increase");
    all.iter().map(|(_, m)| m.seq).collect()
}

/// The `seq` of the stream's newest entry (0: empty).
async fn newest_seq(conn: &MultiplexedConnection, channel: &str) -> u64 {
    let mut c = conn.clone();
    let raw: Entries = ::redis::cmd("XREVRANGE")
        .arg(key(channel))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    raw.first()
        .and_then(|(_, f)| f.first())
        .and_then(|(_, env)| serde_json::from_slice::<serde_json::Value>(env).ok())
        .and_then(|v| v["seq"].as_u64())
        .unwrap_or(0)
}

async fn wait_seq(conn: &MultiplexedConnection, channel: &str, seq: u64) {
    wait_until(&format!("seq {seq} in {channel}'s stream"), || async {
        newest_seq(conn, channel).await >= seq
    })
    .await;
}

async fn query<T: ::redis::FromRedisValue>(
    conn: &MultiplexedConnection,
    cmd: &mut ::redis::Cmd,
) -> T {
    let mut c = conn.clone();
    cmd.query_async(&mut c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_envelopes_land_in_the_stream_as_published_and_others_do_not() {
    let server = RedisTestServer::start();
    let url = server.url();
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(format!("md:{BTC}")).await.unwrap();
    sub.subscribe("md:trade:kraken:BTC-USD").await.unwrap();
    let mut p = start(
        redis_config(&url),
        setup(&["trade:binance:*"], vec![], 1 << 20),
    )
    .await;
    for n in 1..=50 {
        p.publish(btc(n)).await;
        p.publish(trade(Exchange::Kraken, "BTC-USD", n)).await;
    }
    let mut published: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    {
        let mut messages = sub.on_message();
        for _ in 0..100 {
            let msg = tokio::time::timeout(WAIT, messages.next())
                .await
                .unwrap()
                .unwrap();
            let payload: Vec<u8> = msg.get_payload().unwrap();
            published
                .entry(msg.get_channel_name().to_string())
                .or_default()
                .push(payload);
        }
    }
    let conn = raw(&url).await;
    let stream = entries(&conn, BTC).await;
    let durable = &published[&format!("md:{BTC}")];
    assert_eq!(stream.len(), 50);
    for (n, ((id, msg), payload)) in stream.iter().zip(durable).enumerate() {
        assert_eq!(
            &msg.envelope[..],
            &payload[..],
            "same bytes in stream and pub/sub"
        );
        assert_eq!(msg.seq, n as u64 + 1);
        assert_eq!(msg.id, Some(*id));
    }
    assert!(stream.windows(2).all(|w| w[0].0 < w[1].0));
    for payload in &published["md:trade:kraken:BTC-USD"] {
        let msg = BusMessage::decode(
            Channel::parse("trade:kraken:BTC-USD").unwrap(),
            Bytes::from(payload.clone()),
        )
        .unwrap();
        assert_eq!(msg.id, None, "a non-durable envelope carries no id");
    }
    let streams: Vec<String> = query(&conn, ::redis::cmd("KEYS").arg("md:stream:*")).await;
    assert_eq!(streams, vec![key(BTC)]);
    let registry: Vec<String> = query(&conn, ::redis::cmd("SMEMBERS").arg("md:streams")).await;
    assert_eq!(registry, vec![BTC.to_string()]);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_pattern_caps_hold_under_load_exact_and_approximate() {
    let server = RedisTestServer::start();
    let url = server.url();
    // trade:binance:* exactly 100; other trades ~1000.
    let streams = StreamSetup::from_config(&DurableConfig {
        channels: vec!["trade:*:*".into()],
        maxlen: 1000,
        approximate: true,
        limits: vec![StreamLimit {
            pattern: "trade:binance:*".into(),
            maxlen: 100,
            approximate: Some(false),
        }],
        buffer_bytes: 1 << 20,
        ..DurableConfig::default()
    });
    let config = RedisConfig {
        publish_queue_size: 50_000,
        ..redis_config(&url)
    };
    let mut p = start(config, streams).await;
    const N: u64 = 20_000;
    for n in 1..=N {
        p.publish(btc(n)).await;
        p.publish(trade(Exchange::Kraken, "BTC-USD", n)).await;
    }
    let conn = raw(&url).await;
    wait_seq(&conn, BTC, N).await;
    wait_seq(&conn, "trade:kraken:BTC-USD", N).await;
    let xlen = |channel: &'static str| {
        let conn = conn.clone();
        async move { query::<u64>(&conn, ::redis::cmd("XLEN").arg(key(channel))).await }
    };
    assert_eq!(xlen(BTC).await, 100, "MAXLEN = 100 is exact");
    assert_eq!(seqs(&conn, BTC).await, (N - 99..=N).collect::<Vec<_>>());
    let approx = xlen("trade:kraken:BTC-USD").await;
    // `~` trims whole nodes (stream-node-max-entries 100): never below N, at most a node over.
    assert!((1000..=1100).contains(&approx), "XLEN {approx}");
    let kept = seqs(&conn, "trade:kraken:BTC-USD").await;
    assert_eq!(kept, (N - approx + 1..=N).collect::<Vec<_>>());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_mid_stream_loses_and_duplicates_nothing() {
    let server = RedisTestServer::start();
    let url = server.url();
    let client = ::redis::Client::open(url.as_str()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(format!("md:{BTC}")).await.unwrap();
    let conn = raw(&url).await;
    let mut p = start(redis_config(&url), setup(&[BTC], vec![], 1 << 20)).await;
    for n in 1..=500 {
        p.publish(btc(n)).await;
    }
    wait_seq(&conn, BTC, 500).await;
    // The writer believes the script loaded: its next appends meet NOSCRIPT for certain.
    let _: () = query(&conn, ::redis::cmd("SCRIPT").arg("FLUSH")).await;
    for n in 501..=1000 {
        p.publish(btc(n)).await;
        if n == 750 {
            // And once more while appends are in flight.
            let _: () = query(&conn, ::redis::cmd("SCRIPT").arg("FLUSH")).await;
        }
    }
    wait_seq(&conn, BTC, 1000).await;
    assert_eq!(seqs(&conn, BTC).await, (1..=1000).collect::<Vec<_>>());
    let info: String = query(&conn, ::redis::cmd("INFO").arg("errorstats")).await;
    assert!(
        info.contains("errorstat_NOSCRIPT:count="),
        "the NOSCRIPT path was taken: {info}"
    );
    // Pub/sub saw each envelope once too: a NOSCRIPT append published nothing.
    let mut messages = sub.on_message();
    for n in 1..=1000u64 {
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await
            .unwrap()
            .unwrap();
        let payload: Vec<u8> = msg.get_payload().unwrap();
        let back = BusMessage::decode(Channel::parse(BTC).unwrap(), Bytes::from(payload)).unwrap();
        assert_eq!(back.seq, n);
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_published_while_redis_is_down_are_appended_in_order_after() {
    let mut server = RedisTestServer::start();
    let url = server.url();
    let mut p = start(redis_config(&url), setup(&[BTC], vec![], 1 << 20)).await;
    for n in 1..=10 {
        p.publish(btc(n)).await;
    }
    wait_seq(&raw(&url).await, BTC, 10).await;
    server.kill();
    // At once: these meet the dead connection (a pipeline that fails, put back)...
    for n in 11..=40 {
        p.publish(btc(n)).await;
    }
    wait_until("publisher notices", || async { !p.health.all_healthy() }).await;
    // ...these find it down already (buffered).
    for n in 41..=60 {
        p.publish(btc(n)).await;
    }
    server.restart(); // empty, as after a crash without persistence
    for n in 61..=70 {
        p.publish(btc(n)).await;
    }
    let conn = raw(&url).await;
    wait_seq(&conn, BTC, 70).await;
    // The new server is empty. Envelopes before 11 whose replies the kill cut off (an RST
    // discards unread replies) are appended again: the stream no longer has them.
    let held = seqs(&conn, BTC).await;
    let first = held.first().copied().unwrap_or(0);
    assert!((1..=11).contains(&first), "{held:?}");
    assert_eq!(held, (first..=70).collect::<Vec<_>>());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_overflow_drops_the_oldest_counts_and_announces_the_gap() {
    let metrics = crate::metrics::install();
    let mut server = RedisTestServer::start();
    let url = server.url();
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel::<Event>(16);
    // About ten trade envelopes.
    let streams = setup(
        &[BTC],
        vec![],
        10 * (250 + crate::bus::redis::stream_buffer::ENTRY_OVERHEAD),
    )
    .with_notices(&events_tx);
    let mut p = start(redis_config(&url), streams).await;
    for n in 1..=5 {
        p.publish(btc(n)).await;
    }
    wait_seq(&raw(&url).await, BTC, 5).await;
    server.kill();
    wait_until("publisher notices", || async { !p.health.all_healthy() }).await;
    for n in 6..=205 {
        p.publish(btc(n)).await;
    }
    // A flush of a full buffer is what makes an outage's loss final.
    let dropped_metric = || {
        let text = metrics.render();
        text.lines()
            .find(|l| l.starts_with(crate::metrics::STREAM_BUFFER_DROPPED))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    };
    server.restart();
    let status = tokio::time::timeout(WAIT, events_rx.recv())
        .await
        .expect("a gap status")
        .expect("open");
    let conn = raw(&url).await;
    wait_seq(&conn, BTC, 205).await;
    let kept = seqs(&conn, BTC).await;
    let first = 206 - kept.len() as u64;
    assert_eq!(
        kept,
        (first..=205).collect::<Vec<_>>(),
        "the newest survive"
    );
    // 6..=205 met the full buffer; 1..=5 too if the kill cut off their reply (at least
    // once: they were put back first, so they were the first dropped).
    let lost = 200 - kept.len() as u64;
    assert!(
        lost > 150,
        "the buffer holds about ten: kept {}",
        kept.len()
    );
    let Event::Status(status) = status else {
        panic!("not a status: {status:?}")
    };
    assert_eq!(status.exchange, Exchange::Binance);
    assert_eq!(status.state, StatusState::Error);
    let detail = status.detail.unwrap_or_default();
    assert!(detail.contains(BTC), "{detail}");
    let announced: u64 = detail
        .split(" envelopes dropped")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {detail}"));
    assert!(
        (lost..=lost + 5).contains(&announced),
        "{detail}, lost {lost}"
    );
    // Only this test overflows a buffer in this binary.
    assert_eq!(dropped_metric(), announced);
    p.stop().await;
}

#[tokio::test]
async fn a_lost_reply_is_not_appended_twice() {
    let server = RedisTestServer::start();
    let conn = raw(&server.url()).await;
    let src = Uuid::new_v4();
    let mut seq = Sequencer::new(src);
    let msgs: Vec<BusMessage> = (1..=6).map(|n| seq.wrap(btc(n))).collect();
    let script = AppendScript::new();
    let cap = StreamCap {
        maxlen: 100,
        approximate: false,
    };
    // 1..=4 reached the stream; the replies of 3 and 4 were lost with the connection.
    for msg in &msgs[..4] {
        let (head, tail) = msg.id_split().unwrap();
        script
            .append(
                &mut conn.clone(),
                &key(BTC),
                &format!("md:{BTC}"),
                cap,
                &head,
                &tail,
            )
            .await
            .unwrap();
    }
    let mut writer = StreamWriter::new(setup(&[BTC], vec![], 1 << 20), "md:", src);
    let mut back = msgs[2..].to_vec();
    writer.stash(&mut back);
    writer.buffer.unsure.insert(Channel::parse(BTC).unwrap(), 4);
    writer.prepare(&mut conn.clone()).await.unwrap();
    let left: Vec<u64> = writer.take_chunk(10).iter().map(|m| m.seq).collect();
    assert_eq!(left, vec![5, 6], "3 and 4 are in the stream already");
    assert!(writer.buffer.unsure.is_empty());
    // Another publisher's entries with higher seqs do not count as ours.
    let mut other = Sequencer::new(Uuid::new_v4());
    for n in 1..=10 {
        let msg = other.wrap(btc(n));
        let (head, tail) = msg.id_split().unwrap();
        script
            .append(
                &mut conn.clone(),
                &key(BTC),
                &format!("md:{BTC}"),
                cap,
                &head,
                &tail,
            )
            .await
            .unwrap();
    }
    let mut back = msgs[4..].to_vec();
    writer.stash(&mut back);
    writer.buffer.unsure.insert(Channel::parse(BTC).unwrap(), 2);
    writer.prepare(&mut conn.clone()).await.unwrap();
    let left: Vec<u64> = writer.take_chunk(10).iter().map(|m| m.seq).collect();
    assert_eq!(left, vec![5, 6]);
}

/// Not a check: the figures for docs/operations.md and benches/BENCHMARKS.md.
/// `cargo test --release --lib measure_append_rate_and_memory -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_append_rate_and_memory() {
    const N: u64 = 100_000;
    for (label, channels, approximate) in [
        ("pub/sub only", vec![], true),
        ("durable, MAXLEN ~", vec![BTC], true),
        ("durable, MAXLEN =", vec![BTC], false),
    ] {
        let server = RedisTestServer::start();
        let url = server.url();
        let conn = raw(&url).await;
        let streams = StreamSetup::from_config(&DurableConfig {
            channels: channels.iter().map(|c| c.to_string()).collect(),
            maxlen: N,
            approximate,
            buffer_bytes: 1 << 26,
            ..DurableConfig::default()
        });
        let config = RedisConfig {
            publish_queue_size: 2 * N as usize,
            ..redis_config(&url)
        };
        let mut p = start(config, streams).await;
        let used = |conn: MultiplexedConnection| async move {
            let info: String = query(&conn, ::redis::cmd("INFO").arg("memory")).await;
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let before = used(conn.clone()).await;
        let mut size = 0;
        let started = std::time::Instant::now();
        // Twice the cap: the second half runs with trimming, as in production.
        for n in 1..=2 * N {
            let msg = p.seq.wrap(btc(n));
            size = msg.envelope.len();
            p.bus.publish(msg).await;
            if n % 10_000 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let rate = if channels.is_empty() {
            let stats = || async {
                let info: String = query(&conn, ::redis::cmd("INFO").arg("commandstats")).await;
                info.lines()
                    .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
                    .and_then(|v| v.split(',').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            wait_until("all published", || async { stats().await >= 2 * N }).await;
            (2 * N) as f64 / started.elapsed().as_secs_f64()
        } else {
            wait_seq(&conn, BTC, 2 * N).await;
            (2 * N) as f64 / started.elapsed().as_secs_f64()
        };
        let after = used(conn.clone()).await;
        let (xlen, usage): (u64, Option<u64>) = if channels.is_empty() {
            (0, None)
        } else {
            (
                query(&conn, ::redis::cmd("XLEN").arg(key(BTC))).await,
                query(
                    &conn,
                    ::redis::cmd("MEMORY")
                        .arg("USAGE")
                        .arg(key(BTC))
                        .arg("SAMPLES")
                        .arg(0),
                )
                .await,
            )
        };
        let stats: String = query(&conn, ::redis::cmd("INFO").arg("commandstats")).await;
        let per_call = stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_publish:"))
            .filter_map(|l| l.split("usec_per_call=").nth(1))
            .filter_map(|v| v.split(',').next())
            .collect::<Vec<_>>()
            .join(", ");
        eprintln!(
            "{label}: Redis µs per EVALSHA/PUBLISH call: {per_call}; envelope {size} B, {rate:.0} events/s end to end ({} events), XLEN {xlen}, MEMORY USAGE {usage:?} B, used_memory delta {} B",
            2 * N,
            after.saturating_sub(before)
        );
        p.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_publish_queue_makes_durable_envelopes_wait_never_drop() {
    let server = RedisTestServer::start();
    // A one-envelope queue: almost every publish finds it full.
    let config = RedisConfig {
        publish_queue_size: 1,
        ..redis_config(&server.url())
    };
    let mut p = start(config, setup(&[BTC], Vec::new(), 1 << 20)).await;
    for n in 1..=3_000 {
        p.publish(btc(n)).await;
        // The same flood on a non-durable channel keeps pub/sub's rule: dropped, counted.
        p.publish(trade(Exchange::Binance, "ETH-USDT", n)).await;
    }
    let conn = raw(&server.url()).await;
    wait_seq(&conn, BTC, 3_000).await;
    assert_eq!(seqs(&conn, BTC).await, (1..=3_000).collect::<Vec<u64>>());
    p.stop().await;
}
