//! An L2 order book kept from normalized `book` events: snapshot, then deltas that chain.
//!
//! Used on both sides of the bus: the publisher keeps one per book channel to refresh the
//! `{p}snapshot:{channel}` key, and the gateway keeps one per subscribed book channel so a
//! bot that joins late gets a snapshot that the next delta chains onto. Levels keep the
//! exchange's decimal text; ordering uses an exact fixed-point key parsed from that text.
//! The exchange-specific synchronisation (REST snapshot + diff stream) lives in
//! `exchange::book_sync`; this type only applies already-normalized events.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use crate::event::{Book, BookAction, Decimal, Level};

/// Why a book event could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error("price `{0}` is not a plain decimal")]
    BadPrice(String),
    /// Shown to bots in `resync` details: plain numbers, never Rust `Debug` text.
    #[error("delta follows seq {} but the book is at seq {}", SeqText(*prev_seq), SeqText(*book_seq))]
    Gap {
        book_seq: Option<u64>,
        prev_seq: Option<u64>,
    },
    #[error("a delta arrived before any snapshot")]
    NoSnapshot,
}

/// An optional sequence number as a bot reads it: `9547`, or `none` when absent.
struct SeqText(Option<u64>);

impl std::fmt::Display for SeqText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(seq) => write!(f, "{seq}"),
            None => f.write_str("none"),
        }
    }
}

/// Exact fixed-point price: the decimal text scaled by 10^18 (prices up to ~1.7e20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PriceKey(i128);

const SCALE_DIGITS: usize = 18;

impl PriceKey {
    pub fn parse(text: &str) -> Option<PriceKey> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let frac = frac.trim_end_matches('0');
        if frac.len() > SCALE_DIGITS || int.len() > 20 {
            return None;
        }
        let mut value: i128 = 0;
        for b in int.bytes() {
            value = value.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        for i in 0..SCALE_DIGITS {
            let digit = frac.as_bytes().get(i).map_or(0, |b| b - b'0');
            value = value.checked_mul(10)?.checked_add(i128::from(digit))?;
        }
        Some(PriceKey(value))
    }
}

/// A full L2 book: bids best (highest) first, asks best (lowest) first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderBook {
    bids: BTreeMap<Reverse<PriceKey>, Level>,
    asks: BTreeMap<PriceKey, Level>,
    seq: Option<u64>,
    has_snapshot: bool,
}

impl OrderBook {
    pub fn new() -> OrderBook {
        OrderBook::default()
    }

    /// Replaces the book with `snapshot`'s levels and sequence.
    pub fn reset(&mut self, snapshot: &Book) -> Result<(), BookError> {
        let mut fresh = OrderBook {
            has_snapshot: true,
            seq: snapshot.seq,
            ..OrderBook::default()
        };
        fresh.apply_levels(&snapshot.bids, &snapshot.asks)?;
        *self = fresh;
        Ok(())
    }

    /// Applies a snapshot (reset) or a delta that must chain onto the current `seq`.
    pub fn apply(&mut self, event: &Book) -> Result<(), BookError> {
        match event.action {
            BookAction::Snapshot => self.reset(event),
            BookAction::Delta => {
                if !self.has_snapshot {
                    return Err(BookError::NoSnapshot);
                }
                if self.seq.is_some() && event.prev_seq != self.seq {
                    return Err(BookError::Gap {
                        book_seq: self.seq,
                        prev_seq: event.prev_seq,
                    });
                }
                self.apply_levels(&event.bids, &event.asks)?;
                if event.seq.is_some() {
                    self.seq = event.seq;
                }
                Ok(())
            }
        }
    }

    fn apply_levels(&mut self, bids: &[Level], asks: &[Level]) -> Result<(), BookError> {
        for level in bids {
            let key = Reverse(key_of(&level.0)?);
            if level.1.is_zero() {
                self.bids.remove(&key);
            } else {
                self.bids.insert(key, level.clone());
            }
        }
        for level in asks {
            let key = key_of(&level.0)?;
            if level.1.is_zero() {
                self.asks.remove(&key);
            } else {
                self.asks.insert(key, level.clone());
            }
        }
        Ok(())
    }

