//! Micro-benchmarks along the event path: envelope encode/decode, signing and
//! verification (`[redis] signing_keys`), pattern matching, order-book delta apply. Each
//! benchmark checks its output once before timing.
//!
//! Run: `cargo bench --bench event_path`. Results: benches/BENCHMARKS.md.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use mdbridge::book::OrderBook;
use mdbridge::bus::signing::Keyring;
use mdbridge::config::SigningKey;
use mdbridge::envelope::{BusMessage, DecodePolicy};
use mdbridge::event::{Book, BookAction, Channel, Event, Exchange, Level, Pattern, Side, Trade};
use uuid::Uuid;

fn trade(i: u64) -> Event {
    Event::Trade(Trade {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: Some(1_672_515_782_136_000 + i),
        ts_recv: 1_672_515_782_140_000 + i,
        trade_id: i.to_string(),
        price: "60012.34000000".into(),
        size: "0.01234000".into(),
        side: Some(Side::Buy),
    })
}

fn envelope(c: &mut Criterion) {
    let src = Uuid::new_v4();
    let msg = BusMessage::encode(src, 1, 2, trade(1));
    assert!(msg.event_json().starts_with(b"{\"type\":\"trade\""));
    c.bench_function("envelope_encode_trade", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(BusMessage::encode(src, i, i, trade(i)))
        })
    });
    let channel = msg.channel.clone();
    let payload: Bytes = msg.envelope.clone();
    let decoded = BusMessage::decode(channel.clone(), payload.clone()).expect("decode");
    assert_eq!(decoded.event_json(), msg.event_json());
    c.bench_function("envelope_decode_trade", |b| {
        b.iter(|| black_box(BusMessage::decode(channel.clone(), payload.clone())))
    });
    // Reference for what validation costs: the bare borrowed parse the executor did before
    // it checked events (envelope, `src`, then only `type` and `ts_recv` of the event).
    c.bench_function("envelope_decode_trade_parse_only_reference", |b| {
        b.iter(|| black_box(parse_only(&payload)))
    });
}

#[derive(serde::Deserialize)]
struct EnvelopeRef<'a> {
    src: &'a str,
    seq: u64,
    #[serde(borrow)]
    event: &'a serde_json::value::RawValue,
}

#[derive(serde::Deserialize)]
struct EventHead {
    #[serde(rename = "type")]
    kind: mdbridge::event::EventType,
    ts_recv: u64,
}

fn parse_only(payload: &[u8]) -> Option<(Uuid, u64, mdbridge::event::EventType, u64)> {
    let env: EnvelopeRef<'_> = serde_json::from_slice(payload).ok()?;
    let src = Uuid::parse_str(env.src).ok()?;
    let head: EventHead = serde_json::from_str(env.event.get()).ok()?;
    Some((src, env.seq, head.kind, head.ts_recv))
}

fn signing(c: &mut Criterion) {
    let key: SigningKey = "k1=3f9a1c0e5b7d2468ace13579bdf02468".parse().expect("key");
    let keys = std::sync::Arc::new(Keyring::new(&[key]).expect("keyring"));
    let src = Uuid::new_v4();
    let channel = trade(1).channel();
    let signed = BusMessage::encode_signed(channel.clone(), src, 1, 2, trade(1), Some(&keys));
    let payload: Bytes = signed.envelope.clone();
    assert!(keys.verify(channel.as_str(), &payload).is_ok());
    c.bench_function("envelope_sign_trade", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(BusMessage::encode_signed(
                channel.clone(),
                src,
                i,
                i,
                trade(i),
                Some(&keys),
            ))
        })
    });
    c.bench_function("envelope_verify_trade", |b| {
        b.iter(|| black_box(keys.verify(channel.as_str(), &payload)))
    });
    let strict = DecodePolicy {
        keys: Some(keys.clone()),
        ..DecodePolicy::default()
    };
    assert!(BusMessage::decode_with(channel.clone(), payload.clone(), &strict).is_ok());
    c.bench_function("envelope_decode_signed_trade", |b| {
        b.iter(|| {
            black_box(BusMessage::decode_with(
                channel.clone(),
                payload.clone(),
                &strict,
            ))
        })
    });
}

fn patterns(c: &mut Criterion) {
    let symbols: Vec<String> = (0..2_500).map(|i| format!("C{i}-USDT")).collect();
    let mut pats = Vec::new();
    for s in &symbols {
        for kind in ["trade", "ticker", "book"] {
            pats.push(Pattern::parse(&format!("{kind}:binance:{s}")).expect("pattern"));
        }
        pats.push(Pattern::parse(&format!("trade:*:{s}")).expect("pattern"));
    }
    assert_eq!(pats.len(), 10_000);
    let chan = Channel::parse("trade:binance:C1234-USDT").expect("channel");
    assert_eq!(pats.iter().filter(|p| p.matches(&chan)).count(), 2);
    c.bench_function("match_10k_patterns_one_channel", |b| {
        b.iter(|| black_box(pats.iter().filter(|p| p.matches(&chan)).count()))
    });
}

