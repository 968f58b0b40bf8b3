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
    let (_publisher, executor) = publisher_and_executor(&redis, &feed).await;
    wait_until("publisher subscribed to the exchange", WAIT, || async {
        exchange.subscribed_clients() > 0
    })
    .await;

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
    wait_until("the router holds only the steady bot's channel", WAIT, || async {
        executor.metric("mdbridge_router_channels").await == 1.0
    })
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
