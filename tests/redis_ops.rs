//! Redis in trouble and Redis under many bots, through real processes and a real
//! redis-server: an error reply is not a dead connection (OOM, READONLY), and bots'
//! wildcards cost Redis a bounded number of patterns.

mod common;

use common::exchange::ScriptedExchange;
use common::*;
use mdbridge::envelope::BusMessage;
use mdbridge::event::{now_micros, Event, Exchange, Trade};
use serde_json::json;

/// A 24hrTicker frame for BNBBTC whose last price is `last`.
fn ticker(last: &str) -> String {
    format!(
        r#"{{"stream":"bnbbtc@ticker","data":{{"e":"24hrTicker","E":1672515782136,"s":"BNBBTC","p":"0.0015","P":"250.00","w":"0.0018","x":"0.0009","c":"{last}","Q":"10","b":"0.0024","B":"10","a":"0.0026","A":"100","o":"0.0010","h":"0.0025","l":"0.0010","v":"10000","q":"18","O":0,"C":86400000,"F":0,"L":18150,"n":18151}}}}"#
    )
}

const LAST_KEY: &str = "md:last:ticker:binance:BNB-BTC";
const RECONNECTS: &str = r#"mdbridge_redis_reconnects_total{role="publish"}"#;

fn last_value(redis: &RedisServer) -> String {
    let mut c = redis.conn();
    redis::cmd("GET")
        .arg(LAST_KEY)
        .query::<Option<String>>(&mut c)
        .ok()
        .flatten()
        .unwrap_or_default()
}

fn config_set(redis: &RedisServer, key: &str, value: &str) {
    let mut c = redis.conn();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query(&mut c)
        .expect("CONFIG SET");
}

