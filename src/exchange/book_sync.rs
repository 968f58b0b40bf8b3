//! Order-book synchronisation: REST snapshot + diff stream → a chain-exact `book` stream.
//!
//! Exchange-agnostic: an adapter turns its frames into [`BookDiff`]s (first/last update
//! id) and its REST answer into a [`BookSnapshot`]; this module implements Binance's
//! documented algorithm ("How to manage a local order book correctly",
//! <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md>),
//! which any exchange with update-id ranges fits:
//!
//! 1. Buffer diffs; on the first one, ask for a snapshot (the caller fetches it without
//!    blocking frame reading and hands the result to [`BookSync::on_snapshot`]).
//! 2. A snapshot older than the buffered stream (`lastUpdateId + 1 < U` of the first
//!    buffered diff: updates in between would be missing) is refetched.
//! 3. Buffered diffs with `u <= lastUpdateId` are dropped; the first applied one must have
//!    `U <= lastUpdateId + 1 <= u`; every later one `U == previous u + 1`.
//!
//! What comes out (PROTOCOL §2): a `book` snapshot (seq = `lastUpdateId`, prev_seq null,
//! levels as the REST answer lists them, best first), then deltas with seq = `u` and
//! prev_seq = the seq of the book message emitted just before — so the emitted chain is
//! exact even though the first delta's `U - 1` is usually below `lastUpdateId`. On a gap,
//! an invalid delta, or a reconnect the synchroniser emits a `status` `resync` event naming
//! the channel, never passes the broken delta on, and starts over with a new snapshot.
//! An [`OrderBook`] per symbol checks that every emitted message applies.
//!
//! It does no I/O and keeps no clock: the connection drives it, and tests drive it directly.

use std::collections::VecDeque;
use std::time::Duration;

use tracing::warn;

use crate::book::OrderBook;
use crate::event::{Book, BookAction, Event, Exchange, Level, StatusState};
use crate::metrics;

/// Diffs held while waiting for a snapshot; past this the sync starts over (a snapshot
/// that takes longer than 100 ms × this is not going to line up anyway).
pub const DEFAULT_MAX_BUFFER: usize = 4096;

/// One exchange diff: absolute sizes for price levels, covering update ids
/// `first_update_id ..= last_update_id` (Binance `U` ..= `u`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookDiff {
    pub exchange: Exchange,
    pub symbol: String,
    pub first_update_id: u64,
    pub last_update_id: u64,
    /// Exchange event time, µs.
    pub ts: Option<u64>,
    pub ts_recv: u64,
    pub bids: Vec<Level>,
    pub asks: Vec<Level>,
}

/// A REST order-book snapshot (best first on each side, as the exchange lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookSnapshot {
    pub exchange: Exchange,
    pub symbol: String,
    pub last_update_id: u64,
    /// When the response body was read.
    pub ts_recv: u64,
    pub bids: Vec<Level>,
    pub asks: Vec<Level>,
}

/// "Fetch a snapshot of `symbol` after `delay` and hand it back with this `generation`."
/// Results of an older generation are ignored (the sync moved on meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub symbol: String,
    pub generation: u64,
    pub delay: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting diffs; `requested` when a snapshot of the current generation is on its way.
    Buffering { requested: bool },
    /// Snapshot emitted; `last_u` is the seq of the last emitted book message. `first`
    /// until the first diff after the snapshot has been applied.
    Live { last_u: u64, first: bool },
}

/// The synchroniser of one (exchange, symbol) book.
#[derive(Debug)]
pub struct BookSync {
    exchange: Exchange,
    symbol: String,
    state: State,
    buffer: VecDeque<BookDiff>,
    pending: Option<BookSnapshot>,
    max_buffer: usize,
    book: OrderBook,
    generation: u64,
    /// Consecutive snapshots that failed or were too old: drives the refetch delay.
    refetches: u32,
}

impl BookSync {
    pub fn new(exchange: Exchange, symbol: impl Into<String>) -> BookSync {
        BookSync::with_max_buffer(exchange, symbol, DEFAULT_MAX_BUFFER)
    }

