//! Exchange simulator: a deterministic, seeded market model plus exchange
//! wire-format front-ends that serve it over HTTP/WebSocket.
//!
//! What lives here:
//! * the public API ([`SimConfig`], [`Faults`], [`serve_binance`],
//!   [`serve_coinbase`]; which venues are simulated is said by
//!   `crate::exchange::registry`);
//! * the exchange-agnostic market model ([`Market`]): one per symbol, a
//!   seeded random walk that produces abstract trades, L2 book diffs with
//!   monotonically increasing update ids, rolling ticker statistics and
//!   candles. Prices and sizes are integers (ticks of 0.01, units of 1e-8)
//!   so the model is exact and deterministic; front-ends only *render* them.
//!
//! Each venue adds only a front-end: its wire rendering, subscribe protocol and
//! heartbeat, kept with the venue's other files and named by its registry entry
//! (`crate::exchange::registry::<venue>::simulator`); the model lives here, the market
//! loop, the drop fault and serving in [`runtime`], the `/_sim/` control API in
//! [`control`], all `pub(crate)` for those front-ends.

pub(crate) mod control;
pub(crate) mod runtime;

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The venues' own simulators, under their names of before the registry held them.
pub use crate::exchange::registry::binance::simulator::serve_binance;
pub use crate::exchange::registry::coinbase::simulator::serve_coinbase;
pub(crate) use runtime::{lock, now_ms};

/// Simulator configuration.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Normalized symbols ("BTC-USDT"); Binance renders them "BTCUSDT" and
    /// stream names "btcusdt@trade".
    pub symbols: Vec<String>,
    /// Market events (trades + depth updates) per second over all symbols; each symbol
    /// ticks `rate / (2 × symbols)` times a second, every tick one trade and one depth
    /// update. 0 = flat out (as fast as the slowest client reads, yielding regularly).
    /// Tickers and klines come on top, once a second per symbol.
    pub rate: u32,
    /// Seed for deterministic prices/sizes.
    pub seed: u64,
    /// Periodic faults, all off by default.
    pub faults: Faults,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            symbols: vec!["BTC-USDT".to_string(), "ETH-USDT".to_string()],
            rate: 200,
            seed: 42,
            faults: Faults::default(),
        }
    }
}

/// Periodic faults injected by the simulator (e.g. from the CLI).
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Drop every WebSocket connection every N seconds.
    pub drop_every_secs: Option<u64>,
    /// Withhold one depth diff every N diffs (clients see an update-id gap).
    pub gap_every_updates: Option<u64>,
    /// Send one garbage text frame every N frames on each connection.
    pub malformed_every_frames: Option<u64>,
}

/// Price in ticks of 0.01 quote units.
pub(crate) type Price = i64;
/// Quantity in units of 1e-8 base units.
pub(crate) type Qty = u64;

/// Number of decimals of the tick size (0.01).
pub(crate) const PRICE_DECIMALS: u32 = 2;
/// Target number of levels per side; the book is kept within
/// `[BOOK_MIN_LEVELS, BOOK_MAX_LEVELS]` so memory and snapshot size stay bounded.
const BOOK_TARGET_LEVELS: usize = 50;
const BOOK_MIN_LEVELS: usize = 40;
const BOOK_MAX_LEVELS: usize = 60;
/// Lowest mid price (in ticks) the random walk may reach, so prices stay positive.
const MIN_MID: Price = 1_000;
/// First depth update id; arbitrary but non-zero like a real venue.
const FIRST_UPDATE_ID: u64 = 1000;

/// Kline intervals supported (Binance's list without `1M`, whose calendar
/// months are not fixed-length), with their length in ms.
pub(crate) const KLINE_INTERVALS: &[(&str, i64)] = &[
    ("1s", 1_000),
    ("1m", 60_000),
    ("3m", 180_000),
    ("5m", 300_000),
    ("15m", 900_000),
    ("30m", 1_800_000),
    ("1h", 3_600_000),
    ("2h", 7_200_000),
    ("4h", 14_400_000),
    ("6h", 21_600_000),
    ("8h", 28_800_000),
    ("12h", 43_200_000),
    ("1d", 86_400_000),
    ("3d", 259_200_000),
    ("1w", 604_800_000),
];

