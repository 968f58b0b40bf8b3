//! Unit tests of the Coinbase front-end's rendering, checked against the documented shapes.

use super::*;

#[test]
fn times_are_rfc3339_with_nanoseconds() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
    assert_eq!(rfc3339(1_675_974_770_714), "2023-02-09T20:32:50.714000000Z");
    assert_eq!(rfc3339(1_709_164_800_001), "2024-02-29T00:00:00.001000000Z");
}

#[test]
fn level2_and_trades_render_the_documented_fields() {
    let bids = BTreeMap::from([(2_192_173i64, 6_317_902u64)]);
    let asks = BTreeMap::from([(2_192_200i64, 0u64)]);
    let l2 = render_l2("snapshot", "BTC-USD", "t", bids.iter().rev(), asks.iter());
    let v: Value = serde_json::from_str(&l2).expect("JSON");
    assert_eq!(
        v,
        json!([{"type":"snapshot","product_id":"BTC-USD","updates":[
            {"side":"bid","event_time":"t","price_level":"21921.73","new_quantity":"0.06317902"},
            {"side":"offer","event_time":"t","price_level":"21922.00","new_quantity":"0.00000000"}]}])
    );
    let trade = crate::simulator::Trade {
        id: 7,
        price: 126_001,
        qty: 30_000_000,
        time: 0,
        buyer_is_maker: true,
    };
    let v: Value = serde_json::from_str(&render_trade("ETH-USD", "t", &trade)).expect("JSON");
    assert_eq!(
        v,
        json!({"trade_id":"7","product_id":"ETH-USD","price":"1260.01","size":"0.30000000","side":"BUY","time":"t"})
    );
}

/// The periodic fault switches, seen by a client as the docs describe the wire: every 5th
/// `l2_data` message comes after a skipped `sequence_num`, every 7th numbered message is
/// followed by one that is not JSON.
#[tokio::test]
async fn periodic_faults_skip_sequence_numbers_and_send_garbage() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as WsMsg;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let config = SimConfig {
        symbols: vec!["BTC-USD".into()],
        rate: 400,
        seed: 1,
        faults: crate::simulator::Faults {
            drop_every_secs: None,
            gap_every_updates: Some(5),
            malformed_every_frames: Some(7),
        },
    };
    let server = tokio::spawn(serve_coinbase(listener, config, stop.clone()));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
        .await
        .expect("connect");
    let sub = json!({"type":"subscribe","product_ids":["BTC-USD"],"channel":"level2"});
    ws.send(WsMsg::text(sub.to_string())).await.expect("send");
    let (mut numbered, mut l2, mut jumps, mut garbage) = (0u64, 0u64, 0u64, 0u64);
    let mut last: Option<u64> = None;
    while garbage < 3 {
        let Some(Ok(WsMsg::Text(t))) = ws.next().await else {
            panic!("connection ended")
        };
        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
            garbage += 1;
            assert_eq!(numbered % 7, 0, "garbage right after every 7th message");
            continue;
        };
        numbered += 1;
        let n = v["sequence_num"].as_u64().expect("sequence_num");
        if v["channel"] == "l2_data" {
            l2 += 1;
        }
        if let Some(l) = last.filter(|l| n != l + 1) {
            assert_eq!(n, l + 2, "one number skipped");
            jumps += 1;
        }
        last = Some(n);
    }
    assert_eq!(numbered, 21);
    assert_eq!(jumps, l2 / 5);
    stop.cancel();
    drop(ws);
    let _ = server.await;
}
