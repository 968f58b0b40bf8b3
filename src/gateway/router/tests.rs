//! The router's own state, driven directly (no sockets): what it keeps after churn.

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::{Command, Router};
use crate::bus::{Interest, SnapshotStore, StoreFuture};
use crate::config::SlowClientPolicy;
use crate::envelope::BusMessage;
use crate::event::{Channel, Event, Exchange, Pattern, Side, Trade};
use crate::gateway::client::{ClientQueue, Outbound};
use crate::gateway::protocol::{Op, Request};
use crate::gateway::StatsInner;

/// A store that never has anything.
struct Empty;

impl SnapshotStore for Empty {
    fn latest(&self, _channel: &Channel) -> StoreFuture<'_> {
        Box::pin(async { Ok(None) })
    }
}

fn router(store: Option<Arc<dyn SnapshotStore>>) -> (Router, watch::Receiver<Interest>) {
    let (interest, rx) = watch::channel(Interest::default());
    // Store answers are not read here (a closed channel refuses them at once).
    let (commands, _) = mpsc::channel(16);
    let stats = Arc::new(StatsInner::default());
    (Router::new(interest, store, commands, stats, 1_000), rx)
}

fn client(router: &mut Router, id: u64) -> Arc<ClientQueue> {
    let queue = Arc::new(ClientQueue::new(
        id,
        1_000_000,
        SlowClientPolicy::DropOldest,
        Arc::new(StatsInner::default()),
    ));
    router.on_command(Command::Connect {
        id,
        queue: queue.clone(),
    });
    queue
}

fn request(router: &mut Router, id: u64, op: Op) {
    router.on_command(Command::Request {
        id,
        request: Request { op, req: None },
    });
}

fn patterns(names: &[String]) -> Vec<Pattern> {
    names.iter().map(|n| Pattern::parse(n).unwrap()).collect()
}

fn trade(symbol: &str, id: u64) -> BusMessage {
    BusMessage::encode(
        Uuid::nil(),
        id,
        1,
        Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: symbol.into(),
            ts: None,
            ts_recv: 1,
            trade_id: id.to_string(),
            price: "1".into(),
            size: "1".into(),
            side: Some(Side::Buy),
        }),
    )
}

