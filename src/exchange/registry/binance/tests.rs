//! Unit tests of `binance` (kept apart so the module itself stays readable).

use super::*;
use crate::event::{Book, BookAction, Level};

const TS_RECV: u64 = 1_700_000_000_123_456;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/binance/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn parse_fixture(name: &str) -> Result<Vec<Parsed>, ParseError> {
    let adapter = BinanceAdapter::new(Exchange::Binance, &[]);
    adapter.parse(&mut fixture(name), TS_RECV)
}

fn one_event(name: &str) -> Event {
    let mut parsed = parse_fixture(name).unwrap();
    assert_eq!(parsed.len(), 1);
    match parsed.remove(0) {
        Parsed::Event(e) => e,
        other => panic!("{name}: expected an event, got {other:?}"),
    }
}

/// The fast path (Binance's key order) and the general path (any other key order)
/// must agree on every payload kind.
#[test]
fn sniffed_and_general_paths_agree() {
    let adapter = BinanceAdapter::new(Exchange::Binance, &[]);
    for name in [
        "trade.json",
        "trade_combined.json",
        "ticker.json",
        "kline.json",
        "depth_update.json",
    ] {
        let frame = fixture(name);
        assert!(sniff(&frame).is_some(), "{name} takes the fast path");
        let fast = format!("{:?}", adapter.parse(&mut frame.clone(), TS_RECV).unwrap());
        // Same JSON with its keys reordered (serde_json sorts them): no sniffing.
        let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
        let mut reordered = serde_json::to_vec(&v).unwrap();
        assert!(
            sniff(&reordered).is_none(),
            "{name} reordered takes the general path"
        );
        let general = format!("{:?}", adapter.parse(&mut reordered, TS_RECV).unwrap());
        assert_eq!(fast, general, "{name}");
    }
    // A sniffed frame that is cut short is an error, not a panic.
    let mut cut = fixture("trade_combined.json");
    cut.truncate(cut.len() / 2);
    assert!(adapter.parse(&mut cut, TS_RECV).is_err());
    let mut wrong = br#"{"e":"trade","E":"soon"}"#.to_vec();
    assert!(adapter.parse(&mut wrong, TS_RECV).is_err());
    // Escaped strings are unescaped in place: results never point into the scratch
    // space that the next frame reuses.
    let escaped =
        br#"{"e":"trade","E":1,"s":"BNBBTC","t":7,"p":"0.1","q":"1","T":2,"m":false,"M":true}"#;
    let first = adapter.parse(&mut escaped.to_vec(), TS_RECV).unwrap();
    let _second = adapter.parse(&mut fixture("trade.json"), TS_RECV).unwrap();
    let Parsed::Event(Event::Trade(t)) = &first[0] else {
        panic!("not a trade: {first:?}")
    };
    assert_eq!((t.symbol.as_str(), t.trade_id.as_str()), ("BNB-BTC", "7"));
}

#[test]
fn trade_from_docs() {
    let e = one_event("trade.json");
    assert_eq!(
        e,
        Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: "BNB-BTC".into(),
            ts: Some(1_672_515_782_136_000),
            ts_recv: TS_RECV,
            trade_id: "12345".into(),
            price: "0.001".into(),
            size: "100".into(),
            // "m": true — the buyer is the maker, so the taker sold.
            side: Some(Side::Sell),
        })
    );
}

#[test]
fn trade_side_buy_when_buyer_is_taker_and_combined_wrapper() {
    let e = one_event("trade_combined.json");
    let Event::Trade(t) = e else {
        panic!("not a trade")
    };
    assert_eq!(t.side, Some(Side::Buy));
    assert_eq!(t.symbol, "BTC-USDT");
    assert_eq!(t.price.as_str(), "97000.01000000");
    assert_eq!(t.size.as_str(), "0.00100000");
    assert_eq!(t.trade_id, "4567890123");
    // `T` (trade time), not `E` (event time).
    assert_eq!(t.ts, Some(1_733_000_000_100_000));
}

#[test]
fn ticker_from_docs() {
    let e = one_event("ticker.json");
    assert_eq!(
        e,
        Event::Ticker(Ticker {
            exchange: Exchange::Binance,
            symbol: "BNB-BTC".into(),
            ts: Some(1_672_515_782_136_000),
            ts_recv: TS_RECV,
            bid: Some("0.0024".into()),
            bid_size: Some("10".into()),
            ask: Some("0.0026".into()),
            ask_size: Some("100".into()),
            last: Some("0.0025".into()),
            volume_24h: Some("10000".into()),
        })
    );
}

