//! Bot recovery with `since`, end to end: a real executor process, a private
//! redis-server whose stream entries are written by the real append script (which also
//! publishes them), and real WebSocket bots. Checks exact events, ids, order and counts.

mod common;

use common::*;
use mdbridge::bus::redis::append::parse_id;
use mdbridge::durable::StreamId;
use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use uuid::Uuid;

const BTC: &str = "trade:binance:BTC-USDT";
const KEY: &str = "md:stream:trade:binance:BTC-USDT";

/// Appends trade `n` (envelope seq `n`) with the real script; returns its stream id.
async fn append(conn: &mut MultiplexedConnection, src: Uuid, n: u64) -> StreamId {
    parse_id(&common::streams::append_one(conn, BTC, src, n).await).expect("an id")
}

/// Frames until `recovered`; returns (trade ids with their stream ids, the recovered frame,
/// anything else seen before it).
async fn until_recovered(bot: &mut Bot) -> (Vec<(u64, StreamId)>, Value, Vec<Value>) {
    let mut trades = Vec::new();
    let mut other = Vec::new();
    loop {
        let v = bot.next(WAIT).await.expect("a frame");
        match v["type"].as_str() {
            Some("trade") => trades.push(trade_of(&v)),
            Some("recovered") => return (trades, v, other),
            _ => other.push(v),
        }
    }
}

fn trade_of(v: &Value) -> (u64, StreamId) {
    let n = v["trade_id"].as_str().and_then(|t| t.parse().ok());
    let id = v["id"].as_str().and_then(|t| t.parse().ok());
    (
        n.expect("trade_id"),
        id.expect("every durable event carries its id"),
    )
}

async fn next_trade(bot: &mut Bot) -> (u64, StreamId) {
    let v = bot.next(WAIT).await.expect("a frame");
    assert_eq!(v["type"], "trade", "{v}");
    trade_of(&v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_replays_then_continues_live_exactly_and_reports_truncation() {
    let redis = RedisServer::start();
    let (http, bots) = (free_port(), free_port());
    let extra = "[durable]\nchannels = [\"trade:*:*\"]\nmax_replay = 1000\n";
    let mut executor = Proc::role(
        "executor",
        &role_config(&redis.url(), http, bots, extra),
        http,
        Some(bots),
    );
    executor.wait_healthy().await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let src = Uuid::new_v4();
    let mut ids = vec![StreamId::MIN]; // ids[n]: trade n
    for n in 1..=5 {
        ids.push(append(&mut conn, src, n).await);
    }

    // Since trade 2: 3, 4, 5 from the stream, then recovered.
    let mut a = Bot::connect(&executor.bots_url()).await;
    a.send(json!({"op":"subscribe","channels":[BTC],"since":{BTC: ids[2].to_string()},"req":1}))
        .await;
    let (trades, recovered, other) = until_recovered(&mut a).await;
    assert_eq!(
        other,
        vec![json!({"type":"subscribed","channels":[BTC],"req":1})]
    );
    assert_eq!(trades, vec![(3, ids[3]), (4, ids[4]), (5, ids[5])]);
    assert_eq!(
        recovered,
        json!({"type":"recovered","channel":BTC,"count":3})
    );

    // Live from here: wait until the executor's consumer group reads the stream (durable
    // channels come from the stream, not from pub/sub).
    wait_until("the executor's consumer group exists", WAIT, || async {
        let mut c = redis.conn();
        redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(KEY)
            .query::<Vec<redis::Value>>(&mut c)
            .map(|groups| !groups.is_empty())
            .unwrap_or(false)
    })
    .await;
    ids.push(append(&mut conn, src, 6).await);
    assert_eq!(next_trade(&mut a).await, (6, ids[6]));

    // A second bot asks for history while entries keep coming: every trade after 3
    // exactly once, in id order, across the switch.
    let writer = {
        let mut conn = conn.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for n in 7..=300 {
                out.push(append(&mut conn, src, n).await);
                if n % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            out
        })
    };
    let mut b = Bot::connect(&executor.bots_url()).await;
    b.send(json!({"op":"subscribe","channels":[BTC],"since":{BTC: ids[3].to_string()},"req":2}))
        .await;
    let (mut got, recovered, _) = until_recovered(&mut b).await;
    let count = recovered["count"].as_u64().expect("count");
    assert_eq!(
        count,
        got.len() as u64,
        "recovered counts what came before it"
    );
    while got.last().map(|t| t.0) != Some(300) {
        got.push(next_trade(&mut b).await);
    }
    ids.extend(writer.await.unwrap());
    let want: Vec<(u64, StreamId)> = (4..=300).map(|n| (n, ids[n as usize])).collect();
    assert_eq!(got, want, "no gap, no duplicate, each with its own id");
    // The first bot got every live one once.
    let mut live = Vec::new();
    while live.last().map(|t: &(u64, StreamId)| t.0) != Some(300) {
        live.push(next_trade(&mut a).await);
    }
    let want: Vec<(u64, StreamId)> = (7..=300).map(|n| (n, ids[n as usize])).collect();
    assert_eq!(live, want);

    // Trimmed: a since older than what is held is reported, then what is held follows.
    let _: u64 = redis::cmd("XTRIM")
        .arg(KEY)
        .arg("MAXLEN")
        .arg("=")
        .arg(10)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut c = Bot::connect(&executor.bots_url()).await;
    c.send(json!({"op":"subscribe","channels":[BTC],"since":{BTC: ids[3].to_string()},"req":"c"}))
        .await;
    let (trades, recovered, other) = until_recovered(&mut c).await;
    assert_eq!(other.len(), 2, "{other:?}");
    assert_eq!(other[0]["type"], "subscribed");
    assert_eq!(
        (
            &other[1]["type"],
            &other[1]["code"],
            &other[1]["channel"],
            &other[1]["req"]
        ),
        (
            &json!("error"),
            &json!("history_truncated"),
            &json!(BTC),
            &json!("c")
        )
    );
    let want: Vec<(u64, StreamId)> = (291..=300).map(|n| (n, ids[n as usize])).collect();
    assert_eq!(trades, want);
    assert_eq!(recovered["count"], 10);

    // A bad id and a channel that is not durable refuse the whole request.
    for (req, since) in [
        (3, json!({BTC: "yesterday"})),
        (4, json!({"ticker:binance:BTC-USDT": "1-0"})),
    ] {
        let channels = json!([BTC, "ticker:binance:BTC-USDT"]);
        let mut d = Bot::connect(&executor.bots_url()).await;
        d.send(json!({"op":"subscribe","channels":channels,"since":since,"req":req}))
            .await;
        let v = d.next(WAIT).await.expect("a reply");
        assert_eq!(
            (&v["code"], &v["req"]),
            (&json!("bad_request"), &json!(req)),
            "{v}"
        );
    }

    assert_eq!(
        executor
            .metric("mdbridge_stream_replays_total{outcome=\"recovered\"}")
            .await,
        2.0
    );
    assert_eq!(
        executor
            .metric("mdbridge_stream_replays_total{outcome=\"truncated\"}")
            .await,
        1.0
    );
}
