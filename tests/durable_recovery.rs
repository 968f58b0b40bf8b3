//! Durable channels end to end, through real processes: simulator → publisher → Redis
//! Stream → executor → bot. The executor is SIGKILLed in the middle of a stream of numbered
//! trades and started again; the bot reconnects with `since` and must see every trade
//! exactly once, in order, each with its stream id.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const DURABLE: &str = "[durable]\nchannels = [\"trade:*:*\"]\nclaim_idle_ms = 1000\n";

fn trade_id(v: &Value) -> u64 {
    v["trade_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("trade without a numeric trade_id: {v}"))
}

fn stream_id(v: &Value) -> (u64, u64) {
    let id = v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("durable event without an id: {v}"));
    let (ms, seq) = id.split_once('-').expect("id is ms-seq");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

fn executor(redis: &RedisServer) -> Proc {
    let (h, b) = (free_port(), free_port());
    Proc::role(
        "executor",
        &role_config(&redis.url(), h, b, DURABLE),
        h,
        Some(b),
    )
}

/// Reads `n` trades (skipping control frames other than errors, which fail the test).
async fn trades(bot: &mut Bot, n: usize, out: &mut Vec<Value>) {
    let mut got = 0;
    while got < n {
        let v = bot.next(WAIT).await.expect("bot connection closed");
        match v["type"].as_str() {
            Some("trade") => {
                out.push(v);
                got += 1;
            }
            Some("error") => panic!("unexpected error: {v}"),
            _ => {}
        }
    }
}

/// A simulator (400 events/s, BTC-USDT) and a healthy publisher of its trades with the
/// `[durable]` section `durable`. Drop order: publisher, then simulator.
async fn durable_publisher(redis: &RedisServer, durable: &str) -> (Proc, Proc) {
    let sim = Proc::simulator(&["--rate", "400", "--symbols", "BTC-USDT"]).await;
    let feed = sim_feed(
        sim.http.expect("port"),
        "binance",
        &["BTC-USDT"],
        &["trade"],
    );
    let (ph, pb) = (free_port(), free_port());
    let mut publisher = Proc::role(
        "publisher",
        &role_config(&redis.url(), ph, pb, &format!("{durable}{feed}")),
        ph,
        None,
    );
    publisher.wait_healthy().await;
    (publisher, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_killed_mid_stream_loses_nothing_for_a_bot_that_resumes_with_since() {
    let redis = RedisServer::start();
    let (_publisher, _sim) = durable_publisher(&redis, DURABLE).await;
    let mut first = executor(&redis);
    first.wait_healthy().await;

    let channel = "trade:binance:BTC-USDT";
    let mut bot = Bot::connect(&first.bots_url()).await;
    bot.subscribe(&[channel]).await;
    let mut seen = Vec::new();
    trades(&mut bot, 150, &mut seen).await;

    // SIGKILL: no flush, no ack of what is in flight, no goodbye to the bot.
    first.child.kill().expect("kill executor");
    let _ = first.child.wait();
    // Trades keep coming into the stream while no executor runs.
    let before = redis_xlen(&redis, channel);
    common::wait_until(
        "more trades appended while the executor is down",
        WAIT,
        || {
            let now = redis_xlen(&redis, channel);
            async move { now >= before + 100 }
        },
    )
    .await;

    let mut second = executor(&redis);
    second.wait_healthy().await;
    let last = seen.last().expect("trades seen")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut bot = Bot::connect(&second.bots_url()).await;
    bot.send(json!({"op":"subscribe","channels":[channel],"since":{channel: last},"req":1}))
        .await;
    // Everything after `last`: the replay, `recovered`, then live trades.
    let mut recovered = None;
    let mut after = Vec::new();
    while recovered.is_none() || after.len() < 400 {
        let v = bot.next(WAIT).await.expect("bot connection closed");
        match v["type"].as_str() {
            Some("trade") => after.push(v),
            Some("recovered") => {
                assert_eq!(v["channel"], channel, "{v}");
                recovered = Some(v);
            }
            Some("error") => panic!("unexpected error: {v}"),
            _ => {}
        }
    }
    let recovered = recovered.expect("recovered");
    assert!(
        recovered["count"].as_u64().expect("count") >= 100,
        "the trades appended while no executor ran are replayed: {recovered}"
    );

    // Exactly once, in order, across the kill: trade ids are consecutive and stream ids
    // strictly increase.
    let all: Vec<&Value> = seen.iter().chain(after.iter()).collect();
    for pair in all.windows(2) {
        assert_eq!(
            trade_id(pair[1]),
            trade_id(pair[0]) + 1,
            "gap or duplicate between {} and {}",
            pair[0],
            pair[1]
        );
        assert!(stream_id(pair[1]) > stream_id(pair[0]));
    }
}

fn redis_xlen(redis: &RedisServer, channel: &str) -> u64 {
    let mut conn = redis.conn();
    redis::cmd("XLEN")
        .arg(format!("md:stream:{channel}"))
        .query(&mut conn)
        .unwrap_or(0)
}

/// `XINFO STREAM`'s `entries-added`: every entry ever appended (Redis 7).
fn entries_added(redis: &RedisServer, channel: &str) -> i64 {
    let mut conn = redis.conn();
    let info: std::collections::HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(format!("md:stream:{channel}"))
        .query(&mut conn)
        .unwrap_or_default();
    match info.get("entries-added") {
        Some(redis::Value::Int(n)) => *n,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_older_than_the_stream_is_history_truncated_then_live() {
    let redis = RedisServer::start();
    let capped = DURABLE.replace(
        "[durable]\n",
        "[durable]\nmaxlen = 50\napproximate = false\n",
    );
    let (_publisher, _sim) = durable_publisher(&redis, &capped).await;
    let channel = "trade:binance:BTC-USDT";
    common::wait_until(
        "more than the cap appended, so the oldest are trimmed",
        WAIT,
        || {
            let added = entries_added(&redis, channel);
            async move { added > 60 }
        },
    )
    .await;
    assert_eq!(redis_xlen(&redis, channel), 50, "exact cap");
    let mut ex = executor(&redis);
    ex.wait_healthy().await;
    let mut bot = Bot::connect(&ex.bots_url()).await;
    bot.send(json!({"op":"subscribe","channels":[channel],"since":{channel: "1-0"},"req":7}))
        .await;
    let (truncated, _) = bot
        .until(WAIT, |v| v["type"] == "error" || v["type"] == "trade")
        .await;
    assert_eq!(truncated["code"], "history_truncated", "{truncated}");
    assert_eq!(truncated["req"], 7, "{truncated}");
    // Live trades follow, each with its id.
    let mut live = Vec::new();
    let mut n = 0;
    while n < 20 {
        let v = bot.next(Duration::from_secs(20)).await.expect("open");
        if v["type"] == "trade" {
            stream_id(&v);
            live.push(trade_id(&v));
            n += 1;
        }
    }
    assert!(live.windows(2).all(|w| w[1] == w[0] + 1), "{live:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hybrid_delivers_its_own_durable_trades_once_with_ids_and_the_rest_in_process() {
    let redis = RedisServer::start();
    let sim = Proc::simulator(&["--rate", "400", "--symbols", "BTC-USDT"]).await;
    let feed = sim_feed(
        sim.http.expect("port"),
        "binance",
        &["BTC-USDT"],
        &["trade", "ticker"],
    );
    let (h, b) = (free_port(), free_port());
    let mut hybrid = Proc::role(
        "hybrid",
        &role_config(&redis.url(), h, b, &format!("{DURABLE}{feed}")),
        h,
        Some(b),
    );
    hybrid.wait_healthy().await;
    let mut bot = Bot::connect(&hybrid.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT", "ticker:binance:BTC-USDT"])
        .await;
    let (mut trades, mut tickers) = (Vec::new(), 0);
    while trades.len() < 300 || tickers < 3 {
        let v = bot.next(WAIT).await.expect("bot connection closed");
        match v["type"].as_str() {
            Some("trade") => trades.push(v),
            Some("ticker") => {
                // Not durable: in-process, as before, without an id.
                assert!(v.get("id").is_none(), "{v}");
                tickers += 1;
            }
            Some("error") => panic!("unexpected error: {v}"),
            _ => {}
        }
    }
    // Durable: through the stream (each with its id), each trade once, in order.
    for pair in trades.windows(2) {
        assert_eq!(
            trade_id(&pair[1]),
            trade_id(&pair[0]) + 1,
            "{} {}",
            pair[0],
            pair[1]
        );
        assert!(stream_id(&pair[1]) > stream_id(&pair[0]));
    }
    assert_eq!(
        hybrid
            .metric("mdbridge_stream_redeliveries_dropped_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_pubsub_envelope_with_a_far_id_neither_reaches_bots_nor_silences_the_stream() {
    let redis = RedisServer::start();
    let mut ex = executor(&redis);
    ex.wait_healthy().await;
    let channel = "trade:binance:BTC-USDT";
    let mut bot = Bot::connect(&ex.bots_url()).await;
    // Both an exact and a wildcard subscriber: the wildcard one is what pub/sub covers.
    bot.subscribe(&[channel]).await;
    let mut wild = Bot::connect(&ex.bots_url()).await;
    wild.subscribe(&["trade:*:*"]).await;
    let mut conn = common::streams::conn(&redis).await;
    let src = uuid::Uuid::new_v4();
    common::streams::append_one(&mut conn, channel, src, 1).await;
    for b in [&mut bot, &mut wild] {
        let (v, _) = b.until(WAIT, |v| v["type"] == "trade").await;
        assert_eq!(v["trade_id"], "1", "{v}");
    }
    // A forged publish: a valid trade, its "id" far in the future and not where our
    // encoder puts it.
    let now = mdbridge::event::now_micros();
    let forged = format!(
        r#"{{"src":"{}","seq":99,"ts_pub":{now},"event":{{"type":"trade","exchange":"binance","symbol":"BTC-USDT","ts":{now},"ts_recv":{now},"trade_id":"forged","price":"1","size":"1","side":"buy"}},"id":"99999999999999-0"}}"#,
        uuid::Uuid::new_v4()
    );
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("md:{channel}"))
        .arg(forged)
        .query_async(&mut conn)
        .await
        .expect("publish");
    for n in 2..=4 {
        common::streams::append_one(&mut conn, channel, src, n).await;
    }
    for b in [&mut bot, &mut wild] {
        let mut got = Vec::new();
        while got.len() < 3 {
            let (v, _) = b.until(WAIT, |v| v["type"] == "trade").await;
            got.push(v["trade_id"].as_str().expect("trade_id").to_string());
        }
        assert_eq!(got, ["2", "3", "4"], "the genuine entries, and only them");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_appended_again_is_not_delivered_twice() {
    let redis = RedisServer::start();
    let mut ex = executor(&redis);
    ex.wait_healthy().await;
    let channel = "trade:binance:BTC-USDT";
    let mut bot = Bot::connect(&ex.bots_url()).await;
    bot.subscribe(&[channel]).await;
    let mut conn = common::streams::conn(&redis).await;
    let src = uuid::Uuid::new_v4();
    // seq 1, 2, then 2 again (a publisher re-sending after a lost reply, or an old
    // envelope re-appended: either way a new entry id), then 3.
    for seq in [1, 2, 2, 3] {
        common::streams::append_one(&mut conn, channel, src, seq).await;
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let (v, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
        got.push(v["trade_id"].as_str().expect("trade_id").to_string());
    }
    assert_eq!(got, ["1", "2", "3"]);
    common::wait_until("the repeat acked", WAIT, || async {
        ex.metric("mdbridge_stream_redeliveries_dropped_total")
            .await
            == 1.0
    })
    .await;
}
