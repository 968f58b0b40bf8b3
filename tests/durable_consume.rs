//! Durable channels on the executor side, through real processes: a real redis-server,
//! the real `mdbridge executor` (its stream consumer and router) and real WebSocket bots.
//! Stream entries are written exactly as the publisher writes them: the append script
//! with `BusMessage::id_split()` halves (it also PUBLISHes the same bytes).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use mdbridge::bus::redis::append::{parse_id, AppendScript};
use mdbridge::durable::{stream_key, StreamCap, StreamId};
use mdbridge::envelope::BusMessage;
use mdbridge::event::{now_micros, Event, Exchange, Side, Trade};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use uuid::Uuid;

const CHANNEL: &str = "trade:binance:BTC-USDT";

/// An executor named `name` in consumer group `group` (None: its name), durable trades.
fn executor(redis: &RedisServer, name: &str, group: Option<&str>, durable: &str) -> Proc {
    let (h, b) = (free_port(), free_port());
    let group = group.map_or(String::new(), |g| format!("group = \"{g}\"\n"));
    let extra =
        format!("[durable]\nchannels = [\"trade:*:*\"]\nblock_ms = 200\n{group}{durable}\n");
    // Bots' queues hold every test's burst: no frame is dropped for a slow test bot.
    let config = role_config(&redis.url(), h, b, &extra)
        .replace("name = \"test\"", &format!("name = \"{name}\""))
        .replace("[bots]\n", "[bots]\nqueue_size = 65536\n");
    Proc::role("executor", &config, h, Some(b))
}

/// Writes entries as the publisher does: one `src`, `seq` from 1.
struct Appender {
    conn: MultiplexedConnection,
    script: AppendScript,
    src: Uuid,
    seq: u64,
    cap: StreamCap,
}

impl Appender {
    async fn new(redis: &RedisServer, maxlen: u64) -> Appender {
        let client = redis::Client::open(redis.url()).expect("client");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        Appender {
            conn,
            script: AppendScript::new(),
            src: Uuid::new_v4(),
            seq: 0,
            cap: StreamCap {
                maxlen,
                approximate: false,
            },
        }
    }

    /// Appends (and publishes) the next trade on `channel`'s stream; registers the channel.
    async fn append_on(&mut self, symbol: &str) -> StreamId {
        self.seq += 1;
        let event = Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: symbol.into(),
            ts: Some(1),
            ts_recv: now_micros(),
            trade_id: self.seq.to_string(),
            price: "100.10".into(),
            size: "0.5".into(),
            side: Some(Side::Buy),
        });
        let msg = BusMessage::encode(self.src, self.seq, now_micros(), event);
        let channel = msg.channel.to_string();
        let (head, tail) = msg.id_split().expect("no id yet");
        let _: u64 = redis::cmd("SADD")
            .arg("md:streams")
            .arg(&channel)
            .query_async(&mut self.conn)
            .await
            .expect("SADD");
        let id = self
            .script
            .append(
                &mut self.conn,
                &stream_key("md:", &channel),
                &format!("md:{channel}"),
                self.cap,
                &head,
                &tail,
            )
            .await
            .expect("append");
        parse_id(&id).expect("stream id")
    }

    async fn append(&mut self) -> StreamId {
        self.append_on("BTC-USDT").await
    }
}

fn key() -> String {
    stream_key("md:", CHANNEL)
}

/// Waits until the consumer group `group` exists on `key` (the executor created it).
async fn wait_group(redis: &RedisServer, key: &str, group: &str) {
    wait_until(&format!("group {group} on {key}"), WAIT, || async {
        let mut c = redis.conn();
        let groups: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(key)
            .query(&mut c)
            .unwrap_or_default();
        format!("{groups:?}").contains(group)
    })
    .await;
}

/// Entries pending in `group` on `key`.
fn pending(redis: &RedisServer, key: &str, group: &str) -> u64 {
    let mut c = redis.conn();
    let summary: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(key)
        .arg(group)
        .query(&mut c)
        .unwrap_or_default();
    match summary.first() {
        Some(redis::Value::Int(n)) => *n as u64,
        _ => 0,
    }
}

