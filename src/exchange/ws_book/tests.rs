//! Unit tests of `ws_book`: the host's numbering, resyncs, and what a bot rebuilds.

use super::*;
use crate::book::OrderBook;
use crate::event::Level;

const X: Exchange = Exchange::Coinbase;

fn lv(p: &str, q: &str) -> Level {
    Level(p.into(), q.into())
}

fn msg(action: BookAction, bids: Vec<Level>, asks: Vec<Level>) -> Book {
    Book {
        exchange: X,
        symbol: "BTC-USD".into(),
        ts: Some(1),
        ts_recv: 2,
        action,
        bids,
        asks,
        seq: None,
        prev_seq: None,
    }
}

fn seqs(out: &[Event]) -> Vec<String> {
    out.iter()
        .map(|e| match e {
            Event::Book(b) => format!("{:?} {:?} {:?}", b.action, b.seq, b.prev_seq),
            Event::Status(s) => format!("{:?}", s.state),
            other => format!("{other:?}"),
        })
        .collect()
}

#[test]
fn snapshot_is_best_first_and_deltas_chain_with_host_numbers() {
    let mut s = WsBookSync::new(X, "BTC-USD");
    let mut out = Vec::new();
    // Updates before the snapshot are covered by it.
    assert_eq!(
        s.on_book(msg(BookAction::Delta, vec![lv("1", "1")], vec![]), &mut out),
        Outcome::Ok
    );
    assert!(out.is_empty());
    let snap = msg(
        BookAction::Snapshot,
        vec![lv("99.5", "1"), lv("100.25", "2"), lv("98", "0")],
        vec![lv("102", "1"), lv("101.0", "3")],
    );
    assert_eq!(s.on_book(snap, &mut out), Outcome::Ok);
    let Event::Book(b) = &out[0] else { panic!() };
    assert_eq!(
        b.bids,
        vec![lv("100.25", "2"), lv("99.5", "1")],
        "best first, zero dropped"
    );
    assert_eq!(b.asks, vec![lv("101.0", "3"), lv("102", "1")]);
    s.on_book(
        msg(
            BookAction::Delta,
            vec![lv("99.5", "0")],
            vec![lv("101.5", "4")],
        ),
        &mut out,
    );
    s.on_book(
        msg(BookAction::Delta, vec![], vec![lv("101.0", "0")]),
        &mut out,
    );
    assert_eq!(
        seqs(&out),
        [
            "Snapshot Some(1) None",
            "Delta Some(2) Some(1)",
            "Delta Some(3) Some(2)"
        ]
    );
    let Event::Book(d) = &out[1] else { panic!() };
    assert_eq!(d.asks, vec![lv("101.5", "4")], "delta levels as sent");
    let asks: Vec<&Level> = s.book().asks().collect();
    assert_eq!(asks, [&lv("101.5", "4"), &lv("102", "1")]);
}

#[test]
fn a_lost_connection_resyncs_and_numbering_goes_on() {
    let mut s = WsBookSync::new(X, "BTC-USD");
    let mut out = Vec::new();
    s.on_book(
        msg(BookAction::Snapshot, vec![lv("1", "1")], vec![]),
        &mut out,
    );
    s.on_book(msg(BookAction::Delta, vec![lv("2", "1")], vec![]), &mut out);
    s.on_disconnect("reset", &mut out);
    s.on_disconnect("again", &mut out); // not live: says nothing
    s.on_book(msg(BookAction::Delta, vec![lv("3", "1")], vec![]), &mut out);
    s.on_book(
        msg(BookAction::Snapshot, vec![lv("5", "1")], vec![]),
        &mut out,
    );
    assert_eq!(
        seqs(&out),
        [
            "Snapshot Some(1) None",
            "Delta Some(2) Some(1)",
            "Resync",
            "Snapshot Some(3) None"
        ]
    );
}

#[test]
fn a_refused_update_resyncs_and_asks_for_a_snapshot() {
    let mut s = WsBookSync::new(X, "BTC-USD");
    let mut out = Vec::new();
    s.on_book(
        msg(BookAction::Snapshot, vec![lv("1", "1")], vec![]),
        &mut out,
    );
    let r = s.on_book(
        msg(BookAction::Delta, vec![lv("1e5", "1")], vec![]),
        &mut out,
    );
    assert!(matches!(r, Outcome::NeedSnapshot(_)), "{r:?}");
    assert_eq!(seqs(&out), ["Snapshot Some(1) None", "Resync"]);
    assert!(!s.is_live());
}

#[test]
fn a_venue_per_book_sequence_is_checked() {
    let mut s = WsBookSync::new(X, "BTC-USD");
    let mut out = Vec::new();
    let mut snap = msg(BookAction::Snapshot, vec![lv("1", "1")], vec![]);
    snap.seq = Some(10);
    s.on_book(snap, &mut out);
    let mut next = msg(BookAction::Delta, vec![lv("2", "1")], vec![]);
    (next.seq, next.prev_seq) = (Some(11), Some(10));
    assert_eq!(s.on_book(next, &mut out), Outcome::Ok);
    let mut gap = msg(BookAction::Delta, vec![lv("3", "1")], vec![]);
    (gap.seq, gap.prev_seq) = (Some(14), Some(13));
    assert!(matches!(s.on_book(gap, &mut out), Outcome::NeedSnapshot(_)));
    assert_eq!(
        seqs(&out),
        ["Snapshot Some(1) None", "Delta Some(2) Some(1)", "Resync"]
    );
}

/// A made-up venue checksum: the number of levels on both sides.
fn level_count(book: &OrderBook, sum: u32) -> bool {
    (book.bids().count() + book.asks().count()) as u64 == u64::from(sum)
}

#[test]
fn a_checksum_mismatch_resyncs_and_never_emits_the_broken_message() {
    let mut s = WsBookSync::new(X, "BTC-USD").with_checksum(Some(level_count));
    let mut out = Vec::new();
    let snap = || msg(BookAction::Snapshot, vec![lv("1", "1")], vec![lv("2", "1")]);
    // A snapshot that disagrees with its checksum is not emitted: nothing was live yet.
    let r = s.on_book_checked(snap(), Some(5), &mut out);
    assert!(matches!(r, Outcome::NeedSnapshot(_)), "{r:?}");
    assert!(out.is_empty());
    assert_eq!(s.on_book_checked(snap(), Some(2), &mut out), Outcome::Ok);
    let add = || msg(BookAction::Delta, vec![lv("0.5", "1")], vec![]);
    assert_eq!(s.on_book_checked(add(), Some(3), &mut out), Outcome::Ok);
    // No checksum on the message: nothing to check.
    assert_eq!(
        s.on_book(
            msg(BookAction::Delta, vec![lv("0.4", "1")], vec![]),
            &mut out
        ),
        Outcome::Ok
    );
    let r = s.on_book_checked(
        msg(BookAction::Delta, vec![lv("0.3", "1")], vec![]),
        Some(99),
        &mut out,
    );
    let Outcome::NeedSnapshot(why) = r else {
        panic!("{r:?}")
    };
    assert!(why.contains("checksum mismatch"), "{why}");
    assert_eq!(
        seqs(&out),
        [
            "Snapshot Some(1) None",
            "Delta Some(2) Some(1)",
            "Delta Some(3) Some(2)",
            "Resync"
        ]
    );
    assert!(!s.is_live());
}