    pub fn with_max_buffer(
        exchange: Exchange,
        symbol: impl Into<String>,
        max_buffer: usize,
    ) -> BookSync {
        BookSync {
            exchange,
            symbol: symbol.into(),
            state: State::Buffering { requested: false },
            buffer: VecDeque::new(),
            pending: None,
            max_buffer: max_buffer.max(1),
            book: OrderBook::new(),
            generation: 0,
            refetches: 0,
        }
    }

    pub fn symbol(&self) -> &str {
        &self.symbol
    }

    /// True once a snapshot has been emitted and deltas flow.
    pub fn is_live(&self) -> bool {
        matches!(self.state, State::Live { .. })
    }

    /// The seq of the last emitted book message, while live.
    pub fn last_seq(&self) -> Option<u64> {
        match self.state {
            State::Live { last_u, .. } => Some(last_u),
            State::Buffering { .. } => None,
        }
    }

    /// The diffs now come from another socket of the same stream (a rotated connection):
    /// its next diff may straddle the last emitted seq (`U <= last + 1 <= u`) like the
    /// first diff after a snapshot; the chain of emitted messages stays exact.
    pub fn continue_on_new_stream(&mut self) {
        if let State::Live { last_u, .. } = self.state {
            self.state = State::Live {
                last_u,
                first: true,
            };
        }
    }

    /// The book as emitted so far (for inspection and tests).
    pub fn book(&self) -> &OrderBook {
        &self.book
    }

    /// Feeds one diff; emitted events go to `out`. Returns a snapshot to fetch, if any.
    pub fn on_diff(&mut self, diff: BookDiff, out: &mut Vec<Event>) -> Option<SnapshotRequest> {
        match self.state {
            State::Live { last_u, first } => {
                // Already covered by the snapshot or a previous delta (Binance: drop u <= lastUpdateId).
                if diff.last_update_id <= last_u {
                    return None;
                }
                let chains = if first {
                    diff.first_update_id <= last_u + 1
                } else {
                    diff.first_update_id == last_u + 1
                };
                if !chains {
                    let why = format!(
                        "gap: expected U={} got U={} u={}",
                        last_u + 1,
                        diff.first_update_id,
                        diff.last_update_id
                    );
                    // The diff after the gap is a fine start for the next sync: keep it buffered.
                    return self.resync(why, Some(diff), out);
                }
                let delta = Book {
                    exchange: self.exchange,
                    symbol: self.symbol.clone(),
                    ts: diff.ts,
                    ts_recv: diff.ts_recv,
                    action: BookAction::Delta,
                    bids: diff.bids,
                    asks: diff.asks,
                    seq: Some(diff.last_update_id),
                    prev_seq: Some(last_u),
                };
                if let Err(e) = self.book.apply(&delta) {
                    return self.resync(
                        format!("invalid delta u={}: {e}", diff.last_update_id),
                        None,
                        out,
                    );
                }
                out.push(Event::Book(delta));
                self.state = State::Live {
                    last_u: diff.last_update_id,
                    first: false,
                };
                None
            }
            State::Buffering { requested } => {
                if self.buffer.len() >= self.max_buffer {
                    warn!(
                        exchange = %self.exchange, symbol = %self.symbol, buffered = self.buffer.len(),
                        "book diff buffer full while waiting for a snapshot: starting over"
                    );
                    metrics::book_resync(self.exchange, "exchange");
                    self.buffer.clear();
                    self.pending = None;
                    self.generation += 1;
                    self.buffer.push_back(diff);
                    self.state = State::Buffering { requested: true };
                    return Some(self.request(Duration::ZERO));
                }
                self.buffer.push_back(diff);
                if !requested {
                    self.state = State::Buffering { requested: true };
                    return Some(self.request(Duration::ZERO));
                }
                self.try_sync(out)
            }
        }
    }

    /// Hands back the result of a snapshot request of `generation`.
    pub fn on_snapshot<E: std::fmt::Display>(
        &mut self,
        generation: u64,
        result: Result<BookSnapshot, E>,
        out: &mut Vec<Event>,
    ) -> Option<SnapshotRequest> {
        if generation != self.generation || self.is_live() {
            return None; // an answer to a question no longer asked
        }
        match result {
            Ok(snapshot) => {
                self.pending = Some(snapshot);
                self.try_sync(out)
            }
            Err(e) => {
                self.refetches += 1;
                let req = self.request(self.refetch_delay());
                warn!(
                    exchange = %self.exchange, symbol = %self.symbol, cause = %e,
                    retry_in_ms = req.delay.as_millis() as u64, "book snapshot failed"
                );
                Some(req)
            }
        }
    }

