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
    let trade = super::super::Trade {
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