#[test]
fn book_ticker_from_docs() {
    let e = one_event("book_ticker.json");
    assert_eq!(
        e,
        Event::Ticker(Ticker {
            exchange: Exchange::Binance,
            symbol: "BNB-USDT".into(),
            ts: None,
            ts_recv: TS_RECV,
            bid: Some("25.35190000".into()),
            bid_size: Some("31.21000000".into()),
            ask: Some("25.36520000".into()),
            ask_size: Some("40.66000000".into()),
            last: None,
            volume_24h: None,
        })
    );
}

#[test]
fn kline_from_docs() {
    let e = one_event("kline.json");
    assert_eq!(
        e,
        Event::Candle(Candle {
            exchange: Exchange::Binance,
            symbol: "BNB-BTC".into(),
            ts: Some(1_672_515_782_136_000),
            ts_recv: TS_RECV,
            interval: "1m".into(),
            start: 1_672_515_780_000_000,
            open: "0.0010".into(),
            high: "0.0025".into(),
            low: "0.0015".into(),
            close: "0.0020".into(),
            volume: "1000".into(),
            closed: false,
        })
    );
}

#[test]
fn depth_update_from_docs_is_a_diff_and_a_stateless_delta() {
    let mut parsed = parse_fixture("depth_update.json").unwrap();
    let Some(Parsed::Diff(d)) = parsed.pop() else {
        panic!("not a diff")
    };
    assert_eq!(d.symbol, "BNB-BTC");
    assert_eq!((d.first_update_id, d.last_update_id), (157, 160));
    assert_eq!(
        d.into_stateless_delta(),
        Book {
            exchange: Exchange::Binance,
            symbol: "BNB-BTC".into(),
            ts: Some(1_672_515_782_136_000),
            ts_recv: TS_RECV,
            action: BookAction::Delta,
            bids: vec![Level("0.0024".into(), "10".into())],
            asks: vec![Level("0.0026".into(), "100".into())],
            seq: Some(160),
            prev_seq: Some(156),
        }
    );
}

#[test]
fn control_frames_produce_no_events() {
    assert_eq!(
        parse_fixture("subscribe_ack.json").unwrap(),
        vec![Parsed::Ack {
            id: Some(AckId::Num(1))
        }]
    );
    let refused = parse_fixture("subscribe_error.json").unwrap();
    let [Parsed::Refused { id, detail }] = refused.as_slice() else {
        panic!("{refused:?}")
    };
    assert_eq!(*id, Some(AckId::Num(1)));
    assert!(
        detail.starts_with("request 1 refused: code 2: Invalid request"),
        "{detail}"
    );
}

#[test]
fn server_shutdown_notice_from_docs() {
    assert_eq!(
        parse_fixture("server_shutdown.json").unwrap(),
        vec![Parsed::ServerShutdown]
    );
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let adapter = BinanceAdapter::new(Exchange::Binance, &[]);
    for bad in [
        &b"not json"[..],
        b"[1,2]",
        b"{}",
        b"",
        b"{\"e\":\"trade\"}",
        b"{\"e\":\"trade\",\"E\":1,\"s\":\"BTCUSDT\",\"t\":1,\"p\":1.5,\"q\":\"1\",\"T\":1,\"m\":true}",
        b"{\"e\":\"outboundAccountPosition\"}",
        b"{\"e\":\"depthUpdate\",\"E\":1,\"s\":\"BTCUSDT\",\"U\":9,\"u\":8,\"b\":[],\"a\":[]}",
        b"{\"e\":\"depthUpdate\",\"E\":1,\"s\":\"BTCUSDT\",\"U\":1,\"u\":8,\"b\":[[\"1\"]],\"a\":[]}",
        b"{\"stream\":\"x\",\"data\":[1]}",
        b"\xff\xfe",
    ] {
        let mut buf = bad.to_vec();
        assert!(adapter.parse(&mut buf, 0).is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
    }
}

#[test]
fn configured_symbols_win_over_splitting() {
    let adapter = BinanceAdapter::new(Exchange::Sim, &["BTC-USDT".to_string()]);
    let mut buf = fixture("trade_combined.json");
    let parsed = adapter.parse(&mut buf, 1).unwrap();
    let [Parsed::Event(Event::Trade(t))] = parsed.as_slice() else {
        panic!()
    };
    assert_eq!(t.exchange, Exchange::Sim);
    assert_eq!(t.symbol, "BTC-USDT");
}

#[test]
fn symbols_split_on_longest_quote() {
    assert_eq!(split_symbol("BTCUSDT").as_deref(), Some("BTC-USDT"));
    assert_eq!(split_symbol("ETHBTC").as_deref(), Some("ETH-BTC"));
    assert_eq!(split_symbol("BTCFDUSD").as_deref(), Some("BTC-FDUSD"));
    assert_eq!(split_symbol("BNBUSDC").as_deref(), Some("BNB-USDC"));
    assert_eq!(split_symbol("btceur").as_deref(), Some("BTC-EUR"));
    assert_eq!(split_symbol("USDT"), None);
    assert_eq!(split_symbol("FOOBAR"), None);
    assert_eq!(wire_symbol("BTC-USDT"), "BTCUSDT");
}

#[test]
fn subscribe_frames_name_streams_in_lower_case() {
    let adapter = BinanceAdapter::new(Exchange::Binance, &[]);
    let frames = adapter.subscribe_frames(
        &["BTC-USDT".into(), "ETH-BTC".into()],
        &[
            FeedChannel::Trade,
            FeedChannel::Ticker,
            FeedChannel::Book,
            FeedChannel::Candle("1m".into()),
        ],
    );
    assert_eq!(frames.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&frames[0].1).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"method":"SUBSCRIBE","id":1,"params":[
            "btcusdt@trade","btcusdt@ticker","btcusdt@depth@100ms","btcusdt@kline_1m",
            "ethbtc@trade","ethbtc@ticker","ethbtc@depth@100ms","ethbtc@kline_1m"]})
    );
    let many: Vec<String> = (0..450).map(|i| format!("A{i}-USDT")).collect();
    let frames = adapter.subscribe_frames(&many, &[FeedChannel::Trade]);
    assert_eq!(
        frames.iter().map(|f| f.0.clone()).collect::<Vec<_>>(),
        vec![AckId::Num(1), AckId::Num(2), AckId::Num(3)]
    );
}

