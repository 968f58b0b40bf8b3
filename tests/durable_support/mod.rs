//! Helpers of the durable-channel tests (`durable_consume.rs`, `durable_failures.rs`):
//! an executor with durable trades, an appender that writes entries exactly as the
//! publisher does (the append script with `BusMessage::id_split()` halves; it also
//! PUBLISHes the same bytes), and bot-side reads.

#![allow(dead_code)]

use std::process::Command;
use std::time::Duration;

use crate::common::*;
use mdbridge::bus::redis::append::{parse_id, AppendScript};
use mdbridge::durable::{stream_key, StreamCap, StreamId};
use mdbridge::envelope::BusMessage;
use mdbridge::event::{now_micros, Event, Exchange, Side, Trade};
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use uuid::Uuid;

pub const CHANNEL: &str = "trade:binance:BTC-USDT";

/// An executor named `name` in consumer group `group` (None: its name), durable trades.
pub fn executor(redis: &RedisServer, name: &str, group: Option<&str>, durable: &str) -> Proc {
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
pub struct Appender {
    pub conn: MultiplexedConnection,
    pub script: AppendScript,
    pub src: Uuid,
    pub seq: u64,
    pub cap: StreamCap,
}

impl Appender {
    pub async fn new(redis: &RedisServer, maxlen: u64) -> Appender {
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
    pub async fn append_on(&mut self, symbol: &str) -> StreamId {
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

    pub async fn append(&mut self) -> StreamId {
        self.append_on("BTC-USDT").await
    }
}

pub fn key() -> String {
    stream_key("md:", CHANNEL)
}

/// Waits until the consumer group `group` exists on `key` (the executor created it).
pub async fn wait_group(redis: &RedisServer, key: &str, group: &str) {
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
pub fn pending(redis: &RedisServer, key: &str, group: &str) -> u64 {
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
pub async fn trades(bot: &mut Bot, n: usize) -> (Vec<Value>, Vec<Value>) {
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
pub async fn nothing_more(bot: &mut Bot) {
    bot.send(json!({"op":"ping","req":"end"})).await;
    let (_, skipped) = bot.until(WAIT, |v| v["type"] == "pong").await;
    assert!(skipped.is_empty(), "unexpected frames: {skipped:?}");
}

pub fn trade_ids(events: &[Value]) -> Vec<u64> {
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

pub fn ids(events: &[Value]) -> Vec<StreamId> {
    events
        .iter()
        .map(|e| e["id"].as_str().and_then(|t| t.parse().ok()).expect("id"))
        .collect()
}

pub fn collect(
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

pub fn signal(proc: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &proc.child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}
