//! Binance spot: wire types, their mapping to normalized events, stream names and symbols.
//!
//! Source of truth: Binance's official docs,
//! <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md>
//! (streams, live SUBSCRIBE, "How to manage a local order book correctly") and
//! <https://github.com/binance/binance-spot-api-docs/blob/master/rest-api.md> ("Order book",
//! `GET /api/v3/depth`). Real frames copied from those pages are the test fixtures in
//! `tests/fixtures/binance/`.
//!
//! What `ts` means per stream (PROTOCOL: "the exchange's own event time"):
//! - `trade`: `T`, the trade time — when the match happened, which is the time a trade is
//!   about (cryptofeed does the same); `E` is only when the event was pushed.
//! - `24hrTicker`, `depthUpdate`, `kline`: `E`, the event time.
//! - `bookTicker`: null — the spot payload carries no time at all.
//! - REST snapshots: null — `/api/v3/depth` returns no time.
//!
//! All Binance times are milliseconds; they are multiplied by 1000 into µs.
//!
//! This file knows nothing about sockets or book state; `connection` and `book_sync` do.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;
use simd_json::prelude::*;
use simd_json::BorrowedValue;

use crate::config::FeedChannel;
use crate::event::{Candle, Decimal, Event, Exchange, Side, Ticker, Trade};
use crate::exchange::{
    levels, AckId, Adapter, BookDiff, BookSnapshot, ParseError, Parsed, SnapshotError,
    SnapshotFuture,
};

mod wire;
pub use wire::{
    BookTickerWire, DepthSnapshotWire, DepthUpdateWire, KlineBody, KlineWire, TickerWire, TradeWire,
};

/// Public combined-stream endpoint; streams are added with live `SUBSCRIBE` requests.
pub const DEFAULT_WS_URL: &str = "wss://stream.binance.com:9443/stream";
/// Public REST base for `/api/v3/depth`.
pub const DEFAULT_REST_URL: &str = "https://api.binance.com";
/// Binance refuses more than 1024 streams on one connection.
pub const MAX_STREAMS_PER_CONNECTION: usize = 1024;
/// Streams per SUBSCRIBE request: keeps each request small; with the pacing in
/// `connection` (≤ 4 requests/s) it stays under the limit of 5 incoming messages/s.
pub const STREAMS_PER_REQUEST: usize = 200;

/// Kline intervals Binance serves (spot WebSocket streams documentation).
pub const KLINE_INTERVALS: [&str; 16] = [
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w",
    "1M",
];

/// Gap between SUBSCRIBE requests. Binance allows 5 incoming messages per second per
/// connection, pings and pongs included, and closes with 1008 beyond that: 300 ms (3.3/s)
/// leaves room for the pong we owe its ping every 20 s.
pub const SUBSCRIBE_PACING: std::time::Duration = std::time::Duration::from_millis(300);

/// Quote assets used to split a bare wire symbol (`BTCUSDT`) when there is no configured
/// mapping (the stateless `normalize`). Longest match is tried first so that `USDT` wins
/// over `USD`... and `FDUSD` over `USD`.
const QUOTE_ASSETS: &[&str] = &[
    "FDUSD", "USDT", "USDC", "TUSD", "BUSD", "USDP", "AEUR", "BIDR", "IDRT", "DAI", "BTC", "ETH",
    "BNB", "EUR", "TRY", "BRL", "JPY", "GBP", "AUD", "RUB", "UAH", "NGN", "ZAR", "PLN", "RON",
    "ARS", "MXN", "COP", "CZK", "XRP", "TRX", "DOGE", "SOL", "DOT", "USD",
];

/// Splits a Binance wire symbol on the longest known quote asset: `BTCUSDT` → `BTC-USDT`.
pub fn split_symbol(wire: &str) -> Option<String> {
    static LONGEST_FIRST: OnceLock<Vec<&'static str>> = OnceLock::new();
    let quotes = LONGEST_FIRST.get_or_init(|| {
        let mut q = QUOTE_ASSETS.to_vec();
        q.sort_by_key(|q| std::cmp::Reverse(q.len()));
        q
    });
    let upper = wire.to_ascii_uppercase();
    quotes
        .iter()
        .find(|q| upper.len() > q.len() && upper.ends_with(**q))
        .map(|q| format!("{}-{}", &upper[..upper.len() - q.len()], q))
        .filter(|s| crate::event::valid_symbol(s))
}

