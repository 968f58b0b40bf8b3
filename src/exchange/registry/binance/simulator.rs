//! Binance-spot-compatible front-end of the simulator: wire rendering of the
//! [`Market`] model plus the HTTP/WebSocket routes, all on one port.
//!
//! Written from Binance's official spot API documentation:
//! * WebSocket streams (URLs, combined wrapper, SUBSCRIBE & co, error codes,
//!   trade/aggTrade/kline/24hrTicker/bookTicker/depthUpdate payloads, ping
//!   every 20 s): <https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams>
//!   (source: <https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md>)
//! * REST market data (`/api/v3/depth`, `/api/v3/ping`, `/api/v3/time`):
//!   <https://developers.binance.com/docs/binance-spot-api-docs/rest-api/market-data-endpoints>
//! * Error codes (`-1121 Invalid symbol.`, `-1100`, `-1102`):
//!   <https://developers.binance.com/docs/binance-spot-api-docs/errors>
//!
//! Deliberate simplifications (documented so tests do not rely on them):
//! * `@depth` and `@depth@100ms` both push every diff in real time instead of
//!   aggregating over 1000/100 ms; ids still follow the `U`/`u` rules.
//! * The trade payload follows the current docs: the buyer/seller order ids
//!   (`b`/`a`) that older docs listed are not sent.
//! * `@ticker` statistics cover the time since the simulator started.
//! * Klines are pushed every second for every interval (docs: 1 s for `1s`,
//!   2 s otherwise); `1M` is not supported.
//!
//! Test-control endpoints (not Binance) live under `/_sim/`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::simulator::control::Control;
use crate::simulator::{
    lock, now_ms, Bbo, BookDiff, Candle, Market, Price, Qty, SimConfig, Stats, Trade,
    KLINE_INTERVALS, PRICE_DECIMALS,
};

/// Binance sends a ping frame every 20 seconds.
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(20);
/// ... and disconnects when no pong arrives within a minute.
const PONG_TIMEOUT: Duration = Duration::from_secs(60);
/// Capacity of the fan-out channel. A connection that falls further behind
/// than this is disconnected as a slow consumer (no unbounded buffering).
const CHANNEL_CAPACITY: usize = 8192;
/// Binance: a single connection can listen to a maximum of 1024 streams.
const MAX_STREAMS_PER_CONNECTION: usize = 1024;
/// REST depth: default and maximum `limit`.
const DEPTH_DEFAULT_LIMIT: usize = 100;
const DEPTH_MAX_LIMIT: usize = 5000;
/// Text sent by the malformed-frame fault: truncated JSON.
const GARBAGE_FRAME: &str = r#"{"e":"trade","s":"#;

// ---------------------------------------------------------------------------
// Streams and frames
// ---------------------------------------------------------------------------

/// A subscribable stream type (the part after `<symbol>@`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Trade,
    AggTrade,
    Depth,
    Depth100,
    Ticker,
    BookTicker,
    Kline(usize),
}

/// What a rendered frame carries; several kinds can share one topic
/// (`@depth` and `@depth@100ms` both carry the diff).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topic {
    Trade,
    AggTrade,
    Depth,
    Ticker,
    BookTicker,
    Kline(usize),
    /// Fault injection: sent to every connection regardless of subscriptions.
    Garbage,
}

impl Kind {
    fn topic(self) -> Topic {
        match self {
            Kind::Trade => Topic::Trade,
            Kind::AggTrade => Topic::AggTrade,
            Kind::Depth | Kind::Depth100 => Topic::Depth,
            Kind::Ticker => Topic::Ticker,
            Kind::BookTicker => Topic::BookTicker,
            Kind::Kline(i) => Topic::Kline(i),
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "trade" => Kind::Trade,
            "aggTrade" => Kind::AggTrade,
            "depth" => Kind::Depth,
            "depth@100ms" => Kind::Depth100,
            "ticker" => Kind::Ticker,
            "bookTicker" => Kind::BookTicker,
            _ => {
                let iv = s.strip_prefix("kline_")?;
                Kind::Kline(KLINE_INTERVALS.iter().position(|(n, _)| *n == iv)?)
            }
        })
    }

    fn suffix(self) -> String {
        match self {
            Kind::Trade => "trade".into(),
            Kind::AggTrade => "aggTrade".into(),
            Kind::Depth => "depth".into(),
            Kind::Depth100 => "depth@100ms".into(),
            Kind::Ticker => "ticker".into(),
            Kind::BookTicker => "bookTicker".into(),
            Kind::Kline(i) => format!("kline_{}", KLINE_INTERVALS[i].0),
        }
    }
}

