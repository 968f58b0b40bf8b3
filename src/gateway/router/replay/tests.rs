//! `since` replay against a real private `redis-server` whose stream entries are written by
//! the real append script; the live side is fed to the router directly, as the stream
//! consumer would (messages with ids, in id order), interleaved with the replay's reads,
//! whose answers are handed to the router one by one. Assertions are on the exact frames.

use std::sync::Arc;

use ::redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::bus::redis::stream_store::tests::{admin, append, config, trade};
use crate::bus::redis::RedisStore;
use crate::bus::redis_test_server::RedisTestServer;
use crate::bus::{BookFuture, Interest, SnapshotStore, StoreFuture, StoredBook, StreamStore};
use crate::config::{DurableConfig, SlowClientPolicy};
use crate::durable::{DurablePolicy, StreamId};
use crate::envelope::BusMessage;
use crate::event::{Book, BookAction, Channel, Event, Exchange, Level, Pattern, Ticker};
use crate::gateway::client::{ClientQueue, Outbound};
use crate::gateway::protocol::{Op, Request};
use crate::gateway::router::{Command, Router};
use crate::gateway::StatsInner;

const BTC: &str = "trade:binance:BTC-USDT";

fn policy(patterns: &[&str]) -> DurablePolicy {
    DurablePolicy::from_config(&DurableConfig {
        channels: patterns.iter().map(|p| p.to_string()).collect(),
        ..DurableConfig::default()
    })
}

struct Harness {
    router: Router,
    commands: mpsc::Receiver<Command>,
    server: RedisTestServer,
    conn: MultiplexedConnection,
}

async fn harness(
    snapshots: Option<Arc<dyn SnapshotStore>>,
    durable: &[&str],
    max_replay: usize,
) -> Harness {
    let server = RedisTestServer::start();
    let url = server.url();
    let store = Arc::new(RedisStore::connect(&config(&url)).await.unwrap());
    let (interest, _) = watch::channel(Interest::default());
    let (tx, commands) = mpsc::channel(64);
    let snapshots = snapshots.unwrap_or_else(|| store.clone());
    let streams: Arc<dyn StreamStore> = store;
    let mut router = Router::new(
        interest,
        Some(snapshots),
        tx,
        Arc::new(StatsInner::default()),
        100,
    )
    .with_streams(streams, policy(durable), max_replay);
    router.replay.page_max = 3;
    Harness {
        router,
        commands,
        conn: admin(&url).await,
        server,
    }
}

impl Harness {
    fn client(&mut self, id: u64) -> Arc<ClientQueue> {
        let queue = Arc::new(ClientQueue::new(
            id,
            10_000,
            SlowClientPolicy::DropOldest,
            Arc::new(StatsInner::default()),
        ));
        self.router.on_command(Command::Connect {
            id,
            queue: queue.clone(),
        });
        queue
    }

    fn subscribe(&mut self, id: u64, channel: &str, since: Option<StreamId>, req: i64) {
        let since = since
            .map(|s| vec![(Channel::parse(channel).unwrap(), s)])
            .unwrap_or_default();
        self.router.on_command(Command::Request {
            id,
            request: Request {
                op: Op::Subscribe {
                    patterns: vec![Pattern::parse(channel).unwrap()],
                    since,
                },
                req: Some(json!(req)),
            },
        });
    }

    /// Hands the next answer of a replay (or store) read to the router.
    async fn answer(&mut self) {
        let cmd = self.commands.recv().await.unwrap();
        assert!(
            matches!(cmd, Command::Replayed { .. } | Command::Stored { .. }),
            "a read answer"
        );
        self.router.on_command(cmd);
    }

    /// Appends `n` trades (exact cap `maxlen`); returns them as the stream holds them.
    async fn append_trades(&mut self, from: u64, to: u64, maxlen: u64) -> Vec<BusMessage> {
        let mut out = Vec::new();
        for n in from..=to {
            out.push(append(&mut self.conn, &trade("BTC-USDT", n), maxlen).await);
        }
        out
    }
}

