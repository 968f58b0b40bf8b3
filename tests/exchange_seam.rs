//! The venue seam on its own: made-up venues described only through `Adapter` (client-sent
//! heartbeats and numeric acks; string request ids and book checksums), driven by
//! `exchange::connection::run` against tiny servers written here. Shows that what a venue
//! needs is said by its adapter, not by the connection.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, WAIT};
use futures_util::{SinkExt, StreamExt};
use mdbridge::book::OrderBook;
use mdbridge::config::{FeedChannel, FeedConfig};
use mdbridge::event::{Book, BookAction, Event, Exchange, Level, StatusState, Trade};
use mdbridge::exchange::{
    AckId, Adapter, BookChecksum, BookSyncMode, Heartbeat, ParseError, Parsed,
};
use mdbridge::health::Health;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A venue that acks `{"sub":N}` with `{"ack":N}` and wants a text `ping` every 50 ms.
struct PingVenue;

impl Adapter for PingVenue {
    fn exchange(&self) -> Exchange {
        Exchange::Okx
    }
    fn default_ws_url(&self) -> &'static str {
        "ws://unused"
    }
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::ClientSends {
            every: Duration::from_millis(50),
            frame: "ping",
        }
    }
    fn subscribe_frames(&self, _: &[String], _: &[FeedChannel]) -> Vec<(AckId, String)> {
        vec![(AckId::Num(7), r#"{"sub":7}"#.to_string())]
    }
    fn parse(&self, frame: &mut Vec<u8>, _ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        match frame.as_slice() {
            b"pong" => Ok(Vec::new()),
            br#"{"ack":7}"# => Ok(vec![Parsed::Ack {
                id: Some(AckId::Num(7)),
            }]),
            _ => Err(ParseError::UnknownShape),
        }
    }
}

#[tokio::test]
async fn a_client_sent_heartbeat_is_sent_and_its_answers_keep_the_feed_quietly_alive() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let pings = Arc::new(AtomicU64::new(0));
    let seen = pings.clone();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
            return;
        };
        while let Some(Ok(Message::Text(t))) = ws.next().await {
            let reply = match t.as_str() {
                r#"{"sub":7}"# => r#"{"ack":7}"#,
                "ping" => {
                    seen.fetch_add(1, Ordering::SeqCst);
                    "pong"
                }
                _ => return,
            };
            if ws.send(Message::text(reply)).await.is_err() {
                return;
            }
        }
    });
    let mut feed = FeedConfig::new(
        Exchange::Okx,
        vec!["BTC-USDT".into()],
        vec![FeedChannel::Trade],
    );
    feed.url = Some(format!("ws://127.0.0.1:{port}/"));
    let (tx, mut events) = mpsc::channel::<Event>(64);
    let stop = CancellationToken::new();
    let health = Health::new().register("feed");
    let task = tokio::spawn(mdbridge::exchange::connection::run(
        Arc::new(PingVenue),
        feed,
        tx,
        health,
        stop.clone(),
    ));
    let first = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("in time");
    assert!(
        matches!(&first, Some(Event::Status(s)) if s.state == StatusState::Connected),
        "{first:?}"
    );
    wait_until("three client pings answered", WAIT, || async {
        pings.load(Ordering::SeqCst) >= 3
    })
    .await;
    // Pongs are control frames: nothing else reached the bus.
    assert!(events.try_recv().is_err());
    stop.cancel();
    let _ = task.await;
}

/// A venue in the style of Bybit/OKX: requests carry a string `req_id` that the answer
/// echoes, books come as snapshot + updates on the socket with a checksum of the book
/// after each message (here: 100 × bid levels + ask levels, so a test can write it by hand).
struct TextVenue;

fn levels_checksum(book: &OrderBook, sum: u32) -> bool {
    (book.bids().count() * 100 + book.asks().count()) as u64 == u64::from(sum)
}

fn wire_levels(v: &Value) -> Vec<Level> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| Some(Level(l[0].as_str()?.into(), l[1].as_str()?.into())))
        .collect()
}