    /// The connection was lost: whatever was emitted no longer chains onto what comes next.
    pub fn on_disconnect(&mut self, reason: &str, out: &mut Vec<Event>) {
        if self.is_live() {
            self.emit_resync(format!("connection lost: {reason}"), out);
        }
        self.book = OrderBook::new();
        self.buffer.clear();
        self.pending = None;
        self.generation += 1;
        self.refetches = 0;
        self.state = State::Buffering { requested: false };
    }

    fn request(&self, delay: Duration) -> SnapshotRequest {
        SnapshotRequest {
            symbol: self.symbol.clone(),
            generation: self.generation,
            delay,
        }
    }

    fn refetch_delay(&self) -> Duration {
        // 250 ms, 500 ms, 1 s, ... capped at 10 s: a snapshot costs request weight.
        let ms = 250u64.saturating_mul(1u64 << self.refetches.saturating_sub(1).min(6));
        Duration::from_millis(ms.min(10_000))
    }

    /// With a snapshot and buffered diffs in hand: emit the snapshot and replay the buffer.
    fn try_sync(&mut self, out: &mut Vec<Event>) -> Option<SnapshotRequest> {
        let first_u = self.buffer.front()?.first_update_id;
        let snapshot = self.pending.take()?;
        if snapshot.last_update_id.saturating_add(1) < first_u {
            // Older than the stream we hold: the updates in between are lost to us.
            self.refetches += 1;
            warn!(
                exchange = %self.exchange, symbol = %self.symbol,
                last_update_id = snapshot.last_update_id, first_buffered_u = first_u,
                "book snapshot older than the buffered diffs: fetching again"
            );
            return Some(self.request(self.refetch_delay()));
        }
        let event = Book {
            exchange: self.exchange,
            symbol: self.symbol.clone(),
            ts: None,
            ts_recv: snapshot.ts_recv,
            action: BookAction::Snapshot,
            bids: snapshot.bids,
            asks: snapshot.asks,
            seq: Some(snapshot.last_update_id),
            prev_seq: None,
        };
        if let Err(e) = self.book.reset(&event) {
            self.refetches += 1;
            warn!(exchange = %self.exchange, symbol = %self.symbol, cause = %e, "invalid book snapshot: fetching again");
            return Some(self.request(self.refetch_delay()));
        }
        self.refetches = 0;
        out.push(Event::Book(event));
        self.state = State::Live {
            last_u: snapshot.last_update_id,
            first: true,
        };
        let mut request = None;
        // Replay: a resync in the middle puts the rest back into the (new) buffer.
        for diff in std::mem::take(&mut self.buffer) {
            if let Some(r) = self.on_diff(diff, out) {
                request = Some(r);
            }
        }
        request
    }

    fn emit_resync(&mut self, why: String, out: &mut Vec<Event>) {
        out.push(resync_event(self.exchange, &self.symbol, &why));
    }

    /// A broken chain: tell, forget the book, start over (keeping `keep` as first buffered diff).
    fn resync(
        &mut self,
        why: String,
        keep: Option<BookDiff>,
        out: &mut Vec<Event>,
    ) -> Option<SnapshotRequest> {
        self.emit_resync(why, out);
        self.book = OrderBook::new();
        self.buffer.clear();
        self.pending = None;
        self.generation += 1;
        self.buffer.extend(keep);
        self.state = State::Buffering { requested: true };
        Some(self.request(Duration::ZERO))
    }
}

