//! End to end through real processes: exchange server → publisher → real Redis → executor →
//! real bot WebSocket clients, plus hybrid, a second executor, and a Redis restart.

mod common;

use std::collections::HashSet;

use common::book_chain::BookChain;
use common::exchange::ScriptedExchange;
use common::*;
use serde_json::{json, Value};

/// Waits until some client of `redis` is subscribed to `channel` (exact) or to any pattern.
async fn wait_subscribed(redis: &RedisServer, channel: &str) {
    wait_until(
        &format!("a Redis subscriber on {channel}"),
        WAIT,
        || async {
            let mut c = redis.conn();
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(channel)
                .query::<Vec<(String, u64)>>(&mut c)
                .ok()
                .and_then(|v| v.into_iter().next())
                .unwrap_or_default();
            let pats: u64 = redis::cmd("PUBSUB")
                .arg("NUMPAT")
                .query(&mut c)
                .unwrap_or(0);
            n > 0 || pats > 0
        },
    )
    .await;
}

fn without_ts_recv(mut v: Value) -> Value {
    assert!(
        v["ts_recv"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000_000),
        "ts_recv µs: {v}"
    );
    v.as_object_mut().expect("object").remove("ts_recv");
    v
}

struct Bridge {
    redis: RedisServer,
    exchange: ScriptedExchange,
    publisher: Proc,
    executor: Proc,
}

/// Scripted Binance → publisher → Redis → executor, all healthy.
async fn scripted_bridge(symbols: &[&str], channels: &[&str]) -> Bridge {
    let redis = RedisServer::start();
    let exchange = ScriptedExchange::start().await;
    let feed = sim_feed(exchange.port(), "binance", symbols, channels);
    let (publisher, executor) = publisher_and_executor(&redis, &feed).await;
    wait_until("publisher subscribed to the exchange", WAIT, || async {
        exchange.subscribed_clients() > 0
    })
    .await;
    Bridge {
        redis,
        exchange,
        publisher,
        executor,
    }
}