impl Adapter for TextVenue {
    fn exchange(&self) -> Exchange {
        Exchange::Bybit
    }
    fn default_ws_url(&self) -> &'static str {
        "ws://unused"
    }
    fn book_sync(&self) -> BookSyncMode {
        BookSyncMode::WsSnapshot
    }
    fn book_checksum(&self) -> Option<BookChecksum> {
        Some(levels_checksum)
    }
    fn subscribe_frames(&self, _: &[String], channels: &[FeedChannel]) -> Vec<(AckId, String)> {
        channels
            .iter()
            .map(|c| {
                let topic = if *c == FeedChannel::Book {
                    "book"
                } else {
                    "trades"
                };
                let id = format!("sub-{topic}");
                let frame = json!({"op": "subscribe", "topic": topic, "req_id": id});
                (AckId::Text(id), frame.to_string())
            })
            .collect()
    }
    fn unsubscribe_frames(&self, _: &[String], channels: &[FeedChannel]) -> Vec<(AckId, String)> {
        self.subscribe_frames(&[], channels)
            .into_iter()
            .map(|(id, frame)| {
                (
                    id,
                    frame.replace(r#""op":"subscribe""#, r#""op":"unsubscribe""#),
                )
            })
            .collect()
    }
    fn parse(&self, frame: &mut Vec<u8>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        let v: Value =
            serde_json::from_slice(frame).map_err(|e| ParseError::Json(e.to_string()))?;
        if let Some(id) = v["req_id"].as_str() {
            return Ok(vec![Parsed::Ack {
                id: Some(AckId::from(id)),
            }]);
        }
        if let Some(id) = v["trade"].as_str() {
            return Ok(vec![Parsed::Event(Event::Trade(Trade {
                exchange: Exchange::Bybit,
                symbol: "BTC-USDT".into(),
                ts: None,
                ts_recv,
                trade_id: id.into(),
                price: "1".into(),
                size: "1".into(),
                side: None,
            }))]);
        }
        let action = match v["book"].as_str() {
            Some("snapshot") => BookAction::Snapshot,
            Some("update") => BookAction::Delta,
            _ => return Err(ParseError::UnknownShape),
        };
        let book = Book {
            exchange: Exchange::Bybit,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv,
            action,
            bids: wire_levels(&v["bids"]),
            asks: wire_levels(&v["asks"]),
            seq: None,
            prev_seq: None,
        };
        let checksum = v["sum"].as_u64().and_then(|n| u32::try_from(n).ok());
        Ok(vec![Parsed::Book { book, checksum }])
    }
}

type Script = fn(usize, &Value) -> Vec<Value>;

/// Serves every connection (numbered from 0) with `script`: each text frame received is
/// answered with the frames it returns.
async fn scripted_server(script: Script) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        for conn in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(Message::Text(t))) = ws.next().await {
                    let Ok(got) = serde_json::from_str::<Value>(&t) else {
                        return;
                    };
                    for reply in script(conn, &got) {
                        if ws.send(Message::text(reply.to_string())).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    port
}

/// Runs a `TextVenue` feed against the server on `port` until `done` says the events so
/// far are enough; returns them.
async fn run_text_venue(
    port: u16,
    channels: Vec<FeedChannel>,
    done: fn(&[Event]) -> bool,
) -> Vec<Event> {
    let feed = FeedConfig::new(Exchange::Bybit, vec!["BTC-USDT".into()], channels);
    run_text_feed(port, feed, done).await
}

async fn run_text_feed(port: u16, mut feed: FeedConfig, done: fn(&[Event]) -> bool) -> Vec<Event> {
    feed.url = Some(format!("ws://127.0.0.1:{port}/"));
    (feed.reconnect_min_ms, feed.reconnect_max_ms) = (10, 50);
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let stop = CancellationToken::new();
    let health = Health::new().register("feed");
    let task = tokio::spawn(mdbridge::exchange::connection::run(
        Arc::new(TextVenue),
        feed,
        tx,
        health,
        stop.clone(),
    ));
    let mut events = Vec::new();
    while !done(&events) {
        match tokio::time::timeout(WAIT, rx.recv()).await {
            Ok(Some(e)) => events.push(e),
            other => panic!("feed ended or timed out ({other:?}) after {events:#?}"),
        }
    }
    stop.cancel();
    let _ = task.await;
    events
}

/// `Connected`, `Book Snapshot 1 -`, `Trade 7`: what a test asserts on.
fn describe(e: &Event) -> String {
    match e {
        Event::Status(s) => format!("{:?}", s.state),
        Event::Book(b) => format!("{:?} {:?} {:?}", b.action, b.seq, b.prev_seq),
        Event::Trade(t) => format!("Trade {}", t.trade_id),
        other => format!("{other:?}"),
    }
}

#[tokio::test]
async fn string_request_ids_are_matched_to_their_answers() {
    // The book answer comes first, then a trade, then the trades answer: the feed is
    // subscribed only once the answer naming `sub-trades` is in.
    let port = scripted_server(|_, got| match got["topic"].as_str() {
        Some("book") => vec![
            json!({"op": "subscribe", "success": true, "req_id": "sub-book"}),
            json!({"trade": "1"}),
            json!({"op": "subscribe", "success": true, "req_id": "sub-trades"}),
        ],
        _ => Vec::new(),
    })
    .await;
    let events = run_text_venue(port, vec![FeedChannel::Trade, FeedChannel::Book], |e| {
        e.len() >= 2
    })
    .await;
    let seen: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(seen, ["Trade 1", "Connected"]);
}

#[tokio::test]
async fn a_checksum_mismatch_resyncs_and_the_fresh_snapshot_is_right() {
    fn lv(p: &str, q: &str) -> Value {
        json!([p, q])
    }
    // Connection 0: a good snapshot (2 bids, 1 ask: sum 201), then an update whose
    // checksum disagrees (the book would have 3 bids: 301). Connection 1: a good snapshot
    // and a good update.
    let port = scripted_server(|conn, _| {
        let ack = json!({"op": "subscribe", "success": true, "req_id": "sub-book"});
        match conn {
            0 => vec![
                ack,
                json!({"book": "snapshot", "bids": [lv("100", "1"), lv("99", "1")], "asks": [lv("101", "1")], "sum": 201}),
                json!({"book": "update", "bids": [lv("98", "1")], "asks": [], "sum": 999}),
            ],
            _ => vec![
                ack,
                json!({"book": "snapshot", "bids": [lv("100", "2")], "asks": [lv("101", "1"), lv("102", "1")], "sum": 102}),
                json!({"book": "update", "bids": [lv("99", "1")], "asks": [], "sum": 202}),
            ],
        }
    })
    .await;
    let events = run_text_venue(port, vec![FeedChannel::Book], |e| {
        e.iter()
            .any(|e| matches!(e, Event::Book(b) if b.seq == Some(3)))
    })
    .await;
    let seen: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        seen,
        [
            "Connected",
            "Snapshot Some(1) None",
            "Resync",
            "Disconnected",
            "Reconnecting",
            "Connected",
            "Snapshot Some(2) None",
            "Delta Some(3) Some(2)",
        ],
        "the update that broke the checksum never reaches bots"
    );
    // What a bot rebuilds from the fresh snapshot and the delta is the venue's book.
    let mut rebuilt = OrderBook::new();
    for e in &events[6..] {
        let Event::Book(b) = e else { panic!("{e:?}") };
        match b.action {
            BookAction::Snapshot => rebuilt.reset(b).expect("snapshot"),
            BookAction::Delta => rebuilt.apply(b).expect("delta"),
        }
    }
    let bids: Vec<&Level> = rebuilt.bids().collect();
    let asks: Vec<&Level> = rebuilt.asks().collect();
    assert_eq!(
        bids,
        [
            &Level("100".into(), "2".into()),
            &Level("99".into(), "1".into())
        ]
    );
    assert_eq!(
        asks,
        [
            &Level("101".into(), "1".into()),
            &Level("102".into(), "1".into())
        ]
    );
    assert!(levels_checksum(&rebuilt, 202));
}