/// A scripted exchange and a healthy publisher reading its BNB-BTC ticker into `redis`.
async fn ticker_publisher(redis: &RedisServer) -> (ScriptedExchange, Proc) {
    let exchange = ScriptedExchange::start().await;
    let feed = sim_feed(exchange.port(), "binance", &["BNB-BTC"], &["ticker"]);
    let (h, b) = (free_port(), free_port());
    let mut publisher = Proc::role(
        "publisher",
        &role_config(&redis.url(), h, b, &feed),
        h,
        None,
    );
    publisher.wait_healthy().await;
    wait_until("publisher subscribed to the exchange", WAIT, || async {
        exchange.subscribed_clients() > 0
    })
    .await;
    exchange.send(&ticker("0.0025"));
    wait_until("first ticker stored", WAIT, || async {
        last_value(redis).contains("0.0025")
    })
    .await;
    (exchange, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_drops_without_reconnecting_and_resumes() {
    let redis = RedisServer::start();
    let (exchange, mut publisher) = ticker_publisher(&redis).await;

    config_set(&redis, "maxmemory-policy", "noeviction");
    config_set(&redis, "maxmemory", "1");
    // Each ticker's SET is refused with OOM; the connection is fine and is kept.
    for (i, last) in ["0.0030", "0.0031", "0.0032"].iter().enumerate() {
        exchange.send(&ticker(last));
        wait_until("the OOM reply counted", WAIT, || async {
            publisher
                .metric(r#"mdbridge_redis_error_replies_total{role="publish",reason="redis_oom"}"#)
                .await
                >= (i + 1) as f64
        })
        .await;
    }
    assert!(
        publisher
            .metric(r#"mdbridge_envelopes_publish_failed_total{reason="redis_oom"}"#)
            .await
            >= 3.0
    );
    assert_eq!(
        publisher.metric(RECONNECTS).await,
        0.0,
        "no reconnect on OOM"
    );
    assert!(last_value(&redis).contains("0.0025"), "nothing was written");
    publisher.wait_healthy().await;

    // Memory is back: the next ticker is written, on the same connection.
    config_set(&redis, "maxmemory", "0");
    exchange.send(&ticker("0.0040"));
    wait_until("writes resume", WAIT, || async {
        last_value(&redis).contains("0.0040")
    })
    .await;
    assert_eq!(publisher.metric(RECONNECTS).await, 0.0);
    let log = publisher.log();
    assert!(log.contains("OOM"), "the reason is logged: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_replica_makes_the_publisher_reconnect() {
    let master = RedisServer::start();
    let redis = RedisServer::start();
    let (exchange, mut publisher) = ticker_publisher(&redis).await;

    // A failover turned our server into a replica: writes fail with READONLY.
    {
        let mut c = redis.conn();
        let _: () = redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(master.port)
            .query(&mut c)
            .expect("REPLICAOF");
    }
    let mut n = 0;
    wait_until("READONLY classified and reconnected", WAIT, || {
        n += 1;
        exchange.send(&ticker(&format!("0.{:04}", 3000 + n)));
        let publisher = &publisher;
        async move {
            publisher
                .metric(r#"mdbridge_envelopes_publish_failed_total{reason="redis_readonly"}"#)
                .await
                >= 1.0
                && publisher.metric(RECONNECTS).await >= 1.0
        }
    })
    .await;

    // The server is promoted back: publishing resumes.
    {
        let mut c = redis.conn();
        let _: () = redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query(&mut c)
            .expect("REPLICAOF NO ONE");
    }
    wait_until("writes resume", WAIT, || {
        exchange.send(&ticker("0.0040"));
        async { last_value(&redis).contains("0.0040") }
    })
    .await;
    publisher.wait_healthy().await;
}

fn trade_on(symbol: &str, id: u64) -> Event {
    Event::Trade(Trade {
        exchange: if symbol.starts_with('M') {
            Exchange::Kraken
        } else {
            Exchange::Binance
        },
        symbol: symbol.into(),
        ts: Some(id),
        ts_recv: now_micros(),
        trade_id: id.to_string(),
        price: "1.5".into(),
        size: "2".into(),
        side: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_bots_many_wildcards_cost_redis_a_bounded_number_of_patterns() {
    const BOTS: usize = 20;
    const PATTERNS: usize = 1000;
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let mut executor = Proc::role("executor", &role_config(&redis.url(), h, b, ""), h, Some(b));
    executor.wait_healthy().await;

    // Every bot: 999 wildcards of its own, plus one shared marker pattern.
    let started = std::time::Instant::now();
    let mut bots = Vec::new();
    for bot in 0..BOTS {
        let mut patterns: Vec<String> = (0..PATTERNS - 1)
            .map(|i| format!("trade:*:B{bot}X{i}-USDT"))
            .collect();
        patterns.push("trade:kraken:*".into());
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let mut ws = Bot::connect(&executor.bots_url()).await;
        ws.subscribe(&refs).await;
        bots.push(ws);
    }
    let numpat = || {
        let mut c = redis.conn();
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<u64>(&mut c)
            .unwrap_or(0)
    };
    wait_until("the executor pattern-subscribed", WAIT, || async {
        numpat() >= 1
    })
    .await;
    // A figure for the report, not an assertion.
    eprintln!(
        "{BOTS} bots x {PATTERNS} patterns subscribed in {:?}; Redis holds {} pattern(s)",
        started.elapsed(),
        numpat()
    );
    let max_patterns = 64;
    assert!(
        numpat() <= max_patterns,
        "{} patterns in Redis for {} bot wildcards",
        numpat(),
        BOTS * PATTERNS
    );

    // Each bot still gets exactly its own events: bot 3's and bot 5's trades, a trade
    // nobody asked for, then the marker every bot holds.
    let src = uuid::Uuid::new_v4();
    let mut c = redis.conn();
    for (seq, symbol) in ["B3X7-USDT", "B5X998-USDT", "B99X0-USDT", "M-USDT"]
        .iter()
        .enumerate()
    {
        let event = trade_on(symbol, seq as u64 + 1);
        let channel = format!("md:{}", event.channel());
        let msg = BusMessage::encode(src, 1, now_micros(), event);
        let _: i64 = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(&msg.envelope[..])
            .query(&mut c)
            .expect("PUBLISH");
    }
    for (n, bot) in bots.iter_mut().enumerate() {
        let (marker, before) = bot
            .until(WAIT, |v| v["type"] == "trade" && v["symbol"] == "M-USDT")
            .await;
        assert_eq!(marker["exchange"], "kraken");
        let symbols: Vec<String> = before
            .iter()
            .filter(|v| v["type"] == "trade")
            .map(|v| v["symbol"].as_str().unwrap_or_default().to_string())
            .collect();
        let expected: Vec<String> = match n {
            3 => vec!["B3X7-USDT".into()],
            5 => vec!["B5X998-USDT".into()],
            _ => vec![],
        };
        assert_eq!(symbols, expected, "bot {n} got {before:?}");
    }
    // Nothing else is on its way: one request round trip per bot.
    for bot in bots.iter_mut() {
        bot.send(json!({"op":"ping","req":1})).await;
        let (pong, skipped) = bot.until(WAIT, |v| v["type"] == "pong").await;
        assert_eq!(pong["req"], 1);
        assert!(skipped.is_empty(), "{skipped:?}");
    }
}