/// `BTC-USDT` → `BTCUSDT` (REST `symbol=` parameter).
pub fn wire_symbol(normalized: &str) -> String {
    normalized.replace('-', "").to_ascii_uppercase()
}

/// Stream names for one symbol: `btcusdt@trade`, `btcusdt@ticker`, `btcusdt@depth@100ms`,
/// `btcusdt@kline_1m`.
pub fn stream_names(symbol: &str, channels: &[FeedChannel]) -> Vec<String> {
    let s = wire_symbol(symbol).to_ascii_lowercase();
    channels
        .iter()
        .map(|c| match c {
            FeedChannel::Trade => format!("{s}@trade"),
            FeedChannel::Ticker => format!("{s}@ticker"),
            FeedChannel::Book => format!("{s}@depth@100ms"),
            FeedChannel::Candle(i) => format!("{s}@kline_{i}"),
        })
        .collect()
}

/// The Binance spot adapter; also serves the simulator (label `sim`).
pub struct BinanceAdapter {
    label: Exchange,
    /// Wire symbol (`BTCUSDT`) → normalized (`BTC-USDT`), from the feed's config.
    symbols: HashMap<String, String>,
}

impl BinanceAdapter {
    pub fn new(label: Exchange, symbols: &[String]) -> BinanceAdapter {
        BinanceAdapter {
            label,
            symbols: symbols
                .iter()
                .map(|s| (wire_symbol(s), s.clone()))
                .collect(),
        }
    }

    fn symbol(&self, wire: &str) -> Result<String, ParseError> {
        if let Some(s) = self.symbols.get(wire) {
            return Ok(s.clone());
        }
        split_symbol(wire).ok_or_else(|| ParseError::UnknownSymbol(wire.to_string()))
    }
}

/// Parses a REST depth body for `symbol` (normalized) into a snapshot.
pub fn parse_depth_snapshot(
    label: Exchange,
    symbol: &str,
    body: &[u8],
    ts_recv: u64,
) -> Result<BookSnapshot, SnapshotError> {
    let wire: DepthSnapshotWire =
        serde_json::from_slice(body).map_err(|e| SnapshotError::Decode(e.to_string()))?;
    Ok(BookSnapshot {
        exchange: label,
        symbol: symbol.to_string(),
        last_update_id: wire.last_update_id,
        ts_recv,
        bids: wire
            .bids
            .into_iter()
            .map(|(p, q)| crate::event::Level(Decimal(p), Decimal(q)))
            .collect(),
        asks: wire
            .asks
            .into_iter()
            .map(|(p, q)| crate::event::Level(Decimal(p), Decimal(q)))
            .collect(),
    })
}

fn payload_err(kind: &'static str) -> impl FnOnce(simd_json::Error) -> ParseError {
    move |e| ParseError::Payload {
        kind,
        reason: e.to_string(),
    }
}

fn ms_to_us(ms: u64) -> u64 {
    ms.saturating_mul(1000)
}

impl BinanceAdapter {
    /// Maps one payload (already unwrapped from a combined-stream envelope) to events.
    fn parse_payload(
        &self,
        v: &BorrowedValue<'_>,
        ts_recv: u64,
    ) -> Result<Vec<Parsed>, ParseError> {
        let label = self.label;
        if v.as_object().is_none() {
            return Err(ParseError::NotObject);
        }
        let Some(kind) = v.get("e") else {
            // No event type: a book ticker (`u` + `b` + `a`), or not ours.
            if v.contains_key("u") && v.contains_key("b") && v.contains_key("a") {
                let w: BookTickerWire = simd_json::serde::from_refborrowed_value(v)
                    .map_err(payload_err("bookTicker"))?;
                return Ok(vec![Parsed::Event(Event::Ticker(Ticker {
                    exchange: label,
                    symbol: self.symbol(w.symbol)?,
                    ts: None,
                    ts_recv,
                    bid: Some(w.bid.into()),
                    bid_size: Some(w.bid_qty.into()),
                    ask: Some(w.ask.into()),
                    ask_size: Some(w.ask_qty.into()),
                    last: None,
                    volume_24h: None,
                }))]);
            }
            return Err(ParseError::UnknownShape);
        };
        let kind = kind
            .as_str()
            .ok_or_else(|| ParseError::UnknownEvent(kind.to_string()))?;
        match kind {
            "trade" => self.trade(from_value(v, "trade")?, ts_recv),
            "24hrTicker" => self.ticker(from_value(v, "24hrTicker")?, ts_recv),
            "kline" => self.kline(from_value(v, "kline")?, ts_recv),
            "depthUpdate" => self.depth(from_value(v, "depthUpdate")?, ts_recv),
            "serverShutdown" => Ok(vec![Parsed::ServerShutdown]),
            other => Err(ParseError::UnknownEvent(other.to_string())),
        }
    }

