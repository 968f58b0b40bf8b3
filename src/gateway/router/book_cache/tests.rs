//! Sync of one book cache, driven directly: store reads, bus deltas, what bots get.

use super::*;
use crate::config::SlowClientPolicy;
use crate::event::{Exchange, Level};
use crate::gateway::client::Outbound;
use crate::gateway::StatsInner;
use uuid::Uuid;

fn channel() -> Channel {
    Channel::parse("book:binance:BTC-USDT").unwrap()
}

fn msg(action: BookAction, price: &str, seq: u64, prev: Option<u64>) -> BusMessage {
    BusMessage::encode(
        Uuid::nil(),
        seq,
        1,
        Event::Book(Book {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv: 1,
            action,
            bids: vec![Level(price.into(), "1".into())],
            asks: vec![],
            seq: Some(seq),
            prev_seq: prev,
        }),
    )
}

fn snap(price: &str, seq: u64) -> BusMessage {
    msg(BookAction::Snapshot, price, seq, None)
}

fn delta(price: &str, seq: u64) -> BusMessage {
    msg(BookAction::Delta, price, seq, Some(seq - 1))
}

fn queue() -> Arc<ClientQueue> {
    Arc::new(ClientQueue::new(
        1,
        1_000,
        SlowClientPolicy::DropOldest,
        Arc::new(StatsInner::default()),
    ))
}

/// The frames a bot got, as JSON.
fn frames(q: &ClientQueue) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    q.take_batch(&mut out, usize::MAX);
    out.into_iter()
        .map(|f| match f {
            Outbound::Market { text, .. } | Outbound::Control(text) => {
                serde_json::from_str(text.as_str()).unwrap()
            }
        })
        .collect()
}

fn bus(cache: &mut BookCache, subs: &[Arc<ClientQueue>], m: BusMessage) -> Next {
    let text = Utf8Bytes::try_from(m.event_json()).unwrap();
    cache.on_message(&channel(), subs, m, &text)
}

#[test]
fn snapshot_log_and_buffer_meet_in_one_snapshot() {
    let t0 = Instant::now();
    let subs = [queue()];
    let mut c = BookCache::new(t0);
    // Bus deltas 13 and 14 arrive before the store answers.
    assert_eq!(
        bus(&mut c, &subs, delta("97", 13)),
        Next::Fetch {
            delay: Duration::ZERO,
            replace: false
        }
    );
    bus(&mut c, &subs, delta("96", 14));
    // Key at 10; the log holds 9 (older, skipped), 11, 12, 13 (also buffered).
    let stored = StoredBook {
        snapshot: snap("100", 10),
        log: vec![
            delta("101", 9),
            delta("99", 11),
            delta("98", 12),
            delta("97", 13),
        ],
    };
    assert_eq!(c.on_stored(&channel(), &subs, stored, t0), Next::Idle);
    let got = frames(&subs[0]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["action"], "snapshot");
    assert_eq!(got[0]["seq"], 14);
    assert_eq!(got[0]["bids"].as_array().unwrap().len(), 5);
    bus(&mut c, &subs, delta("95", 15));
    let got = frames(&subs[0]);
    assert_eq!(
        (got[0]["prev_seq"].as_u64(), got[0]["seq"].as_u64()),
        (Some(14), Some(15))
    );
}

#[test]
fn an_unconfirmed_read_waits_for_the_first_live_delta() {
    let t0 = Instant::now();
    let subs = [queue()];
    let mut c = BookCache::new(t0);
    let stored = StoredBook {
        snapshot: snap("100", 10),
        log: vec![delta("99", 11)],
    };
    // Read right after subscribing, nothing from the bus yet: not shown, confirm later.
    assert_eq!(
        c.on_stored(&channel(), &subs, stored.clone(), t0),
        Next::Fetch {
            delay: SETTLE,
            replace: true
        }
    );
    assert!(frames(&subs[0]).is_empty());
    // A duplicate of the log is skipped; the next delta confirms: one snapshot at 12.
    assert_eq!(bus(&mut c, &subs, delta("99", 11)), Next::Idle);
    assert_eq!(bus(&mut c, &subs, delta("98", 12)), Next::Idle);
    let got = frames(&subs[0]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0]["action"].as_str(), got[0]["seq"].as_u64()),
        (Some("snapshot"), Some(12))
    );

    // Another book: messages went out between the read and the subscription.
    let mut c = BookCache::new(t0);
    c.on_stored(&channel(), &subs, stored.clone(), t0);
    assert_eq!(
        bus(&mut c, &subs, delta("97", 14)),
        Next::Fetch {
            delay: Duration::ZERO,
            replace: true
        },
        "read again at once"
    );
    assert!(
        frames(&subs[0]).is_empty(),
        "no resync for a new subscription"
    );
    let newer = StoredBook {
        snapshot: snap("100", 10),
        log: vec![
            delta("99", 11),
            delta("98", 12),
            delta("97", 13),
            delta("97", 14),
        ],
    };
    c.on_stored(&channel(), &subs, newer, t0);
    let got = frames(&subs[0]);
    assert_eq!((got.len(), got[0]["seq"].as_u64()), (1, Some(14)));

    // A quiet book is trusted once the subscription has settled.
    let mut c = BookCache::new(t0);
    c.on_stored(&channel(), &subs, stored.clone(), t0);
    assert_eq!(
        c.on_stored(&channel(), &subs, stored, t0 + SETTLE),
        Next::Idle
    );
    assert_eq!(frames(&subs[0])[0]["seq"], 11);
}

#[test]
fn a_newer_snapshot_inside_the_log_is_the_base() {
    let t0 = Instant::now();
    let subs = [queue()];
    let mut c = BookCache::new(t0);
    let stored = StoredBook {
        snapshot: snap("100", 10),
        log: vec![delta("99", 11), snap("50", 40), delta("49", 41)],
    };
    c.on_stored(&channel(), &subs, stored, t0 + SETTLE);
    let got = frames(&subs[0]);
    assert_eq!(got[0]["seq"], 41);
    assert_eq!(
        got[0]["bids"],
        serde_json::json!([["50", "1"], ["49", "1"]])
    );
}

#[test]
fn a_missing_book_is_told_once_and_read_with_backoff() {
    let t0 = Instant::now();
    let subs = [queue()];
    let mut c = BookCache::new(t0);
    let mut delays = Vec::new();
    for _ in 0..12 {
        match c.on_missing(&channel(), &subs) {
            Next::Fetch { delay, replace } => {
                assert!(replace);
                delays.push(delay.as_millis() as u64);
            }
            Next::Idle => panic!("a missing book is read again"),
        }
    }
    assert_eq!(
        delays,
        [100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000, 30_000]
    );
    let got = frames(&subs[0]);
    assert_eq!(got.len(), 1, "told once: {got:?}");
    assert_eq!(got[0]["state"], "error");
    assert_eq!(
        got[0]["detail"],
        "no publisher for book:binance:BTC-USDT yet; waiting"
    );
    // A late joiner hears it too.
    let late = queue();
    assert!(c.join(&channel(), &late));
    assert_eq!(frames(&late)[0]["state"], "error");
    // A live gap's detail is plain text.
    c.on_message(
        &channel(),
        &subs,
        snap("100", 10),
        &Utf8Bytes::from_static("{}"),
    );
    frames(&subs[0]);
    bus(&mut c, &subs, delta("99", 20));
    let got = frames(&subs[0]);
    let detail = got[0]["detail"].as_str().unwrap();
    assert_eq!(
        detail,
        "book:binance:BTC-USDT: delta follows seq 19 but the book is at seq 10; a fresh snapshot follows"
    );
}
