//! Tests of [`super`]: reply parsing (RESP2 and RESP3 shapes), and the registry pages
//! against a real redis-server.

use super::*;
use crate::bus::redis_test_server::RedisTestServer;

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