// Frames from Binance's documentation (web-socket-streams.md), wrapped as /stream sends them.
const TRADE: &str = r#"{"stream":"bnbbtc@trade","data":{"e":"trade","E":1672515782136,"s":"BNBBTC","t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}"#;
const TICKER: &str = r#"{"stream":"bnbbtc@ticker","data":{"e":"24hrTicker","E":1672515782136,"s":"BNBBTC","p":"0.0015","P":"250.00","w":"0.0018","x":"0.0009","c":"0.0025","Q":"10","b":"0.0024","B":"10","a":"0.0026","A":"100","o":"0.0010","h":"0.0025","l":"0.0010","v":"10000","q":"18","O":0,"C":86400000,"F":0,"L":18150,"n":18151}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_to_executor_to_bot_exact_events_and_routing() {
    let b = scripted_bridge(&["BNB-BTC"], &["trade", "ticker"]).await;
    let sent = b.exchange.received().join("\n");
    assert!(
        sent.contains("bnbbtc@trade") && sent.contains("bnbbtc@ticker"),
        "subscribe frames: {sent}"
    );

    // With no bot, the executor holds no subscription in Redis (its probe is a PING).
    {
        let mut c = b.redis.conn();
        let channels: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg("md:*")
            .query(&mut c)
            .expect("PUBSUB CHANNELS");
        assert!(channels.is_empty(), "{channels:?}");
        let patterns: u64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query(&mut c)
            .expect("NUMPAT");
        assert_eq!(patterns, 0);
    }
    let mut trades = Bot::connect(&b.executor.bots_url()).await;
    trades.subscribe(&["trade:*:BNB-BTC"]).await;
    let mut tickers = Bot::connect(&b.executor.bots_url()).await;
    tickers.subscribe(&["ticker:binance:BNB-BTC"]).await;
    wait_subscribed(&b.redis, "md:ticker:binance:BNB-BTC").await;

    // A second executor on the same Redis sees the same events.
    let (eh, eb) = (free_port(), free_port());
    let mut second = Proc::role(
        "executor",
        &role_config(&b.redis.url(), eh, eb, ""),
        eh,
        Some(eb),
    );
    second.wait_healthy().await;
    let mut other = Bot::connect(&second.bots_url()).await;
    other.subscribe(&["trade:binance:BNB-BTC"]).await;
    wait_until("second executor subscribed", WAIT, || async {
        let mut c = b.redis.conn();
        let v: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("md:trade:binance:BNB-BTC")
            .query(&mut c)
            .unwrap_or_default();
        v.first().map(|x| x.1).unwrap_or(0) >= 1
    })
    .await;

    b.exchange.send(TRADE);
    b.exchange.send(TICKER);

    let expected_trade = json!({
        "type":"trade","exchange":"binance","symbol":"BNB-BTC","ts":1672515782136000u64,
        "trade_id":"12345","price":"0.001","size":"100","side":"sell"
    });
    let expected_ticker = json!({
        "type":"ticker","exchange":"binance","symbol":"BNB-BTC","ts":1672515782136000u64,
        "bid":"0.0024","bid_size":"10","ask":"0.0026","ask_size":"100","last":"0.0025","volume_24h":"10000"
    });
    let (t, skipped) = trades.until(WAIT, |v| v["type"] == "trade").await;
    assert!(
        skipped.iter().all(|v| v["type"] != "ticker"),
        "ticker leaked to a trade bot: {skipped:?}"
    );
    assert_eq!(without_ts_recv(t), expected_trade);
    let (k, skipped) = tickers.until(WAIT, |v| v["type"] == "ticker").await;
    assert!(
        skipped.iter().all(|v| v["type"] != "trade"),
        "trade leaked: {skipped:?}"
    );
    assert_eq!(without_ts_recv(k), expected_ticker);
    let (t2, _) = other.until(WAIT, |v| v["type"] == "trade").await;
    assert_eq!(without_ts_recv(t2), expected_trade);

    // Nothing else arrives for the ticker bot: a ping round trip proves the queue is empty.
    tickers.send(json!({"op":"ping","req":9})).await;
    let pong = tickers.next(WAIT).await.expect("pong");
    assert_eq!(pong, json!({"type":"pong","req":9}));

    // A late joiner to the feed's status learns its current state at once.
    let mut watcher = Bot::connect(&b.executor.bots_url()).await;
    watcher.subscribe(&["status:binance"]).await;
    let status = watcher.next(WAIT).await.expect("latest status");
    assert_eq!(status["type"], "status", "{status}");
    assert_eq!(status["exchange"], "binance");
    assert_eq!(status["state"], "connected");

    // A late joiner gets the latest ticker at once.
    let mut late = Bot::connect(&b.executor.bots_url()).await;
    late.subscribe(&["ticker:binance:BNB-BTC"]).await;
    let (k2, _) = late.until(WAIT, |v| v["type"] == "ticker").await;
    assert_eq!(without_ts_recv(k2), expected_ticker);

    assert!(
        b.publisher
            .metric("mdbridge_envelopes_published_total")
            .await
            >= 2.0
    );
    assert!(
        b.publisher
            .metric(r#"mdbridge_exchange_events_total{exchange="binance",type="trade"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_envelopes_are_counted_and_skipped() {
    let b = scripted_bridge(&["BNB-BTC"], &["trade"]).await;
    let mut bot = Bot::connect(&b.executor.bots_url()).await;
    bot.subscribe(&["trade:binance:BNB-BTC"]).await;
    wait_subscribed(&b.redis, "md:trade:binance:BNB-BTC").await;

    // Garbage from the exchange, then a valid trade.
    b.exchange
        .send(r#"{"stream":"bnbbtc@trade","data":{"e":"trade","s":"#);
    b.exchange.send("not json at all");
    // Garbage on Redis, then the valid trade through the publisher.
    let mut c = b.redis.conn();
    for bad in [
        "{",
        r#"{"src":"nope","seq":1,"ts_pub":1,"event":{}}"#,
        r#"{"seq":1}"#,
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("md:trade:binance:BNB-BTC")
            .arg(bad)
            .query(&mut c)
            .expect("publish");
    }
    b.exchange.send(TRADE);
    let (t, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
    assert_eq!(t["trade_id"], "12345");
    assert!(
        b.publisher
            .metric("mdbridge_exchange_frames_invalid_total")
            .await
            >= 2.0
    );
    assert!(b.executor.metric("mdbridge_envelopes_invalid_total").await >= 3.0);
}

/// Collects `n` trades from a bot, asserting the ids are contiguous (no loss, no duplicate).
async fn contiguous_trades(bot: &mut Bot, n: usize) -> (u64, u64) {
    let mut first = None;
    let mut last = 0u64;
    let mut got = 0;
    while got < n {
        let (t, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
        let id: u64 = t["trade_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("numeric trade id");
        if let Some(_f) = first {
            assert_eq!(
                id,
                last + 1,
                "trade ids must be contiguous: {last} then {id}"
            );
        } else {
            first = Some(id);
        }
        last = id;
        got += 1;
    }
    (first.unwrap_or(0), last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_delivers_each_event_exactly_once() {
    let SimHybrid {
        hybrid,
        redis,
        sim: _sim,
    } = sim_hybrid("400", &["BTC-USDT"], &["trade", "book"], "").await;
    let mut bot = Bot::connect(&hybrid.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT", "trade:*:BTC-USDT"])
        .await;
    contiguous_trades(&mut bot, 300).await;
    // Its own books are kept in-process: a late joiner gets a snapshot at once and the
    // chain never breaks on the local path (no bus-side resync).
    let mut books = Bot::connect(&hybrid.bots_url()).await;
    books.subscribe(&["book:*:*"]).await;
    let (first, _) = books.until(WAIT, |v| v["type"] == "book").await;
    assert_eq!(first["action"], "snapshot", "{first}");
    let mut seq = first["seq"].as_u64().expect("seq");
    for _ in 0..100 {
        let (d, _) = books.until(WAIT, |v| v["type"] == "book").await;
        assert_eq!(d["action"], "delta");
        assert_eq!(d["prev_seq"].as_u64(), Some(seq), "chain");
        seq = d["seq"].as_u64().expect("seq");
    }
    assert_eq!(
        hybrid
            .metric(r#"mdbridge_book_resyncs_total{side="bus"}"#)
            .await,
        0.0
    );
    // Its own echoes came back from Redis and were dropped by src.
    assert!(
        hybrid
            .metric("mdbridge_envelopes_self_filtered_total")
            .await
            >= 1.0
    );

    // An executor on the same Redis sees the hybrid's events too.
    let (eh, eb) = (free_port(), free_port());
    let mut executor = Proc::role(
        "executor",
        &role_config(&redis.url(), eh, eb, ""),
        eh,
        Some(eb),
    );
    executor.wait_healthy().await;
    let mut remote = Bot::connect(&executor.bots_url()).await;
    remote.subscribe(&["trade:binance:BTC-USDT"]).await;
    contiguous_trades(&mut remote, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_mid_stream_both_roles_recover() {
    let SimBridge {
        mut executor,
        mut publisher,
        sim: _sim,
        mut redis,
    } = sim_bridge("200", &["BTC-USDT"], &["trade", "book"]).await;
    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    let mut books = Bot::connect(&executor.bots_url()).await;
    books.subscribe(&["book:binance:BTC-USDT"]).await;
    let mut chain = BookChain::default();
    chain.read(&mut books, 20).await;
    let (_, before) = contiguous_trades(&mut bot, 20).await;

    redis.restart();

    // Delivery resumes by itself: a trade newer than anything seen before the restart.
    loop {
        let (t, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
        if t["trade_id"]
            .as_str()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            > before + 50
        {
            break;
        }
    }
    contiguous_trades(&mut bot, 20).await;
    // The book bot lost deltas with Redis: it is told (`resync`), gets a fresh snapshot
    // from the executor, and every delta after it chains again.
    while chain.resyncs == 0 || chain.deltas_since_snapshot < 20 {
        chain.read(&mut books, 1).await;
    }
    assert!(
        executor
            .metric(r#"mdbridge_redis_reconnects_total{role="subscribe"}"#)
            .await
            >= 1.0
    );
    assert!(
        publisher
            .metric(r#"mdbridge_redis_reconnects_total{role="publish"}"#)
            .await
            >= 1.0
    );
    assert!(executor.metric("mdbridge_envelopes_lost_total").await >= 1.0);
    assert!(
        publisher.child.try_wait().expect("status").is_none(),
        "publisher must not restart"
    );
    assert!(
        executor.child.try_wait().expect("status").is_none(),
        "executor must not restart"
    );
    publisher.wait_healthy().await;
    executor.wait_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bot_is_disconnected_while_fast_bot_gets_everything() {
    let b = sim_hybrid(
        "2000",
        &["BTC-USDT"],
        &["trade", "book"],
        "queue_size = 256\nslow_client = \"disconnect\"",
    )
    .await;
    let slow = stalled_bot(b.hybrid.bots.expect("port"), &["trade:*:*", "book:*:*"]).await;
    let mut fast = Bot::connect(&b.hybrid.bots_url()).await;
    fast.subscribe(&["trade:binance:BTC-USDT"]).await;
    contiguous_trades(&mut fast, 400).await;
    wait_until("the slow bot is disconnected", WAIT, || async {
        b.hybrid
            .metric(r#"mdbridge_bot_disconnects_total{reason="slow"}"#)
            .await
            >= 1.0
    })
    .await;
    contiguous_trades(&mut fast, 100).await;
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_keeps_slow_bot_connected_and_counts_drops() {
    let b = sim_hybrid(
        "2000",
        &["BTC-USDT"],
        &["trade", "book"],
        "queue_size = 256\nslow_client = \"drop_oldest\"",
    )
    .await;
    let slow = stalled_bot(b.hybrid.bots.expect("port"), &["trade:*:*", "book:*:*"]).await;
    let mut fast = Bot::connect(&b.hybrid.bots_url()).await;
    fast.subscribe(&["trade:binance:BTC-USDT"]).await;
    contiguous_trades(&mut fast, 300).await;
    wait_until("frames dropped for the slow bot", WAIT, || async {
        b.hybrid.metric("mdbridge_bot_frames_dropped_total").await >= 1.0
    })
    .await;
    assert_eq!(
        b.hybrid
            .metric(r#"mdbridge_bot_disconnects_total{reason="slow"}"#)
            .await,
        0.0
    );
    assert_eq!(b.hybrid.metric("mdbridge_bot_clients").await, 2.0);
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bot_requests_get_error_codes_and_the_connection_survives() {
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let mut executor = Proc::role("executor", &role_config(&redis.url(), h, b, ""), h, Some(b));
    executor.wait_healthy().await;
    let mut bot = Bot::connect(&executor.bots_url()).await;
    let cases: Vec<(&str, &str)> = vec![
        ("{not json", "bad_json"),
        (r#"{"op":"dance","req":1}"#, "unknown_op"),
        (r#"{"channels":["trade:binance:BTC-USDT"]}"#, "bad_request"),
        (
            r#"{"op":"subscribe","channels":"trade:binance:BTC-USDT"}"#,
            "bad_request",
        ),
        (
            r#"{"op":"subscribe","channels":["trade:nasdaq:BTC-USDT"],"req":2}"#,
            "bad_channel",
        ),
        (
            r#"{"op":"subscribe","channels":["trade:binance:btcusdt"]}"#,
            "bad_channel",
        ),
        (
            r#"{"op":"subscribe","channels":["trade:bin*:BTC-USDT"]}"#,
            "bad_channel",
        ),
        (
            r#"{"op":"unsubscribe","channels":["trade:binance:BTC-USDT"]}"#,
            "not_subscribed",
        ),
        ("[1,2,3]", "bad_request"),
    ];
    for (frame, code) in &cases {
        bot.send_text(frame).await;
        let reply = bot.next(WAIT).await.expect("reply");
        assert_eq!(reply["type"], "error", "{frame} -> {reply}");
        assert_eq!(reply["code"], *code, "{frame} -> {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    bot.send_text(r#"{"op":"subscribe","channels":["trade:nasdaq:BTC-USDT"],"req":2}"#)
        .await;
    assert_eq!(bot.next(WAIT).await.expect("reply")["req"], 2);
    bot.send(json!({"op":"ping","req":"abc"})).await;
    assert_eq!(
        bot.next(WAIT).await.expect("pong"),
        json!({"type":"pong","req":"abc"})
    );
    let reply = bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    assert_eq!(reply["channels"], json!(["trade:binance:BTC-USDT"]));
    assert!(executor.metric("mdbridge_bot_requests_refused_total").await >= cases.len() as f64);
    assert_eq!(executor.metric("mdbridge_bot_clients").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let SimHybrid {
        hybrid,
        redis: _redis,
        sim: _sim,
    } = sim_hybrid("400", &["BTC-USDT", "ETH-USDT"], &["trade"], "").await;
    let mut bot = Bot::connect(&hybrid.bots_url()).await;
    bot.subscribe(&["trade:binance:*"]).await;
    let mut symbols = HashSet::new();
    while symbols.len() < 2 {
        let (t, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
        symbols.insert(t["symbol"].as_str().unwrap_or_default().to_string());
    }
    bot.send(json!({"op":"unsubscribe","channels":["trade:binance:*"],"req":5}))
        .await;
    let (reply, _) = bot.until(WAIT, |v| v["type"] == "unsubscribed").await;
    assert_eq!(
        reply,
        json!({"type":"unsubscribed","channels":["trade:binance:*"],"req":5})
    );
    bot.subscribe(&["trade:binance:ETH-USDT"]).await;
    for _ in 0..50 {
        let (t, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
        assert_eq!(t["symbol"], "ETH-USDT");
    }
}