/// The `status` `resync` event of book (`exchange`, `symbol`), logged and counted: what
/// every synchroniser emits when its chain broke.
pub(crate) fn resync_event(exchange: Exchange, symbol: &str, why: &str) -> Event {
    let detail = format!("book:{exchange}:{symbol}: {why}");
    warn!(%exchange, %symbol, detail = %detail, "book resync");
    metrics::book_resync(exchange, "exchange");
    Event::status(exchange, StatusState::Resync, Some(detail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Status;

    const X: Exchange = Exchange::Binance;

    fn lv(p: &str, q: &str) -> Level {
        Level(p.into(), q.into())
    }

    fn diff(first: u64, last: u64) -> BookDiff {
        BookDiff {
            exchange: X,
            symbol: "BTC-USDT".into(),
            first_update_id: first,
            last_update_id: last,
            ts: Some(last * 1000),
            ts_recv: last * 1000 + 1,
            // A level named after the diff so tests can tell which diffs went through.
            bids: vec![lv(&format!("{last}.5"), "1")],
            asks: vec![],
        }
    }

    fn snap(id: u64) -> BookSnapshot {
        BookSnapshot {
            exchange: X,
            symbol: "BTC-USDT".into(),
            last_update_id: id,
            ts_recv: 7,
            bids: vec![lv("100.0", "1"), lv("99.0", "2")],
            asks: vec![lv("101.0", "3")],
        }
    }

    fn ok(s: BookSnapshot) -> Result<BookSnapshot, String> {
        Ok(s)
    }

    /// (action, seq, prev_seq) of book events; `R` for resync status events.
    fn summary(out: &[Event]) -> Vec<String> {
        out.iter()
            .map(|e| match e {
                Event::Book(b) => format!("{:?} {:?} {:?}", b.action, b.seq, b.prev_seq),
                Event::Status(Status { state, .. }) => format!("{state:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// Every delta's prev_seq equals the seq of the book message before it, a resync
    /// status is always followed (eventually) by a snapshot before any delta.
    fn assert_chain_exact(out: &[Event]) {
        let mut last: Option<u64> = None;
        for e in out {
            match e {
                Event::Book(b) if b.action == BookAction::Snapshot => last = b.seq,
                Event::Book(b) => {
                    assert!(last.is_some(), "delta without snapshot: {b:?}");
                    assert_eq!(b.prev_seq, last, "chain broken at {b:?}");
                    last = b.seq;
                }
                Event::Status(s) if s.state == StatusState::Resync => last = None,
                _ => {}
            }
        }
    }

    #[test]
    fn normal_sync_drops_old_diffs_and_chains_exactly() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s
            .on_diff(diff(95, 100), &mut out)
            .expect("first diff asks for a snapshot");
        assert_eq!(req.generation, 0);
        assert_eq!(req.delay, Duration::ZERO);
        assert!(
            s.on_diff(diff(101, 104), &mut out).is_none(),
            "one request at a time"
        );
        assert!(s.on_diff(diff(105, 110), &mut out).is_none());
        assert!(out.is_empty(), "nothing before the snapshot");
        // Snapshot at 102: 95..=100 is dropped, 101..=104 straddles it (U <= 103 <= u).
        assert!(s
            .on_snapshot(req.generation, ok(snap(102)), &mut out)
            .is_none());
        assert_eq!(
            summary(&out),
            [
                "Snapshot Some(102) None",
                "Delta Some(104) Some(102)",
                "Delta Some(110) Some(104)"
            ]
        );
        assert!(s.on_diff(diff(111, 111), &mut out).is_none());
        assert_eq!(summary(&out).last().unwrap(), "Delta Some(111) Some(110)");
        assert_chain_exact(&out);
        let Event::Book(first) = &out[0] else {
            panic!()
        };
        assert_eq!(
            first.bids,
            vec![lv("100.0", "1"), lv("99.0", "2")],
            "snapshot levels as returned"
        );
        assert_eq!(first.ts_recv, 7);
        assert_eq!(s.book().seq(), Some(111));
        // The dropped diff's level never made it into the book; the applied ones did.
        let bids: Vec<&str> = s.book().bids().map(|l| l.0.as_str()).collect();
        assert!(!bids.contains(&"100.5"), "{bids:?}");
        assert!(
            bids.contains(&"104.5") && bids.contains(&"111.5"),
            "{bids:?}"
        );
    }

    #[test]
    fn a_new_stream_may_straddle_the_last_seq_once() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s.on_diff(diff(101, 104), &mut out).unwrap();
        s.on_snapshot(req.generation, ok(snap(102)), &mut out);
        s.on_diff(diff(105, 110), &mut out);
        assert_eq!(s.last_seq(), Some(110));
        // Same stream: a straddling diff is a gap.
        let mut same = BookSync::new(X, "BTC-USDT");
        let mut o = Vec::new();
        let r = same.on_diff(diff(101, 104), &mut o).unwrap();
        same.on_snapshot(r.generation, ok(snap(102)), &mut o);
        same.on_diff(diff(105, 110), &mut o);
        same.on_diff(diff(108, 112), &mut o);
        assert_eq!(summary(&o).last().unwrap(), "Resync");
        // A rotated socket batches differently: covered diffs are ignored, the first new
        // one straddles, later ones chain exactly; no resync, no snapshot.
        s.continue_on_new_stream();
        s.on_diff(diff(103, 107), &mut out);
        s.on_diff(diff(108, 112), &mut out);
        s.on_diff(diff(113, 115), &mut out);
        assert_eq!(
            summary(&out)[3..],
            ["Delta Some(112) Some(110)", "Delta Some(115) Some(112)"]
        );
        assert_chain_exact(&out);
        assert_eq!(s.last_seq(), Some(115));
    }

    #[test]
    fn snapshot_older_than_first_buffered_u_is_fetched_again() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s.on_diff(diff(200, 205), &mut out).unwrap();
        let again = s
            .on_snapshot(req.generation, ok(snap(150)), &mut out)
            .expect("refetch");
        assert_eq!(again.generation, req.generation);
        assert!(again.delay > Duration::ZERO);
        assert!(out.is_empty(), "a too-old snapshot is never emitted");
        s.on_diff(diff(206, 210), &mut out);
        // Exactly one before the first buffered U is fine: U <= lastUpdateId + 1.
        assert!(s
            .on_snapshot(again.generation, ok(snap(199)), &mut out)
            .is_none());
        assert_eq!(
            summary(&out),
            [
                "Snapshot Some(199) None",
                "Delta Some(205) Some(199)",
                "Delta Some(210) Some(205)"
            ]
        );
        assert_chain_exact(&out);
    }

    #[test]
    fn snapshot_newer_than_all_buffered_diffs_waits_for_the_straddling_one() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s.on_diff(diff(10, 12), &mut out).unwrap();
        s.on_diff(diff(13, 15), &mut out);
        assert!(s
            .on_snapshot(req.generation, ok(snap(17)), &mut out)
            .is_none());
        assert_eq!(summary(&out), ["Snapshot Some(17) None"]);
        assert!(
            s.on_diff(diff(16, 17), &mut out).is_none(),
            "covered by the snapshot: dropped"
        );
        s.on_diff(diff(18, 20), &mut out);
        assert_eq!(
            summary(&out),
            ["Snapshot Some(17) None", "Delta Some(20) Some(17)"]
        );
        assert_chain_exact(&out);
    }

    #[test]
    fn gap_emits_resync_never_the_broken_delta_and_resyncs() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s.on_diff(diff(1, 5), &mut out).unwrap();
        s.on_snapshot(req.generation, ok(snap(3)), &mut out);
        s.on_diff(diff(6, 8), &mut out);
        // 9 and 10 are lost.
        let again = s.on_diff(diff(11, 12), &mut out).expect("new snapshot");
        assert_eq!(again.generation, req.generation + 1);
        assert_eq!(
            summary(&out),
            [
                "Snapshot Some(3) None",
                "Delta Some(5) Some(3)",
                "Delta Some(8) Some(5)",
                "Resync"
            ]
        );
        let Event::Status(st) = &out[3] else { panic!() };
        let detail = st.detail.as_deref().unwrap();
        assert!(detail.starts_with("book:binance:BTC-USDT: gap"), "{detail}");
        assert!(!out
            .iter()
            .any(|e| matches!(e, Event::Book(b) if b.seq == Some(12))));
        // A late answer to the old request is ignored.
        assert!(s
            .on_snapshot(req.generation, ok(snap(12)), &mut out)
            .is_none());
        assert_eq!(out.len(), 4);
        s.on_diff(diff(13, 14), &mut out);
        s.on_snapshot(again.generation, ok(snap(12)), &mut out);
        assert_eq!(
            summary(&out)[4..],
            ["Snapshot Some(12) None", "Delta Some(14) Some(12)"]
        );
        assert_chain_exact(&out);
        // The broken delta's level was never applied: the book restarted from the snapshot.
        assert!(!s.book().bids().any(|l| l.0.as_str() == "12.5"));
    }

    #[test]
    fn gap_inside_the_buffer_resyncs_during_replay() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s.on_diff(diff(1, 5), &mut out).unwrap();
        s.on_diff(diff(6, 7), &mut out);
        s.on_diff(diff(9, 10), &mut out); // 8 missing
        s.on_diff(diff(11, 12), &mut out);
        let again = s
            .on_snapshot(req.generation, ok(snap(4)), &mut out)
            .expect("resync");
        assert_eq!(
            summary(&out),
            [
                "Snapshot Some(4) None",
                "Delta Some(5) Some(4)",
                "Delta Some(7) Some(5)",
                "Resync"
            ]
        );
        // 9..=10 and 11..=12 stay buffered for the new snapshot.
        s.on_snapshot(again.generation, ok(snap(10)), &mut out);
        assert_eq!(
            summary(&out)[4..],
            ["Snapshot Some(10) None", "Delta Some(12) Some(10)"]
        );
        assert_chain_exact(&out);
    }

    #[test]
    fn invalid_delta_is_not_passed_on() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s.on_diff(diff(1, 2), &mut out).unwrap();
        s.on_snapshot(req.generation, ok(snap(1)), &mut out);
        let mut bad = diff(3, 4);
        bad.asks = vec![lv("1e5", "1")];
        assert!(s.on_diff(bad, &mut out).is_some());
        assert_eq!(
            summary(&out),
            ["Snapshot Some(1) None", "Delta Some(2) Some(1)", "Resync"]
        );
    }

    #[test]
    fn disconnect_resyncs_a_live_book_and_failed_snapshots_retry() {
        let mut s = BookSync::new(X, "BTC-USDT");
        let mut out = Vec::new();
        let req = s.on_diff(diff(1, 2), &mut out).unwrap();
        let retry = s
            .on_snapshot(req.generation, Err("HTTP 503"), &mut out)
            .expect("retry");
        assert_eq!(retry.generation, req.generation);
        assert!(retry.delay >= Duration::from_millis(250));
        s.on_snapshot(retry.generation, ok(snap(1)), &mut out);
        assert!(s.is_live());
        s.on_disconnect("reset by peer", &mut out);
        assert_eq!(
            summary(&out),
            ["Snapshot Some(1) None", "Delta Some(2) Some(1)", "Resync"]
        );
        assert!(!s.is_live());
        let req2 = s
            .on_diff(diff(50, 51), &mut out)
            .expect("new snapshot after reconnect");
        assert!(req2.generation > retry.generation);
        s.on_snapshot(req2.generation, ok(snap(50)), &mut out);
        assert_eq!(
            summary(&out)[3..],
            ["Snapshot Some(50) None", "Delta Some(51) Some(50)"]
        );
        assert_chain_exact(&out);
        // Disconnecting while not live says nothing (nothing was passed on since the resync).
        let mut quiet = BookSync::new(X, "BTC-USDT");
        quiet.on_disconnect("x", &mut out);
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn buffer_overflow_starts_over() {
        let mut s = BookSync::with_max_buffer(X, "BTC-USDT", 3);
        let mut out = Vec::new();
        let req = s.on_diff(diff(1, 1), &mut out).unwrap();
        s.on_diff(diff(2, 2), &mut out);
        s.on_diff(diff(3, 3), &mut out);
        let again = s.on_diff(diff(4, 4), &mut out).expect("restart");
        assert_eq!(again.generation, req.generation + 1);
        assert!(
            s.on_snapshot(req.generation, ok(snap(1)), &mut out)
                .is_none(),
            "old generation"
        );
        s.on_snapshot(again.generation, ok(snap(3)), &mut out);
        assert_eq!(
            summary(&out),
            ["Snapshot Some(3) None", "Delta Some(4) Some(3)"]
        );
    }
}