/// What the server of `the_old_socket_is_unsubscribed_at_a_rotation` was asked to drop,
/// by connection.
static UNSUBSCRIBED: std::sync::Mutex<Vec<(usize, String)>> = std::sync::Mutex::new(Vec::new());

#[tokio::test]
async fn the_old_socket_is_unsubscribed_at_a_rotation() {
    // Every connection is acked; the second one (the rotation's new socket) also carries a
    // trade, emitted once the feed has switched to it.
    let port = scripted_server(|conn, got| match got["op"].as_str() {
        Some("subscribe") => {
            let mut out =
                vec![json!({"op": "subscribe", "success": true, "req_id": got["req_id"]})];
            if conn == 1 {
                out.push(json!({"trade": "1"}));
            }
            out
        }
        Some("unsubscribe") => {
            if let Ok(mut u) = UNSUBSCRIBED.lock() {
                u.push((conn, got["topic"].as_str().unwrap_or("").to_string()));
            }
            Vec::new()
        }
        _ => Vec::new(),
    })
    .await;
    let mut feed = FeedConfig::new(
        Exchange::Bybit,
        vec!["BTC-USDT".into()],
        vec![FeedChannel::Trade],
    );
    feed.rotate_after_secs = 1;
    let events = run_text_feed(port, feed, |e| {
        e.iter().any(|e| matches!(e, Event::Trade(_)))
    })
    .await;
    let seen: Vec<String> = events.iter().map(describe).collect();
    assert_eq!(
        seen,
        ["Connected", "Trade 1"],
        "a rotation says nothing to bots"
    );
    wait_until("the old socket unsubscribed", WAIT, || async {
        UNSUBSCRIBED.lock().map(|u| !u.is_empty()).unwrap_or(false)
    })
    .await;
    let asked = UNSUBSCRIBED.lock().map(|u| u.clone()).unwrap_or_default();
    assert_eq!(
        asked,
        [(0, "trades".to_string())],
        "only the old socket, for what it carried"
    );
}