/// Each frame in order: `t<trade_id>@<index of its id in ids>` for trades (the id a
/// trade carries must be the stream's), `recovered:<count>`, `error:<code>`, the control
/// type otherwise, `book:<action>:<seq>` for books, `ticker@<index>` for tickers.
fn frames(queue: &ClientQueue, ids: &[StreamId]) -> Vec<String> {
    let mut out = Vec::new();
    queue.take_batch(&mut out, usize::MAX);
    let at = |v: &Value| -> String {
        match v["id"].as_str() {
            Some(id) => {
                let id: StreamId = id.parse().unwrap();
                match ids.iter().position(|i| *i == id) {
                    Some(i) => format!("@{i}"),
                    None => format!("@?{id}"),
                }
            }
            None => String::new(),
        }
    };
    out.into_iter()
        .map(|f| {
            let text = match &f {
                Outbound::Market { text, .. } | Outbound::Control(text) => text.as_str(),
            };
            let v: Value = serde_json::from_str(text).unwrap();
            match v["type"].as_str().unwrap() {
                "trade" => format!("t{}{}", v["trade_id"].as_str().unwrap(), at(&v)),
                "ticker" => format!("ticker{}", at(&v)),
                "book" => format!("book:{}:{}", v["action"].as_str().unwrap(), v["seq"]),
                "recovered" => {
                    assert!(v["channel"].is_string());
                    format!("recovered:{}", v["count"])
                }
                "error" => format!("error:{}", v["code"].as_str().unwrap()),
                other => other.to_string(),
            }
        })
        .collect()
}