    /// The fast path for the four market payloads, when the frame's first bytes name its
    /// kind: one pass from bytes into the borrowed wire struct, no intermediate value tree.
    fn parse_sniffed(
        &self,
        frame: &mut [u8],
        sniffed: Sniffed,
        ts_recv: u64,
    ) -> Result<Vec<Parsed>, ParseError> {
        let combined = sniffed.combined;
        match sniffed.kind {
            Kind::Trade => self.trade(from_frame(frame, combined, "trade")?, ts_recv),
            Kind::Ticker => self.ticker(from_frame(frame, combined, "24hrTicker")?, ts_recv),
            Kind::Kline => self.kline(from_frame(frame, combined, "kline")?, ts_recv),
            Kind::Depth => self.depth(from_frame(frame, combined, "depthUpdate")?, ts_recv),
        }
    }

    fn trade(&self, w: TradeWire<'_>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        Ok(vec![Parsed::Event(Event::Trade(Trade {
            exchange: self.label,
            symbol: self.symbol(w.symbol)?,
            ts: Some(ms_to_us(w.trade_time)),
            ts_recv,
            trade_id: w.trade_id.to_string(),
            price: w.price.into(),
            size: w.qty.into(),
            side: Some(if w.buyer_is_maker {
                Side::Sell
            } else {
                Side::Buy
            }),
        }))])
    }

    fn ticker(&self, w: TickerWire<'_>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        Ok(vec![Parsed::Event(Event::Ticker(Ticker {
            exchange: self.label,
            symbol: self.symbol(w.symbol)?,
            ts: Some(ms_to_us(w.event_time)),
            ts_recv,
            bid: Some(w.bid.into()),
            bid_size: Some(w.bid_qty.into()),
            ask: Some(w.ask.into()),
            ask_size: Some(w.ask_qty.into()),
            last: Some(w.last.into()),
            volume_24h: Some(w.volume.into()),
        }))])
    }

    fn kline(&self, w: KlineWire<'_>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        let k = w.kline;
        Ok(vec![Parsed::Event(Event::Candle(Candle {
            exchange: self.label,
            symbol: self.symbol(w.symbol)?,
            ts: Some(ms_to_us(w.event_time)),
            ts_recv,
            interval: k.interval.to_string(),
            start: ms_to_us(k.start),
            open: k.open.into(),
            high: k.high.into(),
            low: k.low.into(),
            close: k.close.into(),
            volume: k.volume.into(),
            closed: k.closed,
        }))])
    }

    fn depth(&self, w: DepthUpdateWire<'_>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        if w.first_update_id > w.final_update_id {
            return Err(ParseError::Payload {
                kind: "depthUpdate",
                reason: format!("U {} > u {}", w.first_update_id, w.final_update_id),
            });
        }
        Ok(vec![Parsed::Diff(BookDiff {
            exchange: self.label,
            symbol: self.symbol(w.symbol)?,
            first_update_id: w.first_update_id,
            last_update_id: w.final_update_id,
            ts: Some(ms_to_us(w.event_time)),
            ts_recv,
            bids: levels(w.bids),
            asks: levels(w.asks),
        })])
    }
}

/// The market payloads the fast path knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Trade,
    Ticker,
    Kline,
    Depth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sniffed {
    /// Wrapped as `{"stream":..,"data":{..}}`.
    combined: bool,
    kind: Kind,
}

