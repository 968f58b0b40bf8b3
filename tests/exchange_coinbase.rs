//! Coinbase Advanced Trade: fixture conformance (the documentation's examples → exact
//! events), the feed against a tiny Coinbase-like server written here from the docs (not
//! `src/simulator`, so the adapter and the simulator cannot share a misreading), and the
//! whole path simulator → publisher → Redis → executor → bot.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use common::book_chain::BookChain;
use common::*;
use futures_util::{SinkExt, StreamExt};
use mdbridge::config::{FeedChannel, FeedConfig};
use mdbridge::event::{BookAction, Event, Exchange, Side, StatusState};
use mdbridge::exchange::run_feed;
use mdbridge::health::Health;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

#[test]
fn fixtures_normalize_to_exactly_the_expected_events() {
    let frames = std::fs::read(fixture("coinbase/frames.jsonl")).expect("frames");
    let expected = std::fs::read_to_string(fixture("coinbase/expected.jsonl")).expect("expected");
    let mut out = Vec::new();
    let mut err = Vec::new();
    let stats = mdbridge::exchange::normalize(Exchange::Coinbase, &frames[..], &mut out, &mut err)
        .expect("normalize");
    assert!(err.is_empty(), "{}", String::from_utf8_lossy(&err));
    let got: Vec<Value> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).expect("JSON line");
            assert!(v["ts_recv"].as_u64().is_some(), "{v}");
            v.as_object_mut().expect("object").remove("ts_recv");
            v
        })
        .collect();
    let want: Vec<Value> = expected
        .lines()
        .map(|l| serde_json::from_str(l).expect("expected JSON"))
        .collect();
    assert_eq!(got, want);
    assert_eq!((stats.lines, stats.events, stats.errors), (12, 8, 0));
}

/// A Coinbase-like server: answers each subscribe with the cumulative `subscriptions`
/// message, then sends the frames the test pushes, numbering them itself
/// (`"sequence_num":SEQ`); the frame `SKIP` uses up a number without sending anything.
struct Scripted {
    port: u16,
    frames: broadcast::Sender<String>,
    received: Arc<Mutex<Vec<String>>>,
    connections: Arc<std::sync::atomic::AtomicU64>,
}

impl Scripted {
    async fn start() -> Scripted {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (frames, _) = broadcast::channel(1024);
        let received = Arc::new(Mutex::new(Vec::new()));
        let (tx, rec) = (frames.clone(), received.clone());
        let connections = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = connections.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (tx, rec) = (tx.clone(), rec.clone());
                tokio::spawn(async move {
                    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    serve(ws, tx, rec).await;
                });
            }
        });
        Scripted {
            port,
            frames,
            received,
            connections,
        }
    }

    fn send(&self, frame: &str) {
        let _ = self.frames.send(frame.to_string());
    }
}

async fn serve(
    mut ws: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    frames: broadcast::Sender<String>,
    received: Arc<Mutex<Vec<String>>>,
) {
    let mut rx = frames.subscribe();
    let mut seq = 0u64;
    let mut subs: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(Message::Text(t))) = msg else { return };
                received.lock().expect("lock").push(t.to_string());
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                let channel = v["channel"].as_str().unwrap_or_default().to_string();
                let products = v["product_ids"].as_array().cloned().unwrap_or_default();
                subs.entry(channel).or_default().extend(products);
                let reply = serde_json::json!({"channel":"subscriptions","client_id":"",
                    "timestamp":"2023-02-09T20:32:50.714964855Z","sequence_num":seq,
                    "events":[{"subscriptions":subs}]});
                seq += 1;
                if ws.send(Message::text(reply.to_string())).await.is_err() { return }
            }
            frame = rx.recv() => {
                let Ok(frame) = frame else { return };
                let n = seq;
                seq += 1;
                if frame == "SKIP" { continue }
                let text = frame.replace("SEQ", &n.to_string());
                if ws.send(Message::text(text)).await.is_err() { return }
            }
        }
    }
}