/// The next `n` market events (trades) a bot receives; other frames are returned apart.
async fn trades(bot: &mut Bot, n: usize) -> (Vec<Value>, Vec<Value>) {
    let mut got = Vec::new();
    let mut other = Vec::new();
    while got.len() < n {
        match bot.next(WAIT).await {
            Some(v) if v["type"] == "trade" => got.push(v),
            Some(v) => other.push(v),
            None => panic!("bot closed after {got:?}"),
        }
    }
    (got, other)
}

/// A ping answered with nothing before the pong: no frame was pending.
async fn nothing_more(bot: &mut Bot) {
    bot.send(json!({"op":"ping","req":"end"})).await;
    let (_, skipped) = bot.until(WAIT, |v| v["type"] == "pong").await;
    assert!(skipped.is_empty(), "unexpected frames: {skipped:?}");
}

fn trade_ids(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| {
            e["trade_id"]
                .as_str()
                .and_then(|t| t.parse().ok())
                .expect("trade_id")
        })
        .collect()
}

fn ids(events: &[Value]) -> Vec<StreamId> {
    events
        .iter()
        .map(|e| e["id"].as_str().and_then(|t| t.parse().ok()).expect("id"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_reaches_the_bots_once_in_order_with_its_id() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "");
    exec.wait_healthy().await;
    let mut exact = Bot::connect(&exec.bots_url()).await;
    exact.subscribe(&[CHANNEL]).await;
    // A wildcard PSUBSCRIBEs on pub/sub too: the durable envelopes it receives there are
    // dropped; the stream delivers them.
    let mut wild = Bot::connect(&exec.bots_url()).await;
    wild.subscribe(&["trade:binance:*"]).await;
    wait_group(&redis, &key(), "e1").await;
    // On pub/sub only the wildcard: the exact durable channel is not subscribed there.
    wait_until("the wildcard on pub/sub", WAIT, || async {
        let mut c = redis.conn();
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<u64>(&mut c)
            .unwrap_or(0)
            == 1
    })
    .await;
    let mut c = redis.conn();
    let numsub: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("md:{CHANNEL}"))
        .query(&mut c)
        .expect("NUMSUB");
    assert_eq!(
        numsub[0].1, 0,
        "exact durable channel subscribed on pub/sub"
    );

    let mut app = Appender::new(&redis, 10_000).await;
    let mut appended = Vec::new();
    for _ in 0..50 {
        appended.push(app.append().await);
    }
    for bot in [&mut exact, &mut wild] {
        let (got, other) = trades(bot, 50).await;
        assert!(other.is_empty(), "{other:?}");
        assert_eq!(trade_ids(&got), (1..=50).collect::<Vec<_>>());
        assert_eq!(ids(&got), appended, "each event carries its entry id");
        nothing_more(bot).await;
    }
    wait_until("every entry acked", WAIT, || async {
        pending(&redis, &key(), "e1") == 0
            && exec.metric("mdbridge_stream_acked_total").await == 50.0
    })
    .await;
    assert_eq!(exec.metric("mdbridge_stream_delivered_total").await, 50.0);
    // The wildcard's pub/sub copies were dropped unread (durable: they carry an id).
    assert_eq!(exec.metric("mdbridge_envelopes_received_total").await, 0.0);
    assert_eq!(
        exec.metric("mdbridge_stream_redeliveries_dropped_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_reads_its_pending_entries_first_then_new_ones() {
    let redis = RedisServer::start();
    let mut app = Appender::new(&redis, 10_000).await;
    {
        let mut first = executor(&redis, "e1", Some("g"), "");
        first.wait_healthy().await;
        let mut bot = Bot::connect(&first.bots_url()).await;
        bot.subscribe(&[CHANNEL]).await;
        wait_group(&redis, &key(), "g").await;
        for _ in 0..10 {
            app.append().await;
        }
        let (got, _) = trades(&mut bot, 10).await;
        assert_eq!(trade_ids(&got), (1..=10).collect::<Vec<_>>());
        wait_until("the first ten acked", WAIT, || async {
            pending(&redis, &key(), "g") == 0
        })
        .await;
        // SIGKILL on drop.
    }
    // While it is dead: 10 more, of which its consumer had read 5 without acking them
    // (what a kill between read and ack leaves), and 5 after.
    for _ in 0..10 {
        app.append().await;
    }
    let mut c = redis.conn();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("e1")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(key())
        .arg(">")
        .query(&mut c)
        .expect("XREADGROUP");
    assert_eq!(pending(&redis, &key(), "g"), 5);
    for _ in 0..5 {
        app.append().await;
    }

    let mut second = executor(&redis, "e1", Some("g"), "");
    second.wait_healthy().await;
    let mut bot = Bot::connect(&second.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    let (got, other) = trades(&mut bot, 15).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(trade_ids(&got), (11..=25).collect::<Vec<_>>());
    nothing_more(&mut bot).await;
    wait_until("all acked", WAIT, || async {
        pending(&redis, &key(), "g") == 0
    })
    .await;
}

/// Reads trades from `bot` into `sink` until the task is aborted.
fn collect(
    mut bot: Bot,
    sink: std::sync::Arc<std::sync::Mutex<Vec<u64>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(v) = bot.next(Duration::from_secs(3600)).await {
            if v["type"] == "trade" {
                if let Some(n) = v["trade_id"].as_str().and_then(|t| t.parse().ok()) {
                    sink.lock().expect("lock").push(n);
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_splits_the_entries_and_each_group_gets_all() {
    let redis = RedisServer::start();
    let mut a = executor(&redis, "a", Some("shared"), "");
    let mut b = executor(&redis, "b", Some("shared"), "");
    let mut c = executor(&redis, "c", None, "");
    for e in [&mut a, &mut b, &mut c] {
        e.wait_healthy().await;
    }
    let mut sinks = Vec::new();
    let mut tasks = Vec::new();
    for e in [&a, &b, &c] {
        let mut bot = Bot::connect(&e.bots_url()).await;
        bot.subscribe(&[CHANNEL]).await;
        let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        tasks.push(collect(bot, sink.clone()));
        sinks.push(sink);
    }
    wait_group(&redis, &key(), "shared").await;
    wait_group(&redis, &key(), "\"c\"").await;
    // Both consumers of the shared group have read once (they exist in the group).
    wait_until("two consumers in the shared group", WAIT, || async {
        let mut conn = redis.conn();
        let consumers: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(key())
            .arg("shared")
            .query(&mut conn)
            .unwrap_or_default();
        consumers.len() == 2
    })
    .await;

    let mut app = Appender::new(&redis, 10_000).await;
    for _ in 0..300 {
        app.append().await;
    }
    let len = |i: usize| sinks[i].lock().expect("lock").len();
    wait_until(
        "all 300 delivered by the shared group and by c",
        WAIT,
        || async { len(0) + len(1) >= 300 && len(2) >= 300 },
    )
    .await;
    wait_until("everything acked", WAIT, || async {
        pending(&redis, &key(), "shared") == 0 && pending(&redis, &key(), "c") == 0
    })
    .await;
    for t in &tasks {
        t.abort();
    }
    let (sa, sb, sc) = (
        sinks[0].lock().expect("lock").clone(),
        sinks[1].lock().expect("lock").clone(),
        sinks[2].lock().expect("lock").clone(),
    );
    let all: BTreeSet<u64> = (1..=300).collect();
    let (set_a, set_b): (BTreeSet<u64>, BTreeSet<u64>) =
        (sa.iter().copied().collect(), sb.iter().copied().collect());
    assert_eq!(
        sa.len() + sb.len(),
        300,
        "no entry delivered twice in the group"
    );
    assert!(set_a.is_disjoint(&set_b));
    assert_eq!(&set_a | &set_b, all);
    assert!(
        !sa.is_empty() && !sb.is_empty(),
        "both consumers got a share"
    );
    assert!(sa.windows(2).all(|w| w[0] < w[1]), "each share in order");
    assert_eq!(
        sc,
        (1..=300).collect::<Vec<_>>(),
        "another group gets everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_pending_on_a_dead_consumer_are_claimed_by_its_peer() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key())
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query(&mut c)
        .expect("XGROUP CREATE");
    let mut app = Appender::new(&redis, 10_000).await;
    for _ in 0..5 {
        app.append().await;
    }
    // Consumer `dead` reads them and never acks (killed).
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("dead")
        .arg("STREAMS")
        .arg(key())
        .arg(">")
        .query(&mut c)
        .expect("XREADGROUP");
    for _ in 0..3 {
        app.append().await;
    }
    let mut peer = executor(&redis, "peer", Some("g"), "claim_idle_ms = 1500\n");
    peer.wait_healthy().await;
    let mut bot = Bot::connect(&peer.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    let (got, other) = trades(&mut bot, 8).await;
    assert!(other.is_empty(), "{other:?}");
    let got: BTreeSet<u64> = trade_ids(&got).into_iter().collect();
    assert_eq!(got, (1..=8).collect::<BTreeSet<_>>());
    nothing_more(&mut bot).await;
    wait_until("claimed entries acked", WAIT, || async {
        pending(&redis, &key(), "g") == 0
    })
    .await;
    assert_eq!(peer.metric("mdbridge_stream_claimed_total").await, 5.0);
    assert_eq!(
        peer.metric("mdbridge_stream_redeliveries_dropped_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_is_retried_then_dead_lettered_while_later_entries_flow() {
    let redis = RedisServer::start();
    let retry = "max_deliveries = 3\nretry_backoff_ms = 100\nretry_backoff_factor = 2\n";
    let mut exec = executor(&redis, "e1", None, retry);
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    wait_group(&redis, &key(), "e1").await;
    let mut app = Appender::new(&redis, 10_000).await;
    app.append().await;
    app.append().await;
    let mut c = redis.conn();
    let poison: String = redis::cmd("XADD")
        .arg(key())
        .arg("*")
        .arg("envelope")
        .arg("not an envelope")
        .query(&mut c)
        .expect("XADD");
    for _ in 0..3 {
        app.append().await;
    }
    let (got, other) = trades(&mut bot, 5).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(trade_ids(&got), (1..=5).collect::<Vec<_>>());

    let dead = format!("{}:dead", key());
    wait_until("the poison entry dead-lettered", WAIT, || async {
        let mut c = redis.conn();
        redis::cmd("XLEN")
            .arg(&dead)
            .query::<u64>(&mut c)
            .unwrap_or(0)
            == 1
    })
    .await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query(&mut c)
        .expect("XRANGE");
    let fields: std::collections::HashMap<String, String> = entries[0].1.iter().cloned().collect();
    assert_eq!(fields["envelope"], "not an envelope");
    assert!(fields["error"].contains("JSON"), "{fields:?}");
    assert_eq!(fields["group"], "e1");
    assert_eq!(fields["consumer"], "e1");
    assert_eq!(fields["source_id"], poison);
    assert_eq!(fields["deliveries"], "3");
    let failed_at: u64 = fields["failed_at"].parse().expect("µs");
    assert!(failed_at > 1_600_000_000_000_000 && failed_at <= now_micros());
    wait_until("nothing pending", WAIT, || async {
        pending(&redis, &key(), "e1") == 0
    })
    .await;
    assert_eq!(exec.metric("mdbridge_stream_dead_letters_total").await, 1.0);
    assert_eq!(exec.metric("mdbridge_stream_retries_total").await, 2.0);
    nothing_more(&mut bot).await;
}

fn signal(proc: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &proc.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_starved_past_maxlen_reports_the_gap() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "");
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    wait_group(&redis, &key(), "e1").await;
    let mut app = Appender::new(&redis, 10).await;
    for _ in 0..5 {
        app.append().await;
    }
    let (first, _) = trades(&mut bot, 5).await;
    assert_eq!(trade_ids(&first), (1..=5).collect::<Vec<_>>());
    // Starve it: the stream moves 30 entries on (MAXLEN = 10 exact) while it is stopped.
    signal(&exec, "-STOP");
    for _ in 0..30 {
        app.append().await;
    }
    signal(&exec, "-CONT");
    // It gets what it had already been sent and what the stream still holds, the gap
    // announced before the first entry after it.
    let (gap, before) = bot.until(WAIT, |v| v["type"] == "error").await;
    assert_eq!(gap["code"], "gap", "{gap}");
    assert_eq!(gap["channel"], CHANNEL);
    let lost: u64 = gap["message"]
        .as_str()
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("N entries …");
    let (after, _) = trades(&mut bot, 10).await;
    assert_eq!(trade_ids(&after), (26..=35).collect::<Vec<_>>());
    // (A stop longer than the reply timeout would add a reconnect's status events.)
    let before: Vec<Value> = before
        .into_iter()
        .filter(|v| v["type"] == "trade")
        .collect();
    let before = trade_ids(&before);
    assert!(before.iter().all(|&n| n == 6), "{before:?}");
    assert_eq!(
        5 + before.len() as u64 + lost + 10,
        35,
        "every entry delivered or counted"
    );
    nothing_more(&mut bot).await;
    assert_eq!(
        exec.metric("mdbridge_stream_trimmed_total").await,
        lost as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_reaches_a_stream_created_after_it() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "");
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&["trade:binance:*"]).await;
    let mut app = Appender::new(&redis, 10_000).await;
    // The stream (and its registry entry) appear only now.
    for _ in 0..3 {
        app.append_on("NEW-USDT").await;
    }
    let (got, other) = trades(&mut bot, 3).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(trade_ids(&got), vec![1, 2, 3]);
    assert!(got.iter().all(|e| e["symbol"] == "NEW-USDT"));
    app.append_on("NEW-USDT").await;
    let (got, _) = trades(&mut bot, 1).await;
    assert_eq!(trade_ids(&got), vec![4]);
    nothing_more(&mut bot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_arrives_complete_and_in_order() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "read_count = 1000\n");
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    wait_group(&redis, &key(), "e1").await;
    let mut app = Appender::new(&redis, 100_000).await;
    app.script.load(&mut app.conn).await.expect("SCRIPT LOAD");
    // 10 000 entries appended while the executor is stopped: a backlog larger than what
    // the consumer may have in the router's queue at once.
    signal(&exec, "-STOP");
    for _ in 0..10 {
        let mut pipe = redis::pipe();
        for _ in 0..1_000 {
            app.seq += 1;
            let msg = BusMessage::encode(
                app.src,
                app.seq,
                now_micros(),
                Event::Trade(Trade {
                    exchange: Exchange::Binance,
                    symbol: "BTC-USDT".into(),
                    ts: Some(1),
                    ts_recv: now_micros(),
                    trade_id: app.seq.to_string(),
                    price: "1".into(),
                    size: "1".into(),
                    side: None,
                }),
            );
            let (head, tail) = msg.id_split().expect("no id yet");
            app.script.add_to(
                &mut pipe,
                &key(),
                &format!("md:{CHANNEL}"),
                app.cap,
                &head,
                &tail,
            );
        }
        let _: Vec<String> = pipe.query_async(&mut app.conn).await.expect("appends");
    }
    signal(&exec, "-CONT");
    let (got, other) = trades(&mut bot, 10_000).await;
    assert!(other.is_empty(), "{:?}", &other[..other.len().min(3)]);
    assert_eq!(trade_ids(&got), (1..=10_000).collect::<Vec<_>>());
    nothing_more(&mut bot).await;
    wait_until("all acked", WAIT, || async {
        pending(&redis, &key(), "e1") == 0
    })
    .await;
    assert_eq!(exec.metric("mdbridge_stream_trimmed_total").await, 0.0);
}
