//! Coinbase Advanced Trade market data: wire types, their mapping to normalized events,
//! subscribe requests and product ids.
//!
//! Source of truth: Coinbase's official docs, "Advanced Trade WebSocket Overview" and
//! "Advanced Trade WebSocket Channels"
//! (<https://docs.cdp.coinbase.com/advanced-trade/docs/ws-overview>,
//! <https://docs.cdp.coinbase.com/advanced-trade/docs/ws-channels>). The examples of those
//! pages are the fixtures in `tests/fixtures/coinbase/`.
//!
//! Every message is `{"channel":..,"client_id":"","timestamp":..,"sequence_num":N,"events":[..]}`.
//! `sequence_num` numbers the messages of the *connection*, across channels: it is handed
//! to the connection as [`Parsed::Sequence`], which treats a gap as the loss of every book
//! on that socket. Books come as `l2_data` events of type `snapshot`, then `update`, with
//! absolute quantities (`new_quantity`, `"0"` removes the level), sides `bid`/`offer`; they
//! become [`Parsed::Book`] with no sequence of their own ([`crate::exchange::ws_book`] numbers them).
//!
//! Mapping decisions:
//! - `market_trades` `side` is the **maker's** side (the docs' definition): the bridge's
//!   `side` is the taker's, so `BUY` → `sell` and `SELL` → `buy`. `ts` is the trade `time`.
//!   A batch (a `snapshot` lists recent trades newest first) is emitted oldest first, and
//!   the connection drops the ids it has already emitted ([`TradeIds::Opaque`]).
//! - `ticker` (and `ticker_batch`): bid/ask and their sizes from `best_bid*`/`best_ask*`,
//!   `last` from `price`, `volume_24h` from `volume_24_h`; null where absent
//!   (`ticker_batch` carries no best bid/ask). `ts` is the message `timestamp`.
//! - `candles`: 5-minute buckets only; `start` is seconds on the wire. `closed` is true when
//!   the bucket has ended by the message's `timestamp` (the channel sends no flag).
//! - `status`: a product whose `status` is not `online` becomes a `status` `error` event
//!   naming it (`ts`: the message `timestamp`); online products produce nothing.
//! - Times are RFC 3339 with nanoseconds, truncated to µs ([`crate::exchange::wire_time`]).
//!
//! This file knows nothing about sockets or book state.

use std::collections::HashMap;

use serde::Deserialize;
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use crate::config::FeedChannel;
use crate::event::{
    Book, BookAction, Candle, Event, Exchange, Side, Status, StatusState, Ticker, Trade,
};
use crate::exchange::wire_time::rfc3339_micros;
use crate::exchange::{
    levels, AckId, Adapter, BookSyncMode, Heartbeat, ParseError, Parsed, TradeIds,
};

/// Public market data endpoint (no API key for these channels).
pub const DEFAULT_WS_URL: &str = "wss://advanced-trade-ws.coinbase.com";
/// The only candle granularity the `candles` channel serves.
pub const CANDLE_INTERVALS: [&str; 1] = ["5m"];
const CANDLE_SECONDS: u64 = 300;
/// Our pacing of subscribe requests (one per channel; the first must arrive within 5 s):
/// "WebSocket unauthenticated messages are rate-limited at 8 per second per IP address"
/// (rate-limits page), so at most 8 a second.
const SUBSCRIBE_PACING: std::time::Duration = std::time::Duration::from_millis(125);

/// The channels we subscribe to, in this order; each request is keyed by its channel
/// name, which is what the answer (a `subscriptions` message) lists.
const CHANNELS: [&str; 6] = [
    "heartbeats",
    "level2",
    "market_trades",
    "ticker",
    "candles",
    "status",
];

/// The request key of a channel named in an answer (`l2_data` is how level2 messages name
/// their channel).
fn channel_key(name: &str) -> AckId {
    AckId::from(if name == "l2_data" { "level2" } else { name })
}

/// The Coinbase Advanced Trade adapter.
pub struct CoinbaseAdapter {
    label: Exchange,
    /// Product id → normalized symbol, from the feed's config (they are equal on Coinbase,
    /// but an unconfigured product is refused on a live feed).
    symbols: HashMap<String, String>,
}

