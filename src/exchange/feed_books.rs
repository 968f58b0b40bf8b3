//! The books of one feed, each synchronised the way its venue needs
//! ([`BookSyncMode`]): the connection asks this what it asks of any book (live? last seq?
//! lost?), and hands each venue message to the synchroniser that understands it.
//!
//! It owns no socket and no venue rule: REST-snapshot books are [`BookSync`], WebSocket
//! snapshot books [`WsBookSync`].

use std::collections::HashMap;

use super::ws_book::{Outcome, WsBookSync};
use super::{BookChecksum, BookSync, BookSyncMode};
use crate::event::{Event, Exchange};

/// One book of a feed.
#[derive(Debug)]
pub enum FeedBook {
    Rest(BookSync),
    Ws(WsBookSync),
}

impl FeedBook {
    pub fn symbol(&self) -> &str {
        match self {
            FeedBook::Rest(b) => b.symbol(),
            FeedBook::Ws(b) => b.symbol(),
        }
    }

    pub fn last_seq(&self) -> Option<u64> {
        match self {
            FeedBook::Rest(b) => b.last_seq(),
            FeedBook::Ws(b) => b.last_seq(),
        }
    }

    /// The connection was lost: emits `resync` for a live book and starts over.
    pub fn on_disconnect(&mut self, reason: &str, out: &mut Vec<Event>) {
        match self {
            FeedBook::Rest(b) => b.on_disconnect(reason, out),
            FeedBook::Ws(b) => b.on_disconnect(reason, out),
        }
    }
}

/// The books of a feed, by symbol.
#[derive(Debug, Default)]
pub struct FeedBooks {
    books: HashMap<String, FeedBook>,
}

impl FeedBooks {
    /// One book per symbol, synchronised by `mode` (WebSocket books verified by
    /// `checksum`, when the venue has one).
    pub fn new(
        exchange: Exchange,
        symbols: &[String],
        mode: BookSyncMode,
        checksum: Option<BookChecksum>,
    ) -> FeedBooks {
        let books = symbols
            .iter()
            .map(|s| {
                let book = match mode {
                    BookSyncMode::RestSnapshot => {
                        FeedBook::Rest(BookSync::new(exchange, s.clone()))
                    }
                    BookSyncMode::WsSnapshot => {
                        FeedBook::Ws(WsBookSync::new(exchange, s.clone()).with_checksum(checksum))
                    }
                };
                (s.clone(), book)
            })
            .collect();
        FeedBooks { books }
    }

    pub fn rest(&mut self, symbol: &str) -> Option<&mut BookSync> {
        match self.books.get_mut(symbol) {
            Some(FeedBook::Rest(b)) => Some(b),
            _ => None,
        }
    }

    /// A WebSocket book message (with the venue's checksum, if any) for its symbol; None
    /// when the feed has no such book.
    pub fn ws(
        &mut self,
        msg: crate::event::Book,
        checksum: Option<u32>,
        out: &mut Vec<Event>,
    ) -> Option<Outcome> {
        match self.books.get_mut(&msg.symbol) {
            Some(FeedBook::Ws(b)) => Some(b.on_book_checked(msg, checksum, out)),
            _ => None,
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &FeedBook> {
        self.books.values()
    }

    /// Every book lost its chain (connection lost, its sequence broken).
    pub fn disconnect_all(&mut self, reason: &str, out: &mut Vec<Event>) {
        for book in self.books.values_mut() {
            book.on_disconnect(reason, out);
        }
    }

    /// The feed switched to a rotated socket: REST books continue on it (update ids are
    /// global per symbol), WebSocket books wait for that socket's own snapshot (replayed
    /// from the overlap), emitting nothing meanwhile; books not live start over.
    pub fn continue_on_new_stream(&mut self, out: &mut Vec<Event>) {
        for book in self.books.values_mut() {
            match book {
                FeedBook::Rest(b) if b.is_live() => b.continue_on_new_stream(),
                FeedBook::Ws(b) => b.await_snapshot(),
                other => other.on_disconnect("rotation", out),
            }
        }
    }
}
