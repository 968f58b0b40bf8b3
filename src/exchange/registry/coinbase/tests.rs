//! Unit tests of `coinbase` against the documentation's examples (tests/fixtures/coinbase).

use super::*;

const TS_RECV: u64 = 1_700_000_000_123_456;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/coinbase/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse(name: &str) -> Vec<Parsed> {
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &[]);
    adapter
        .parse(&mut fixture(name), TS_RECV)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn every_message_hands_its_connection_sequence_first() {
    for (name, seq) in [
        ("level2_snapshot.json", 0),
        ("level2_update.json", 1),
        ("subscriptions.json", 2),
        ("heartbeats.json", 0),
        ("market_trades_update.json", 5),
    ] {
        assert_eq!(parse(name)[0], Parsed::Sequence(seq), "{name}");
    }
    assert_eq!(
        parse("heartbeats.json").len(),
        1,
        "a heartbeat is control only"
    );
}

#[test]
fn market_trades_side_is_the_makers_so_the_taker_is_the_other() {
    let Parsed::Event(Event::Trade(t)) = &parse("market_trades.json")[1] else {
        panic!("trade expected")
    };
    assert_eq!(t.side, Some(Side::Sell), "maker BUY: the taker sold");
    assert_eq!(t.trade_id, "000000000", "string id kept as sent");
    let Parsed::Event(Event::Trade(t)) = &parse("market_trades_update.json")[1] else {
        panic!("trade expected")
    };
    assert_eq!(t.side, Some(Side::Buy), "maker SELL: the taker bought");
    assert_eq!(t.size.as_str(), "0.10000000", "decimal text kept");
}