impl CoinbaseAdapter {
    pub fn new(label: Exchange, symbols: &[String]) -> CoinbaseAdapter {
        let mut map: HashMap<String, String> =
            symbols.iter().map(|s| (s.clone(), s.clone())).collect();
        // "Subscribing to '-USDC' based products ... other channels will return the same
        // data as the corresponding '-USD' based products" (channel docs; USDT-USDC and
        // EURC-USDC excepted): a configured X-USDC is answered as X-USD and published under
        // the configured name, unless X-USD is configured itself.
        for s in symbols {
            if let Some(base) = s.strip_suffix("-USDC") {
                if base != "USDT" && base != "EURC" {
                    map.entry(format!("{base}-USD"))
                        .or_insert_with(|| s.clone());
                }
            }
        }
        CoinbaseAdapter {
            label,
            symbols: map,
        }
    }

    fn symbol(&self, product: &str) -> Result<String, ParseError> {
        if let Some(s) = self.symbols.get(product) {
            return Ok(s.clone());
        }
        // Stateless (`normalize`): a product id already is BASE-QUOTE.
        if self.symbols.is_empty() && crate::event::valid_symbol(product) {
            return Ok(product.to_string());
        }
        Err(ParseError::UnknownSymbol(product.to_string()))
    }
}

/// The envelope of every message; `events` is read per channel.
#[derive(Debug, Deserialize)]
struct Message<'a, E> {
    #[serde(borrow)]
    timestamp: &'a str,
    #[serde(default)]
    sequence_num: Option<u64>,
    #[serde(default = "Vec::new")]
    events: Vec<E>,
}

/// `l2_data` event: `{"type":"snapshot","product_id":"BTC-USD","updates":[..]}`.
#[derive(Debug, Deserialize)]
struct L2Event<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    product_id: &'a str,
    #[serde(borrow)]
    updates: Vec<L2Update<'a>>,
}

/// `{"side":"bid","event_time":"..","price_level":"21921.73","new_quantity":"0.06317902"}`.
#[derive(Debug, Deserialize)]
struct L2Update<'a> {
    side: &'a str,
    price_level: &'a str,
    new_quantity: &'a str,
}

#[derive(Debug, Deserialize)]
struct TradesEvent<'a> {
    #[serde(borrow)]
    trades: Vec<TradeWire<'a>>,
}

/// `{"trade_id":"000000000","product_id":"ETH-USD","price":"1260.01","size":"0.3",
/// "side":"BUY","time":"2019-08-14T20:42:27.265Z"}`; `side` is the maker's.
#[derive(Debug, Deserialize)]
struct TradeWire<'a> {
    trade_id: &'a str,
    product_id: &'a str,
    price: &'a str,
    size: &'a str,
    side: &'a str,
    time: &'a str,
}

#[derive(Debug, Deserialize)]
struct TickersEvent<'a> {
    #[serde(borrow)]
    tickers: Vec<TickerWire<'a>>,
}

#[derive(Debug, Deserialize)]
struct TickerWire<'a> {
    product_id: &'a str,
    price: Option<&'a str>,
    volume_24_h: Option<&'a str>,
    best_bid: Option<&'a str>,
    best_bid_quantity: Option<&'a str>,
    best_ask: Option<&'a str>,
    best_ask_quantity: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
struct CandlesEvent<'a> {
    #[serde(borrow)]
    candles: Vec<CandleWire<'a>>,
}

/// `{"start":"1688998200","high":"1867.72","low":"1865.63","open":"1867.38",
/// "close":"1866.81","volume":"0.20269406","product_id":"ETH-USD"}`.
#[derive(Debug, Deserialize)]
struct CandleWire<'a> {
    start: &'a str,
    open: &'a str,
    high: &'a str,
    low: &'a str,
    close: &'a str,
    volume: &'a str,
    product_id: &'a str,
}

#[derive(Debug, Deserialize)]
struct StatusEvent<'a> {
    #[serde(borrow, default = "Vec::new")]
    products: Vec<StatusProduct<'a>>,
}

#[derive(Debug, Deserialize)]
struct StatusProduct<'a> {
    id: &'a str,
    status: &'a str,
    #[serde(default)]
    status_message: Option<&'a str>,
}

fn bad(kind: &'static str, reason: impl Into<String>) -> ParseError {
    ParseError::Payload {
        kind,
        reason: reason.into(),
    }
}

fn time(kind: &'static str, text: &str) -> Result<u64, ParseError> {
    rfc3339_micros(text).ok_or_else(|| bad(kind, format!("`{text}` is not an RFC 3339 time")))
}