/// Start of the interval containing `t`. Weeks start on Monday 00:00 UTC
/// (the epoch was a Thursday, hence the 4-day offset).
fn interval_start(t: i64, len: i64) -> i64 {
    let offset = if len == 604_800_000 {
        4 * 86_400_000
    } else {
        0
    };
    (t - offset).div_euclid(len) * len + offset
}

/// One executed trade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Trade {
    pub id: u64,
    pub price: Price,
    pub qty: Qty,
    pub time: i64,
    /// True when the buyer was the resting (maker) order, i.e. the taker sold.
    pub buyer_is_maker: bool,
}

/// A change of L2 book levels; `qty == 0` removes the level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BookDiff {
    pub first_update_id: u64,
    pub last_update_id: u64,
    pub bids: Vec<(Price, Qty)>,
    pub asks: Vec<(Price, Qty)>,
}

/// Best bid/ask after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bbo {
    pub bid: (Price, Qty),
    pub ask: (Price, Qty),
}

/// Everything one market tick produced.
#[derive(Debug, Clone)]
pub(crate) struct TickOutput {
    pub trade: Trade,
    pub diff: BookDiff,
    /// Set when the best bid or ask (price or quantity) changed.
    pub bbo_changed: Option<Bbo>,
}

/// Rolling statistics since the simulator started (a stand-in for a 24h
/// window: the simulator rarely runs a day).
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub open_time: i64,
    /// Price before the first trade of the window.
    pub prev_price: Price,
    pub open: Price,
    pub high: Price,
    pub low: Price,
    pub last: Price,
    pub last_qty: Qty,
    pub volume: u128,
    /// Quote volume in units of 1e-10 (ticks * qty units).
    pub quote_volume: u128,
    pub first_trade_id: u64,
    pub last_trade_id: u64,
    pub count: u64,
}

/// One candle (OHLCV) of a kline interval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Candle {
    pub interval: usize,
    pub start: i64,
    pub end: i64,
    pub open: Price,
    pub high: Price,
    pub low: Price,
    pub close: Price,
    pub volume: u128,
    pub quote_volume: u128,
    pub taker_buy_volume: u128,
    pub taker_buy_quote_volume: u128,
    /// `None` while the candle has no trades.
    pub first_trade_id: Option<u64>,
    pub last_trade_id: Option<u64>,
    pub count: u64,
}

impl Candle {
    fn empty(interval: usize, t: i64, price: Price) -> Self {
        let len = KLINE_INTERVALS[interval].1;
        let start = interval_start(t, len);
        Self {
            interval,
            start,
            end: start + len - 1,
            open: price,
            high: price,
            low: price,
            close: price,
            volume: 0,
            quote_volume: 0,
            taker_buy_volume: 0,
            taker_buy_quote_volume: 0,
            first_trade_id: None,
            last_trade_id: None,
            count: 0,
        }
    }

    fn add(&mut self, trade: &Trade) {
        if self.count == 0 {
            self.open = trade.price;
            self.high = trade.price;
            self.low = trade.price;
            self.first_trade_id = Some(trade.id);
        }
        self.high = self.high.max(trade.price);
        self.low = self.low.min(trade.price);
        self.close = trade.price;
        self.last_trade_id = Some(trade.id);
        self.count += 1;
        let quote = trade.price as u128 * trade.qty as u128;
        self.volume += trade.qty as u128;
        self.quote_volume += quote;
        if !trade.buyer_is_maker {
            // Taker bought.
            self.taker_buy_volume += trade.qty as u128;
            self.taker_buy_quote_volume += quote;
        }
    }
}

/// A kline update to publish: the candle and whether it just closed.
#[derive(Debug, Clone)]
pub(crate) struct KlineUpdate {
    pub candle: Candle,
    pub closed: bool,
}

