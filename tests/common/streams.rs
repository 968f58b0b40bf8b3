//! Durable streams as the protocol has them, for the stream tests: entries appended with
//! the real append script from `BusMessage::encode(…).id_split()`, dead letters with the
//! fields of PROTOCOL §3, an executor config with `[durable]`, and JSON over HTTP.

use mdbridge::bus::redis::append::AppendScript;
use mdbridge::durable::StreamCap;
use mdbridge::envelope::BusMessage;
use mdbridge::event::{Event, Exchange, Side, Trade};
use redis::aio::MultiplexedConnection;
use serde_json::Value;

use super::{role_config, Proc, RedisServer};

pub const BTC: &str = "trade:binance:BTC-USDT";
pub const ETH: &str = "trade:binance:ETH-USDT";

pub fn key(channel: &str) -> String {
    format!("md:stream:{channel}")
}

pub fn dead(channel: &str) -> String {
    format!("md:stream:{channel}:dead")
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

pub async fn conn(redis: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Appends trade `seq` of publisher `src` to `channel`'s stream with the real append
/// script (which also publishes it); returns the entry id.
pub async fn append_one(
    conn: &mut MultiplexedConnection,
    channel: &str,
    src: uuid::Uuid,
    seq: u64,
) -> String {
    let symbol = channel.rsplit(':').next().expect("symbol");
    let event = Event::Trade(Trade {
        exchange: Exchange::Binance,
        symbol: symbol.into(),
        ts: Some(now_us()),
        ts_recv: now_us(),
        trade_id: seq.to_string(),
        price: "100.5".into(),
        size: "0.25".into(),
        side: Some(Side::Buy),
    });
    let (head, tail) = BusMessage::encode(src, seq, now_us(), event)
        .id_split()
        .expect("no id yet");
    let cap = StreamCap {
        maxlen: 1000,
        approximate: false,
    };
    AppendScript::new()
        .append(
            conn,
            &key(channel),
            &format!("md:{channel}"),
            cap,
            &head,
            &tail,
        )
        .await
        .expect("append")
}

/// Appends `n` trades to `channel`'s stream with the append script and registers it;
/// returns the entry ids.
pub async fn append(conn: &mut MultiplexedConnection, channel: &str, n: u64) -> Vec<String> {
    let src = uuid::Uuid::new_v4();
    let mut ids = Vec::new();
    for seq in 1..=n {
        ids.push(append_one(conn, channel, src, seq).await);
    }
    let _: u64 = redis::cmd("SADD")
        .arg("md:streams")
        .arg(channel)
        .query_async(conn)
        .await
        .expect("SADD");
    ids
}

pub async fn cmd<T: redis::FromRedisValue>(conn: &mut MultiplexedConnection, args: &[&str]) -> T {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

pub type Entries = Vec<(String, Vec<(String, String)>)>;

/// The envelope of stream entry `id`.
pub async fn envelope(conn: &mut MultiplexedConnection, channel: &str, id: &str) -> String {
    let entries: Entries = cmd(conn, &["XRANGE", &key(channel), id, id]).await;
    assert_eq!(entries.len(), 1, "entry {id}");
    assert_eq!(entries[0].1[0].0, "envelope");
    entries[0].1[0].1.clone()
}

/// A dead letter of entry `source_id`, with every PROTOCOL §3 field; returns its id.
pub async fn dead_letter(
    conn: &mut MultiplexedConnection,
    channel: &str,
    source_id: &str,
) -> String {
    let env = envelope(conn, channel, source_id).await;
    cmd(
        conn,
        &[
            "XADD",
            &dead(channel),
            "*",
            "envelope",
            &env,
            "error",
            "handler failed: boom",
            "group",
            "g1",
            "consumer",
            "c1",
            "source_id",
            source_id,
            "deliveries",
            "5",
            "failed_at",
            "1732300000000000",
        ],
    )
    .await
}

pub fn executor_config(redis: &RedisServer, h: u16, b: u16, durable: &str) -> String {
    role_config(
        &redis.url(),
        h,
        b,
        &format!("[durable]\nchannels = [\"trade:*:*\"]\nmonitor_interval_ms = 100\n{durable}"),
    )
}

pub async fn get(p: &Proc, path: &str) -> (u16, Value) {
    let r = reqwest::get(p.http_url(path)).await.expect("GET");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

pub async fn post(p: &Proc, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(p.http_url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("POST");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, v)
}

pub async fn metrics(p: &Proc) -> String {
    reqwest::get(p.http_url("/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body")
}