fn typed<'v, T: Deserialize<'v>>(
    v: &'v BorrowedValue<'v>,
    kind: &'static str,
) -> Result<T, ParseError> {
    simd_json::serde::from_refborrowed_value(v).map_err(|e| bad(kind, e.to_string()))
}

impl CoinbaseAdapter {
    fn l2(
        &self,
        m: Message<'_, L2Event<'_>>,
        ts_recv: u64,
        out: &mut Vec<Parsed>,
    ) -> Result<(), ParseError> {
        let ts = time("l2_data", m.timestamp)?;
        for e in m.events {
            let action = match e.kind {
                "snapshot" => BookAction::Snapshot,
                "update" => BookAction::Delta,
                other => return Err(bad("l2_data", format!("event type `{other}`"))),
            };
            let (mut bids, mut asks) = (Vec::new(), Vec::new());
            for u in e.updates {
                let side = match u.side {
                    "bid" => &mut bids,
                    "offer" | "ask" => &mut asks,
                    other => return Err(bad("l2_data", format!("side `{other}`"))),
                };
                side.push((u.price_level, u.new_quantity));
            }
            let book = Book {
                exchange: self.label,
                symbol: self.symbol(e.product_id)?,
                ts: Some(ts),
                ts_recv,
                action,
                bids: levels(bids),
                asks: levels(asks),
                seq: None,
                prev_seq: None,
            };
            out.push(Parsed::Book {
                book,
                checksum: None,
            });
        }
        Ok(())
    }

    fn trades(
        &self,
        m: Message<'_, TradesEvent<'_>>,
        ts_recv: u64,
        out: &mut Vec<Parsed>,
    ) -> Result<(), ParseError> {
        for e in m.events {
            let mut batch = Vec::with_capacity(e.trades.len());
            for t in e.trades {
                // The maker's side on the wire; the taker took the other one.
                let side = match t.side {
                    "BUY" | "buy" => Side::Sell,
                    "SELL" | "sell" => Side::Buy,
                    other => return Err(bad("market_trades", format!("side `{other}`"))),
                };
                batch.push(Trade {
                    exchange: self.label,
                    symbol: self.symbol(t.product_id)?,
                    ts: Some(time("market_trades", t.time)?),
                    ts_recv,
                    trade_id: t.trade_id.to_string(),
                    price: t.price.into(),
                    size: t.size.into(),
                    side: Some(side),
                });
            }
            // A `snapshot` batch is newest first on the wire; every batch goes out oldest
            // first (stable: equal times keep their order).
            batch.sort_by_key(|t| t.ts);
            out.extend(batch.into_iter().map(|t| Parsed::Event(Event::Trade(t))));
        }
        Ok(())
    }

    fn tickers(
        &self,
        m: Message<'_, TickersEvent<'_>>,
        ts_recv: u64,
        out: &mut Vec<Parsed>,
    ) -> Result<(), ParseError> {
        let ts = time("ticker", m.timestamp)?;
        for e in m.events {
            for t in e.tickers {
                out.push(Parsed::Event(Event::Ticker(Ticker {
                    exchange: self.label,
                    symbol: self.symbol(t.product_id)?,
                    ts: Some(ts),
                    ts_recv,
                    bid: t.best_bid.map(Into::into),
                    bid_size: t.best_bid_quantity.map(Into::into),
                    ask: t.best_ask.map(Into::into),
                    ask_size: t.best_ask_quantity.map(Into::into),
                    last: t.price.map(Into::into),
                    volume_24h: t.volume_24_h.map(Into::into),
                })));
            }
        }
        Ok(())
    }

    fn candles(
        &self,
        m: Message<'_, CandlesEvent<'_>>,
        ts_recv: u64,
        out: &mut Vec<Parsed>,
    ) -> Result<(), ParseError> {
        let ts = time("candles", m.timestamp)?;
        for e in m.events {
            for c in e.candles {
                let start_s: u64 = c
                    .start
                    .parse()
                    .map_err(|_| bad("candles", format!("start `{}` is not seconds", c.start)))?;
                let start = start_s.saturating_mul(1_000_000);
                out.push(Parsed::Event(Event::Candle(Candle {
                    exchange: self.label,
                    symbol: self.symbol(c.product_id)?,
                    ts: Some(ts),
                    ts_recv,
                    interval: CANDLE_INTERVALS[0].to_string(),
                    start,
                    open: c.open.into(),
                    high: c.high.into(),
                    low: c.low.into(),
                    close: c.close.into(),
                    volume: c.volume.into(),
                    closed: start.saturating_add(CANDLE_SECONDS * 1_000_000) <= ts,
                })));
            }
        }
        Ok(())
    }