/// Stable (FNV-1a) hash of the symbol so the per-symbol seed does not depend
/// on the standard library's hasher.
fn symbol_hash(symbol: &str) -> u64 {
    symbol.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Initial mid price in ticks for a normalized symbol.
fn initial_mid(symbol: &str) -> Price {
    match symbol.split('-').next().unwrap_or_default() {
        "BTC" => 6_000_000,
        "ETH" => 300_000,
        _ => 10_000,
    }
}

/// Deterministic per-symbol market: mid-price random walk, L2 book, trades.
pub(crate) struct Market {
    rng: SmallRng,
    mid: Price,
    /// Price -> qty. Bids are all `< mid`, asks all `> mid`.
    pub bids: BTreeMap<Price, Qty>,
    pub asks: BTreeMap<Price, Qty>,
    pub last_update_id: u64,
    next_trade_id: u64,
    pub stats: Stats,
    candles: Vec<Candle>,
    /// Candles that closed because a trade crossed their end, not yet published.
    closed_pending: Vec<Candle>,
}

impl Market {
    pub fn new(symbol: &str, seed: u64, now_ms: i64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ symbol_hash(symbol));
        let mid = initial_mid(symbol);
        let mut bids = BTreeMap::new();
        let mut asks = BTreeMap::new();
        let (mut b, mut a) = (mid, mid);
        for _ in 0..BOOK_TARGET_LEVELS {
            b -= rng.gen_range(1..=3);
            a += rng.gen_range(1..=3);
            bids.insert(b, random_qty(&mut rng));
            asks.insert(a, random_qty(&mut rng));
        }
        let candles = (0..KLINE_INTERVALS.len())
            .map(|i| Candle::empty(i, now_ms, mid))
            .collect();
        Self {
            rng,
            mid,
            bids,
            asks,
            last_update_id: FIRST_UPDATE_ID,
            next_trade_id: 1,
            stats: Stats {
                open_time: now_ms,
                prev_price: mid,
                open: mid,
                high: mid,
                low: mid,
                last: mid,
                last_qty: 0,
                volume: 0,
                quote_volume: 0,
                first_trade_id: 1,
                last_trade_id: 0,
                count: 0,
            },
            candles,
            closed_pending: Vec::new(),
        }
    }

    pub fn best_bid(&self) -> Option<(Price, Qty)> {
        self.bids.iter().next_back().map(|(p, q)| (*p, *q))
    }

    pub fn best_ask(&self) -> Option<(Price, Qty)> {
        self.asks.iter().next().map(|(p, q)| (*p, *q))
    }

    fn bbo(&self) -> Option<Bbo> {
        Some(Bbo {
            bid: self.best_bid()?,
            ask: self.best_ask()?,
        })
    }

    /// Advance the market by one tick: one trade and one book diff.
    pub fn tick(&mut self, now_ms: i64) -> TickOutput {
        let before = self.bbo();
        // Per-tick level changes, merged per price so a diff never lists a
        // price twice (the last write is the absolute quantity to apply).
        let mut changes_b: BTreeMap<Price, Qty> = BTreeMap::new();
        let mut changes_a: BTreeMap<Price, Qty> = BTreeMap::new();

        // 1. Mid random walk; levels that would cross the new mid are removed.
        let step = self.rng.gen_range(-1..=1);
        self.mid = (self.mid + step).max(MIN_MID);
        let mid = self.mid;
        let crossed_b: Vec<Price> = self.bids.range(mid..).map(|(p, _)| *p).collect();
        for p in crossed_b {
            self.bids.remove(&p);
            changes_b.insert(p, 0);
        }
        let crossed_a: Vec<Price> = self.asks.range(..=mid).map(|(p, _)| *p).collect();
        for p in crossed_a {
            self.asks.remove(&p);
            changes_a.insert(p, 0);
        }

        // 2. One trade against the best level of a random side.
        let buyer_is_maker = self.rng.gen_bool(0.5);
        let (book, changes) = if buyer_is_maker {
            (&mut self.bids, &mut changes_b)
        } else {
            (&mut self.asks, &mut changes_a)
        };
        let best = if buyer_is_maker {
            book.iter().next_back().map(|(p, q)| (*p, *q))
        } else {
            book.iter().next().map(|(p, q)| (*p, *q))
        };
        let trade_qty = self.rng.gen_range(100_000..=50_000_000);
        let (price, qty) = match best {
            Some((p, level_qty)) => {
                let qty = trade_qty.min(level_qty);
                let rest = level_qty - qty;
                if rest == 0 {
                    book.remove(&p);
                } else {
                    book.insert(p, rest);
                }
                changes.insert(p, rest);
                (p, qty)
            }
            // Empty side (cannot happen with the level maintenance below,
            // but keep the model total): trade at the mid.
            None => (mid, trade_qty),
        };
        let trade = Trade {
            id: self.next_trade_id,
            price,
            qty,
            time: now_ms,
            buyer_is_maker,
        };
        self.next_trade_id += 1;

        // 3. 1-3 random level operations: update, remove or add.
        let ops = self.rng.gen_range(1..=3);
        for _ in 0..ops {
            let bid_side = self.rng.gen_bool(0.5);
            let op = self.rng.gen_range(0..3);
            let (book, changes) = if bid_side {
                (&mut self.bids, &mut changes_b)
            } else {
                (&mut self.asks, &mut changes_a)
            };
            match op {
                0 | 1 if !book.is_empty() => {
                    let idx = self.rng.gen_range(0..book.len());
                    let Some(p) = book.keys().nth(idx).copied() else {
                        continue;
                    };
                    if op == 0 {
                        let q = random_qty(&mut self.rng);
                        book.insert(p, q);
                        changes.insert(p, q);
                    } else {
                        book.remove(&p);
                        changes.insert(p, 0);
                    }
                }
                _ => {
                    let dist = self.rng.gen_range(1..=BOOK_TARGET_LEVELS as i64 * 2);
                    let p = if bid_side { mid - dist } else { mid + dist };
                    let q = random_qty(&mut self.rng);
                    book.insert(p, q);
                    changes.insert(p, q);
                }
            }
        }

        // 4. Keep both sides within bounds: trim the farthest levels, refill
        //    near the mid.
        self.rebalance(true, &mut changes_b);
        self.rebalance(false, &mut changes_a);

        let n = (changes_b.len() + changes_a.len()) as u64;
        let diff = BookDiff {
            first_update_id: self.last_update_id + 1,
            last_update_id: self.last_update_id + n.max(1),
            // Bids best (highest) first, asks best (lowest) first.
            bids: changes_b.into_iter().rev().collect(),
            asks: changes_a.into_iter().collect(),
        };
        self.last_update_id = diff.last_update_id;

        self.record_trade(&trade);
        let after = self.bbo();
        TickOutput {
            trade,
            diff,
            bbo_changed: if after != before { after } else { None },
        }
    }

    fn rebalance(&mut self, bid_side: bool, changes: &mut BTreeMap<Price, Qty>) {
        let mid = self.mid;
        let book = if bid_side {
            &mut self.bids
        } else {
            &mut self.asks
        };
        while book.len() > BOOK_MAX_LEVELS {
            let far = if bid_side {
                book.keys().next().copied()
            } else {
                book.keys().next_back().copied()
            };
            let Some(p) = far else { break };
            book.remove(&p);
            changes.insert(p, 0);
        }
        while book.len() < BOOK_MIN_LEVELS {
            let dist = self.rng.gen_range(1..=BOOK_TARGET_LEVELS as i64 * 2);
            let p = if bid_side { mid - dist } else { mid + dist };
            if p <= 0 || book.contains_key(&p) {
                continue;
            }
            let q = random_qty(&mut self.rng);
            book.insert(p, q);
            changes.insert(p, q);
        }
    }

    fn record_trade(&mut self, trade: &Trade) {
        let s = &mut self.stats;
        if s.count == 0 {
            s.open = trade.price;
            s.high = trade.price;
            s.low = trade.price;
            s.first_trade_id = trade.id;
        }
        s.high = s.high.max(trade.price);
        s.low = s.low.min(trade.price);
        s.last = trade.price;
        s.last_qty = trade.qty;
        s.volume += trade.qty as u128;
        s.quote_volume += trade.price as u128 * trade.qty as u128;
        s.last_trade_id = trade.id;
        s.count += 1;

        for c in &mut self.candles {
            if trade.time > c.end {
                let next = Candle::empty(c.interval, trade.time, c.close);
                self.closed_pending.push(std::mem::replace(c, next));
            }
            c.add(trade);
        }
    }

    /// Candle updates to publish at `now_ms` (called about once a second):
    /// candles that closed since the last call (`closed == true`) followed by
    /// the current candle of every interval.
    pub fn kline_updates(&mut self, now_ms: i64) -> Vec<KlineUpdate> {
        let mut out: Vec<KlineUpdate> = self
            .closed_pending
            .drain(..)
            .map(|candle| KlineUpdate {
                candle,
                closed: true,
            })
            .collect();
        for c in &mut self.candles {
            if now_ms > c.end {
                let next = Candle::empty(c.interval, now_ms, c.close);
                out.push(KlineUpdate {
                    candle: std::mem::replace(c, next),
                    closed: true,
                });
            }
            out.push(KlineUpdate {
                candle: c.clone(),
                closed: false,
            });
        }
        out
    }
}

