//! Tests of [`super`]: reply parsing (RESP2 and RESP3 shapes), and against a real
//! redis-server the registry pages and a requeue that leaves bad dead letters in place.

use super::*;
use crate::bus::redis_test_server::RedisTestServer;
use crate::event::{Event, Exchange, Side, Trade};
use uuid::Uuid;

fn bulk(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

#[test]
fn xinfo_replies_parse_as_flat_arrays_and_as_maps() {
    let resp2 = Value::Array(vec![
        bulk("name"),
        bulk("g1"),
        bulk("consumers"),
        Value::Int(2),
        bulk("pending"),
        Value::Int(7),
        bulk("last-delivered-id"),
        bulk("5-0"),
        bulk("entries-read"),
        Value::Nil,
        bulk("lag"),
        Value::Nil,
    ]);
    let g = group_info(pairs(resp2));
    assert_eq!(
        (g.name.as_str(), g.consumer_count, g.pending, g.lag),
        ("g1", 2, 7, None)
    );
    assert_eq!(g.last_delivered_id.as_deref(), Some("5-0"));
    let resp3 = Value::Map(vec![
        (bulk("name"), bulk("c1")),
        (bulk("pending"), Value::Int(3)),
        (bulk("idle"), Value::Int(1500)),
        (bulk("inactive"), Value::Int(-1)),
    ]);
    let c = consumer_info(pairs(resp3));
    assert_eq!(
        (c.name.as_str(), c.pending, c.idle_ms, c.inactive_ms),
        ("c1", 3, 1500, Some(-1))
    );
    let entry = Value::Array(vec![bulk("9-1"), Value::Array(vec![bulk("envelope")])]);
    assert_eq!(entry_id(&entry).as_deref(), Some("9-1"));
    assert_eq!(entry_id(&Value::Nil), None);
}

async fn conn(server: &RedisTestServer) -> MultiplexedConnection {
    ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test]
async fn registry_pages_cover_every_stream_once_and_skip_foreign_members() {
    let server = RedisTestServer::start();
    let mut c = conn(&server).await;
    let mut all: Vec<String> = (0..300)
        .map(|i| format!("trade:binance:S{i:03}-USDT"))
        .collect();
    for name in &all {
        let _: u64 = ::redis::cmd("SADD")
            .arg("md:streams")
            .arg(name)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: u64 = ::redis::cmd("SADD")
        .arg("md:streams")
        .arg("not a channel")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut cursor = 0;
    for _ in 0..1000 {
        let page = list(&mut c, "md:", cursor, 50).await.unwrap();
        assert_eq!(page.total, 301);
        assert!(page.streams.len() <= MAX_PAGE * MAX_SCANS, "bounded");
        for s in &page.streams {
            // Registered, but no stream was ever written there.
            assert_eq!((s.length, s.dead_letters), (None, Some(0)));
        }
        seen.extend(page.streams.into_iter().map(|s| s.channel));
        match page.next_cursor {
            Some(next) => cursor = next.parse().unwrap(),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    all.sort();
    assert_eq!(seen, all);
}

#[tokio::test]
async fn requeue_all_moves_envelopes_and_leaves_what_is_not_an_envelope_of_the_channel() {
    let server = RedisTestServer::start();
    let mut c = conn(&server).await;
    let channel = Channel::parse("trade:binance:BTC-USDT").unwrap();
    let trade = BusMessage::encode(
        Uuid::new_v4(),
        1,
        crate::event::now_micros(),
        Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv: crate::event::now_micros(),
            trade_id: "1".into(),
            price: "1.5".into(),
            size: "2".into(),
            side: Some(Side::Sell),
        }),
    );
    // One with an old id (as the executor writes it), one without any, two bad ones.
    let with_id = trade.with_id(StreamId::new(5, 0));
    let dead = "md:stream:trade:binance:BTC-USDT:dead";
    let bodies: [&[u8]; 4] = [
        &with_id.envelope,
        &trade.envelope,
        b"{\"not\":\"an envelope\"}",
        &trade.envelope[..20],
    ];
    for body in bodies {
        let _: String = ::redis::cmd("XADD")
            .arg(dead)
            .arg("*")
            .arg("envelope")
            .arg(body)
            .arg("error")
            .arg("x")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: String = ::redis::cmd("XADD")
        .arg(dead)
        .arg("*")
        .arg("error")
        .arg("no envelope")
        .query_async(&mut c)
        .await
        .unwrap();
    let cap = StreamCap {
        maxlen: 100,
        approximate: false,
    };
    let script = AppendScript::new();
    let report = requeue(&mut c, &script, "md:", &channel, cap, Which::All)
        .await
        .unwrap();
    assert_eq!(report.requeued.len(), 2, "{report:?}");
    assert_eq!(report.failed.len(), 3, "{report:?}");
    assert_eq!(report.remaining, 3);
    let entries: Entries = ::redis::cmd("XRANGE")
        .arg("md:stream:trade:binance:BTC-USDT")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(entries.len(), 2);
    for ((id, fields), r) in entries.iter().zip(&report.requeued) {
        assert_eq!(id, &r.new_id);
        let message =
            BusMessage::decode(channel.clone(), Bytes::from(fields[0].1.clone())).unwrap();
        assert_eq!(
            message.id.map(|i| i.to_string()).as_deref(),
            Some(id.as_str())
        );
        let new_id: StreamId = id.parse().unwrap();
        assert_eq!(message.envelope, trade.with_id(new_id).envelope);
    }
    // A second run finds only the bad ones again and moves nothing.
    let again = requeue(&mut c, &script, "md:", &channel, cap, Which::All)
        .await
        .unwrap();
    assert_eq!((again.requeued.len(), again.failed.len()), (0, 3));
}