fn book(c: &mut Criterion) {
    let level = |p: u64, q: &str| {
        Level(
            format!("{}.{:02}", 60_000 + p / 100, p % 100).into(),
            q.into(),
        )
    };
    let snapshot = Book {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: 0,
        action: BookAction::Snapshot,
        bids: (0..1000).map(|i| level(10_000 - i, "1.00000000")).collect(),
        asks: (0..1000).map(|i| level(10_001 + i, "1.00000000")).collect(),
        seq: Some(1),
        prev_seq: None,
    };
    let mut ob = OrderBook::new();
    ob.apply(&snapshot).expect("snapshot");
    assert_eq!(ob.bids().count(), 1000);
    let mut seq = 1;
    c.bench_function("book_apply_delta_4_levels_on_2000", |b| {
        b.iter(|| {
            let delta = Book {
                action: BookAction::Delta,
                bids: vec![level(9_990, "2.00000000"), level(9_995, "0.00000000")],
                asks: vec![level(10_005, "3.50000000"), level(10_995, "1.00000000")],
                seq: Some(seq + 1),
                prev_seq: Some(seq),
                ..snapshot.clone_header()
            };
            seq += 1;
            ob.apply(&delta).expect("delta");
        })
    });
}

trait CloneHeader {
    fn clone_header(&self) -> Book;
}
impl CloneHeader for Book {
    fn clone_header(&self) -> Book {
        Book {
            exchange: self.exchange,
            symbol: self.symbol.clone(),
            ts: self.ts,
            ts_recv: self.ts_recv,
            action: self.action,
            bids: Vec::new(),
            asks: Vec::new(),
            seq: self.seq,
            prev_seq: self.prev_seq,
        }
    }
}

fn binance_parse(c: &mut Criterion) {
    let adapter = mdbridge::exchange::adapter_for(Exchange::Binance, &["BNB-BTC".to_string()])
        .expect("binance adapter");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/binance/");
    for (name, file) in [
        ("binance_parse_trade", "trade_combined.json"),
        ("binance_parse_depth_update", "depth_update.json"),
        ("binance_parse_24hr_ticker", "ticker.json"),
    ] {
        let frame = std::fs::read(format!("{root}{file}")).expect("fixture");
        let mut buf = frame.clone();
        let parsed = adapter.parse(&mut buf, 1).expect("parses");
        assert_eq!(parsed.len(), 1, "{file}");
        c.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(&frame);
                black_box(adapter.parse(&mut buf, 1).expect("parses"))
            })
        });
    }
}

/// Coinbase frames (the documentation's examples): parse + normalize, one frame each, and a
/// `level2` snapshot of 1 000 levels a side (Coinbase sends whole books in one message).
fn coinbase_parse(c: &mut Criterion) {
    let symbols = ["BTC-USD".to_string(), "ETH-USD".to_string()];
    let adapter =
        mdbridge::exchange::adapter_for(Exchange::Coinbase, &symbols).expect("coinbase adapter");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/coinbase/");
    let mut cases: Vec<(&str, Vec<u8>)> = [
        ("coinbase_parse_market_trades", "market_trades_update.json"),
        ("coinbase_parse_level2_update", "level2_update.json"),
        ("coinbase_parse_ticker", "ticker.json"),
        ("coinbase_parse_candles", "candles.json"),
        ("coinbase_parse_heartbeat", "heartbeats.json"),
    ]
    .into_iter()
    .map(|(name, file)| {
        // Compact, as Coinbase sends it (the fixture files are indented for reading).
        let text = std::fs::read(format!("{root}{file}")).expect("fixture");
        let v: serde_json::Value = serde_json::from_slice(&text).expect("JSON fixture");
        (name, serde_json::to_vec(&v).expect("JSON"))
    })
    .collect();
    let level = |side: &str, i: u32| {
        format!(
            r#"{{"side":"{side}","event_time":"1970-01-01T00:00:00Z","price_level":"{}.{:02}","new_quantity":"0.{:08}"}}"#,
            20_000 + i / 100,
            i % 100,
            i + 1
        )
    };
    let updates: Vec<String> = (0..1000)
        .map(|i| level("bid", 1000 - i))
        .chain((0..1000).map(|i| level("offer", 2000 + i)))
        .collect();
    let snapshot = format!(
        r#"{{"channel":"l2_data","client_id":"","timestamp":"2023-02-09T20:32:50.714964855Z","sequence_num":0,"events":[{{"type":"snapshot","product_id":"BTC-USD","updates":[{}]}}]}}"#,
        updates.join(",")
    );
    cases.push((
        "coinbase_parse_level2_snapshot_2000_levels",
        snapshot.into_bytes(),
    ));
    for (name, frame) in cases {
        let mut buf = frame.clone();
        adapter.parse(&mut buf, 1).expect("parses");
        c.bench_function(name, |b| {
            b.iter(|| {
                buf.clear();
                buf.extend_from_slice(&frame);
                black_box(adapter.parse(&mut buf, 1).expect("parses"))
            })
        });
    }
}

criterion_group!(
    benches,
    binance_parse,
    coinbase_parse,
    envelope,
    signing,
    patterns,
    book
);
criterion_main!(benches);
