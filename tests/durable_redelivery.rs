//! The stream consumer loses its connection after the router delivered entries but before
//! their acks reached Redis: it reads its pending entries again, hands them over again,
//! and the router drops them as redeliveries — the bot sees each entry once. Built from
//! the library (real redis-server, real bot server, real WebSocket bot) so the test can
//! hold the router's acks back.

mod common;

use std::time::Duration;

use common::*;
use mdbridge::bus::delivery::Acked;
use mdbridge::bus::redis::append::AppendScript;
use mdbridge::bus::redis::streams::{ConsumerLinks, ConsumerSetup};
use mdbridge::bus::redis::StreamConsumer;
use mdbridge::bus::{BusState, Interest};
use mdbridge::config::{BotsConfig, DurableConfig, RedisConfig};
use mdbridge::durable::{stream_key, StreamCap};
use mdbridge::envelope::BusMessage;
use mdbridge::event::{now_micros, Event, Exchange, Side, Trade};
use mdbridge::gateway::Gateway;
use mdbridge::health::HealthHandle;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const CHANNEL: &str = "trade:binance:BTC-USDT";

fn pending(redis: &RedisServer) -> u64 {
    let mut c = redis.conn();
    let summary: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(stream_key("md:", CHANNEL))
        .arg("g")
        .query(&mut c)
        .unwrap_or_default();
    match summary.first() {
        Some(redis::Value::Int(n)) => *n as u64,
        _ => 0,
    }
}

async fn acks(rx: &mut mpsc::Receiver<Acked>, n: usize) -> Vec<Acked> {
    let mut out = Vec::new();
    while out.len() < n {
        let a = tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("an ack in time")
            .expect("router alive");
        out.push(a);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_delivered_but_not_acked_are_not_delivered_again_after_a_reconnect() {
    let redis = RedisServer::start();
    let redis_config = RedisConfig {
        url: redis.url(),
        key_prefix: "md:".into(),
        reconnect_min_ms: 50,
        reconnect_max_ms: 200,
        probe_timeout_ms: 1_000,
        ..RedisConfig::default()
    };
    let durable = DurableConfig {
        channels: vec!["trade:*:*".into()],
        block_ms: 200,
        ..DurableConfig::default()
    };
    let (out, messages) = mpsc::channel(1_024);
    let (interest_tx, interest_rx) = watch::channel(Interest::default());
    let (router_acks, mut held) = mpsc::channel(1_024);
    let (to_consumer, consumer_acks) = mpsc::channel(1_024);
    let (notices, notice_rx) = mpsc::channel(64);
    let (bus_state, _) = watch::channel(BusState::Up);
    let shutdown = CancellationToken::new();
    let consumer = StreamConsumer::spawn(
        ConsumerSetup {
            redis: redis_config,
            durable,
            group: "g".into(),
            consumer: "c1".into(),
        },
        ConsumerLinks {
            interest: interest_rx,
            out,
            acks: consumer_acks,
            notices,
            health: HealthHandle::detached("streams"),
            bus_state,
        },
        shutdown.clone(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let gateway = Gateway::new(
        BotsConfig {
            listen: "127.0.0.1:0".into(),
            ..BotsConfig::default()
        },
        messages,
        interest_tx,
        None,
        HealthHandle::detached("bots"),
    )
    .with_durable(router_acks, notice_rx);
    let server = tokio::spawn(gateway.serve(listener, shutdown.clone()));

    let mut bot = Bot::connect(&url).await;
    bot.subscribe(&[CHANNEL]).await;
    let key = stream_key("md:", CHANNEL);
    wait_until("the group exists", WAIT, || async {
        let mut c = redis.conn();
        redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .query::<Vec<redis::Value>>(&mut c)
            .is_ok_and(|g| !g.is_empty())
    })
    .await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let script = AppendScript::new();
    let src = Uuid::new_v4();
    for seq in 1..=10u64 {
        let event = Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: Some(1),
            ts_recv: now_micros(),
            trade_id: seq.to_string(),
            price: "1.5".into(),
            size: "2".into(),
            side: Some(Side::Sell),
        });
        let msg = BusMessage::encode(src, seq, now_micros(), event);
        let (head, tail) = msg.id_split().unwrap();
        let cap = StreamCap {
            maxlen: 1_000,
            approximate: true,
        };
        script
            .append(&mut conn, &key, &format!("md:{CHANNEL}"), cap, &head, &tail)
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        let v = bot.next(WAIT).await.expect("a frame");
        assert_eq!(v["type"], "trade", "{v}");
        got.push(v["trade_id"].as_str().unwrap().to_string());
    }
    assert_eq!(got, (1..=10).map(|n| n.to_string()).collect::<Vec<_>>());
    // The router acked all ten; none reached Redis.
    let first = acks(&mut held, 10).await;
    assert_eq!(pending(&redis), 10);

    // The consumer's connection dies: it reconnects and reads its ten pending entries again.
    let mut c = redis.conn();
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut c)
        .unwrap();
    let again = acks(&mut held, 10).await;
    assert_eq!(
        again, first,
        "each redelivery dropped and acked by the router"
    );
    bot.send(json!({"op":"ping","req":"end"})).await;
    let (_, skipped) = bot.until(WAIT, |v| v["type"] == "pong").await;
    assert!(skipped.is_empty(), "delivered twice: {skipped:?}");

    for a in first.into_iter().chain(again) {
        to_consumer.send(a).await.unwrap();
    }
    wait_until("acks reached Redis", WAIT, || async {
        pending(&redis) == 0
    })
    .await;

    shutdown.cancel();
    let stop = async {
        let _ = consumer.await;
        let _ = server.await;
    };
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("consumer and bot server stop");
}