fn ids(msgs: &[BusMessage]) -> Vec<StreamId> {
    msgs.iter().map(|m| m.id.unwrap()).collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn since_mid_stream_replays_then_goes_live_with_a_consumer_behind_the_replay() {
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    // Trade n is at index n - 1.
    let held = h.append_trades(1, 10, 1_000).await;
    let mut all = held.clone();
    let bot = h.client(1);
    let other = h.client(2);
    h.subscribe(2, BTC, None, 1);
    h.subscribe(1, BTC, Some(held[3].id.unwrap()), 2);
    // The consumer is behind: it delivers 8 while the first page is being read.
    h.router.on_message(held[7].clone(), false);
    h.answer().await; // 5 6 7
    h.router.on_message(held[8].clone(), false);
    all.extend(h.append_trades(11, 11, 1_000).await);
    h.router.on_message(held[9].clone(), false);
    h.answer().await; // 8 9 10: reaches the buffer, switch
    h.router.on_message(all[10].clone(), false);
    let ids = ids(&all);
    assert_eq!(
        frames(&bot, &ids),
        strs(&[
            "subscribed",
            "t5@4",
            "t6@5",
            "t7@6",
            "t8@7",
            "t9@8",
            "t10@9",
            "recovered:6",
            "t11@10"
        ])
    );
    assert_eq!(
        frames(&other, &ids),
        strs(&["subscribed", "t8@7", "t9@8", "t10@9", "t11@10"]),
        "the others are not held back"
    );
    assert!(
        h.router.replay.active.is_empty(),
        "past the replay: forgotten"
    );
}

#[tokio::test]
async fn since_with_the_consumer_ahead_and_an_overflowing_buffer_has_no_gap_or_duplicate() {
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    h.router.replay.buffer_max = 2;
    let mut all = h.append_trades(1, 4, 1_000).await;
    let bot = h.client(1);
    h.subscribe(1, BTC, Some(all[0].id.unwrap()), 7);
    // New entries arrive live, ahead of the replay, more than the buffer holds.
    for n in 5..=9 {
        all.extend(h.append_trades(n, n, 1_000).await);
        h.router.on_message(all[n as usize - 1].clone(), false);
    }
    h.answer().await; // 2 3 4 (its read may be older than the overflow)
    h.answer().await; // 5 6 7
    h.answer().await; // 8 9: the end of the stream (the buffer holds 9)
                      // A redelivery of 9 (the stream consumer retried) and then 10.
    h.router.on_message(all[8].clone(), false);
    all.extend(h.append_trades(10, 10, 1_000).await);
    h.router.on_message(all[9].clone(), false);
    let ids = ids(&all);
    assert_eq!(
        frames(&bot, &ids),
        strs(&[
            "subscribed",
            "t2@1",
            "t3@2",
            "t4@3",
            "t5@4",
            "t6@5",
            "t7@6",
            "t8@7",
            "t9@8",
            "recovered:8",
            "t10@9"
        ])
    );
}

#[tokio::test]
async fn a_live_source_that_starts_after_the_switch_leaves_no_gap() {
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    let mut all = h.append_trades(1, 3, 1_000).await;
    let bot = h.client(1);
    h.subscribe(1, BTC, Some(all[0].id.unwrap()), 1);
    h.answer().await; // 2 3, the end: recovered with no live message seen yet
                      // Appended while the live source was not delivering yet (a subscription taking
                      // effect): only 6 comes live.
    all.extend(h.append_trades(4, 6, 1_000).await);
    h.router.on_message(all[5].clone(), false);
    h.answer().await; // 4 5 6 from the stream
    all.extend(h.append_trades(7, 7, 1_000).await);
    h.router.on_message(all[6].clone(), false);
    assert_eq!(
        frames(&bot, &ids(&all)),
        strs(&[
            "subscribed",
            "t2@1",
            "t3@2",
            "recovered:2",
            "t4@3",
            "t5@4",
            "t6@5",
            "t7@6"
        ])
    );
    assert!(h.router.replay.active.is_empty());
}

#[tokio::test]
async fn since_past_the_end_recovers_nothing_and_live_follows() {
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    let mut all = h.append_trades(1, 3, 1_000).await;
    let bot = h.client(1);
    h.subscribe(1, BTC, Some(StreamId::new(u64::MAX / 2, 0)), 1);
    h.answer().await;
    all.extend(h.append_trades(4, 4, 1_000).await);
    h.router.on_message(all[3].clone(), false);
    h.answer().await; // the first live message is checked against the stream
                      // A `since` past the stream's last id counts from that id: the next event is live.
    assert_eq!(
        frames(&bot, &ids(&all)),
        strs(&["subscribed", "recovered:0", "t4@3"])
    );
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    let all = h.append_trades(1, 3, 1_000).await;
    let bot = h.client(1);
    h.subscribe(1, BTC, Some(all[2].id.unwrap()), 1);
    h.answer().await;
    let more = h.append_trades(4, 5, 1_000).await;
    for m in &more {
        h.router.on_message(m.clone(), false);
    }
    h.answer().await;
    let ids: Vec<StreamId> = ids(&all).into_iter().chain(ids(&more)).collect();
    assert_eq!(
        frames(&bot, &ids),
        strs(&["subscribed", "recovered:0", "t4@3", "t5@4"])
    );
}

#[tokio::test]
async fn since_older_than_the_stream_is_truncated_then_what_is_held_then_live() {
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    // Exact cap 4: trades 1..6 leave 3..6.
    let mut all = h.append_trades(1, 6, 4).await;
    let bot = h.client(1);
    h.subscribe(1, BTC, Some(all[0].id.unwrap()), 9);
    h.answer().await;
    h.answer().await;
    all.extend(h.append_trades(7, 7, 4).await);
    h.router.on_message(all[6].clone(), false);
    h.answer().await;
    let mut out = Vec::new();
    bot.take_batch(&mut out, 2);
    let Outbound::Control(err) = &out[1] else {
        panic!("{out:?}")
    };
    let err: Value = serde_json::from_str(err.as_str()).unwrap();
    assert_eq!(
        (&err["code"], &err["channel"], &err["req"]),
        (&json!("history_truncated"), &json!(BTC), &json!(9))
    );
    assert!(err["message"].as_str().unwrap().contains("trimmed"));
    assert_eq!(
        frames(&bot, &ids(&all)),
        strs(&["t3@2", "t4@3", "t5@4", "t6@5", "recovered:4", "t7@6"])
    );
}

#[tokio::test]
async fn more_than_max_replay_entries_after_since_replays_the_newest_ones() {
    let mut h = harness(None, &["trade:*:*"], 3).await;
    let all = h.append_trades(1, 10, 1_000).await;
    let bot = h.client(1);
    h.subscribe(1, BTC, Some(all[1].id.unwrap()), 1);
    h.answer().await;
    h.answer().await;
    assert_eq!(
        frames(&bot, &ids(&all)),
        strs(&[
            "subscribed",
            "error:history_truncated",
            "t8@7",
            "t9@8",
            "t10@9",
            "recovered:3"
        ])
    );
}

#[tokio::test]
async fn bad_since_refuses_the_whole_request() {
    let mut h = harness(None, &["trade:binance:*"], 1_000).await;
    let all = h.append_trades(1, 2, 1_000).await;
    let bot = h.client(1);
    // Not durable here.
    h.subscribe(1, "trade:kraken:BTC-USD", Some(StreamId::new(1, 0)), 3);
    h.subscribe(1, BTC, None, 4);
    // Already held.
    h.subscribe(1, BTC, Some(StreamId::new(1, 0)), 5);
    let mut out = Vec::new();
    bot.take_batch(&mut out, usize::MAX);
    let replies: Vec<Value> = out
        .iter()
        .map(|f| match f {
            Outbound::Control(t) => serde_json::from_str(t.as_str()).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(replies[0]["code"], "bad_request");
    assert_eq!(replies[0]["req"], 3);
    assert!(replies[0]["message"]
        .as_str()
        .unwrap()
        .contains("not durable"));
    assert_eq!(replies[1]["type"], "subscribed");
    assert_eq!(
        (&replies[2]["code"], &replies[2]["req"]),
        (&json!("bad_request"), &json!(5))
    );
    assert_eq!(replies.len(), 3);
    assert!(h.router.replay.active.is_empty());
    // The refused subscription made nothing: no pattern, no read.
    assert!(!h
        .router
        .patterns
        .contains_key(&Pattern::parse("trade:kraken:BTC-USD").unwrap()));
    h.router.on_message(all[1].clone(), false);
    assert_eq!(frames(&bot, &ids(&all)), strs(&["t2@1"]));
}

#[tokio::test]
async fn a_client_leaving_mid_replay_cancels_it() {
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    let all = h.append_trades(1, 9, 1_000).await;
    let _bot = h.client(1);
    h.subscribe(1, BTC, Some(StreamId::MIN), 1);
    h.answer().await;
    assert_eq!(h.router.replay.active.len(), 1);
    h.router.on_message(all[8].clone(), false);
    h.router.on_command(Command::Disconnect { id: 1 });
    assert!(h.router.replay.active.is_empty());
    assert_eq!(h.router.channel_count(), 0);
}

#[tokio::test]
async fn an_unreadable_stream_is_replay_failed_then_live() {
    let mut h = harness(None, &["trade:*:*"], 1_000).await;
    let all = h.append_trades(1, 3, 1_000).await;
    let bot = h.client(1);
    h.server.kill();
    h.subscribe(1, BTC, Some(all[0].id.unwrap()), 6);
    h.answer().await;
    // The live source goes on (here: fed directly).
    h.router.on_message(all[2].clone(), false);
    let mut out = Vec::new();
    bot.take_batch(&mut out, 2);
    let Outbound::Control(err) = &out[1] else {
        panic!("{out:?}")
    };
    let err: Value = serde_json::from_str(err.as_str()).unwrap();
    assert_eq!(
        (&err["code"], &err["channel"], &err["req"]),
        (&json!("replay_failed"), &json!(BTC), &json!(6))
    );
    assert_eq!(frames(&bot, &ids(&all)), strs(&["t3@2"]), "no recovered");
}

fn ticker(bid: &str) -> BusMessage {
    BusMessage::encode(
        Uuid::nil(),
        1,
        1,
        Event::Ticker(Ticker {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv: 1,
            bid: Some(bid.into()),
            bid_size: None,
            ask: None,
            ask_size: None,
            last: None,
            volume_24h: None,
        }),
    )
}

#[tokio::test]
async fn a_durable_ticker_latest_value_comes_from_the_stream_with_its_id() {
    let mut h = harness(None, &["ticker:*:*"], 1_000).await;
    let a = append(&mut h.conn, &ticker("1"), 100).await;
    let b = append(&mut h.conn, &ticker("2"), 100).await;
    let ids = [a.id.unwrap(), b.id.unwrap()];
    let plain = h.client(1);
    h.subscribe(1, "ticker:binance:BTC-USDT", None, 1);
    h.answer().await;
    assert_eq!(frames(&plain, &ids), strs(&["subscribed", "ticker@1"]));
    // With `since`: the history after it, not the latest value on top.
    let replaying = h.client(2);
    h.subscribe(2, "ticker:binance:BTC-USDT", Some(ids[0]), 2);
    h.answer().await;
    assert_eq!(
        frames(&replaying, &ids),
        strs(&["subscribed", "ticker@1", "recovered:1"])
    );
}

/// A store holding one book snapshot (seq 10) and no log.
struct OneBook;

fn book(action: BookAction, seq: u64) -> BusMessage {
    BusMessage::encode(
        Uuid::nil(),
        seq,
        1,
        Event::Book(Book {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv: seq,
            action,
            bids: vec![Level(format!("{seq}").into(), "1".into())],
            asks: vec![],
            seq: Some(seq),
            prev_seq: (action == BookAction::Delta).then(|| seq - 1),
        }),
    )
}

impl SnapshotStore for OneBook {
    fn latest(&self, _channel: &Channel) -> StoreFuture<'_> {
        Box::pin(async { Ok(Some(book(BookAction::Snapshot, 10))) })
    }

    fn book(&self, _channel: &Channel) -> BookFuture<'_> {
        Box::pin(async {
            Ok(Some(StoredBook {
                snapshot: book(BookAction::Snapshot, 10),
                log: Vec::new(),
            }))
        })
    }
}

#[tokio::test]
async fn since_on_a_book_is_the_snapshot_path_then_recovered_zero() {
    let mut h = harness(Some(Arc::new(OneBook)), &["book:*:*"], 1_000).await;
    let bot = h.client(1);
    h.subscribe(1, "book:binance:BTC-USDT", Some(StreamId::new(5, 0)), 1);
    h.answer().await; // the store's book: a candidate
    for seq in [11, 12] {
        let m = book(BookAction::Delta, seq).with_id(StreamId::new(100 + seq, 0));
        h.router.on_message(m, false);
    }
    assert_eq!(
        frames(&bot, &[]),
        strs(&[
            "subscribed",
            "book:snapshot:11",
            "recovered:0",
            "book:delta:12"
        ])
    );
}