    fn status(
        &self,
        m: Message<'_, StatusEvent<'_>>,
        ts_recv: u64,
        out: &mut Vec<Parsed>,
    ) -> Result<(), ParseError> {
        let ts = time("status", m.timestamp)?;
        for e in m.events {
            // The channel lists every product of the venue: only the feed's own matter.
            let ours = |id: &str| self.symbols.is_empty() || self.symbols.contains_key(id);
            for p in e.products {
                if p.status != "online" && ours(p.id) {
                    let why = p.status_message.filter(|m| !m.is_empty());
                    let detail = match why {
                        Some(why) => format!("{}: product status `{}`: {why}", p.id, p.status),
                        None => format!("{}: product status `{}`", p.id, p.status),
                    };
                    out.push(Parsed::Event(Event::Status(Status {
                        exchange: self.label,
                        ts: Some(ts),
                        ts_recv,
                        state: StatusState::Error,
                        detail: Some(detail),
                    })));
                }
            }
        }
        Ok(())
    }

    /// `{"channel":"subscriptions",..,"events":[{"subscriptions":{"level2":["BTC-USD"],..}}]}`:
    /// an answer to every request whose channel it lists.
    fn subscriptions(v: &BorrowedValue<'_>, out: &mut Vec<Parsed>) {
        let events = v.get("events").and_then(|e| e.as_array());
        for e in events.into_iter().flatten() {
            if let Some(subs) = e.get("subscriptions").and_then(|s| s.as_object()) {
                for name in subs.keys() {
                    out.push(Parsed::Ack {
                        id: Some(channel_key(name)),
                    });
                }
            }
        }
    }
}

/// The market channels the fast path knows, read off the frame's first bytes when
/// Coinbase's own field order shows it (`{"channel":"l2_data",...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fast {
    L2,
    Trades,
    Ticker,
    Candles,
    Heartbeats,
}

fn sniff(frame: &[u8]) -> Option<Fast> {
    let rest = frame.strip_prefix(br#"{"channel":""#)?;
    let end = rest.iter().take(16).position(|&b| b == b'"')?;
    Some(match &rest[..end] {
        b"l2_data" => Fast::L2,
        b"market_trades" => Fast::Trades,
        b"ticker" | b"ticker_batch" => Fast::Ticker,
        b"candles" => Fast::Candles,
        b"heartbeats" => Fast::Heartbeats,
        _ => return None,
    })
}

/// The frame's `sequence_num`, read on its own (for a frame whose payload is refused).
fn sequence_of(frame: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Numbered {
        sequence_num: Option<u64>,
    }
    serde_json::from_slice::<Numbered>(frame).ok()?.sequence_num
}

/// One pass from the frame into `Message<E>`, its `sequence_num` first in `out`.
fn message<'a, E: Deserialize<'a>>(
    frame: &'a mut [u8],
    kind: &'static str,
    out: &mut Vec<Parsed>,
) -> Result<Message<'a, E>, ParseError> {
    let m: Message<'a, E> =
        crate::exchange::wire_json::from_slice(frame).map_err(|e| bad(kind, e.to_string()))?;
    out.extend(m.sequence_num.map(Parsed::Sequence));
    Ok(m)
}

impl CoinbaseAdapter {
    /// The market channels in one pass from bytes into the borrowed wire structs.
    fn parse_fast(
        &self,
        frame: &mut [u8],
        channel: Fast,
        ts_recv: u64,
    ) -> Result<Vec<Parsed>, ParseError> {
        let mut out = Vec::with_capacity(2);
        match channel {
            Fast::L2 => self.l2(message(frame, "l2_data", &mut out)?, ts_recv, &mut out)?,
            Fast::Trades => self.trades(
                message(frame, "market_trades", &mut out)?,
                ts_recv,
                &mut out,
            )?,
            Fast::Ticker => self.tickers(message(frame, "ticker", &mut out)?, ts_recv, &mut out)?,
            Fast::Candles => {
                self.candles(message(frame, "candles", &mut out)?, ts_recv, &mut out)?
            }
            Fast::Heartbeats => {
                message::<serde::de::IgnoredAny>(frame, "heartbeats", &mut out)?;
            }
        }
        Ok(out)
    }
}

