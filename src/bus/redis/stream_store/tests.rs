//! The stream reads against a real private `redis-server`, with entries written by the
//! real append script: bounds (incl. what trimming deleted), pages, the walk back, the
//! newest entry, and refused entries skipped.

use ::redis::aio::MultiplexedConnection;
use uuid::Uuid;

use crate::bus::redis::append::{parse_id, AppendScript};
use crate::bus::redis::{channel_key, RedisStore};
use crate::bus::redis_test_server::RedisTestServer;
use crate::bus::StreamStore;
use crate::config::RedisConfig;
use crate::durable::{stream_key, StreamCap, StreamId};
use crate::envelope::BusMessage;
use crate::event::{Channel, Event, Exchange, Side, Trade};

pub(crate) const PREFIX: &str = "md:";

pub(crate) fn config(url: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_string(),
        key_prefix: PREFIX.to_string(),
        ..RedisConfig::default()
    }
}

pub(crate) async fn admin(url: &str) -> MultiplexedConnection {
    ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A trade on `symbol` whose `trade_id` is `n`.
pub(crate) fn trade(symbol: &str, n: u64) -> BusMessage {
    BusMessage::encode(
        Uuid::nil(),
        n,
        1,
        Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: symbol.into(),
            ts: None,
            ts_recv: 1,
            trade_id: n.to_string(),
            price: "1".into(),
            size: "1".into(),
            side: Some(Side::Buy),
        }),
    )
}

/// Appends `msg` with the real append script (exact cap `maxlen`); returns the message as
/// the stream holds it (with its id), as the stream consumer would deliver it.
pub(crate) async fn append(
    conn: &mut MultiplexedConnection,
    msg: &BusMessage,
    maxlen: u64,
) -> BusMessage {
    let (head, tail) = msg.id_split().unwrap();
    let id = AppendScript::new()
        .append(
            conn,
            &stream_key(PREFIX, msg.channel.as_str()),
            &channel_key(PREFIX, &msg.channel),
            StreamCap {
                maxlen,
                approximate: false,
            },
            &head,
            &tail,
        )
        .await
        .unwrap();
    msg.with_id(parse_id(&id).unwrap())
}

fn trade_ids(msgs: &[BusMessage]) -> Vec<String> {
    msgs.iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.event_json()).unwrap();
            v["trade_id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test]
async fn reads_bounds_pages_walks_back_and_skips_bad_entries() {
    let server = RedisTestServer::start();
    let url = server.url();
    let mut conn = admin(&url).await;
    let store = RedisStore::connect(&config(&url)).await.unwrap();
    let channel = Channel::parse("trade:binance:BTC-USDT").unwrap();

    assert_eq!(store.bounds(&channel).await.unwrap(), None, "no stream yet");
    assert!(store.newest(&channel).await.unwrap().is_none());

    let mut held = Vec::new();
    for n in 1..=6 {
        held.push(append(&mut conn, &trade("BTC-USDT", n), 5).await);
    }
    let ids: Vec<StreamId> = held.iter().map(|m| m.id.unwrap()).collect();
    let b = store.bounds(&channel).await.unwrap().unwrap();
    assert_eq!(b.len, 5);
    assert_eq!(b.first, Some(ids[1]), "the exact cap trimmed trade 1");
    assert_eq!(b.last, ids[5]);
    assert_eq!(
        b.max_deleted,
        Some(StreamId::MIN),
        "trimming does not move it"
    );
    assert_eq!(b.added, Some(6));

    let page = store.range(&channel, ids[2], 2).await.unwrap();
    assert_eq!(trade_ids(&page.messages), ["3", "4"]);
    assert_eq!((page.read, page.last, page.skipped), (2, Some(ids[3]), 0));
    assert!(page.largest > held[2].envelope.len());
    assert_eq!(page.messages[0].id, Some(ids[2]));
    assert_eq!(
        page.messages[0].envelope, held[2].envelope,
        "the exact bytes"
    );
    let page = store.range(&channel, ids[4], 10).await.unwrap();
    assert_eq!(trade_ids(&page.messages), ["5", "6"]);
    assert_eq!(page.read, 2);

    assert_eq!(
        store.count_back(&channel, ids[1], 100).await.unwrap(),
        (4, Some(ids[2]))
    );
    assert_eq!(
        store.count_back(&channel, StreamId::MIN, 3).await.unwrap(),
        (3, Some(ids[3]))
    );

    let newest = store.newest(&channel).await.unwrap().unwrap();
    assert_eq!((newest.id, newest.seq), (Some(ids[5]), 6));
    let _: u64 = ::redis::cmd("XDEL")
        .arg(stream_key(PREFIX, channel.as_str()))
        .arg(ids[3].to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let b = store.bounds(&channel).await.unwrap().unwrap();
    assert_eq!((b.len, b.max_deleted), (4, Some(ids[3])));

    // Garbage and an envelope claiming another entry's id: skipped, counted, not fatal.
    let key = stream_key(PREFIX, channel.as_str());
    let _: String = ::redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("envelope")
        .arg("not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: String = ::redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("envelope")
        .arg(held[5].envelope.as_ref())
        .query_async(&mut conn)
        .await
        .unwrap();
    let last = append(&mut conn, &trade("BTC-USDT", 7), 100).await;
    let page = store
        .range(&channel, ids[5].next().unwrap(), 10)
        .await
        .unwrap();
    assert_eq!(trade_ids(&page.messages), ["7"]);
    assert_eq!((page.read, page.skipped, page.last), (3, 2, last.id));
}