/// Reads a frame's kind from its first bytes when Binance's own field order shows it:
/// `{"stream":"btcusdt@trade",...` or `{"e":"trade",...`. Anything else (acks, errors,
/// book tickers, other key orders) returns None and takes the general path.
fn sniff(frame: &[u8]) -> Option<Sniffed> {
    fn quoted(rest: &[u8]) -> Option<&[u8]> {
        let end = rest.iter().take(64).position(|&b| b == b'"')?;
        Some(&rest[..end])
    }
    if let Some(rest) = frame.strip_prefix(br#"{"stream":""#) {
        let name = quoted(rest)?;
        let kind = if name.ends_with(b"@trade") {
            Kind::Trade
        } else if name.ends_with(b"@ticker") {
            Kind::Ticker
        } else if name.windows(7).any(|w| w == b"@kline_") {
            Kind::Kline
        } else if name.windows(6).any(|w| w == b"@depth") {
            Kind::Depth
        } else {
            return None;
        };
        return Some(Sniffed {
            combined: true,
            kind,
        });
    }
    let rest = frame.strip_prefix(br#"{"e":""#)?;
    let kind = match quoted(rest)? {
        b"trade" => Kind::Trade,
        b"24hrTicker" => Kind::Ticker,
        b"kline" => Kind::Kline,
        b"depthUpdate" => Kind::Depth,
        _ => return None,
    };
    Some(Sniffed {
        combined: false,
        kind,
    })
}

/// `{"stream":"..","data":T}`: only `data` is read.
#[derive(Deserialize)]
struct Combined<T> {
    data: T,
}

/// One pass from the frame's bytes into `T`, unwrapping a combined-stream frame. What `T`
/// borrows, it borrows from `frame` (simd-json unescapes in place), never from the scratch.
fn from_frame<'a, T: Deserialize<'a>>(
    frame: &'a mut [u8],
    combined: bool,
    kind: &'static str,
) -> Result<T, ParseError> {
    if combined {
        crate::exchange::wire_json::from_slice::<Combined<T>>(frame)
            .map(|c| c.data)
            .map_err(payload_err(kind))
    } else {
        crate::exchange::wire_json::from_slice::<T>(frame).map_err(payload_err(kind))
    }
}

fn from_value<'a, T: Deserialize<'a>>(
    v: &'a BorrowedValue<'a>,
    kind: &'static str,
) -> Result<T, ParseError> {
    simd_json::serde::from_refborrowed_value(v).map_err(payload_err(kind))
}

/// `request 3`, or `a request` when the reply names none (bots read this text: no
/// `Some(3)`).
fn request_name(id: Option<&AckId>) -> String {
    match id {
        Some(id) => format!("request {id}"),
        None => "a request".to_string(),
    }
}

/// Live `SUBSCRIBE` / `UNSUBSCRIBE` requests for the streams of `symbols` × `channels`, at
/// most [`STREAMS_PER_REQUEST`] streams each, ids from 1.
fn requests(method: &str, symbols: &[String], channels: &[FeedChannel]) -> Vec<(AckId, String)> {
    let streams: Vec<String> = symbols
        .iter()
        .flat_map(|s| stream_names(s, channels))
        .collect();
    streams
        .chunks(STREAMS_PER_REQUEST)
        .zip(1u64..)
        .map(|(chunk, id)| {
            let frame = serde_json::json!({"method": method, "params": chunk, "id": id});
            (AckId::Num(id), frame.to_string())
        })
        .collect()
}

impl Adapter for BinanceAdapter {
    fn exchange(&self) -> Exchange {
        self.label
    }

    fn default_ws_url(&self) -> &'static str {
        DEFAULT_WS_URL
    }

    fn default_rest_url(&self) -> &'static str {
        DEFAULT_REST_URL
    }

    fn max_streams_per_connection(&self) -> usize {
        MAX_STREAMS_PER_CONNECTION
    }

    fn subscribe_pacing(&self) -> std::time::Duration {
        SUBSCRIBE_PACING
    }

    /// "A single connection to stream.binance.com is only valid for 24 hours."
    fn max_connection_lifetime(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(24 * 3600))
    }

    /// `{"method":"SUBSCRIBE","params":["btcusdt@trade",...],"id":1}`, at most
    /// [`STREAMS_PER_REQUEST`] streams each, ids from 1.
    fn subscribe_frames(
        &self,
        symbols: &[String],
        channels: &[FeedChannel],
    ) -> Vec<(AckId, String)> {
        requests("SUBSCRIBE", symbols, channels)
    }

    /// `{"method":"UNSUBSCRIBE","params":["btcusdt@depth"],"id":312}`, chunked like the
    /// subscriptions.
    fn unsubscribe_frames(
        &self,
        symbols: &[String],
        channels: &[FeedChannel],
    ) -> Vec<(AckId, String)> {
        requests("UNSUBSCRIBE", symbols, channels)
    }

    fn parse(&self, frame: &mut Vec<u8>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        if let Some(sniffed) = sniff(frame) {
            return self.parse_sniffed(frame, sniffed, ts_recv);
        }
        let v = simd_json::to_borrowed_value(frame).map_err(|e| ParseError::Json(e.to_string()))?;
        if v.as_object().is_none() {
            return Err(ParseError::NotObject);
        }
        let id = v.get("id").and_then(|i| i.as_u64()).map(AckId::Num);
        // Request replies: `{"result":null,"id":1}` / `{"error":{"code":2,"msg":".."},"id":1}`
        // (older docs: `{"code":2,"msg":"..","id":1}`).
        if let Some(err) = v.get("error") {
            let detail = match (
                err.get("code").and_then(|c| c.as_i64()),
                err.get("msg").and_then(|m| m.as_str()),
            ) {
                (Some(code), Some(msg)) => {
                    format!("{} refused: code {code}: {msg}", request_name(id.as_ref()))
                }
                _ => format!("{} refused: {err}", request_name(id.as_ref())),
            };
            return Ok(vec![Parsed::Refused { id, detail }]);
        }
        if v.contains_key("result") && v.contains_key("id") {
            return Ok(vec![Parsed::Ack { id }]);
        }
        if let (Some(code), Some(msg)) = (
            v.get("code").and_then(|c| c.as_i64()),
            v.get("msg").and_then(|m| m.as_str()),
        ) {
            let detail = format!("{} refused: code {code}: {msg}", request_name(id.as_ref()));
            return Ok(vec![Parsed::Refused { id, detail }]);
        }
        // Combined stream: `{"stream":"btcusdt@trade","data":{...}}`; raw stream: the payload.
        match (v.get("stream"), v.get("data")) {
            (Some(_), Some(data)) => self.parse_payload(data, ts_recv),
            _ => self.parse_payload(&v, ts_recv),
        }
    }

    fn fetch_snapshot(
        &self,
        http: &reqwest::Client,
        rest_url: &str,
        symbol: &str,
        limit: u32,
    ) -> SnapshotFuture {
        let label = self.label;
        let symbol = symbol.to_string();
        let url = url::Url::parse(rest_url)
            .and_then(|base| base.join("/api/v3/depth"))
            .map(|mut u| {
                u.query_pairs_mut()
                    .append_pair("symbol", &wire_symbol(&symbol))
                    .append_pair("limit", &limit.to_string());
                u
            });
        let http = http.clone();
        Box::pin(async move {
            let url =
                url.map_err(|e| SnapshotError::Url(format!("{rest_url_err}", rest_url_err = e)))?;
            let resp = http.get(url).send().await?;
            let status = resp.status();
            // Binance answers 429 (and 418 once it bans) with Retry-After in seconds.
            let retry_after = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(std::time::Duration::from_secs);
            let body = resp.bytes().await?;
            let ts_recv = crate::event::now_micros();
            if !status.is_success() {
                let body = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                return Err(SnapshotError::Status {
                    status: status.as_u16(),
                    body,
                    retry_after,
                });
            }
            parse_depth_snapshot(label, &symbol, &body, ts_recv)
        })
    }
}

/// The simulated venue (`mdbridge simulate --exchange binance`), written from the same
/// documentation and sharing no type with the adapter above.
pub(crate) mod simulator;

#[cfg(test)]
mod tests;
