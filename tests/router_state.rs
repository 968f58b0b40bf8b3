//! Bounded router state on a real executor: a bot that subscribes and unsubscribes
//! thousands of new names leaves nothing behind, and a bot beside it gets every one of its
//! events, exactly once. Real processes (scripted Binance → publisher → private
//! redis-server → executor), real bot sockets.

mod common;

use common::exchange::ScriptedExchange;
use common::*;
use serde_json::json;

fn trade_frame(id: u64) -> String {
    format!(
        r#"{{"stream":"bnbbtc@trade","data":{{"e":"trade","E":1672515782136,"s":"BNBBTC","t":{id},"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churning_bot_leaves_no_router_state_and_a_bot_beside_it_gets_every_event() {
    let redis = RedisServer::start();
    let exchange = ScriptedExchange::start().await;
    let feed = sim_feed(exchange.port(), "binance", &["BNB-BTC"], &["trade"]);
    let (ph, pb, eh, eb) = (free_port(), free_port(), free_port(), free_port());
    let mut _publisher = Proc::role(
        "publisher",
        &role_config(&redis.url(), ph, pb, &feed),
        ph,
        None,
    );
    // The churn is the point here, not the request limit (tests/gateway_limits.rs has
    // that): lift it for this executor.
    let mut executor = Proc::role(
        "executor",
        &role_config(
            &redis.url(),
            eh,
            eb,
            "max_requests_per_sec = 1000000.0\nrequest_burst = 1000000",
        ),
        eh,
        Some(eb),
    );
    _publisher.wait_healthy().await;
    executor.wait_healthy().await;
    wait_until("publisher subscribed to the exchange", WAIT, || async {
        exchange.subscribed_clients() > 0
    })
    .await;

    // The series exists from start, at zero.
    let text = reqwest::get(executor.http_url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        text.lines().any(|l| l == "mdbridge_router_channels 0"),
        "mdbridge_router_channels from start"
    );
    let mut steady = Bot::connect(&executor.bots_url()).await;
    steady.subscribe(&["trade:binance:BNB-BTC"]).await;
    wait_until("the executor subscribed in Redis", WAIT, || async {
        let mut c = redis.conn();
        let v: Vec<(String, u64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("md:trade:binance:BNB-BTC")
            .query(&mut c)
            .unwrap_or_default();
        v.first().map(|x| x.1).unwrap_or(0) >= 1
    })
    .await;
    assert_eq!(executor.metric("mdbridge_router_channels").await, 1.0);

    let mut churn = Bot::connect(&executor.bots_url()).await;
    let rounds = 40u64;
    let per_round = 100u64;
    let mut sent = 0u64;
    for round in 0..rounds {
        // New names every round: books (store reads), tickers, candles, other exchanges.
        let names: Vec<String> = (0..per_round)
            .map(|i| {
                let n = round * per_round + i;
                match n % 4 {
                    0 => format!("book:binance:C{n}-USDT"),
                    1 => format!("ticker:binance:C{n}-USDT"),
                    2 => format!("candle:okx:C{n}-USDT:1m"),
                    _ => format!("trade:*:C{n}-USDT"),
                }
            })
            .collect();
        churn
            .send(json!({"op":"subscribe","channels":names,"req":round}))
            .await;
        churn.until(WAIT, |v| v["type"] == "subscribed").await;
        for _ in 0..5 {
            sent += 1;
            exchange.send(&trade_frame(sent));
        }
        churn
            .send(json!({"op":"unsubscribe","channels":names,"req":round}))
            .await;
        churn.until(WAIT, |v| v["type"] == "unsubscribed").await;
    }
    // Nothing of the churn is held: only the steady bot's channel.
    wait_until(
        "the router holds only the steady bot's channel",
        WAIT,
        || async { executor.metric("mdbridge_router_channels").await == 1.0 },
    )
    .await;
    assert_eq!(executor.metric("mdbridge_bot_subscriptions").await, 1.0);

    // The steady bot got every trade, in order, once; and nothing else follows.
    for id in 1..=sent {
        let (t, skipped) = steady.until(WAIT, |v| v["type"] == "trade").await;
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(t["trade_id"], id.to_string(), "{t}");
    }
    steady.send(json!({"op":"ping","req":"end"})).await;
    assert_eq!(
        steady.next(WAIT).await.expect("pong"),
        json!({"type":"pong","req":"end"})
    );

    // A disconnect is forgotten too.
    churn
        .send(json!({"op":"subscribe","channels":["book:*:*","ticker:binance:Z-USDT"]}))
        .await;
    churn.until(WAIT, |v| v["type"] == "subscribed").await;
    drop(churn);
    wait_until("the churning bot's state is gone", WAIT, || async {
        executor.metric("mdbridge_router_channels").await == 1.0
            && executor.metric("mdbridge_bot_clients").await == 1.0
    })
    .await;
}

/// `VmRSS` of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Figures, not a test (run by hand; asserts nothing about time):
/// `cargo test --test router_state -- --ignored --nocapture churn_figures`.
/// One bot subscribes and unsubscribes 100 000 new names (100 per request) while another
/// pings; prints the executor's RSS before/after and the pinging bot's round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn churn_figures() {
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let mut executor = Proc::role(
        "executor",
        &role_config(
            &redis.url(),
            h,
            b,
            "max_requests_per_sec = 1000000.0\nrequest_burst = 1000000",
        ),
        h,
        Some(b),
    );
    executor.wait_healthy().await;
    let pid = executor.child.id();
    let mut steady = Bot::connect(&executor.bots_url()).await;
    steady.subscribe(&["trade:binance:BNB-BTC"]).await;
    let rss_before = rss_kib(pid);
    let url = executor.bots_url();
    let churner = tokio::spawn(async move {
        let mut churn = Bot::connect(&url).await;
        for round in 0..1_000u64 {
            let names: Vec<String> = (0..100u64)
                .map(|i| {
                    let n = round * 100 + i;
                    match n % 4 {
                        0 => format!("book:binance:C{n}-USDT"),
                        1 => format!("ticker:binance:C{n}-USDT"),
                        2 => format!("candle:okx:C{n}-USDT:1m"),
                        _ => format!("trade:*:C{n}-USDT"),
                    }
                })
                .collect();
            churn.send(json!({"op":"subscribe","channels":names})).await;
            churn.until(WAIT, |v| v["type"] == "subscribed").await;
            churn
                .send(json!({"op":"unsubscribe","channels":names}))
                .await;
            churn.until(WAIT, |v| v["type"] == "unsubscribed").await;
        }
        churn
    });
    let mut rtts = Vec::new();
    while !churner.is_finished() {
        let t = std::time::Instant::now();
        steady.send(json!({"op":"ping"})).await;
        steady.until(WAIT, |v| v["type"] == "pong").await;
        rtts.push(t.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let _churn = churner.await.expect("churn");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid);
    rtts.sort();
    let pct = |p: f64| rtts[((rtts.len() as f64 - 1.0) * p) as usize];
    println!(
        "churn 100000 names: executor RSS {rss_before} KiB -> {rss_after} KiB; router_channels {}; steady bot ping n={} p50={:?} p99={:?} max={:?}",
        executor.metric("mdbridge_router_channels").await,
        rtts.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