/// Trades the queue holds, by id.
fn trades(queue: &ClientQueue) -> Vec<String> {
    let mut out = Vec::new();
    queue.take_batch(&mut out, usize::MAX);
    out.into_iter()
        .filter_map(|f| match f {
            Outbound::Market { text, .. } => {
                let v: serde_json::Value = serde_json::from_str(text.as_str()).ok()?;
                (v["type"] == "trade").then(|| v["trade_id"].as_str().unwrap().to_string())
            }
            Outbound::Control(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn churned_names_leave_no_state_behind_and_a_steady_bot_gets_every_event() {
    let store: Arc<dyn SnapshotStore> = Arc::new(Empty);
    let (mut r, interest) = router(Some(store));
    let steady = client(&mut r, 1);
    let _churn = client(&mut r, 2);
    request(
        &mut r,
        1,
        Op::Subscribe {
            patterns: patterns(&["trade:binance:BTC-USDT".into()]),
            since: Vec::new(),
        },
    );
    let mut sent = 0u64;
    for i in 0..5_000u64 {
        // Exact names of every kind, and a wildcard, each subscribed then dropped.
        let names: Vec<String> = vec![
            format!("book:binance:C{i}-USDT"),
            format!("ticker:binance:C{i}-USDT"),
            format!("trade:okx:C{i}-USDT"),
            format!("candle:binance:C{i}-USDT:1m"),
            format!("trade:*:C{i}-USDT"),
        ];
        request(
            &mut r,
            2,
            Op::Subscribe {
                patterns: patterns(&names),
                since: Vec::new(),
            },
        );
        if i % 10 == 0 {
            sent += 1;
            r.on_message(trade("BTC-USDT", sent), false);
            // A straggler on a name just dropped must not bring its state back.
            r.on_message(trade(&format!("C{}-USDT", i.saturating_sub(1)), 1), false);
        }
        request(
            &mut r,
            2,
            Op::Unsubscribe {
                patterns: patterns(&names),
            },
        );
    }
    assert_eq!(
        r.channel_count(),
        1,
        "only the steady bot's channel is held"
    );
    assert_eq!(r.patterns.len(), 1);
    assert!(r.wildcards.is_empty());
    assert_eq!(interest.borrow().len(), 1);
    let got = trades(&steady);
    let want: Vec<String> = (1..=sent).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "every trade, once, in order");

    // A disconnect leaves nothing either.
    request(
        &mut r,
        2,
        Op::Subscribe {
            patterns: patterns(&["book:*:*".into(), "ticker:binance:X-USDT".into()]),
            since: Vec::new(),
        },
    );
    r.on_command(Command::Disconnect { id: 2 });
    r.on_command(Command::Disconnect { id: 1 });
    assert_eq!(r.channel_count(), 0);
    assert!(r.patterns.is_empty() && r.clients.is_empty());
}

#[tokio::test]
async fn without_a_store_channels_that_carry_messages_are_kept_and_wished_ones_are_not() {
    let (mut r, _interest) = router(None);
    let _bot = client(&mut r, 1);
    r.on_message(trade("BTC-USDT", 1), false);
    for i in 0..1_000 {
        let names = vec![format!("ticker:binance:C{i}-USDT")];
        request(
            &mut r,
            1,
            Op::Subscribe {
                patterns: patterns(&names),
                since: Vec::new(),
            },
        );
        request(
            &mut r,
            1,
            Op::Unsubscribe {
                patterns: patterns(&names),
            },
        );
    }
    assert_eq!(
        r.channel_count(),
        1,
        "the channel that carried a message stays (its cache is complete without a store)"
    );
}

/// A store that answers latest-value reads from a script (then repeats its last answer);
/// `Err` is a failed read.
struct Scripted {
    answers: std::sync::Mutex<std::collections::VecDeque<Result<Option<BusMessage>, ()>>>,
}

impl Scripted {
    fn store(answers: Vec<Result<Option<BusMessage>, ()>>) -> Arc<dyn SnapshotStore> {
        Arc::new(Scripted {
            answers: std::sync::Mutex::new(answers.into()),
        })
    }
}

impl SnapshotStore for Scripted {
    fn latest(&self, _channel: &Channel) -> StoreFuture<'_> {
        let answer = {
            let mut a = self.answers.lock().unwrap();
            if a.len() > 1 {
                a.pop_front().unwrap()
            } else {
                a.front().cloned().unwrap_or(Ok(None))
            }
        };
        Box::pin(async move { answer.map_err(|()| crate::bus::BusError::Closed) })
    }
}

/// A router whose store answers come back on the returned receiver.
fn router_with_answers(
    store: Arc<dyn SnapshotStore>,
) -> (Router, mpsc::Receiver<Command>, watch::Receiver<Interest>) {
    let (interest, irx) = watch::channel(Interest::default());
    let (commands, rx) = mpsc::channel(16);
    let stats = Arc::new(StatsInner::default());
    (
        Router::new(interest, Some(store), commands, stats, 1_000),
        rx,
        irx,
    )
}

fn status_msg(detail: &str) -> BusMessage {
    BusMessage::encode(
        Uuid::nil(),
        1,
        1,
        Event::status(
            Exchange::Binance,
            crate::event::StatusState::Connected,
            Some(detail.into()),
        ),
    )
}

/// The `detail` of each status event the queue holds, in order.
fn details(queue: &ClientQueue) -> Vec<String> {
    let mut out = Vec::new();
    queue.take_batch(&mut out, usize::MAX);
    out.into_iter()
        .filter_map(|f| match f {
            Outbound::Market { text, .. } => {
                let v: serde_json::Value = serde_json::from_str(text.as_str()).ok()?;
                (v["type"] == "status").then(|| v["detail"].as_str().unwrap_or("").to_string())
            }
            Outbound::Control(_) => None,
        })
        .collect()
}

/// Feeds store answers to the router until `done` (bounded: panics after 20 s).
async fn pump(
    r: &mut Router,
    rx: &mut mpsc::Receiver<Command>,
    what: &str,
    mut done: impl FnMut(&mut Router) -> bool,
) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done(r) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(cmd)) => r.on_command(cmd),
            _ => panic!("{what}: no more store answers"),
        }
    }
}

fn subscribe(r: &mut Router, id: u64, name: &str) {
    request(
        r,
        id,
        Op::Subscribe {
            patterns: patterns(&[name.into()]),
            since: Vec::new(),
        },
    );
}