fn l2(kind: &str, product: &str, side: &str, price: &str, qty: &str) -> String {
    format!(
        r#"{{"channel":"l2_data","client_id":"","timestamp":"2023-02-09T20:32:50.714964855Z","sequence_num":SEQ,"events":[{{"type":"{kind}","product_id":"{product}","updates":[{{"side":"{side}","event_time":"1970-01-01T00:00:00Z","price_level":"{price}","new_quantity":"{qty}"}}]}}]}}"#
    )
}

fn trades(kind: &str, list: &[(&str, &str)]) -> String {
    let trades: Vec<String> = list
        .iter()
        .map(|(id, side)| format!(r#"{{"trade_id":"{id}","product_id":"BTC-USD","price":"21921.73","size":"0.5","side":"{side}","time":"2023-02-09T20:32:50.{id:0>6}Z"}}"#))
        .collect();
    format!(
        r#"{{"channel":"market_trades","client_id":"","timestamp":"2023-02-09T20:32:51Z","sequence_num":SEQ,"events":[{{"type":"{kind}","trades":[{}]}}]}}"#,
        trades.join(",")
    )
}

struct Feed {
    events: mpsc::Receiver<Event>,
    stop: CancellationToken,
}

impl Feed {
    fn start(port: u16, channels: Vec<FeedChannel>) -> Feed {
        Feed::start_with(port, channels, |_| {})
    }

    fn start_with(
        port: u16,
        channels: Vec<FeedChannel>,
        tweak: impl FnOnce(&mut FeedConfig),
    ) -> Feed {
        let mut feed = FeedConfig::new(
            Exchange::Coinbase,
            vec!["BTC-USD".into(), "ETH-USD".into()],
            channels,
        );
        feed.url = Some(format!("ws://127.0.0.1:{port}/"));
        feed.reconnect_min_ms = 20;
        feed.reconnect_max_ms = 100;
        tweak(&mut feed);
        let (tx, events) = mpsc::channel(1024);
        let stop = CancellationToken::new();
        let health = Health::new().register("feed");
        tokio::spawn(run_feed(feed, tx, health, stop.clone()));
        Feed { events, stop }
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event in time")
            .expect("feed running")
    }

    async fn until_status(&mut self, state: StatusState) -> Vec<Event> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await;
            let done = matches!(&e, Event::Status(s) if s.state == state);
            seen.push(e);
            if done {
                return seen;
            }
        }
    }
}

/// (action, symbol, seq, prev_seq) of a book event.
fn book(e: &Event) -> (BookAction, String, Option<u64>, Option<u64>) {
    match e {
        Event::Book(b) => (b.action, b.symbol.clone(), b.seq, b.prev_seq),
        other => panic!("book expected, got {other:?}"),
    }
}

