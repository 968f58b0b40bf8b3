//! Order books end to end: the bot's book, built only from what the executor sends, equals
//! the exchange's book — across a lost depth update (gap → resync → fresh snapshot) and a
//! late snapshot.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::Value;

/// A bot-side book that checks the chain rule of PROTOCOL §2 on every message.
#[derive(Default)]
struct BotBook {
    bids: HashMap<String, String>,
    asks: HashMap<String, String>,
    seq: Option<u64>,
    snapshots: usize,
    deltas: usize,
}

impl BotBook {
    fn apply(&mut self, v: &Value) {
        let side = |v: &Value, key: &str| -> Vec<(String, String)> {
            v[key]
                .as_array()
                .expect("levels")
                .iter()
                .map(|l| {
                    (
                        l[0].as_str().expect("price").to_string(),
                        l[1].as_str().expect("size").to_string(),
                    )
                })
                .collect()
        };
        let seq = v["seq"].as_u64().expect("book seq");
        match v["action"].as_str() {
            Some("snapshot") => {
                let bids = side(v, "bids");
                let asks = side(v, "asks");
                let px = |l: &(String, String)| l.0.parse::<f64>().expect("price");
                assert!(
                    bids.windows(2).all(|w| px(&w[0]) > px(&w[1])),
                    "snapshot bids best first"
                );
                assert!(
                    asks.windows(2).all(|w| px(&w[0]) < px(&w[1])),
                    "snapshot asks best first"
                );
                self.bids = bids.into_iter().collect();
                self.asks = asks.into_iter().collect();
                self.snapshots += 1;
            }
            Some("delta") => {
                let prev = v["prev_seq"].as_u64().expect("prev_seq");
                assert_eq!(
                    Some(prev),
                    self.seq,
                    "delta must chain onto the previous book message: {v}"
                );
                for (book, key) in [(&mut self.bids, "bids"), (&mut self.asks, "asks")] {
                    for (p, q) in side(v, key) {
                        if q.trim_matches(|c| c == '0' || c == '.').is_empty() {
                            book.remove(&p);
                        } else {
                            book.insert(p, q);
                        }
                    }
                }
                self.deltas += 1;
            }
            other => panic!("unknown action {other:?}"),
        }
        self.seq = Some(seq);
    }
}

fn levels(v: &Value) -> HashMap<String, String> {
    v.as_array()
        .expect("levels")
        .iter()
        .map(|l| {
            (
                l[0].as_str().expect("p").to_string(),
                l[1].as_str().expect("q").to_string(),
            )
        })
        .collect()
}