/// One rendered payload, shared (cheaply cloned `Utf8Bytes`) by every
/// connection: rendered once per tick, never per client.
struct FrameInner {
    sym: usize,
    topic: Topic,
    /// Raw payload for `/ws` connections.
    raw: Utf8Bytes,
    /// `{"stream":..,"data":..}` per stream kind for combined connections.
    wrapped: Vec<(Kind, Utf8Bytes)>,
}

#[derive(Clone)]
struct Frame(Arc<FrameInner>);

/// A connection's subscription.
#[derive(Debug, Clone)]
struct Sub {
    sym: usize,
    kind: Kind,
    name: String,
}

// ---------------------------------------------------------------------------
// Shared server state
// ---------------------------------------------------------------------------

struct SymbolEntry {
    /// "BTC-USDT"
    normalized: String,
    /// "BTCUSDT"
    wire: String,
    /// "btcusdt" (stream names)
    lower: String,
    market: Mutex<Market>,
    /// Set by `/_sim/gap`: withhold the next diff.
    gap_pending: AtomicBool,
    diffs: AtomicU64,
}

#[derive(Default)]
struct Counters {
    connections_open: AtomicU64,
    connections_total: AtomicU64,
    frames_produced: AtomicU64,
    frames_sent: AtomicU64,
    slow_disconnects: AtomicU64,
    dropped_connections: AtomicU64,
    gaps: AtomicU64,
    malformed_sent: AtomicU64,
}

struct Shared {
    config: SimConfig,
    symbols: Vec<SymbolEntry>,
    tx: broadcast::Sender<Frame>,
    paused: watch::Sender<bool>,
    snapshot_delay_ms: AtomicU64,
    /// Cancelled (and replaced) to drop every current WebSocket connection.
    drop_token: Mutex<CancellationToken>,
    shutdown: CancellationToken,
    counters: Counters,
    tracker: TaskTracker,
}

type AppState = Arc<Shared>;

fn wire_symbol(normalized: &str) -> String {
    normalized.replace(['-', '/', '_'], "").to_uppercase()
}

impl Shared {
    fn new(config: SimConfig, shutdown: CancellationToken) -> Self {
        let now = now_ms();
        let symbols = config
            .symbols
            .iter()
            .map(|s| {
                let wire = wire_symbol(s);
                SymbolEntry {
                    normalized: s.clone(),
                    lower: wire.to_lowercase(),
                    wire,
                    market: Mutex::new(Market::new(s, config.seed, now)),
                    gap_pending: AtomicBool::new(false),
                    diffs: AtomicU64::new(0),
                }
            })
            .collect();
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        let (paused, _) = watch::channel(false);
        Self {
            config,
            symbols,
            tx,
            paused,
            snapshot_delay_ms: AtomicU64::new(0),
            drop_token: Mutex::new(CancellationToken::new()),
            shutdown,
            counters: Counters::default(),
            tracker: TaskTracker::new(),
        }
    }

    /// Binance wire symbol ("BTCUSDT", case-insensitive).
    fn find_wire(&self, s: &str) -> Option<usize> {
        self.symbols
            .iter()
            .position(|e| e.wire.eq_ignore_ascii_case(s))
    }

    /// Normalized ("BTC-USDT") or wire symbol, for the `/_sim/` endpoints.
    fn find_any(&self, s: &str) -> Option<usize> {
        self.symbols
            .iter()
            .position(|e| e.normalized.eq_ignore_ascii_case(s))
            .or_else(|| self.find_wire(s))
    }

    /// Parse "btcusdt@depth@100ms" into a subscription.
    fn parse_stream(&self, name: &str) -> Option<Sub> {
        let (sym, kind) = name.split_once('@')?;
        let sym = self.symbols.iter().position(|e| e.lower == sym)?;
        Some(Sub {
            sym,
            kind: Kind::parse(kind)?,
            name: name.to_string(),
        })
    }

    fn publish(&self, frame: FrameInner) {
        self.counters
            .frames_produced
            .fetch_add(1, Ordering::Relaxed);
        // An error only means nobody is listening right now.
        let _ = self.tx.send(Frame(Arc::new(frame)));
    }

    fn drop_all_connections(&self) {
        let mut token = lock(&self.drop_token);
        token.cancel();
        *token = CancellationToken::new();
    }
}

// ---------------------------------------------------------------------------
// Rendering (Binance number formats: strings with 8 decimals)
// ---------------------------------------------------------------------------

fn push_price(s: &mut String, p: Price) {
    let scale = 10i64.pow(PRICE_DECIMALS);
    let sign = if p < 0 { "-" } else { "" };
    let a = p.unsigned_abs();
    let _ = write!(
        s,
        "{sign}{}.{:02}000000",
        a / scale as u64,
        a % scale as u64
    );
}

