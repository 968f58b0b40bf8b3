//! Order-book synchronisation for venues that send the snapshot on the WebSocket
//! ([`super::BookSyncMode::WsSnapshot`]: Coinbase; Kraken, Bybit and OKX work the same way):
//! a snapshot, then updates with absolute sizes → the chain-exact `book` stream of
//! PROTOCOL §2.
//!
//! - The host numbers each book's messages itself: `seq` goes up by one per emitted
//!   message and never restarts while the process runs (a fresh snapshot after a
//!   reconnect continues the numbering), each delta's `prev_seq` is the previous `seq`.
//!   A venue sequence that numbers the connection (Coinbase `sequence_num`) is checked by
//!   the connection, not here; a per-book venue sequence (`Book::prev_seq` set by the
//!   adapter) is checked here.
//! - Updates before the first snapshot are dropped (the snapshot that follows covers them).
//! - An update that does not chain onto the venue's per-book sequence, or that the book
//!   refuses, emits `status` `resync` and asks the connection for a fresh snapshot
//!   ([`Outcome::NeedSnapshot`]); nothing is emitted for the book until it arrives.
//! - A venue that checksums its book (Kraken, OKX: CRC32 of the top levels) gives a
//!   verifier ([`super::BookChecksum`]): after each applied snapshot or update it is called
//!   with the book and the message's checksum, and a mismatch is a gap like any other
//!   (`resync`, fresh snapshot); the message that broke the book is not emitted.
//! - Snapshots are emitted from the [`OrderBook`] they were applied to, so each side is
//!   listed best first whatever order the venue sent, with the venue's exact text.
//!
//! No I/O, no clock; the connection drives it and tests drive it directly.

use super::book_sync::resync_event;
use super::BookChecksum;
use crate::book::OrderBook;
use crate::event::{Book, BookAction, Event, Exchange};

/// What the connection has to do after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The book lost its chain (the reason is given): a fresh snapshot is needed, which
    /// on these venues means subscribing again (the connection reconnects).
    NeedSnapshot(String),
}

/// The synchroniser of one (exchange, symbol) book.
#[derive(Debug)]
pub struct WsBookSync {
    exchange: Exchange,
    symbol: String,
    book: OrderBook,
    /// Seq of the last emitted message, while live.
    live: Option<u64>,
    /// Last seq handed out (never goes back).
    numbered: u64,
    /// The venue's own per-book sequence of the last applied message, where it has one.
    venue_seq: Option<u64>,
    /// The venue's checksum verifier, if it sends checksums.
    checksum: Option<BookChecksum>,
}

impl WsBookSync {
    pub fn new(exchange: Exchange, symbol: impl Into<String>) -> WsBookSync {
        WsBookSync {
            exchange,
            symbol: symbol.into(),
            book: OrderBook::new(),
            live: None,
            numbered: 0,
            venue_seq: None,
            checksum: None,
        }
    }

    /// Verifies every applied message that carries a checksum with `checksum` (None: the
    /// venue sends none).
    pub fn with_checksum(mut self, checksum: Option<BookChecksum>) -> WsBookSync {
        self.checksum = checksum;
        self
    }

    pub fn symbol(&self) -> &str {
        &self.symbol
    }

    pub fn is_live(&self) -> bool {
        self.live.is_some()
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.live
    }

    /// The book as emitted so far.
    pub fn book(&self) -> &OrderBook {
        &self.book
    }

    /// One venue book message (snapshot or update, absolute sizes); events go to `out`.
    pub fn on_book(&mut self, msg: Book, out: &mut Vec<Event>) -> Outcome {
        self.on_book_checked(msg, None, out)
    }

    /// [`Self::on_book`] for a message carrying the venue's checksum of the book after it.
    pub fn on_book_checked(
        &mut self,
        msg: Book,
        checksum: Option<u32>,
        out: &mut Vec<Event>,
    ) -> Outcome {
        match msg.action {
            BookAction::Snapshot => self.on_snapshot(msg, checksum, out),
            BookAction::Delta => self.on_update(msg, checksum, out),
        }
    }

    /// Why the book disagrees with the venue's checksum, if it does.
    fn mismatch(&self, checksum: Option<u32>) -> Option<String> {
        match (self.checksum, checksum) {
            (Some(verify), Some(sum)) if !verify(&self.book, sum) => {
                Some(format!("checksum mismatch: the venue says {sum}"))
            }
            _ => None,
        }
    }

    fn on_snapshot(&mut self, msg: Book, checksum: Option<u32>, out: &mut Vec<Event>) -> Outcome {
        let venue_seq = msg.seq;
        let numbered = Book {
            seq: Some(self.numbered + 1),
            prev_seq: None,
            ..msg
        };
        if let Err(e) = self.book.reset(&numbered) {
            return self.resync(format!("invalid snapshot: {e}"), out);
        }
        if let Some(why) = self.mismatch(checksum) {
            return self.resync(format!("snapshot: {why}"), out);
        }
        self.numbered += 1;
        self.live = Some(self.numbered);
        self.venue_seq = venue_seq;
        out.push(Event::Book(self.book.to_snapshot(&numbered)));
        Outcome::Ok
    }

    fn on_update(&mut self, msg: Book, checksum: Option<u32>, out: &mut Vec<Event>) -> Outcome {
        let Some(last) = self.live else {
            return Outcome::Ok; // before the snapshot: covered by it
        };
        if let (Some(prev), Some(venue)) = (msg.prev_seq, self.venue_seq) {
            if prev != venue {
                return self.resync(format!("gap: expected prev {venue}, got {prev}"), out);
            }
        }
        let venue_seq = msg.seq;
        let delta = Book {
            action: BookAction::Delta,
            seq: Some(self.numbered + 1),
            prev_seq: Some(last),
            ..msg
        };
        if let Err(e) = self.book.apply(&delta) {
            return self.resync(format!("invalid update: {e}"), out);
        }
        if let Some(why) = self.mismatch(checksum) {
            return self.resync(why, out);
        }
        self.numbered += 1;
        self.live = Some(self.numbered);
        if venue_seq.is_some() {
            self.venue_seq = venue_seq;
        }
        out.push(Event::Book(delta));
        Outcome::Ok
    }

    /// The connection was lost or its sequence broke: whatever was emitted no longer
    /// chains onto what comes next.
    pub fn on_disconnect(&mut self, reason: &str, out: &mut Vec<Event>) {
        if self.is_live() {
            self.emit_resync(format!("connection lost: {reason}"), out);
        }
        self.forget();
    }

    /// The messages now come from another socket whose snapshot follows: nothing is
    /// emitted until it does, and it continues the numbering (no `resync`: nothing broke).
    pub fn await_snapshot(&mut self) {
        self.forget();
    }

    fn forget(&mut self) {
        self.book = OrderBook::new();
        self.live = None;
        self.venue_seq = None;
    }

    fn emit_resync(&self, why: String, out: &mut Vec<Event>) {
        out.push(resync_event(self.exchange, &self.symbol, &why));
    }

    fn resync(&mut self, why: String, out: &mut Vec<Event>) -> Outcome {
        if self.is_live() {
            self.emit_resync(why.clone(), out);
        }
        self.forget();
        Outcome::NeedSnapshot(why)
    }
}

#[cfg(test)]
mod tests;