fn random_qty(rng: &mut SmallRng) -> Qty {
    // 0.001 .. 2.0 base units, in 1e-8 units.
    rng.gen_range(100_000..=200_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    #[test]
    fn same_seed_same_market() {
        let mut a = Market::new("BTC-USDT", 7, T0);
        let mut b = Market::new("BTC-USDT", 7, T0);
        assert_eq!(a.bids, b.bids);
        for i in 0..500 {
            let (x, y) = (a.tick(T0 + i), b.tick(T0 + i));
            assert_eq!(x.trade, y.trade);
            assert_eq!(x.diff, y.diff);
        }
        let mut c = Market::new("BTC-USDT", 8, T0);
        let differs = (0..50).any(|i| c.tick(T0 + i).trade != a.tick(T0 + 500 + i).trade);
        assert!(differs);
    }

    #[test]
    fn update_ids_contiguous_and_book_sane() {
        let mut m = Market::new("ETH-USDT", 42, T0);
        assert!(m.best_ask().is_some_and(|a| a.0 > 250_000));
        let mut last = m.last_update_id;
        let mut trade_id = 0;
        for i in 0..5_000 {
            let out = m.tick(T0 + i * 10);
            assert_eq!(out.diff.first_update_id, last + 1);
            assert!(out.diff.last_update_id >= out.diff.first_update_id);
            last = out.diff.last_update_id;
            assert_eq!(out.trade.id, trade_id + 1);
            trade_id = out.trade.id;
            assert!((BOOK_MIN_LEVELS..=BOOK_MAX_LEVELS).contains(&m.bids.len()));
            assert!((BOOK_MIN_LEVELS..=BOOK_MAX_LEVELS).contains(&m.asks.len()));
            let (bb, ba) = (m.best_bid().unwrap(), m.best_ask().unwrap());
            assert!(bb.0 < ba.0, "crossed book");
        }
    }

    #[test]
    fn diffs_replay_to_the_book() {
        let mut m = Market::new("SOL-USDT", 1, T0);
        let (mut bids, mut asks) = (m.bids.clone(), m.asks.clone());
        for i in 0..2_000 {
            let out = m.tick(T0 + i);
            for (side, levels) in [(&mut bids, &out.diff.bids), (&mut asks, &out.diff.asks)] {
                for &(p, q) in levels {
                    if q == 0 {
                        side.remove(&p);
                    } else {
                        side.insert(p, q);
                    }
                }
            }
        }
        assert_eq!(bids, m.bids);
        assert_eq!(asks, m.asks);
    }

    #[test]
    fn candles_close_on_interval_end() {
        let mut m = Market::new("BTC-USDT", 3, T0);
        for i in 0..10 {
            m.tick(T0 + i * 100);
        }
        let ups = m.kline_updates(T0 + 1_500);
        let closed_1s: Vec<_> = ups
            .iter()
            .filter(|u| u.closed && u.candle.interval == 0)
            .collect();
        assert_eq!(closed_1s.len(), 1);
        assert_eq!(closed_1s[0].candle.count, 10);
        assert_eq!(closed_1s[0].candle.end - closed_1s[0].candle.start, 999);
        let week = ups
            .iter()
            .find(|u| u.candle.interval == KLINE_INTERVALS.len() - 1)
            .unwrap();
        // 1w candles start on a Monday: epoch day 4 (mod 7) is a Monday.
        assert_eq!((week.candle.start / 86_400_000) % 7, 4);
    }
}
