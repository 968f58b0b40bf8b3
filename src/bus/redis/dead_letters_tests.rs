//! Tests of [`super`] against a real redis-server.

use super::*;
use crate::bus::redis_test_server::RedisTestServer;
use crate::event::{Event, Exchange, Side, Trade};
use uuid::Uuid;

type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

async fn conn(server: &RedisTestServer) -> MultiplexedConnection {
    ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
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