/// Quantity in 1e-8 units.
fn push_qty(s: &mut String, q: u128) {
    let _ = write!(s, "{}.{:08}", q / 100_000_000, q % 100_000_000);
}

/// Quote amount in 1e-10 units (price ticks * qty units), rendered with 8
/// decimals (truncated).
fn push_quote(s: &mut String, v: u128) {
    push_qty(s, v / 100);
}

#[cfg(test)]
fn price_str(p: Price) -> String {
    let mut s = String::with_capacity(24);
    push_price(&mut s, p);
    s
}

#[cfg(test)]
fn qty_str(q: Qty) -> String {
    let mut s = String::with_capacity(24);
    push_qty(&mut s, q as u128);
    s
}

fn push_levels<'a>(s: &mut String, levels: impl Iterator<Item = (&'a Price, &'a Qty)>) {
    s.push('[');
    for (i, (p, q)) in levels.enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str("[\"");
        push_price(s, *p);
        s.push_str("\",\"");
        push_qty(s, *q as u128);
        s.push_str("\"]");
    }
    s.push(']');
}

fn render_trade(sym: &str, e: i64, t: &Trade) -> String {
    let mut s = String::with_capacity(160);
    let _ = write!(s, r#"{{"e":"trade","E":{e},"s":"{sym}","t":{},"p":""#, t.id);
    push_price(&mut s, t.price);
    s.push_str(r#"","q":""#);
    push_qty(&mut s, t.qty as u128);
    let _ = write!(s, r#"","T":{},"m":{},"M":true}}"#, t.time, t.buyer_is_maker);
    s
}

fn render_agg_trade(sym: &str, e: i64, t: &Trade) -> String {
    // One aggregate per trade: the simulator's taker orders fill one level.
    let mut s = String::with_capacity(180);
    let _ = write!(
        s,
        r#"{{"e":"aggTrade","E":{e},"s":"{sym}","a":{},"p":""#,
        t.id
    );
    push_price(&mut s, t.price);
    s.push_str(r#"","q":""#);
    push_qty(&mut s, t.qty as u128);
    let _ = write!(
        s,
        r#"","f":{id},"l":{id},"T":{},"m":{},"M":true}}"#,
        t.time,
        t.buyer_is_maker,
        id = t.id
    );
    s
}

fn render_depth_update(sym: &str, e: i64, d: &BookDiff) -> String {
    let mut s = String::with_capacity(128 + 48 * (d.bids.len() + d.asks.len()));
    let _ = write!(
        s,
        r#"{{"e":"depthUpdate","E":{e},"s":"{sym}","U":{},"u":{},"b":"#,
        d.first_update_id, d.last_update_id
    );
    push_levels(&mut s, d.bids.iter().map(|(p, q)| (p, q)));
    s.push_str(r#","a":"#);
    push_levels(&mut s, d.asks.iter().map(|(p, q)| (p, q)));
    s.push('}');
    s
}

fn render_book_ticker(sym: &str, u: u64, b: &Bbo) -> String {
    let mut s = String::with_capacity(128);
    let _ = write!(s, r#"{{"u":{u},"s":"{sym}","b":""#);
    push_price(&mut s, b.bid.0);
    s.push_str(r#"","B":""#);
    push_qty(&mut s, b.bid.1 as u128);
    s.push_str(r#"","a":""#);
    push_price(&mut s, b.ask.0);
    s.push_str(r#"","A":""#);
    push_qty(&mut s, b.ask.1 as u128);
    s.push_str("\"}");
    s
}

fn render_ticker(sym: &str, e: i64, st: &Stats, bbo: Option<Bbo>) -> String {
    let mut s = String::with_capacity(512);
    let _ = write!(s, r#"{{"e":"24hrTicker","E":{e},"s":"{sym}","p":""#);
    push_price(&mut s, st.last - st.open);
    let pct = if st.open != 0 {
        (st.last - st.open) as f64 * 100.0 / st.open as f64
    } else {
        0.0
    };
    let _ = write!(s, r#"","P":"{pct:.3}","w":""#);
    // Weighted average price in 1e-8 units: quote(1e-10) / volume(1e-8) * 1e6.
    let w = (st.quote_volume * 1_000_000)
        .checked_div(st.volume)
        .unwrap_or(st.last as u128 * 1_000_000);
    push_qty(&mut s, w);
    s.push_str(r#"","x":""#);
    push_price(&mut s, st.prev_price);
    s.push_str(r#"","c":""#);
    push_price(&mut s, st.last);
    s.push_str(r#"","Q":""#);
    push_qty(&mut s, st.last_qty as u128);
    let (bid, ask) = bbo.map_or(((0, 0), (0, 0)), |b| (b.bid, b.ask));
    s.push_str(r#"","b":""#);
    push_price(&mut s, bid.0);
    s.push_str(r#"","B":""#);
    push_qty(&mut s, bid.1 as u128);
    s.push_str(r#"","a":""#);
    push_price(&mut s, ask.0);
    s.push_str(r#"","A":""#);
    push_qty(&mut s, ask.1 as u128);
    s.push_str(r#"","o":""#);
    push_price(&mut s, st.open);
    s.push_str(r#"","h":""#);
    push_price(&mut s, st.high);
    s.push_str(r#"","l":""#);
    push_price(&mut s, st.low);
    s.push_str(r#"","v":""#);
    push_qty(&mut s, st.volume);
    s.push_str(r#"","q":""#);
    push_quote(&mut s, st.quote_volume);
    // Binance uses -1 for the first/last trade id when there were no trades.
    let (first, last) = if st.count == 0 {
        (-1, -1)
    } else {
        (st.first_trade_id as i64, st.last_trade_id as i64)
    };
    let _ = write!(
        s,
        r#"","O":{},"C":{e},"F":{first},"L":{last},"n":{}}}"#,
        st.open_time, st.count
    );
    s
}

fn render_kline(sym: &str, e: i64, c: &Candle, closed: bool) -> String {
    let mut s = String::with_capacity(400);
    let (first, last) = (
        c.first_trade_id.map_or(-1, |v| v as i64),
        c.last_trade_id.map_or(-1, |v| v as i64),
    );
    let _ = write!(
        s,
        r#"{{"e":"kline","E":{e},"s":"{sym}","k":{{"t":{},"T":{},"s":"{sym}","i":"{}","f":{first},"L":{last},"o":""#,
        c.start, c.end, KLINE_INTERVALS[c.interval].0
    );
    push_price(&mut s, c.open);
    s.push_str(r#"","c":""#);
    push_price(&mut s, c.close);
    s.push_str(r#"","h":""#);
    push_price(&mut s, c.high);
    s.push_str(r#"","l":""#);
    push_price(&mut s, c.low);
    s.push_str(r#"","v":""#);
    push_qty(&mut s, c.volume);
    let _ = write!(s, r#"","n":{},"x":{closed},"q":""#, c.count);
    push_quote(&mut s, c.quote_volume);
    s.push_str(r#"","V":""#);
    push_qty(&mut s, c.taker_buy_volume);
    s.push_str(r#"","Q":""#);
    push_quote(&mut s, c.taker_buy_quote_volume);
    s.push_str(r#"","B":"0"}}"#);
    s
}

/// `{"lastUpdateId":N,"bids":[..],"asks":[..]}`, best levels first.
fn render_book(m: &Market, limit: usize) -> String {
    let mut s = String::with_capacity(64 + 48 * 2 * limit.min(m.bids.len().max(m.asks.len())));
    let _ = write!(s, r#"{{"lastUpdateId":{},"bids":"#, m.last_update_id);
    push_levels(&mut s, m.bids.iter().rev().take(limit));
    s.push_str(r#","asks":"#);
    push_levels(&mut s, m.asks.iter().take(limit));
    s.push('}');
    s
}

/// Build a frame: the raw payload and its combined-stream wrappers.
fn frame(entry: &SymbolEntry, sym: usize, topic: Topic, raw: String) -> FrameInner {
    let kinds: &[Kind] = match topic {
        Topic::Trade => &[Kind::Trade],
        Topic::AggTrade => &[Kind::AggTrade],
        Topic::Depth => &[Kind::Depth, Kind::Depth100],
        Topic::Ticker => &[Kind::Ticker],
        Topic::BookTicker => &[Kind::BookTicker],
        Topic::Kline(i) => &[Kind::Kline(i)][..],
        Topic::Garbage => &[],
    };
    let wrapped = kinds
        .iter()
        .map(|k| {
            let w = format!(
                r#"{{"stream":"{}@{}","data":{raw}}}"#,
                entry.lower,
                k.suffix()
            );
            (*k, Utf8Bytes::from(w))
        })
        .collect();
    FrameInner {
        sym,
        topic,
        raw: Utf8Bytes::from(raw),
        wrapped,
    }
}

fn kline_frame(entry: &SymbolEntry, sym: usize, e: i64, c: &Candle, closed: bool) -> FrameInner {
    // The Kline kind needs its index at runtime, so build it here.
    let raw = render_kline(&entry.wire, e, c, closed);
    let kind = Kind::Kline(c.interval);
    let w = format!(
        r#"{{"stream":"{}@{}","data":{raw}}}"#,
        entry.lower,
        kind.suffix()
    );
    FrameInner {
        sym,
        topic: Topic::Kline(c.interval),
        raw: Utf8Bytes::from(raw),
        wrapped: vec![(kind, Utf8Bytes::from(w))],
    }
}

// ---------------------------------------------------------------------------
// Market tasks
// ---------------------------------------------------------------------------

/// Run `n` market ticks for one symbol and publish their frames.
fn run_ticks(shared: &Shared, sym: usize, n: usize) {
    let entry = &shared.symbols[sym];
    let mut market = lock(&entry.market);
    // Checked under the market lock so `/_sim/pause` (which takes the lock
    // after setting the flag) guarantees no tick happens after it returns.
    if *shared.paused.borrow() {
        return;
    }
    let e = now_ms();
    for _ in 0..n {
        let out = market.tick(e);
        let w = &entry.wire;
        shared.publish(frame(
            entry,
            sym,
            Topic::Trade,
            render_trade(w, e, &out.trade),
        ));
        shared.publish(frame(
            entry,
            sym,
            Topic::AggTrade,
            render_agg_trade(w, e, &out.trade),
        ));
        let count = entry.diffs.fetch_add(1, Ordering::Relaxed) + 1;
        let periodic_gap = shared
            .config
            .faults
            .gap_every_updates
            .is_some_and(|every| every > 0 && count % every == 0);
        if entry.gap_pending.swap(false, Ordering::Relaxed) || periodic_gap {
            // The book changed, but this diff is never sent: clients see
            // `U > previous u + 1`.
            shared.counters.gaps.fetch_add(1, Ordering::Relaxed);
        } else {
            shared.publish(frame(
                entry,
                sym,
                Topic::Depth,
                render_depth_update(w, e, &out.diff),
            ));
        }
        if let Some(bbo) = out.bbo_changed {
            shared.publish(frame(
                entry,
                sym,
                Topic::BookTicker,
                render_book_ticker(w, market.last_update_id, &bbo),
            ));
        }
    }
}

/// Once a second: 24hrTicker and kline updates.
fn publish_periodic(shared: &Shared, sym: usize) {
    let entry = &shared.symbols[sym];
    let mut market = lock(&entry.market);
    let e = now_ms();
    let bbo = market
        .best_bid()
        .zip(market.best_ask())
        .map(|(bid, ask)| Bbo { bid, ask });
    shared.publish(frame(
        entry,
        sym,
        Topic::Ticker,
        render_ticker(&entry.wire, e, &market.stats, bbo),
    ));
    for up in market.kline_updates(e) {
        shared.publish(kline_frame(entry, sym, e, &up.candle, up.closed));
    }
}

impl crate::simulator::runtime::Ticking for Shared {
    fn pace(&self) -> crate::simulator::runtime::Pace<'_> {
        crate::simulator::runtime::Pace {
            config: &self.config,
            shutdown: &self.shutdown,
            paused: &self.paused,
            backlog: (self.tx.receiver_count(), self.tx.len(), CHANNEL_CAPACITY),
        }
    }
    fn tick(&self, sym: usize, n: usize) {
        run_ticks(self, sym, n);
    }
    fn second(&self, sym: usize) {
        publish_periodic(self, sym);
    }
}

// ---------------------------------------------------------------------------
// WebSocket connections
// ---------------------------------------------------------------------------

/// Decrements the open-connection gauge however the connection ends.
struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn ws_reply(result: Value, id: &Value) -> Message {
    Message::Text(json!({ "result": result, "id": id }).to_string().into())
}

fn ws_error(code: i64, msg: &str, id: &Value) -> Message {
    Message::Text(
        json!({ "error": { "code": code, "msg": msg }, "id": id })
            .to_string()
            .into(),
    )
}

/// Handle one client request (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS,
/// SET_PROPERTY, GET_PROPERTY) and build the reply.
fn handle_request(
    shared: &Shared,
    text: &str,
    subs: &mut Vec<Sub>,
    combined: &mut bool,
) -> Message {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return ws_error(3, &format!("Invalid JSON: {e}"), &Value::Null),
    };
    let Some(obj) = v.as_object() else {
        return ws_error(2, "Invalid request", &Value::Null);
    };
    // id: 64-bit integer, alphanumeric string of at most 36 chars, or null.
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    let id_ok = match &id {
        Value::Null => true,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::String(s) => s.len() <= 36 && s.chars().all(|c| c.is_ascii_alphanumeric()),
        _ => false,
    };
    if !id_ok {
        return ws_error(
            2,
            "Invalid request: request ID must be an unsigned integer",
            &Value::Null,
        );
    }
    let method = match obj.get("method") {
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return ws_error(2, "Invalid request: method must be a string", &id),
        None => return ws_error(2, "Invalid request: missing field `method`", &id),
    };
    let params = obj.get("params");
    match method {
        "SUBSCRIBE" | "UNSUBSCRIBE" => {
            let Some(list) = params.and_then(Value::as_array) else {
                return ws_error(
                    2,
                    "Invalid request: params must be an array of streams",
                    &id,
                );
            };
            let mut parsed = Vec::with_capacity(list.len());
            for p in list {
                let Some(name) = p.as_str() else {
                    return ws_error(2, "Invalid request: stream name must be a string", &id);
                };
                match shared.parse_stream(name) {
                    Some(s) => parsed.push(s),
                    None => {
                        return ws_error(
                            2,
                            &format!("Invalid request: invalid stream `{name}`"),
                            &id,
                        )
                    }
                }
            }
            if method == "SUBSCRIBE" {
                for s in parsed {
                    if !subs.iter().any(|x| x.name == s.name) {
                        if subs.len() >= MAX_STREAMS_PER_CONNECTION {
                            return ws_error(2, "Invalid request: too many streams", &id);
                        }
                        subs.push(s);
                    }
                }
            } else {
                subs.retain(|x| !parsed.iter().any(|s| s.name == x.name));
            }
            ws_reply(Value::Null, &id)
        }
        "LIST_SUBSCRIPTIONS" => ws_reply(
            Value::Array(subs.iter().map(|s| Value::String(s.name.clone())).collect()),
            &id,
        ),
        "SET_PROPERTY" => match params.and_then(Value::as_array).map(Vec::as_slice) {
            Some([Value::String(p), Value::Bool(b)]) if p == "combined" => {
                *combined = *b;
                ws_reply(Value::Null, &id)
            }
            Some([Value::String(p), _]) if p == "combined" => {
                ws_error(1, "Invalid value type: expected Boolean", &id)
            }
            Some([Value::String(_), _]) => ws_error(0, "Unknown property", &id),
            _ => ws_error(2, "Invalid request: property name must be a string", &id),
        },
        "GET_PROPERTY" => match params.and_then(Value::as_array).map(Vec::as_slice) {
            Some([Value::String(p)]) if p == "combined" => ws_reply(Value::Bool(*combined), &id),
            Some([Value::String(_)]) => ws_error(0, "Unknown property", &id),
            _ => ws_error(2, "Invalid request: property name must be a string", &id),
        },
        other => ws_error(
            2,
            &format!(
                "Invalid request: unknown variant `{other}`, expected one of `SUBSCRIBE`, \
                 `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`"
            ),
            &id,
        ),
    }
}

/// Messages a frame turns into for this connection (one per matching stream).
fn route_frame(f: &FrameInner, subs: &[Sub], combined: bool, out: &mut Vec<Message>) {
    if f.topic == Topic::Garbage {
        out.push(Message::Text(f.raw.clone()));
        return;
    }
    for s in subs
        .iter()
        .filter(|s| s.sym == f.sym && s.kind.topic() == f.topic)
    {
        let text = if combined {
            match f.wrapped.iter().find(|(k, _)| *k == s.kind) {
                Some((_, w)) => w.clone(),
                None => continue,
            }
        } else {
            f.raw.clone()
        };
        out.push(Message::Text(text));
    }
}

enum Exit {
    /// Drop the TCP stream without a close frame.
    Abrupt,
    /// Send a close frame first.
    Graceful,
}

async fn run_connection(
    shared: AppState,
    socket: WebSocket,
    mut subs: Vec<Sub>,
    mut combined: bool,
) {
    // Keeps `serve_binance` from returning while this connection is open.
    let _tracked = shared.tracker.token();
    let c = &shared.counters;
    c.connections_total.fetch_add(1, Ordering::Relaxed);
    c.connections_open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(c);
    let kill = lock(&shared.drop_token).clone();
    let mut rx = shared.tx.subscribe();
    let (mut sink, mut stream) = socket.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut awaiting_pong: Option<Instant> = None;
    let malformed_every = shared
        .config
        .faults
        .malformed_every_frames
        .filter(|n| *n > 0);
    let mut since_malformed = 0u64;
    let mut out: Vec<Message> = Vec::with_capacity(4);

    let exit = 'conn: loop {
        tokio::select! {
            biased;
            _ = kill.cancelled() => {
                c.dropped_connections.fetch_add(1, Ordering::Relaxed);
                break Exit::Abrupt;
            }
            _ = shared.shutdown.cancelled() => break Exit::Graceful,
            _ = ping.tick() => {
                if awaiting_pong.is_some_and(|t| t.elapsed() >= PONG_TIMEOUT) {
                    break Exit::Graceful;
                }
                awaiting_pong.get_or_insert_with(Instant::now);
                out.push(Message::Ping(Bytes::from_static(b"sim")));
            }
            msg = stream.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Exit::Abrupt,
                Some(Ok(Message::Text(t))) => {
                    out.push(handle_request(&shared, t.as_str(), &mut subs, &mut combined));
                }
                Some(Ok(Message::Pong(_))) => awaiting_pong = None,
                // Pings are answered by the WebSocket layer; binary is ignored.
                Some(Ok(_)) => {}
            },
            f = rx.recv() => match f {
                Ok(f) => {
                    let before = out.len();
                    route_frame(&f.0, &subs, combined, &mut out);
                    if f.0.topic != Topic::Garbage {
                        if let Some(every) = malformed_every {
                            since_malformed += (out.len() - before) as u64;
                            if since_malformed >= every {
                                since_malformed = 0;
                                out.push(Message::Text(Utf8Bytes::from_static(GARBAGE_FRAME)));
                                c.malformed_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow to keep up: disconnect like a real exchange.
                    c.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                    break Exit::Graceful;
                }
                Err(broadcast::error::RecvError::Closed) => break Exit::Graceful,
            },
        }
        for m in out.drain(..) {
            let is_data = matches!(m, Message::Text(_));
            tokio::select! {
                biased;
                _ = kill.cancelled() => {
                    c.dropped_connections.fetch_add(1, Ordering::Relaxed);
                    break 'conn Exit::Abrupt;
                }
                _ = shared.shutdown.cancelled() => break 'conn Exit::Graceful,
                r = sink.send(m) => {
                    if r.is_err() {
                        break 'conn Exit::Abrupt;
                    }
                    if is_data {
                        c.frames_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    if let Exit::Graceful = exit {
        // Bounded, so a client that stopped reading cannot hold shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
    }
    // Dropping sink + stream drops the TCP stream.
}

fn parse_stream_list(shared: &Shared, list: &str) -> Result<Vec<Sub>, ApiError> {
    let mut subs: Vec<Sub> = Vec::new();
    for name in list.split('/').filter(|s| !s.is_empty()) {
        match shared.parse_stream(name) {
            Some(s) => {
                if !subs.iter().any(|x| x.name == s.name) {
                    subs.push(s);
                }
            }
            None => {
                return Err(api_error(2, &format!("Invalid stream name `{name}`")));
            }
        }
    }
    if subs.len() > MAX_STREAMS_PER_CONNECTION {
        return Err(api_error(2, "Too many streams"));
    }
    Ok(subs)
}

fn upgrade(ws: WebSocketUpgrade, shared: AppState, subs: Vec<Sub>, combined: bool) -> Response {
    ws.on_upgrade(move |socket| run_connection(shared, socket, subs, combined))
}

async fn ws_combined(
    ws: WebSocketUpgrade,
    State(shared): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match parse_stream_list(&shared, q.get("streams").map_or("", String::as_str)) {
        Ok(subs) => upgrade(ws, shared, subs, true),
        Err(r) => r.into_response(),
    }
}

async fn ws_raw_root(ws: WebSocketUpgrade, State(shared): State<AppState>) -> Response {
    upgrade(ws, shared, Vec::new(), false)
}

async fn ws_raw(
    ws: WebSocketUpgrade,
    State(shared): State<AppState>,
    Path(streams): Path<String>,
) -> Response {
    match parse_stream_list(&shared, &streams) {
        Ok(subs) => upgrade(ws, shared, subs, false),
        Err(r) => r.into_response(),
    }
}

// ---------------------------------------------------------------------------
// REST
// ---------------------------------------------------------------------------

/// A Binance-style `{"code":..,"msg":..}` answered with HTTP 400.
struct ApiError {
    code: i64,
    msg: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({ "code": self.code, "msg": self.msg })),
        )
            .into_response()
    }
}

fn api_error(code: i64, msg: &str) -> ApiError {
    ApiError {
        code,
        msg: msg.to_string(),
    }
}

fn bad_request(code: i64, msg: &str) -> Response {
    api_error(code, msg).into_response()
}

fn json_text(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn ok() -> Response {
    Json(json!({ "ok": true })).into_response()
}

async fn rest_depth(
    State(shared): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(symbol) = q.get("symbol").filter(|s| !s.is_empty()) else {
        return bad_request(
            -1102,
            "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
        );
    };
    let limit = match q.get("limit") {
        None => DEPTH_DEFAULT_LIMIT,
        Some(l) => match l.parse::<usize>() {
            // Binance truncates limits above 5000 to 5000.
            Ok(n) if n >= 1 => n.min(DEPTH_MAX_LIMIT),
            _ => {
                return bad_request(
                    -1100,
                    "Illegal characters found in parameter 'limit'; legal range is '1-5000'.",
                )
            }
        },
    };
    let Some(sym) = shared.find_wire(symbol) else {
        return bad_request(-1121, "Invalid symbol.");
    };
    let delay = shared.snapshot_delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        // The snapshot is taken after the delay, as a slow request would be.
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let body = render_book(&lock(&shared.symbols[sym].market), limit);
    json_text(body)
}

async fn rest_ping() -> Response {
    json_text("{}".into())
}

async fn rest_time() -> Response {
    Json(json!({ "serverTime": now_ms() })).into_response()
}

// ---------------------------------------------------------------------------
// Test control endpoints (/_sim/)
// ---------------------------------------------------------------------------

fn sim_symbol(shared: &Shared, symbol: Option<&str>) -> Result<usize, ApiError> {
    let Some(s) = symbol else {
        return Err(api_error(
            -1102,
            "Mandatory parameter 'symbol' was not sent.",
        ));
    };
    shared
        .find_any(s)
        .ok_or_else(|| api_error(-1121, "Invalid symbol."))
}

async fn sim_snapshot_delay(
    State(shared): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match q.get("ms").map(|v| v.parse::<u64>()) {
        Some(Ok(ms)) => {
            shared.snapshot_delay_ms.store(ms, Ordering::Relaxed);
            ok()
        }
        _ => bad_request(-1100, "Parameter 'ms' must be a non-negative integer."),
    }
}

impl Control for Shared {
    fn drop_all(&self) {
        self.drop_all_connections();
    }

    /// Withholds the next depth diff of `symbol`.
    fn gap(&self, symbol: Option<&str>) -> Option<Response> {
        match sim_symbol(self, symbol) {
            Ok(sym) => {
                self.symbols[sym].gap_pending.store(true, Ordering::Relaxed);
                None
            }
            Err(e) => Some(e.into_response()),
        }
    }

    fn malformed(&self) {
        self.counters.malformed_sent.fetch_add(1, Ordering::Relaxed);
        self.publish(FrameInner {
            sym: usize::MAX,
            topic: Topic::Garbage,
            raw: Utf8Bytes::from_static(GARBAGE_FRAME),
            wrapped: Vec::new(),
        });
    }

    fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
        // Wait out any tick batch in progress; later ones see the flag under the
        // lock. So when this returns the books are at rest.
        for e in &self.symbols {
            drop(lock(&e.market));
        }
    }

    fn book(&self, symbol: Option<&str>) -> Response {
        match sim_symbol(self, symbol) {
            Ok(sym) => json_text(render_book(&lock(&self.symbols[sym].market), usize::MAX)),
            Err(r) => r.into_response(),
        }
    }

    fn stats(&self) -> Value {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "connections_open": g(&c.connections_open),
            "connections_total": g(&c.connections_total),
            "frames_produced": g(&c.frames_produced),
            "frames_sent": g(&c.frames_sent),
            "slow_disconnects": g(&c.slow_disconnects),
            "dropped_connections": g(&c.dropped_connections),
            "gaps": g(&c.gaps),
            "malformed_sent": g(&c.malformed_sent),
            "paused": *self.paused.borrow(),
        })
    }
}

fn router(shared: AppState) -> Router {
    Router::new()
        .route("/stream", get(ws_combined))
        .route("/ws", get(ws_raw_root))
        .route("/ws/{*streams}", get(ws_raw))
        .route("/api/v3/depth", get(rest_depth))
        .route("/api/v3/ping", get(rest_ping))
        .route("/api/v3/time", get(rest_time))
        .route("/_sim/snapshot_delay", post(sim_snapshot_delay))
        .with_state(shared.clone())
        .merge(crate::simulator::control::routes(shared))
}

/// Serve the Binance-compatible simulator on `listener` until `shutdown` is
/// cancelled. Returns when every connection (HTTP and WebSocket) is closed.
pub async fn serve_binance(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let shared: AppState = Arc::new(Shared::new(config, shutdown.clone()));
    for sym in 0..shared.symbols.len() {
        shared
            .tracker
            .spawn(crate::simulator::runtime::market_task(shared.clone(), sym));
    }
    let s = shared.clone();
    crate::simulator::runtime::spawn_drop_fault(
        &shared.tracker,
        &shared.config.faults,
        shutdown.clone(),
        move || s.drop_all_connections(),
    );
    tracing::info!(addr = ?listener.local_addr().ok(), symbols = shared.symbols.len(), "binance simulator listening");
    crate::simulator::runtime::serve_until(
        listener,
        router(shared.clone()),
        shutdown,
        &shared.tracker,
    )
    .await
}

#[cfg(test)]
mod tests;