#[test]
fn snapshot_trade_batches_come_out_oldest_first() {
    let frame = br#"{"channel":"market_trades","timestamp":"2023-02-09T20:19:35Z","sequence_num":3,"events":[{"type":"snapshot","trades":[
        {"trade_id":"3","product_id":"BTC-USD","price":"3","size":"1","side":"BUY","time":"2023-02-09T20:19:34.000003Z"},
        {"trade_id":"2","product_id":"BTC-USD","price":"2","size":"1","side":"BUY","time":"2023-02-09T20:19:34.000002Z"},
        {"trade_id":"1","product_id":"BTC-USD","price":"1","size":"1","side":"BUY","time":"2023-02-09T20:19:34.000001Z"}]}]}"#;
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &["BTC-USD".into()]);
    let parsed = adapter.parse(&mut frame.to_vec(), TS_RECV).unwrap();
    let ids: Vec<&str> = parsed
        .iter()
        .filter_map(|p| match p {
            Parsed::Event(Event::Trade(t)) => Some(t.trade_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(ids, ["1", "2", "3"]);
}

#[test]
fn subscriptions_answer_the_requests_of_the_channels_they_list() {
    let acks: Vec<Parsed> = parse("subscriptions.json").into_iter().skip(1).collect();
    assert!(
        acks.contains(&Parsed::Ack {
            id: Some("level2".into())
        }),
        "level2"
    );
    assert!(
        acks.contains(&Parsed::Ack {
            id: Some("heartbeats".into())
        }),
        "heartbeats"
    );
    assert_eq!(acks.len(), 2);
    let refused = parse("error.json");
    let [Parsed::Refused { id: None, detail }] = refused.as_slice() else {
        panic!("refusal expected")
    };
    assert!(detail.contains("failure to subscribe"), "{detail}");
}

#[test]
fn subscribe_requests_one_channel_each_with_heartbeats_and_status() {
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &[]);
    let symbols = ["BTC-USD".to_string(), "ETH-USD".to_string()];
    let frames = adapter.subscribe_frames(
        &symbols,
        &[
            FeedChannel::Trade,
            FeedChannel::Book,
            FeedChannel::Candle("5m".into()),
        ],
    );
    let ids: Vec<String> = frames.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(
        ids,
        ["heartbeats", "level2", "market_trades", "candles", "status"]
    );
    let level2: serde_json::Value = serde_json::from_str(&frames[1].1).unwrap();
    assert_eq!(
        level2,
        serde_json::json!({"type":"subscribe","product_ids":["BTC-USD","ETH-USD"],"channel":"level2"})
    );
}

#[test]
fn malformed_and_unknown_messages_are_errors_not_panics() {
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &["BTC-USD".into()]);
    for bad in [
        &b"{\"channel\":\"l2_data\",\"timestamp\":"[..],
        br#"[1,2]"#,
        br#"{"channel":"l2_data","timestamp":"yesterday","sequence_num":1,"events":[]}"#,
        br#"{"channel":"l2_data","timestamp":"2023-02-09T20:32:50Z","sequence_num":1,"events":[{"type":"update","product_id":"BTC-USD","updates":[{"side":"up","price_level":"1","new_quantity":"1"}]}]}"#,
        br#"{"channel":"l2_data","timestamp":"2023-02-09T20:32:50Z","sequence_num":1,"events":[{"type":"update","product_id":"DOGE-USD","updates":[]}]}"#,
        br#"{"channel":"candles","timestamp":"2023-02-09T20:32:50Z","sequence_num":1,"events":[{"type":"update","candles":[{"start":"soon","open":"1","high":"1","low":"1","close":"1","volume":"1","product_id":"BTC-USD"}]}]}"#,
        br#"{"no":"channel"}"#,
    ] {
        assert!(adapter.parse(&mut bad.to_vec(), TS_RECV).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn a_finished_candle_bucket_is_closed() {
    let frame = br#"{"channel":"candles","timestamp":"2023-07-10T14:15:00.5Z","sequence_num":9,"events":[{"type":"update","candles":[{"start":"1688998200","high":"2","low":"1","open":"1","close":"2","volume":"3","product_id":"ETH-USD"},{"start":"1688998500","high":"2","low":"1","open":"1","close":"2","volume":"3","product_id":"ETH-USD"}]}]}"#;
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &[]);
    let closed: Vec<bool> = adapter
        .parse(&mut frame.to_vec(), TS_RECV)
        .unwrap()
        .into_iter()
        .filter_map(|p| match p {
            Parsed::Event(Event::Candle(c)) => Some(c.closed),
            _ => None,
        })
        .collect();
    assert_eq!(
        closed,
        [true, false],
        "14:10 bucket ended at 14:15; 14:15 bucket just began"
    );
}

/// The one-pass path (Coinbase's field order, `channel` first) and the general path (any
/// other shape) agree on every documented market message.
#[test]
fn fast_and_general_paths_agree() {
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &[]);
    let lines = fixture("frames.jsonl");
    let mut fast_seen = 0;
    for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let fast = sniff(line).is_some();
        fast_seen += usize::from(fast);
        let a = adapter
            .parse(&mut line.to_vec(), TS_RECV)
            .map_err(|e| e.to_string());
        // A leading space hides the field order: the general path.
        let mut spaced = b" ".to_vec();
        spaced.extend_from_slice(line);
        assert!(sniff(&spaced).is_none());
        let b = adapter
            .parse(&mut spaced, TS_RECV)
            .map_err(|e| e.to_string());
        assert_eq!(a, b, "{}", String::from_utf8_lossy(line));
    }
    assert_eq!(
        fast_seen, 8,
        "l2 ×2, trades ×2, ticker ×2, candles, heartbeats"
    );
    let mut cut = fixture("frames.jsonl");
    cut.truncate(60);
    assert!(adapter.parse(&mut cut, TS_RECV).is_err());
}

#[test]
fn unsubscribe_requests_mirror_the_subscriptions() {
    // Advanced Trade WebSocket Overview, "Unsubscribing": the same structure as subscribe,
    // one channel per message: {"type":"unsubscribe","product_ids":["ETH-USD","ETH-EUR"],"channel":"level2"}.
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &[]);
    let symbols = ["ETH-USD".to_string(), "ETH-EUR".to_string()];
    let frames = adapter.unsubscribe_frames(&symbols, &[FeedChannel::Book]);
    let keys: Vec<String> = frames.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(keys, ["heartbeats", "level2", "status"]);
    let level2: serde_json::Value = serde_json::from_str(&frames[1].1).unwrap();
    assert_eq!(
        level2,
        serde_json::json!({"type":"unsubscribe","product_ids":["ETH-USD","ETH-EUR"],"channel":"level2"})
    );
}