#[tokio::test]
async fn a_failed_latest_value_read_is_retried_until_the_value_is_known() {
    let current = status_msg("current state");
    let store = Scripted::store(vec![Err(()), Err(()), Ok(Some(current))]);
    let (mut r, mut rx, _interest) = router_with_answers(store);
    let bot = client(&mut r, 1);
    subscribe(&mut r, 1, "status:binance");
    let mut got = Vec::new();
    pump(&mut r, &mut rx, "the bot learns the current state", |_| {
        got.extend(details(&bot));
        !got.is_empty()
    })
    .await;
    assert_eq!(got, vec!["current state".to_string()]);
}

#[tokio::test]
async fn after_the_bus_is_back_latest_values_are_read_again_and_not_served_stale() {
    // Nothing stored at first; after the outage, the store holds what was published meanwhile.
    let store = Scripted::store(vec![
        Ok(None),
        Ok(Some(status_msg("published during the outage"))),
    ]);
    let (mut r, mut rx, _interest) = router_with_answers(store);
    let first = client(&mut r, 1);
    subscribe(&mut r, 1, "status:binance");
    pump(&mut r, &mut rx, "the first read", |r| {
        r.channels.values().all(|s| s.fetch.is_none())
    })
    .await;
    r.on_message(status_msg("before the outage"), false);
    assert_eq!(details(&first), vec!["before the outage".to_string()]);
    r.on_bus_state(crate::bus::BusState::Down("test".into()));
    r.on_bus_state(crate::bus::BusState::Up);
    pump(&mut r, &mut rx, "the read after the bus is back", |r| {
        r.channels.values().all(|s| s.fetch.is_none())
    })
    .await;
    let seen = details(&first);
    assert_eq!(
        seen.last().map(String::as_str),
        Some("published during the outage"),
        "{seen:?}"
    );
    let late = client(&mut r, 2);
    subscribe(&mut r, 2, "status:binance");
    assert_eq!(
        details(&late),
        vec!["published during the outage".to_string()],
        "a new subscriber gets the current value, not the pre-outage one"
    );
}

#[tokio::test]
async fn channels_only_wildcards_reach_are_capped_and_their_messages_still_delivered() {
    let store: Arc<dyn SnapshotStore> = Arc::new(Empty);
    let (mut r, _interest) = router(Some(store));
    r.wildcard_cap = 3;
    let bot = client(&mut r, 1);
    subscribe(&mut r, 1, "trade:binance:*");
    subscribe(&mut r, 1, "trade:binance:NAMED-USDT");
    for i in 0..10u64 {
        r.on_message(trade(&format!("MADEUP{i}-USDT"), i + 1), false);
    }
    // A channel an exact pattern names is not counted against the cap.
    r.on_message(trade("NAMED-USDT", 11), false);
    assert_eq!(
        r.channel_count(),
        4,
        "three made-up names and the named one"
    );
    let want: Vec<String> = (1..=11).map(|i| i.to_string()).collect();
    assert_eq!(
        trades(&bot),
        want,
        "every trade is delivered, once, in order"
    );
    request(
        &mut r,
        1,
        Op::Unsubscribe {
            patterns: patterns(&["trade:binance:*".into()]),
        },
    );
    assert_eq!(r.channel_count(), 1);
    assert_eq!(r.wildcard_channels, 0);
}

#[tokio::test]
async fn a_wildcard_holder_is_not_left_out_when_another_bot_names_a_fresh_channel() {
    // With a store (executor): the exact subscribe creates the channel's state before any
    // message; the bot holding a matching wildcard must be in it from the start.
    let (mut r, _interest) = router(Some(Arc::new(Empty)));
    let wild = client(&mut r, 1);
    let exact = client(&mut r, 2);
    subscribe(&mut r, 1, "trade:*:*");
    subscribe(&mut r, 2, "trade:binance:BTC-USDT");
    for n in 1..=3 {
        r.on_message(trade("BTC-USDT", n), false);
    }
    assert_eq!(trades(&wild), ["1", "2", "3"]);
    assert_eq!(trades(&exact), ["1", "2", "3"]);
    // And each once, however many patterns match.
    subscribe(&mut r, 1, "trade:binance:BTC-USDT");
    r.on_message(trade("BTC-USDT", 4), false);
    assert_eq!(trades(&wild), ["4"]);
}
