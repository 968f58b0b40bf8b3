//! Bot WebSocket server, end to end: a real listener on 127.0.0.1:0, real
//! `tokio_tungstenite` bot clients, and a bus fed with `BusMessage::encode` messages.
//! Every wait is on a condition with a deadline; no test sleeps to get timing right.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use mdbridge::bus::{SnapshotStore, StoreFuture};
use mdbridge::config::{BotsConfig, SlowClientPolicy};
use mdbridge::envelope::BusMessage;
use mdbridge::event::{
    Book, BookAction, Channel, Event, Exchange, Level, Side, StatusState, Ticker, Trade,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

mod gateway_harness;
use gateway_harness::{config, send, start, start_with_store, wait_until, within, Harness, Ws};

/// The next text frame (control frames skipped).
async fn next_text(ws: &mut Ws) -> String {
    within("a text frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return t.as_str().to_string(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

async fn next_json(ws: &mut Ws) -> Value {
    serde_json::from_str(&next_text(ws).await).unwrap()
}

async fn subscribe(ws: &mut Ws, channels: &[&str]) {
    send(ws, json!({"op":"subscribe","channels":channels,"req":"s"})).await;
    let reply = next_json(ws).await;
    assert_eq!(
        reply,
        json!({"type":"subscribed","channels":channels,"req":"s"})
    );
}

fn trade(exchange: Exchange, symbol: &str, id: &str) -> Event {
    Event::Trade(Trade {
        exchange,
        symbol: symbol.into(),
        ts: Some(1),
        ts_recv: mdbridge::event::now_micros(),
        trade_id: id.into(),
        price: "100.10".into(),
        size: "0.50000000".into(),
        side: Some(Side::Buy),
    })
}

fn ticker(symbol: &str, last: &str) -> Event {
    Event::Ticker(Ticker {
        exchange: Exchange::Binance,
        symbol: symbol.into(),
        ts: None,
        ts_recv: 5,
        bid: Some("1.0".into()),
        bid_size: None,
        ask: None,
        ask_size: None,
        last: Some(last.into()),
        volume_24h: None,
    })
}

fn book(action: BookAction, bids: &[(&str, &str)], seq: u64, prev: Option<u64>) -> Event {
    Event::Book(Book {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: 7,
        action,
        bids: bids
            .iter()
            .map(|(p, s)| Level((*p).into(), (*s).into()))
            .collect(),
        asks: vec![Level("101".into(), "1".into())],
        seq: Some(seq),
        prev_seq: prev,
    })
}

fn status() -> Event {
    Event::status(
        Exchange::Binance,
        StatusState::Connected,
        Some("sentinel".into()),
    )
}

#[tokio::test]
async fn exact_bytes_wildcards_and_no_leakage() {
    let mut h = start(config()).await;
    let mut exact = h.connect().await;
    let mut wild = h.connect().await;
    let mut tick = h.connect().await;
    subscribe(&mut exact, &["trade:binance:BTC-USDT", "status:binance"]).await;
    subscribe(&mut wild, &["trade:*:BTC-USDT", "status:binance"]).await;
    subscribe(&mut tick, &["ticker:binance:*", "status:binance"]).await;
    let want: Vec<&str> = vec![
        "trade:*:BTC-USDT",
        "status:binance",
        "ticker:binance:*",
        "trade:binance:BTC-USDT",
    ];
    let interest = h
        .interest
        .borrow()
        .iter()
        .map(|p| p.as_str().to_string())
        .collect::<Vec<_>>();
    let mut want_sorted: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want_sorted.sort();
    assert_eq!(
        interest, want_sorted,
        "interest is the set of held patterns"
    );

    let t1 = h.publish(trade(Exchange::Binance, "BTC-USDT", "1")).await;
    let t2 = h.publish(trade(Exchange::Kraken, "BTC-USDT", "2")).await;
    let _t3 = h.publish(trade(Exchange::Binance, "ETH-USDT", "3")).await;
    let k1 = h.publish(ticker("ETH-USDT", "5")).await;
    let end = h.publish(status()).await;

    // Each bot's queue is FIFO and the sentinel comes last: anything leaked shows up first.
    assert_eq!(next_text(&mut exact).await, t1);
    assert_eq!(next_text(&mut exact).await, end);
    assert_eq!(next_text(&mut wild).await, t1);
    assert_eq!(next_text(&mut wild).await, t2);
    assert_eq!(next_text(&mut wild).await, end);
    assert_eq!(next_text(&mut tick).await, k1);
    assert_eq!(next_text(&mut tick).await, end);
    h.stop().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_overlaps_deliver_once() {
    let mut h = start(config()).await;
    let mut bot = h.connect().await;
    subscribe(
        &mut bot,
        &[
            "trade:binance:BTC-USDT",
            "trade:*:BTC-USDT",
            "status:binance",
        ],
    )
    .await;
    // Subscribing again is idempotent; `*:binance:BTC-USDT` overlaps both trade patterns.
    subscribe(&mut bot, &["trade:binance:BTC-USDT", "*:binance:BTC-USDT"]).await;
    assert_eq!(h.stats.snapshot().subscriptions, 4);
    let t1 = h.publish(trade(Exchange::Binance, "BTC-USDT", "1")).await;
    let end = h.publish(status()).await;
    assert_eq!(next_text(&mut bot).await, t1);
    assert_eq!(next_text(&mut bot).await, end, "delivered once");

    send(&mut bot, json!({"op":"unsubscribe","channels":["trade:binance:BTC-USDT","*:binance:BTC-USDT"],"req":9})).await;
    assert_eq!(
        next_json(&mut bot).await,
        json!({"type":"unsubscribed","channels":["trade:binance:BTC-USDT","*:binance:BTC-USDT"],"req":9})
    );
    // Still matched by the wildcard.
    let t2 = h.publish(trade(Exchange::Binance, "BTC-USDT", "2")).await;
    let end = h.publish(status()).await;
    assert_eq!(next_text(&mut bot).await, t2);
    assert_eq!(next_text(&mut bot).await, end);

    send(
        &mut bot,
        json!({"op":"unsubscribe","channels":["trade:*:BTC-USDT"]}),
    )
    .await;
    assert_eq!(
        next_json(&mut bot).await,
        json!({"type":"unsubscribed","channels":["trade:*:BTC-USDT"]})
    );
    h.publish(trade(Exchange::Binance, "BTC-USDT", "3")).await;
    let end = h.publish(status()).await;
    assert_eq!(next_text(&mut bot).await, end, "no trade after unsubscribe");
    assert_eq!(h.stats.snapshot().subscriptions, 1);
    let interest: Vec<String> = h.interest.borrow().iter().map(|p| p.to_string()).collect();
    assert_eq!(interest, ["status:binance"]);
    h.stop().await;
}

#[tokio::test]
async fn bad_requests_get_their_code_and_the_connection_survives() {
    let cfg = BotsConfig {
        max_subscriptions: 2,
        max_message_bytes: 512,
        ..config()
    };
    let h = start(cfg).await;
    let mut bot = h.connect().await;
    let cases: Vec<(Message, &str, Value)> = vec![
        (Message::text("{not json"), "bad_json", Value::Null),
        (Message::text(r#"{"req":1}"#), "bad_request", json!(1)),
        (
            Message::text(r#"{"op":"subscribe","req":2}"#),
            "bad_request",
            json!(2),
        ),
        (
            Message::text(r#"{"op":"subscribe","channels":[3],"req":3}"#),
            "bad_request",
            json!(3),
        ),
        (
            Message::binary(b"\x01\x02".to_vec()),
            "bad_request",
            Value::Null,
        ),
        (
            Message::text(r#"{"op":"dance","req":"d"}"#),
            "unknown_op",
            json!("d"),
        ),
        (
            Message::text(r#"{"op":"subscribe","channels":["trade:nyse:BTC-USDT"],"req":5}"#),
            "bad_channel",
            json!(5),
        ),
        (
            Message::text(r#"{"op":"unsubscribe","channels":["trade:binance:BTC-USDT"],"req":6}"#),
            "not_subscribed",
            json!(6),
        ),
        (
            Message::text(
                r#"{"op":"subscribe","channels":["trade:binance:BTC-USDT","trade:binance:ETH-USDT","trade:kraken:BTC-USD"],"req":7}"#,
            ),
            "too_many_subscriptions",
            json!(7),
        ),
    ];
    for (frame, code, req) in cases {
        let shown = format!("{frame:?}");
        bot.send(frame).await.unwrap();
        let reply = next_json(&mut bot).await;
        assert_eq!(reply["type"], "error", "{shown}: {reply}");
        assert_eq!(reply["code"], code, "{shown}: {reply}");
        assert_eq!(
            reply.get("req").cloned().unwrap_or(Value::Null),
            req,
            "{shown}"
        );
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        if code == "bad_channel" {
            let msg = reply["message"].as_str().unwrap();
            assert!(
                msg.contains("trade:nyse:BTC-USDT") && msg.contains("unknown exchange"),
                "{msg}"
            );
        }
        // The connection still works after every refusal.
        send(&mut bot, json!({"op":"ping","req":0})).await;
        assert_eq!(next_json(&mut bot).await, json!({"type":"pong","req":0}));
    }

    // `since` on a channel that is not durable refuses the whole request.
    send(
        &mut bot,
        json!({"op":"subscribe","channels":["status:binance"],"since":{"status:binance":"1-0"},"req":8}),
    )
    .await;
    let err = next_json(&mut bot).await;
    assert_eq!(
        (err["code"].clone(), err["req"].clone()),
        (json!("bad_request"), json!(8))
    );
    assert!(
        err["message"]
            .as_str()
            .is_some_and(|m| m.contains("not durable")),
        "{err}"
    );
    send(
        &mut bot,
        json!({"op":"subscribe","channels":["status:binance"],"req":9}),
    )
    .await;
    assert_eq!(
        next_json(&mut bot).await,
        json!({"type":"subscribed","channels":["status:binance"],"req":9})
    );
    let mut h = h;
    let end = h.publish(status()).await;
    assert_eq!(next_text(&mut bot).await, end);
    h.stop().await;
}

#[tokio::test]
async fn ping_echoes_numbers_and_strings() {
    let h = start(config()).await;
    let mut bot = h.connect().await;
    for (req, want) in [
        (
            json!({"op":"ping","req":42}),
            json!({"type":"pong","req":42}),
        ),
        (
            json!({"op":"ping","req":"abc-1"}),
            json!({"type":"pong","req":"abc-1"}),
        ),
        (
            json!({"op":"ping","req":1.5}),
            json!({"type":"pong","req":1.5}),
        ),
        (json!({"op":"ping"}), json!({"type":"pong"})),
    ] {
        send(&mut bot, req).await;
        assert_eq!(next_json(&mut bot).await, want);
    }
    h.stop().await;
}

/// Asserts `frames` form one exact chain: a snapshot, then deltas each following the last.
fn assert_chain(frames: &[Value]) {
    assert_eq!(frames[0]["action"], "snapshot", "{}", frames[0]);
    for pair in frames.windows(2) {
        assert_eq!(pair[1]["action"], "delta");
        assert_eq!(
            pair[1]["prev_seq"], pair[0]["seq"],
            "{} then {}",
            pair[0], pair[1]
        );
    }
}

#[tokio::test]
async fn late_joiner_gets_last_ticker_and_a_chaining_book_snapshot() {
    let mut h = start(config()).await;
    let mut watcher = h.connect().await;
    subscribe(&mut watcher, &["*:binance:BTC-USDT"]).await;
    h.publish(ticker("BTC-USDT", "1")).await;
    let last = h.publish(ticker("BTC-USDT", "2")).await;
    h.publish(book(
        BookAction::Snapshot,
        &[("100", "1"), ("99", "2")],
        10,
        None,
    ))
    .await;
    let d11 = h
        .publish(book(
            BookAction::Delta,
            &[("100", "0"), ("98", "3")],
            11,
            Some(10),
        ))
        .await;
    // The router has seen everything once the watcher has.
    for _ in 0..3 {
        next_text(&mut watcher).await;
    }
    assert_eq!(next_text(&mut watcher).await, d11);

    let mut late = h.connect().await;
    subscribe(
        &mut late,
        &["ticker:binance:BTC-USDT", "book:binance:BTC-USDT"],
    )
    .await;
    assert_eq!(
        next_text(&mut late).await,
        last,
        "latest ticker, exact bytes"
    );
    let snap = next_json(&mut late).await;
    assert_eq!(snap["action"], "snapshot");
    assert_eq!(snap["seq"], 11);
    assert_eq!(
        snap["bids"],
        json!([["99", "2"], ["98", "3"]]),
        "built from the cached book"
    );
    assert_eq!(snap["asks"], json!([["101", "1"]]));
    let d12 = h
        .publish(book(BookAction::Delta, &[("97", "1")], 12, Some(11)))
        .await;
    let got = next_text(&mut late).await;
    assert_eq!(got, d12);
    assert_chain(&[snap, serde_json::from_str(&got).unwrap()]);
    h.stop().await;
}

/// A [`SnapshotStore`] serving whatever the test put in.
#[derive(Default)]
struct TestStore {
    values: Mutex<HashMap<String, BusMessage>>,
    asked: Mutex<Vec<String>>,
}

impl TestStore {
    fn put(&self, msg: BusMessage) {
        self.values
            .lock()
            .unwrap()
            .insert(msg.channel.to_string(), msg);
    }
    fn asked(&self, channel: &str) -> usize {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == channel)
            .count()
    }
}

impl SnapshotStore for TestStore {
    fn latest(&self, channel: &Channel) -> StoreFuture<'_> {
        self.asked.lock().unwrap().push(channel.to_string());
        let found = self.values.lock().unwrap().get(channel.as_str()).cloned();
        Box::pin(async move { Ok(found) })
    }
}

#[tokio::test]
async fn store_serves_late_joiners_and_book_gaps_resync_to_a_chain() {
    let store = Arc::new(TestStore::default());
    let mut h = start_with_store(config(), Some(store.clone() as Arc<dyn SnapshotStore>)).await;

    // A stored ticker reaches a bot that subscribes before any live ticker.
    let stored_ticker = h.encode(ticker("ETH-USDT", "7"));
    let stored_text = String::from_utf8(stored_ticker.event_json().to_vec()).unwrap();
    store.put(stored_ticker);
    let mut bot = h.connect().await;
    subscribe(&mut bot, &["ticker:binance:ETH-USDT"]).await;
    assert_eq!(next_text(&mut bot).await, stored_text);

    // The book: the store has nothing at first, and the bot is told so (once); a bus
    // snapshot makes it live.
    subscribe(&mut bot, &["book:binance:BTC-USDT"]).await;
    let waiting = next_json(&mut bot).await;
    assert_eq!(waiting["type"], "status", "{waiting}");
    assert_eq!(waiting["state"], "error", "{waiting}");
    assert_eq!(
        waiting["detail"],
        "no publisher for book:binance:BTC-USDT yet; waiting"
    );
    let mut frames = Vec::new();
    h.publish(book(BookAction::Snapshot, &[("100", "1")], 10, None))
        .await;
    frames.push(next_json(&mut bot).await);
    h.publish(book(BookAction::Delta, &[("99", "1")], 11, Some(10)))
        .await;
    frames.push(next_json(&mut bot).await);
    assert_chain(&frames);

    // The store holds a snapshot that is too old for the deltas after the gap...
    store.put(h.encode(book(BookAction::Snapshot, &[("100", "1")], 11, None)));
    let asked_before = store.asked("book:binance:BTC-USDT");
    // ...deltas 12 and 13 are lost; 14 and 15 arrive.
    h.publish(book(BookAction::Delta, &[("98", "1")], 14, Some(13)))
        .await;
    h.publish(book(BookAction::Delta, &[("97", "1")], 15, Some(14)))
        .await;
    let resync = next_json(&mut bot).await;
    assert_eq!(resync["type"], "status");
    assert_eq!(resync["state"], "resync");
    assert_eq!(resync["exchange"], "binance");
    assert_eq!(resync["ts"], Value::Null);
    assert!(resync["ts_recv"].as_u64().is_some());
    assert!(resync["detail"]
        .as_str()
        .unwrap()
        .starts_with("book:binance:BTC-USDT: "));
    // The gateway asks, finds seq 11 < 13, and asks again later: then seq 13 is there.
    wait_until("a store lookup after the gap", || {
        store.asked("book:binance:BTC-USDT") > asked_before
    })
    .await;
    let snap13 = h.encode(book(
        BookAction::Snapshot,
        &[("100", "1"), ("99", "1")],
        13,
        None,
    ));
    store.put(snap13);
    // The buffered deltas 14 and 15 are applied to snapshot 13 before anyone sees it: the
    // bot gets one snapshot of the current book (seq 15), not 13 followed by stale deltas.
    let snap = next_text(&mut bot).await;
    let v: Value = serde_json::from_str(&snap).unwrap();
    assert_eq!(v["action"], "snapshot");
    assert_eq!(v["seq"], 15);
    assert_eq!(
        v["bids"],
        json!([["100", "1"], ["99", "1"], ["98", "1"], ["97", "1"]])
    );
    assert_eq!(v["asks"], json!([["101", "1"]]));
    let d16 = h
        .publish(book(BookAction::Delta, &[("96", "1")], 16, Some(15)))
        .await;
    assert_eq!(next_text(&mut bot).await, d16);
    let chain: Vec<Value> = [snap, d16]
        .iter()
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    assert_chain(&chain);
    h.stop().await;
}

/// A big trade, so socket buffers fill after a few thousand.
fn big_trade(i: usize) -> Event {
    trade(
        Exchange::Binance,
        "BTC-USDT",
        &format!("{i}-{}", "x".repeat(16 * 1024)),
    )
}

/// Feeds big trades until `done`, keeping at most 4 ahead of the fast bot, which must see
/// every one of them in order.
async fn feed_until(h: &mut Harness, fast: &mut Ws, done: impl FnMut(&Harness) -> bool) -> usize {
    feed_events_until(h, fast, big_trade, done).await
}

async fn feed_events_until(
    h: &mut Harness,
    fast: &mut Ws,
    make: impl Fn(usize) -> Event,
    mut done: impl FnMut(&Harness) -> bool,
) -> usize {
    let mut sent = std::collections::VecDeque::new();
    let mut i = 0;
    while !done(h) {
        assert!(i < 20_000, "condition not reached after {i} messages");
        sent.push_back(h.publish(make(i)).await);
        i += 1;
        if sent.len() >= 4 {
            let want = sent.pop_front().unwrap();
            assert!(
                next_text(fast).await == want,
                "fast bot missed or reordered a frame"
            );
        }
    }
    while let Some(want) = sent.pop_front() {
        assert!(
            next_text(fast).await == want,
            "fast bot missed or reordered a frame"
        );
    }
    i
}

#[tokio::test]
async fn slow_bot_is_disconnected_while_a_fast_bot_gets_everything() {
    let cfg = BotsConfig {
        queue_size: 8,
        slow_client: SlowClientPolicy::Disconnect,
        ..config()
    };
    let mut h = start(cfg).await;
    let mut fast = h.connect().await;
    let mut slow = h.connect().await;
    subscribe(&mut fast, &["trade:binance:BTC-USDT"]).await;
    subscribe(&mut slow, &["trade:binance:BTC-USDT"]).await;
    // `slow` never reads from here on.
    feed_until(&mut h, &mut fast, |h| {
        h.stats.snapshot().slow_disconnects == 1
    })
    .await;
    wait_until("the slow bot to be gone", || {
        h.stats.snapshot().clients == 1
    })
    .await;
    // The fast bot is unaffected.
    let end = h.publish(trade(Exchange::Binance, "BTC-USDT", "end")).await;
    assert_eq!(next_text(&mut fast).await, end);
    // What the slow bot finally reads ends with the connection closing.
    let ended = within("the slow bot's stream to end", async {
        loop {
            match slow.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return true,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended);
    assert_eq!(h.stats.snapshot().frames_dropped, 0);
    h.stop().await;
}

#[tokio::test]
async fn drop_oldest_keeps_a_slow_bot_connected_and_counts_drops() {
    let cfg = BotsConfig {
        queue_size: 8,
        slow_client: SlowClientPolicy::DropOldest,
        ..config()
    };
    let mut h = start(cfg).await;
    let mut fast = h.connect().await;
    let mut slow = h.connect().await;
    subscribe(&mut fast, &["trade:binance:BTC-USDT"]).await;
    subscribe(&mut slow, &["trade:binance:BTC-USDT"]).await;
    let fed = feed_until(&mut h, &mut fast, |h| {
        h.stats.snapshot().frames_dropped >= 10
    })
    .await;
    let stats = h.stats.snapshot();
    assert_eq!((stats.clients, stats.slow_disconnects), (2, 0));
    // The slow bot catches up: it reads what survived, in order, then answers a ping.
    send(&mut slow, json!({"op":"ping","req":"late"})).await;
    let mut seen = 0usize;
    let mut last_index = None;
    loop {
        let v = next_json(&mut slow).await;
        if v["type"] == "pong" {
            assert_eq!(v["req"], "late");
            break;
        }
        let id = v["trade_id"].as_str().unwrap();
        let index: usize = id.split('-').next().unwrap().parse().unwrap();
        assert!(last_index.is_none_or(|l| index > l), "frames stay in order");
        last_index = Some(index);
        seen += 1;
    }
    assert!(seen < fed, "some frames were dropped ({seen} of {fed})");
    // Everything the slow bot did not get was dropped (and counted) before its pong.
    assert!(h.stats.snapshot().frames_dropped as usize >= fed - seen);
    h.stop().await;
}

#[tokio::test]
async fn auth_accepts_header_and_query_tokens_only() {
    let cfg = BotsConfig {
        tokens: vec!["s3cret".into(), "other".into()],
        ..config()
    };
    let h = start(cfg).await;
    let url = format!("ws://{}/", h.addr);
    for bad in [url.clone(), format!("{url}?token=nope")] {
        match tokio_tungstenite::connect_async(bad.as_str()).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("{bad}: expected 401, got {:?}", other.map(|_| ())),
        }
    }
    let mut wrong = url.as_str().into_client_request().unwrap();
    wrong
        .headers_mut()
        .insert("Authorization", "Bearer s3cre".parse().unwrap());
    assert!(
        matches!(tokio_tungstenite::connect_async(wrong).await, Err(WsError::Http(r)) if r.status() == 401)
    );

    let mut good = url.as_str().into_client_request().unwrap();
    good.headers_mut()
        .insert("Authorization", "Bearer s3cret".parse().unwrap());
    let (mut a, _) = tokio_tungstenite::connect_async(good).await.unwrap();
    let (mut b, _) = tokio_tungstenite::connect_async(format!("{url}?token=other"))
        .await
        .unwrap();
    for ws in [&mut a, &mut b] {
        send(ws, json!({"op":"ping","req":1})).await;
        assert_eq!(next_json(ws).await, json!({"type":"pong","req":1}));
    }
    h.stop().await;
}

#[tokio::test]
async fn shutdown_flushes_and_sends_a_close_frame() {
    let mut h = start(config()).await;
    let mut bot = h.connect().await;
    subscribe(&mut bot, &["trade:binance:BTC-USDT"]).await;
    let t = h.publish(trade(Exchange::Binance, "BTC-USDT", "1")).await;
    assert_eq!(next_text(&mut bot).await, t);
    h.shutdown.cancel();
    let frame = within("a close frame", async {
        loop {
            match bot.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected Close, got {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(frame.map(|f| f.code), Some(CloseCode::Away));
    within("serve to return", h.server).await.unwrap().unwrap();
}

#[tokio::test]
async fn silent_bot_is_closed_after_three_ping_intervals() {
    // Silence of 3 × 300 ms: long enough that a live bot on a loaded machine (the test
    // suite runs many binaries at once) is never mistaken for a silent one.
    let cfg = BotsConfig {
        ping_interval_ms: 300,
        ..config()
    };
    let h = start(cfg).await;
    // A raw TCP client that completes the handshake but never reads or answers pings.
    let _silent = h.connect().await;
    let mut live = h.connect().await;
    wait_until("both bots counted", || h.stats.snapshot().clients == 2).await;
    // The live bot keeps reading, so its client library answers pings.
    let reader = tokio::spawn(async move { while let Some(Ok(_)) = live.next().await {} });
    wait_until("the silent bot to be closed", || {
        h.stats.snapshot().clients <= 1
    })
    .await;
    assert_eq!(
        h.stats.snapshot().clients,
        1,
        "the bot that answers pings stays"
    );
    assert!(!reader.is_finished(), "the bot that answers pings stays");
    h.stop().await;
}

/// A book delta big enough to fill socket buffers: the same 500 price levels, new sizes.
fn big_delta(i: usize) -> Event {
    let sizes: Vec<(String, String)> = (1..=500)
        .map(|p| (format!("{p}.5"), format!("{}", i + 1)))
        .collect();
    let levels: Vec<(&str, &str)> = sizes
        .iter()
        .map(|(p, s)| (p.as_str(), s.as_str()))
        .collect();
    let seq = i as u64 + 2;
    book(BookAction::Delta, &levels, seq, Some(seq - 1))
}

#[tokio::test]
async fn drop_oldest_on_a_book_resyncs_the_slow_bot_with_a_snapshot() {
    let cfg = BotsConfig {
        queue_size: 8,
        slow_client: SlowClientPolicy::DropOldest,
        ..config()
    };
    let mut h = start(cfg).await;
    let mut fast = h.connect().await;
    let mut slow = h.connect().await;
    subscribe(&mut fast, &["book:binance:BTC-USDT"]).await;
    subscribe(&mut slow, &["book:binance:BTC-USDT"]).await;
    let snap = h
        .publish(book(BookAction::Snapshot, &[("1.5", "1")], 1, None))
        .await;
    assert_eq!(next_text(&mut fast).await, snap);
    let fed = feed_events_until(&mut h, &mut fast, big_delta, |h| {
        h.stats.snapshot().frames_dropped >= 10
    })
    .await;
    // One more delta reaches the router after the drops: the slow bot gets a resync there.
    let last = h.publish(big_delta(fed)).await;
    assert!(
        next_text(&mut fast).await == last,
        "fast bot got the last delta"
    );
    send(&mut slow, json!({"op":"ping","req":"late"})).await;
    // What the slow bot sees is a series of exact chains, each restarted by a resync status.
    let mut chains: Vec<Vec<Value>> = Vec::new();
    let mut resyncs = 0;
    loop {
        let v = next_json(&mut slow).await;
        match v["type"].as_str() {
            Some("pong") => break,
            Some("status") => {
                assert_eq!(v["state"], "resync");
                resyncs += 1;
                chains.push(Vec::new());
            }
            Some("book") => match chains.last_mut() {
                Some(chain) => chain.push(v),
                None => chains.push(vec![v]),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(resyncs >= 1, "the slow bot was told about its broken chain");
    for (i, chain) in chains.iter().enumerate() {
        // Before the first resync the bot may have seen nothing of the book yet; after each
        // resync a fresh snapshot must come first.
        if i > 0 || resyncs == chains.len() {
            assert!(!chain.is_empty(), "chain {i} after a resync is empty");
            assert_eq!(
                chain[0]["action"], "snapshot",
                "chain {i} starts with a snapshot"
            );
        }
        if !chain.is_empty() {
            assert_chain(chain);
        }
    }
    h.stop().await;
}