const DOGE_TRADE: &[u8] = br#"{"channel":"market_trades","client_id":"","timestamp":"2023-02-09T20:19:36.1Z","sequence_num":8,"events":[{"type":"update","trades":[{"trade_id":"1","product_id":"DOGE-USD","price":"0.1","size":"5","side":"BUY","time":"2023-02-09T20:19:36Z"}]}]}"#;

#[test]
fn unknown_channels_are_ignored_and_refused_non_book_frames_keep_their_number() {
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &["BTC-USD".into()]);
    // "Clients are expected to ignore messages they do not support": only the number.
    let unknown = br#"{"channel":"futures_balance_summary","timestamp":"2023-02-09T20:32:50Z","sequence_num":7,"events":[]}"#;
    assert_eq!(
        adapter.parse(&mut unknown.to_vec(), TS_RECV).unwrap(),
        vec![Parsed::Sequence(7)]
    );
    // A trade of a product this feed does not carry is refused, yet numbered: the next
    // message must not look like a gap.
    let err = adapter
        .parse(&mut DOGE_TRADE.to_vec(), TS_RECV)
        .unwrap_err();
    assert_eq!(err.sequence(), Some(8), "{err}");
    // A refused book frame keeps no number: its book did miss an update (gap → resync).
    let l2 = br#"{"channel":"l2_data","timestamp":"2023-02-09T20:32:50Z","sequence_num":9,"events":[{"type":"update","product_id":"DOGE-USD","updates":[]}]}"#;
    let err = adapter.parse(&mut l2.to_vec(), TS_RECV).unwrap_err();
    assert_eq!(err.sequence(), None, "{err}");
}

#[test]
fn a_usdc_product_is_answered_as_usd_and_published_under_its_configured_name() {
    let adapter = CoinbaseAdapter::new(
        Exchange::Coinbase,
        &["DOGE-USDC".into(), "USDT-USDC".into()],
    );
    let out = adapter.parse(&mut DOGE_TRADE.to_vec(), TS_RECV).unwrap();
    let symbols: Vec<&str> = out
        .iter()
        .filter_map(|p| match p {
            Parsed::Event(Event::Trade(t)) => Some(t.symbol.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(symbols, ["DOGE-USDC"]);
    // USDT-USDC is its own market: USDT-USD is not taken for it.
    assert!(adapter.symbol("USDT-USD").is_err());
}

#[test]
fn status_reports_only_the_feeds_own_products() {
    let frame = br#"{"channel":"status","client_id":"","timestamp":"2023-02-09T20:29:49.753424311Z","sequence_num":0,"events":[{"type":"snapshot","products":[{"product_type":"SPOT","id":"BTC-USD","base_currency":"BTC","quote_currency":"USD","base_increment":"0.00000001","quote_increment":"0.01","display_name":"BTC/USD","status":"delisted","status_message":"","min_market_funds":"1"},{"product_type":"SPOT","id":"DOGE-USD","base_currency":"DOGE","quote_currency":"USD","base_increment":"0.1","quote_increment":"0.00001","display_name":"DOGE/USD","status":"delisted","status_message":"","min_market_funds":"1"}]}]}"#;
    let adapter = CoinbaseAdapter::new(Exchange::Coinbase, &["BTC-USD".into()]);
    let out = adapter.parse(&mut frame.to_vec(), TS_RECV).unwrap();
    let details: Vec<String> = out
        .iter()
        .filter_map(|p| match p {
            Parsed::Event(Event::Status(s)) => s.detail.clone(),
            _ => None,
        })
        .collect();
    assert_eq!(details.len(), 1, "{details:?}");
    assert!(details[0].starts_with("BTC-USD:"), "{details:?}");
}