    pub fn seq(&self) -> Option<u64> {
        self.seq
    }
    pub fn has_snapshot(&self) -> bool {
        self.has_snapshot
    }
    pub fn bids(&self) -> impl Iterator<Item = &Level> {
        self.bids.values()
    }
    pub fn asks(&self) -> impl Iterator<Item = &Level> {
        self.asks.values()
    }

    /// A snapshot event of the whole book, stamped like `template` (exchange, symbol, times).
    pub fn to_snapshot(&self, template: &Book) -> Book {
        Book {
            exchange: template.exchange,
            symbol: template.symbol.clone(),
            ts: template.ts,
            ts_recv: template.ts_recv,
            action: BookAction::Snapshot,
            bids: self.bids.values().cloned().collect(),
            asks: self.asks.values().cloned().collect(),
            seq: self.seq,
            prev_seq: None,
        }
    }
}

fn key_of(price: &Decimal) -> Result<PriceKey, BookError> {
    PriceKey::parse(price.as_str()).ok_or_else(|| BookError::BadPrice(price.0.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Exchange;

    fn lv(p: &str, s: &str) -> Level {
        Level(p.into(), s.into())
    }

    fn book(
        action: BookAction,
        bids: Vec<Level>,
        asks: Vec<Level>,
        seq: u64,
        prev: Option<u64>,
    ) -> Book {
        Book {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv: 0,
            action,
            bids,
            asks,
            seq: Some(seq),
            prev_seq: prev,
        }
    }

    #[test]
    fn price_keys_order_numerically() {
        let k = |s| PriceKey::parse(s).unwrap();
        assert!(k("9.5") < k("10"));
        assert_eq!(k("10.0100"), k("10.01"));
        assert!(k("0.00000001") > k("0"));
        for bad in ["", ".", "1e5", "-1", "abc", "1.2.3"] {
            assert!(PriceKey::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn snapshot_then_chained_deltas() {
        let mut b = OrderBook::new();
        let snap = book(
            BookAction::Snapshot,
            vec![lv("99.00", "1"), lv("100.00", "2")],
            vec![lv("101.5", "3"), lv("101.00", "4")],
            10,
            None,
        );
        b.apply(&snap).unwrap();
        let bids: Vec<_> = b.bids().map(|l| l.0.as_str()).collect();
        assert_eq!(bids, ["100.00", "99.00"]);
        let asks: Vec<_> = b.asks().map(|l| l.0.as_str()).collect();
        assert_eq!(asks, ["101.00", "101.5"]);

        let d = book(
            BookAction::Delta,
            vec![lv("100.0", "0.00000000")],
            vec![lv("100.5", "7")],
            12,
            Some(10),
        );
        b.apply(&d).unwrap();
        assert_eq!(b.seq(), Some(12));
        let s = b.to_snapshot(&d);
        assert_eq!(s.bids, vec![lv("99.00", "1")]);
        assert_eq!(s.asks[0], lv("100.5", "7"));
        assert_eq!(s.action, BookAction::Snapshot);

        let gap = book(BookAction::Delta, vec![], vec![], 20, Some(15));
        assert!(matches!(b.apply(&gap), Err(BookError::Gap { .. })));
        assert_eq!(
            b.seq(),
            Some(12),
            "a refused delta leaves the book as it was"
        );
    }

    #[test]
    fn gap_text_has_plain_numbers_not_debug_text() {
        let gap = BookError::Gap {
            book_seq: Some(9546),
            prev_seq: Some(9547),
        };
        assert_eq!(
            gap.to_string(),
            "delta follows seq 9547 but the book is at seq 9546"
        );
        let none = BookError::Gap {
            book_seq: None,
            prev_seq: None,
        };
        assert_eq!(
            none.to_string(),
            "delta follows seq none but the book is at seq none"
        );
        for e in [gap, none] {
            assert!(!e.to_string().contains("Some("), "{e}");
        }
    }

    #[test]
    fn delta_before_snapshot_is_refused() {
        let mut b = OrderBook::new();
        let d = book(BookAction::Delta, vec![], vec![], 2, Some(1));
        assert_eq!(b.apply(&d), Err(BookError::NoSnapshot));
    }
}
