//! Trade de-duplication across a rotation's overlap and a venue's repeated batches
//! (Coinbase sends its recent trades again on every subscribe), by the venue's rule
//! ([`TradeIds`]). Bounded: at most [`RECENT_IDS`] ids per symbol are remembered.
//!
//! It owns only the memory of emitted trade ids; what a repeat is comes from the adapter.

use std::collections::{HashMap, HashSet, VecDeque};

use super::TradeIds;
use crate::event::{Event, Trade};

/// Opaque ids remembered per symbol (a snapshot batch is far shorter).
pub const RECENT_IDS: usize = 4096;

#[derive(Debug, Default)]
struct Recent {
    order: VecDeque<String>,
    set: HashSet<String>,
}

/// The ids emitted per symbol.
#[derive(Debug)]
pub struct TradeDedup {
    rule: TradeIds,
    last: HashMap<String, u64>,
    recent: HashMap<String, Recent>,
}

impl TradeDedup {
    pub fn new(rule: TradeIds) -> TradeDedup {
        TradeDedup {
            rule,
            last: HashMap::new(),
            recent: HashMap::new(),
        }
    }

    /// A new session of a venue whose ids may start over (a restarted simulated venue):
    /// forgets increasing ids. Opaque ids are kept: a repeated batch must stay suppressed.
    pub fn new_session(&mut self) {
        self.last.clear();
    }

    /// False for a trade already emitted; true (and remembered) otherwise. Not a trade:
    /// always true.
    pub fn fresh(&mut self, e: &Event) -> bool {
        let Event::Trade(t) = e else { return true };
        match self.rule {
            TradeIds::Increasing => self.fresh_increasing(t),
            TradeIds::Opaque => self.fresh_opaque(t),
        }
    }

    fn fresh_increasing(&mut self, t: &Trade) -> bool {
        let Ok(id) = t.trade_id.parse::<u64>() else {
            return true;
        };
        match self.last.get_mut(&t.symbol) {
            Some(last) if id <= *last => false,
            Some(last) => {
                *last = id;
                true
            }
            None => {
                self.last.insert(t.symbol.clone(), id);
                true
            }
        }
    }

    fn fresh_opaque(&mut self, t: &Trade) -> bool {
        let recent = self.recent.entry(t.symbol.clone()).or_default();
        if recent.set.contains(&t.trade_id) {
            return false;
        }
        if recent.order.len() >= RECENT_IDS {
            if let Some(old) = recent.order.pop_front() {
                recent.set.remove(&old);
            }
        }
        recent.order.push_back(t.trade_id.clone());
        recent.set.insert(t.trade_id.clone());
        true
    }

    /// For a rotation: under the increasing rule, whether a new socket whose first trade of
    /// `symbol` has id `first` loses none (`first <= last + 1`). Opaque ids cannot say, and
    /// need not: the overlap's repeats are dropped by id.
    pub fn continues(&self, symbol: &str, first: &str) -> bool {
        match (self.rule, first.parse::<u64>()) {
            (TradeIds::Increasing, Ok(first)) => {
                self.last.get(symbol).is_none_or(|&last| first <= last + 1)
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Exchange, Side};

    fn trade(symbol: &str, id: &str) -> Event {
        Event::Trade(Trade {
            exchange: Exchange::Coinbase,
            symbol: symbol.into(),
            ts: None,
            ts_recv: 1,
            trade_id: id.into(),
            price: "1".into(),
            size: "1".into(),
            side: Some(Side::Buy),
        })
    }

    #[test]
    fn opaque_ids_are_dropped_when_seen_and_survive_a_new_session() {
        let mut d = TradeDedup::new(TradeIds::Opaque);
        assert!(d.fresh(&trade("BTC-USD", "a")));
        assert!(d.fresh(&trade("BTC-USD", "b")));
        assert!(d.fresh(&trade("ETH-USD", "a")), "per symbol");
        d.new_session();
        assert!(!d.fresh(&trade("BTC-USD", "a")));
        assert!(!d.fresh(&trade("BTC-USD", "b")));
        assert!(d.fresh(&trade("BTC-USD", "c")));
    }

    #[test]
    fn opaque_memory_is_bounded() {
        let mut d = TradeDedup::new(TradeIds::Opaque);
        for i in 0..RECENT_IDS + 1 {
            assert!(d.fresh(&trade("BTC-USD", &i.to_string())));
        }
        // The oldest was forgotten, the newest is remembered.
        assert!(d.fresh(&trade("BTC-USD", "0")));
        assert!(!d.fresh(&trade("BTC-USD", &RECENT_IDS.to_string())));
        assert!(d.recent["BTC-USD"].order.len() <= RECENT_IDS);
    }

    #[test]
    fn increasing_ids_drop_anything_not_above_the_last() {
        let mut d = TradeDedup::new(TradeIds::Increasing);
        assert!(d.fresh(&trade("BTC-USDT", "5")));
        assert!(!d.fresh(&trade("BTC-USDT", "5")));
        assert!(!d.fresh(&trade("BTC-USDT", "4")));
        assert!(d.continues("BTC-USDT", "6"));
        assert!(!d.continues("BTC-USDT", "7"));
        d.new_session();
        assert!(d.fresh(&trade("BTC-USDT", "1")));
    }
}