#[test]
fn rest_snapshot_from_docs() {
    let s = parse_depth_snapshot(
        Exchange::Binance,
        "LTC-BTC",
        &fixture("depth_snapshot.json"),
        5,
    )
    .unwrap();
    assert_eq!(s.last_update_id, 1_027_024);
    assert_eq!(
        s.bids,
        vec![Level("4.00000000".into(), "431.00000000".into())]
    );
    assert_eq!(
        s.asks,
        vec![Level("4.00000200".into(), "12.00000000".into())]
    );
    assert!(parse_depth_snapshot(Exchange::Binance, "X-Y", b"{\"code\":-1121}", 5).is_err());
}

#[test]
fn normalize_fixture_stream() {
    let input = fixture("frames.jsonl");
    let mut out = Vec::new();
    let mut err = Vec::new();
    let stats =
        crate::exchange::normalize(Exchange::Binance, &input[..], &mut out, &mut err).unwrap();
    assert_eq!(stats.errors, 0, "{}", String::from_utf8_lossy(&err));
    let events: Vec<serde_json::Value> = out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["trade", "ticker", "ticker", "book", "candle"]);
    assert_eq!(stats.events, 5);
    assert_eq!(events[3]["seq"], 160);
    assert_eq!(events[3]["prev_seq"], 156);
    assert_eq!(events[3]["action"], "delta");
    assert_eq!(events[2]["ts"], serde_json::Value::Null);
    assert_eq!(events[2]["last"], serde_json::Value::Null);
}

#[test]
fn unsubscribe_frames_mirror_the_subscriptions() {
    // web-socket-streams.md, "Unsubscribe to a stream":
    // {"method":"UNSUBSCRIBE","params":["btcusdt@depth"],"id":312} → {"result":null,"id":312}
    let adapter = BinanceAdapter::new(Exchange::Binance, &[]);
    let frames = adapter.unsubscribe_frames(&["BTC-USDT".into()], &[FeedChannel::Book]);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].0, AckId::Num(1));
    let v: serde_json::Value = serde_json::from_str(&frames[0].1).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"method":"UNSUBSCRIBE","params":["btcusdt@depth@100ms"],"id":1})
    );
    let many: Vec<String> = (0..450).map(|i| format!("A{i}-USDT")).collect();
    assert_eq!(
        adapter
            .unsubscribe_frames(&many, &[FeedChannel::Trade])
            .len(),
        3,
        "chunked like the subscriptions"
    );
    let mut answer = br#"{"result":null,"id":312}"#.to_vec();
    assert_eq!(
        adapter.parse(&mut answer, TS_RECV).unwrap(),
        vec![Parsed::Ack {
            id: Some(AckId::Num(312))
        }]
    );
}
