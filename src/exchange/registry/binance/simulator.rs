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
//!
//! Split by job: [`wire`] renders the market in Binance's formats, [`connection`] speaks the
//! WebSocket subscribe protocol, [`rest`] serves the REST depth; this file holds the
//! shared state, the market tasks, the `/_sim/` control and the router.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod connection;
mod rest;
mod wire;

// What the unit tests (`tests.rs`, `use super::*`) check besides this file's own items.
#[cfg(test)]
use crate::simulator::Trade;
#[cfg(test)]
use futures_util::{SinkExt, StreamExt};
#[cfg(test)]
use wire::{price_str, qty_str, render_kline};

use connection::{ws_combined, ws_raw, ws_raw_root};
use rest::{api_error, bad_request, json_text, ok, rest_depth, rest_ping, rest_time, ApiError};
use wire::{
    frame, kline_frame, render_agg_trade, render_book, render_book_ticker, render_depth_update,
    render_ticker, render_trade,
};

use crate::simulator::control::Control;
use crate::simulator::{lock, now_ms, Bbo, Market, SimConfig, KLINE_INTERVALS};

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