/// Reads book messages until the bot's book is at the simulator's paused `lastUpdateId`,
/// then compares every level.
async fn assert_books_equal(bot: &mut Bot, book: &mut BotBook, sim: &Proc) {
    sim.post("/_sim/pause").await;
    let truth = sim.get_json("/_sim/book?symbol=BTC-USDT").await;
    let target = truth["lastUpdateId"].as_u64().expect("lastUpdateId");
    while book.seq != Some(target) {
        let (v, _) = bot.until(WAIT, |v| v["type"] == "book").await;
        book.apply(&v);
        assert!(
            book.seq <= Some(target),
            "bot's book went past the paused simulator"
        );
    }
    assert_eq!(book.bids, levels(&truth["bids"]), "bids differ");
    assert_eq!(book.asks, levels(&truth["asks"]), "asks differ");
    sim.post("/_sim/resume").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_leads_to_resync_and_the_bot_book_still_equals_the_exchange_book() {
    let SimBridge {
        executor,
        publisher,
        sim,
        redis: _redis,
    } = sim_bridge("200", &["BTC-USDT"], &["book"]).await;

    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&["book:binance:BTC-USDT", "status:binance"])
        .await;
    let mut book = BotBook::default();
    // The first book message a subscriber sees is a snapshot.
    let (first, _) = bot.until(WAIT, |v| v["type"] == "book").await;
    assert_eq!(first["action"], "snapshot", "first book message: {first}");
    book.apply(&first);
    for _ in 0..50 {
        let (v, _) = bot.until(WAIT, |v| v["type"] == "book").await;
        book.apply(&v);
    }
    assert_books_equal(&mut bot, &mut book, &sim).await;
    // A second bot holds only the book channel, not `status:binance`.
    let mut book_only = Bot::connect(&executor.bots_url()).await;
    book_only.subscribe(&["book:binance:BTC-USDT"]).await;
    let mut only_book = BotBook::default();
    let (first, _) = book_only.until(WAIT, |v| v["type"] == "book").await;
    only_book.apply(&first);

    // Lose one depth update at the exchange: the host must notice, say so, and resync.
    sim.post("/_sim/gap?symbol=BTC-USDT").await;
    let (status, skipped) = bot
        .until(WAIT, |v| v["type"] == "status" && v["state"] == "resync")
        .await;
    for v in skipped.iter().filter(|v| v["type"] == "book") {
        book.apply(v);
    }
    assert_eq!(status["exchange"], "binance");
    let (snap, skipped) = bot
        .until(WAIT, |v| v["type"] == "book" && v["action"] == "snapshot")
        .await;
    assert!(
        skipped.iter().all(|v| v["type"] != "book"),
        "no delta between resync and snapshot: {skipped:?}"
    );
    book.apply(&snap);
    for _ in 0..30 {
        let (v, _) = bot.until(WAIT, |v| v["type"] == "book").await;
        book.apply(&v);
    }
    assert_books_equal(&mut bot, &mut book, &sim).await;
    // The book-only bot also hears `resync` right before the fresh snapshot.
    let mut previous: Option<Value> = None;
    loop {
        let v = book_only.next(WAIT).await.expect("frame");
        if v["type"] == "book" && v["action"] == "snapshot" {
            let before = previous.expect("something before the snapshot");
            assert_eq!(
                before["type"], "status",
                "resync must precede the snapshot: {before}"
            );
            assert_eq!(before["state"], "resync");
            only_book.apply(&v);
            break;
        }
        if v["type"] == "book" {
            only_book.apply(&v);
        }
        previous = Some(v);
    }
    assert_books_equal(&mut book_only, &mut only_book, &sim).await;
    assert!(
        publisher
            .metric(r#"mdbridge_book_resyncs_total{exchange="binance",side="exchange"}"#)
            .await
            >= 1.0
    );

    // A bot joining now gets a snapshot it can chain the live deltas onto.
    let mut late = Bot::connect(&executor.bots_url()).await;
    late.subscribe(&["book:binance:BTC-USDT"]).await;
    let mut late_book = BotBook::default();
    let (first, _) = late.until(WAIT, |v| v["type"] == "book").await;
    assert_eq!(first["action"], "snapshot");
    late_book.apply(&first);
    for _ in 0..20 {
        let (v, _) = late.until(WAIT, |v| v["type"] == "book").await;
        late_book.apply(&v);
    }
    assert_books_equal(&mut late, &mut late_book, &sim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_snapshot_and_dropped_exchange_connection_still_give_an_exact_book() {
    let redis = RedisServer::start();
    let sim = Proc::simulator(&["--rate", "200", "--symbols", "BTC-USDT"]).await;
    // The REST snapshot answers long after the diff stream started.
    sim.post("/_sim/snapshot_delay?ms=700").await;
    let feed = sim_feed(sim.http.expect("port"), "binance", &["BTC-USDT"], &["book"]);
    let (h, b) = (free_port(), free_port());
    let mut hybrid = Proc::role(
        "hybrid",
        &role_config(&redis.url(), h, b, &feed),
        h,
        Some(b),
    );
    hybrid.wait_healthy().await;
    let mut bot = Bot::connect(&hybrid.bots_url()).await;
    bot.subscribe(&["book:binance:BTC-USDT", "status:binance"])
        .await;
    let mut book = BotBook::default();
    let (first, _) = bot.until(WAIT, |v| v["type"] == "book").await;
    book.apply(&first);
    assert_books_equal(&mut bot, &mut book, &sim).await;

    // Cut every exchange socket: the feed reconnects and the book is rebuilt from scratch.
    sim.post("/_sim/drop").await;
    let (_, skipped) = bot
        .until(WAIT, |v| v["type"] == "status" && v["state"] == "connected")
        .await;
    for v in skipped.iter().filter(|v| v["type"] == "book") {
        book.apply(v);
    }
    let (snap, _) = bot
        .until(WAIT, |v| v["type"] == "book" && v["action"] == "snapshot")
        .await;
    book.apply(&snap);
    assert_books_equal(&mut bot, &mut book, &sim).await;
    assert!(hybrid.metric(r#"mdbridge_exchange_reconnects_total"#).await >= 1.0);
}