#[tokio::test]
async fn a_sequence_gap_on_a_socket_carrying_two_products_resyncs_both() {
    let server = Scripted::start().await;
    let mut feed = Feed::start(server.port, vec![FeedChannel::Book]);
    feed.until_status(StatusState::Connected).await;
    let sent = server.received.lock().expect("lock").clone();
    assert_eq!(sent.len(), 3, "heartbeats, level2, status: {sent:?}");
    assert!(sent.iter().any(|s| s.contains(r#""channel":"heartbeats""#)));

    server.send(&l2("snapshot", "BTC-USD", "bid", "100.5", "1"));
    server.send(&l2("snapshot", "ETH-USD", "offer", "20.25", "3"));
    server.send(&l2("update", "BTC-USD", "offer", "101", "2"));
    for _ in 0..3 {
        let e = feed.next().await;
        let (action, symbol, seq, prev) = book(&e);
        match (action, symbol.as_str()) {
            (BookAction::Snapshot, _) => assert_eq!((seq, prev), (Some(1), None), "{e:?}"),
            (BookAction::Delta, "BTC-USD") => assert_eq!((seq, prev), (Some(2), Some(1))),
            other => panic!("{other:?}"),
        }
    }
    // One number of the connection goes missing: both books are in doubt.
    server.send("SKIP");
    server.send(&l2("update", "ETH-USD", "offer", "20.5", "1"));
    let seen = feed.until_status(StatusState::Reconnecting).await;
    let states: Vec<(StatusState, String)> = seen
        .iter()
        .map(|e| match e {
            Event::Status(s) => (s.state, s.detail.clone().unwrap_or_default()),
            other => panic!("only status events after a gap, got {other:?}"),
        })
        .collect();
    assert_eq!(states[0].0, StatusState::Disconnected);
    assert!(states[0].1.contains("sequence gap"), "{states:?}");
    let resynced: HashSet<&str> = states[1..3]
        .iter()
        .map(|(state, detail)| {
            assert_eq!(*state, StatusState::Resync);
            detail.split(':').take(3).last().unwrap_or_default()
        })
        .collect();
    assert_eq!(resynced, HashSet::from(["BTC-USD", "ETH-USD"]));
    assert_eq!(states.len(), 4, "{states:?}");

    // The new connection's snapshots continue each book's numbering.
    feed.until_status(StatusState::Connected).await;
    server.send(&l2("snapshot", "BTC-USD", "bid", "99", "1"));
    server.send(&l2("snapshot", "ETH-USD", "bid", "19", "1"));
    let mut snapshots = vec![book(&feed.next().await), book(&feed.next().await)];
    snapshots.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(
        snapshots,
        [
            (BookAction::Snapshot, "BTC-USD".into(), Some(3), None),
            (BookAction::Snapshot, "ETH-USD".into(), Some(2), None),
        ]
    );
    feed.stop.cancel();
}

#[tokio::test]
async fn trades_take_the_takers_side_and_repeated_batches_are_dropped() {
    let server = Scripted::start().await;
    let mut feed = Feed::start(server.port, vec![FeedChannel::Trade]);
    feed.until_status(StatusState::Connected).await;
    // Snapshot batch, newest first as Coinbase sends it; BUY is the maker's side.
    server.send(&trades("snapshot", &[("3", "SELL"), ("2", "BUY")]));
    server.send(&trades("update", &[("4", "BUY")]));
    let mut got = Vec::new();
    for _ in 0..3 {
        match feed.next().await {
            Event::Trade(t) => got.push((t.trade_id, t.side)),
            other => panic!("trade expected, got {other:?}"),
        }
    }
    assert_eq!(
        got,
        [
            ("2".to_string(), Some(Side::Sell)),
            ("3".to_string(), Some(Side::Buy)),
            ("4".to_string(), Some(Side::Sell)),
        ]
    );
    // After a reconnect the batch repeats what was emitted: only the new trade passes.
    server.send("SKIP");
    server.send(&trades("update", &[("5", "BUY")]));
    feed.until_status(StatusState::Connected).await;
    server.send(&trades(
        "snapshot",
        &[("6", "SELL"), ("4", "BUY"), ("3", "SELL")],
    ));
    server.send(&trades("update", &[("7", "SELL")]));
    let mut ids = Vec::new();
    while ids.len() < 2 {
        if let Event::Trade(t) = feed.next().await {
            ids.push(t.trade_id);
        }
    }
    assert_eq!(ids, ["6", "7"]);
    feed.stop.cancel();
}

/// A `level2` snapshot of `levels` bids.
fn big_snapshot(levels: u32) -> String {
    let updates: Vec<String> = (0..levels)
        .map(|i| format!(r#"{{"side":"bid","event_time":"1970-01-01T00:00:00Z","price_level":"{}.{:02}","new_quantity":"1.5"}}"#, 10_000 + i / 100, i % 100))
        .collect();
    format!(
        r#"{{"channel":"l2_data","client_id":"","timestamp":"2023-02-09T20:32:50.714964855Z","sequence_num":SEQ,"events":[{{"type":"snapshot","product_id":"BTC-USD","updates":[{}]}}]}}"#,
        updates.join(",")
    )
}

#[tokio::test]
async fn book_snapshots_up_to_max_message_bytes_pass_larger_ones_are_refused() {
    let server = Scripted::start().await;
    let mut feed = Feed::start_with(server.port, vec![FeedChannel::Book], |f| {
        f.max_message_bytes = 1024 * 1024;
    });
    feed.until_status(StatusState::Connected).await;
    let fits = big_snapshot(8_000);
    assert!(
        fits.len() > 700_000 && fits.len() < 1024 * 1024,
        "{}",
        fits.len()
    );
    server.send(&fits);
    match feed.next().await {
        Event::Book(b) => {
            assert_eq!((b.bids.len(), b.action), (8_000, BookAction::Snapshot));
            assert_eq!(b.bids[0].0.as_str(), "10079.99", "best first");
        }
        other => panic!("snapshot expected, got {other:?}"),
    }
    server.send(&big_snapshot(14_000));
    let seen = feed.until_status(StatusState::Disconnected).await;
    let Some(Event::Status(s)) = seen.last() else {
        panic!()
    };
    assert!(
        s.detail
            .as_deref()
            .is_some_and(|d| d.contains("socket error")),
        "{s:?}"
    );
    feed.stop.cancel();
}

#[tokio::test]
async fn rotation_switches_to_the_new_sockets_snapshots_without_resync_or_repeated_trades() {
    let server = Scripted::start().await;
    let mut feed = Feed::start_with(
        server.port,
        vec![FeedChannel::Book, FeedChannel::Trade],
        |f| {
            f.rotate_after_secs = 1;
        },
    );
    feed.until_status(StatusState::Connected).await;
    server.send(&l2("snapshot", "BTC-USD", "bid", "100", "1"));
    server.send(&l2("snapshot", "ETH-USD", "bid", "20", "1"));
    server.send(&l2("update", "BTC-USD", "bid", "101", "1"));
    for _ in 0..3 {
        book(&feed.next().await);
    }
    // The second socket is open and has sent its four subscribe requests.
    wait_until("the rotation's socket subscribed", WAIT, || async {
        server.connections.load(std::sync::atomic::Ordering::SeqCst) == 2
            && server.received.lock().expect("lock").len() == 8
    })
    .await;
    // Both sockets get these; the new one's snapshots let the feed switch.
    server.send(&l2("snapshot", "BTC-USD", "bid", "102", "1"));
    server.send(&l2("snapshot", "ETH-USD", "bid", "21", "1"));
    server.send(&trades("update", &[("9", "BUY")]));
    wait_until("the old socket closed", WAIT, || async {
        server.frames.receiver_count() == 1
    })
    .await;
    server.send(&l2("update", "BTC-USD", "offer", "103", "2"));
    let mut last: std::collections::HashMap<String, u64> =
        [("BTC-USD".to_string(), 2), ("ETH-USD".to_string(), 1)].into();
    let mut trades_seen = 0;
    loop {
        match feed.next().await {
            Event::Book(b) => {
                let prev = last.insert(b.symbol.clone(), b.seq.expect("seq"));
                if b.action == BookAction::Delta {
                    assert_eq!(b.prev_seq, prev, "chain: {b:?}");
                    if b.symbol == "BTC-USD" && b.asks.len() == 1 {
                        break;
                    }
                } else {
                    assert!(b.seq > prev, "numbering goes on: {b:?}");
                }
            }
            Event::Trade(t) => {
                assert_eq!(t.trade_id, "9");
                trades_seen += 1;
            }
            other => panic!("no status event in a rotation: {other:?}"),
        }
    }
    assert_eq!(trades_seen, 1, "the overlap's repeat is dropped");
    feed.stop.cancel();
}

fn coinbase_feed(port: u16) -> String {
    format!(
        r#"
[[feeds]]
exchange = "coinbase"
url = "ws://127.0.0.1:{port}/"
symbols = ["BTC-USD", "ETH-USD"]
channels = ["trade", "ticker", "book", "candle:5m"]
reconnect_min_ms = 50
reconnect_max_ms = 500
"#
    )
}

/// `[[price, size], ...]` as a map (a book side).
fn side_map(levels: &Value) -> BTreeMap<String, String> {
    levels
        .as_array()
        .expect("levels")
        .iter()
        .map(|l| {
            let p = l[0].as_str().expect("price").to_string();
            (p, l[1].as_str().expect("size").to_string())
        })
        .collect()
}

fn apply(book: &mut (BTreeMap<String, String>, BTreeMap<String, String>), v: &Value) {
    if v["action"] == "snapshot" {
        *book = (side_map(&v["bids"]), side_map(&v["asks"]));
        return;
    }
    for (side, key) in [(&mut book.0, "bids"), (&mut book.1, "asks")] {
        for (p, q) in side_map(&v[key]) {
            if q.trim_start_matches(['0', '.']).is_empty() {
                side.remove(&p);
            } else {
                side.insert(p, q);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulator_to_bot_through_redis_with_a_gap_and_a_drop() {
    let redis = RedisServer::start();
    let sim = Proc::simulator_of(
        "coinbase",
        &["--rate", "2000", "--symbols", "BTC-USD,ETH-USD"],
    )
    .await;
    let port = sim.http.expect("port");
    let (publisher, executor) = publisher_and_executor(&redis, &coinbase_feed(port)).await;

    // All four event types reach a bot.
    let mut all = Bot::connect(&executor.bots_url()).await;
    all.subscribe(&[
        "trade:coinbase:BTC-USD",
        "ticker:coinbase:BTC-USD",
        "book:coinbase:ETH-USD",
        "candle:coinbase:BTC-USD:5m",
    ])
    .await;
    let mut kinds = HashSet::new();
    while kinds.len() < 4 {
        let v = all.next(WAIT).await.expect("frame");
        if let Some(t) = v["type"].as_str().filter(|t| *t != "status") {
            assert_eq!(v["exchange"], "coinbase", "{v}");
            if t == "candle" {
                assert_eq!(v["interval"], "5m");
            }
            kinds.insert(t.to_string());
        }
    }

    // One book through thousands of updates, a skipped sequence number and a dropped
    // connection: the chain holds and the bot's book ends equal to the simulator's.
    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&["book:coinbase:BTC-USD"]).await;
    let mut chain = BookChain::default();
    let mut mine = Default::default();
    for i in 0..3000 {
        if i == 1000 {
            sim.post("/_sim/gap").await;
        }
        if i == 2000 {
            sim.post("/_sim/drop").await;
        }
        let v = chain.read_one(&mut bot).await;
        apply(&mut mine, &v);
    }
    assert!(
        chain.resyncs >= 2,
        "gap and drop each resync: {}",
        chain.resyncs
    );
    sim.post("/_sim/pause").await;
    let theirs = sim.get_json("/_sim/book?symbol=BTC-USD").await;
    let theirs = (side_map(&theirs["bids"]), side_map(&theirs["asks"]));
    while mine != theirs {
        let v = chain.read_one(&mut bot).await;
        apply(&mut mine, &v);
    }
    assert!(!mine.0.is_empty() && !mine.1.is_empty());
    let stats = sim.get_json("/_sim/stats").await;
    assert!(stats["gaps"].as_u64() >= Some(1), "{stats}");

    // A malformed message is counted and skipped; the feed carries on.
    sim.post("/_sim/resume").await;
    sim.post("/_sim/malformed").await;
    wait_until("the malformed message counted", WAIT, || async {
        publisher
            .metric("mdbridge_exchange_frames_invalid_total{exchange=\"coinbase\"}")
            .await
            >= 1.0
    })
    .await;
    let after = chain.resyncs;
    chain.read(&mut bot, 10).await;
    assert_eq!(chain.resyncs, after, "a bad frame is no gap");
}