/// One `{"type":<kind>,"product_ids":[..],"channel":".."}` per channel the feed needs,
/// keyed by the channel's name, `heartbeats` and `status` always.
fn requests(kind: &str, symbols: &[String], channels: &[FeedChannel]) -> Vec<(AckId, String)> {
    let mut wanted = vec!["heartbeats"];
    for c in channels {
        wanted.push(match c {
            FeedChannel::Book => "level2",
            FeedChannel::Trade => "market_trades",
            FeedChannel::Ticker => "ticker",
            FeedChannel::Candle(_) => "candles",
        });
    }
    wanted.push("status");
    CHANNELS
        .iter()
        .filter(|name| wanted.contains(name))
        .map(|name| {
            let frame = serde_json::json!({"type": kind, "product_ids": symbols, "channel": name});
            (AckId::from(*name), frame.to_string())
        })
        .collect()
}

impl Adapter for CoinbaseAdapter {
    fn exchange(&self) -> Exchange {
        self.label
    }

    fn default_ws_url(&self) -> &'static str {
        DEFAULT_WS_URL
    }

    fn subscribe_pacing(&self) -> std::time::Duration {
        SUBSCRIBE_PACING
    }

    fn book_sync(&self) -> BookSyncMode {
        BookSyncMode::WsSnapshot
    }

    fn trade_ids(&self) -> TradeIds {
        TradeIds::Opaque
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::ServerMessages
    }

    /// One `{"type":"subscribe","product_ids":[..],"channel":".."}` per channel (the venue
    /// takes one channel per request), `heartbeats` and `status` always.
    fn subscribe_frames(
        &self,
        symbols: &[String],
        channels: &[FeedChannel],
    ) -> Vec<(AckId, String)> {
        requests("subscribe", symbols, channels)
    }

    /// The same requests with `"type":"unsubscribe"` (answered by a `subscriptions`
    /// message listing what is left).
    fn unsubscribe_frames(
        &self,
        symbols: &[String],
        channels: &[FeedChannel],
    ) -> Vec<(AckId, String)> {
        requests("unsubscribe", symbols, channels)
    }

    fn parse(&self, frame: &mut Vec<u8>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        if let Some(channel) = sniff(frame) {
            // A refused trade/ticker/candle payload (an unknown product, a bad field)
            // still counts its `sequence_num`: nothing of a book was lost, so the next
            // message must not look like a gap that resyncs every book of the socket. A
            // refused `l2_data` frame keeps the gap: its book did miss an update.
            let sequence = match channel {
                Fast::L2 => None,
                _ => sequence_of(frame),
            };
            return self
                .parse_fast(frame, channel, ts_recv)
                .map_err(|e| e.with_sequence(sequence));
        }
        let v = simd_json::to_borrowed_value(frame).map_err(|e| ParseError::Json(e.to_string()))?;
        if v.as_object().is_none() {
            return Err(ParseError::NotObject);
        }
        // `{"type":"error","message":"..."}` answers a request it does not name.
        if v.get("type").and_then(|t| t.as_str()) == Some("error") {
            let msg = v
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("no message");
            return Ok(vec![Parsed::Refused {
                id: None,
                detail: format!("a request refused: {msg}"),
            }]);
        }
        let Some(channel) = v.get("channel").and_then(|c| c.as_str()) else {
            return Err(ParseError::UnknownShape);
        };
        let mut out = Vec::with_capacity(4);
        if let Some(seq) = v.get("sequence_num").and_then(|s| s.as_u64()) {
            out.push(Parsed::Sequence(seq));
        }
        match channel {
            "l2_data" => self.l2(typed(&v, "l2_data")?, ts_recv, &mut out)?,
            "market_trades" => self.trades(typed(&v, "market_trades")?, ts_recv, &mut out)?,
            "ticker" | "ticker_batch" => self.tickers(typed(&v, "ticker")?, ts_recv, &mut out)?,
            "candles" => self.candles(typed(&v, "candles")?, ts_recv, &mut out)?,
            "status" => self.status(typed(&v, "status")?, ts_recv, &mut out)?,
            "subscriptions" => Self::subscriptions(&v, &mut out),
            // Keeps quiet channels open; its arrival alone feeds the staleness timer.
            "heartbeats" => {}
            // "New message types can be added at any time. Clients are expected to ignore
            // messages they do not support" (WebSocket overview): only its number counts.
            _ => {}
        }
        Ok(out)
    }
}

/// The simulated venue (`mdbridge simulate --exchange coinbase`), written from the same
/// documentation and sharing no type with the adapter above.
pub(crate) mod simulator;

#[cfg(test)]
mod tests;
