//! Coinbase Advanced Trade-compatible front-end of the simulator: the [`Market`] model
//! rendered as Coinbase's market data WebSocket (`/`), with its subscribe protocol and
//! heartbeats, plus the `/_sim/` control endpoints.
//!
//! Written from Coinbase's "Advanced Trade WebSocket Overview" and "Channels" pages:
//! one `{"type":"subscribe","product_ids":[..],"channel":".."}` per channel, answered by a
//! `subscriptions` message listing every current subscription (an unknown channel or
//! product by `{"type":"error","message":..}`); every message is
//! `{"channel":..,"client_id":"","timestamp":..,"sequence_num":N,"events":[..]}` with `N`
//! counting the messages of the connection from 0, across channels. `level2` sends the
//! whole book (`l2_data` `snapshot`) then `update`s with absolute `new_quantity`;
//! `market_trades` a snapshot of recent trades (newest first) then updates, `side` being
//! the maker's; `ticker` and `candles` (5-minute buckets, `start` in seconds) once a
//! second; `heartbeats` every second.
//!
//! Deliberate simplifications: no JWT; a connection that sends no subscribe within 5 s is
//! closed, as documented; `status` lists every subscribed product `online` once.
//!
//! Faults (venue-neutral switches of [`crate::simulator::Faults`] and `/_sim/`): drop every
//! connection, skip one `sequence_num` on every connection, send one malformed message.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod connection;

use crate::simulator::control::Control;
use crate::simulator::runtime::{self, Ticking};
use crate::simulator::{
    lock, now_ms, Market, Price, Qty, SimConfig, KLINE_INTERVALS, PRICE_DECIMALS,
};

const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(5);
const CHANNEL_CAPACITY: usize = 8192;
/// Trades in a `market_trades` snapshot.
const RECENT_TRADES: usize = 50;
const GARBAGE: &str = r#"{"channel":"l2_data","timestamp":"#;
const CHANNELS: [&str; 6] = [
    "heartbeats",
    "level2",
    "market_trades",
    "ticker",
    "candles",
    "status",
];

/// One rendered market message, shared by every connection (only the envelope with its
/// `sequence_num` is per connection).
struct Item {
    /// Index of the product; `usize::MAX` for the malformed-message fault.
    sym: usize,
    channel: &'static str,
    timestamp: String,
    /// The `events` array.
    events: String,
    /// `level2`: the model's update id of this diff (older than a snapshot: skipped).
    update_id: u64,
}

struct Product {
    id: String,
    market: Mutex<Market>,
    /// Rendered recent trades, newest last.
    recent: Mutex<VecDeque<String>>,
}

#[derive(Default)]
struct Counters {
    connections_total: AtomicU64,
    messages_sent: AtomicU64,
    gaps: AtomicU64,
    malformed_sent: AtomicU64,
    dropped_connections: AtomicU64,
}

struct Shared {
    config: SimConfig,
    products: Vec<Product>,
    tx: broadcast::Sender<Arc<Item>>,
    paused: watch::Sender<bool>,
    /// Bumped by `/_sim/gap`: every connection skips one `sequence_num`.
    gap_epoch: AtomicU64,
    drop_token: Mutex<CancellationToken>,
    shutdown: CancellationToken,
    counters: Counters,
    tracker: TaskTracker,
}

type AppState = Arc<Shared>;

fn push_price(s: &mut String, p: Price) {
    let scale = 10u64.pow(PRICE_DECIMALS);
    let a = p.unsigned_abs();
    let sign = if p < 0 { "-" } else { "" };
    let _ = write!(s, "{sign}{}.{:02}", a / scale, a % scale);
}

fn push_qty(s: &mut String, q: u128) {
    let _ = write!(s, "{}.{:08}", q / 100_000_000, q % 100_000_000);
}

/// RFC 3339 with nanoseconds, as Coinbase writes its times.
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}000000Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn push_l2(s: &mut String, side: &str, time: &str, p: Price, q: Qty) {
    let _ = write!(
        s,
        r#"{{"side":"{side}","event_time":"{time}","price_level":""#
    );
    push_price(s, p);
    s.push_str(r#"","new_quantity":""#);
    push_qty(s, u128::from(q));
    s.push_str("\"}");
}

/// `[{"type":kind,"product_id":..,"updates":[..]}]` of bids then offers.
fn render_l2<'a>(
    kind: &str,
    product: &str,
    time: &str,
    bids: impl Iterator<Item = (&'a Price, &'a Qty)>,
    asks: impl Iterator<Item = (&'a Price, &'a Qty)>,
) -> String {
    let mut s = format!(r#"[{{"type":"{kind}","product_id":"{product}","updates":["#);
    let mut first = true;
    for (side, levels) in [("bid", bids.collect::<Vec<_>>()), ("offer", asks.collect())] {
        for (p, q) in levels {
            if !std::mem::take(&mut first) {
                s.push(',');
            }
            push_l2(&mut s, side, time, *p, *q);
        }
    }
    s.push_str("]}]");
    s
}

fn render_trade(product: &str, time: &str, t: &crate::simulator::Trade) -> String {
    // The docs' `side` is the maker's: the buyer made the market when the taker sold.
    let maker = if t.buyer_is_maker { "BUY" } else { "SELL" };
    let mut s = format!(
        r#"{{"trade_id":"{}","product_id":"{product}","price":""#,
        t.id
    );
    push_price(&mut s, t.price);
    s.push_str(r#"","size":""#);
    push_qty(&mut s, u128::from(t.qty));
    let _ = write!(s, r#"","side":"{maker}","time":"{time}"}}"#);
    s
}

fn render_ticker(kind: &str, product: &str, m: &Market) -> String {
    let st = &m.stats;
    let mut s = format!(
        r#"[{{"type":"{kind}","tickers":[{{"type":"ticker","product_id":"{product}","price":""#
    );
    push_price(&mut s, st.last);
    s.push_str(r#"","volume_24_h":""#);
    push_qty(&mut s, st.volume);
    s.push_str(r#"","low_24_h":""#);
    push_price(&mut s, st.low);
    s.push_str(r#"","high_24_h":""#);
    push_price(&mut s, st.high);
    for (name, level) in [("bid", m.best_bid()), ("ask", m.best_ask())] {
        if let Some((p, q)) = level {
            let _ = write!(s, r#"","best_{name}":""#);
            push_price(&mut s, p);
            let _ = write!(s, r#"","best_{name}_quantity":""#);
            push_qty(&mut s, u128::from(q));
        }
    }
    s.push_str("\"}]}]");
    s
}

fn render_candle(product: &str, c: &crate::simulator::Candle) -> String {
    let mut s = format!(
        r#"[{{"type":"update","candles":[{{"start":"{}","high":""#,
        c.start / 1000
    );
    push_price(&mut s, c.high);
    for (name, p) in [("low", c.low), ("open", c.open), ("close", c.close)] {
        let _ = write!(s, r#"","{name}":""#);
        push_price(&mut s, p);
    }
    s.push_str(r#"","volume":""#);
    push_qty(&mut s, c.volume);
    let _ = write!(s, r#"","product_id":"{product}"}}]}}]"#);
    s
}

impl Shared {
    fn publish(
        &self,
        sym: usize,
        channel: &'static str,
        timestamp: &str,
        events: String,
        update_id: u64,
    ) {
        // An error only means nobody listens right now.
        let _ = self.tx.send(Arc::new(Item {
            sym,
            channel,
            timestamp: timestamp.to_string(),
            events,
            update_id,
        }));
    }

    /// Runs `f` on product `sym`'s market (locked) with the time now, unless paused.
    fn at_market(&self, sym: usize, f: impl FnOnce(&Product, &mut Market, i64, &str)) {
        let p = &self.products[sym];
        let mut m = lock(&p.market);
        // Checked under the lock: once `/_sim/pause` returns, nothing moves.
        if !*self.paused.borrow() {
            let now = now_ms();
            f(p, &mut m, now, &rfc3339(now));
        }
    }

    fn tick_at(&self, sym: usize, p: &Product, m: &mut Market, now: i64, time: &str) {
        let out = m.tick(now);
        let trade = render_trade(&p.id, time, &out.trade);
        {
            let mut recent = lock(&p.recent);
            if recent.len() >= RECENT_TRADES {
                recent.pop_front();
            }
            recent.push_back(trade.clone());
        }
        let trades = format!(r#"[{{"type":"update","trades":[{trade}]}}]"#);
        self.publish(sym, "market_trades", time, trades, 0);
        let diff = &out.diff;
        let bids = diff.bids.iter().map(|(p, q)| (p, q));
        let asks = diff.asks.iter().map(|(p, q)| (p, q));
        let l2 = render_l2("update", &p.id, time, bids, asks);
        self.publish(sym, "l2_data", time, l2, diff.last_update_id);
    }

    fn second_at(&self, sym: usize) {
        self.at_market(sym, |p, m, now, time| {
            self.publish(sym, "ticker", time, render_ticker("update", &p.id, m), 0);
            let five = KLINE_INTERVALS.iter().position(|(n, _)| *n == "5m");
            for up in m.kline_updates(now) {
                if Some(up.candle.interval) == five {
                    self.publish(sym, "candles", time, render_candle(&p.id, &up.candle), 0);
                }
            }
        });
    }
}

impl Ticking for Shared {
    fn pace(&self) -> crate::simulator::runtime::Pace<'_> {
        crate::simulator::runtime::Pace {
            config: &self.config,
            shutdown: &self.shutdown,
            paused: &self.paused,
            backlog: (self.tx.receiver_count(), self.tx.len(), CHANNEL_CAPACITY),
        }
    }
    fn tick(&self, sym: usize, n: usize) {
        for _ in 0..n {
            self.at_market(sym, |p, m, now, time| self.tick_at(sym, p, m, now, time));
        }
    }
    fn second(&self, sym: usize) {
        self.second_at(sym);
    }
}

impl Control for Shared {
    fn drop_all(&self) {
        let mut token = lock(&self.drop_token);
        token.cancel();
        *token = CancellationToken::new();
    }

    /// Every connection skips one `sequence_num` (it numbers the connection, not a book).
    fn gap(&self, _symbol: Option<&str>) -> Option<Response> {
        self.gap_epoch.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn malformed(&self) {
        self.counters.malformed_sent.fetch_add(1, Ordering::Relaxed);
        self.publish(usize::MAX, "", "", GARBAGE.to_string(), 0);
    }

    fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
        // Wait out a tick in progress: when this returns the books are at rest.
        for p in &self.products {
            drop(lock(&p.market));
        }
    }

    /// `{"bids":[[p,q],..],"asks":[..]}`, best first, in Coinbase's number formats.
    fn book(&self, symbol: Option<&str>) -> Response {
        let Some(p) = self.products.iter().find(|p| Some(p.id.as_str()) == symbol) else {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"error": "unknown product"})),
            )
                .into_response();
        };
        let m = lock(&p.market);
        let side = |levels: Vec<(&Price, &Qty)>| -> Value {
            levels
                .into_iter()
                .map(|(p, q)| {
                    let (mut ps, mut qs) = (String::new(), String::new());
                    push_price(&mut ps, *p);
                    push_qty(&mut qs, u128::from(*q));
                    json!([ps, qs])
                })
                .collect()
        };
        Json(json!({
            "bids": side(m.bids.iter().rev().collect()),
            "asks": side(m.asks.iter().collect()),
        }))
        .into_response()
    }

    fn stats(&self) -> Value {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "connections_total": g(&c.connections_total),
            "messages_sent": g(&c.messages_sent),
            "gaps": g(&c.gaps),
            "malformed_sent": g(&c.malformed_sent),
            "dropped_connections": g(&c.dropped_connections),
            "paused": *self.paused.borrow(),
        })
    }
}

async fn ws(upgrade: WebSocketUpgrade, State(shared): State<AppState>) -> Response {
    upgrade
        .max_message_size(1 << 20)
        .on_upgrade(move |socket| connection::run(shared, socket))
}

/// Serve the Coinbase-compatible simulator on `listener` until `shutdown` is cancelled.
pub async fn serve_coinbase(
    listener: tokio::net::TcpListener,
    config: SimConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let now = now_ms();
    let products = config
        .symbols
        .iter()
        .map(|s| Product {
            id: s.clone(),
            market: Mutex::new(Market::new(s, config.seed, now)),
            recent: Mutex::new(VecDeque::new()),
        })
        .collect();
    let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
    let shared: AppState = Arc::new(Shared {
        config,
        products,
        tx,
        paused: watch::channel(false).0,
        gap_epoch: AtomicU64::new(0),
        drop_token: Mutex::new(CancellationToken::new()),
        shutdown: shutdown.clone(),
        counters: Counters::default(),
        tracker: TaskTracker::new(),
    });
    for sym in 0..shared.products.len() {
        shared
            .tracker
            .spawn(runtime::market_task(shared.clone(), sym));
    }
    let s = shared.clone();
    runtime::spawn_drop_fault(
        &shared.tracker,
        &shared.config.faults,
        shutdown.clone(),
        move || s.drop_all(),
    );
    let app = Router::new()
        .route("/", get(ws))
        .with_state(shared.clone())
        .merge(crate::simulator::control::routes(shared.clone()));
    tracing::info!(addr = ?listener.local_addr().ok(), products = shared.products.len(), "coinbase simulator listening");
    runtime::serve_until(listener, app, shutdown, &shared.tracker).await
}

/// The book of product `sym` as a `level2` snapshot `events` array, and its update id.
fn l2_snapshot(shared: &Shared, sym: usize) -> (String, u64, String) {
    let p = &shared.products[sym];
    let m = lock(&p.market);
    let time = rfc3339(now_ms());
    let events = render_l2("snapshot", &p.id, &time, m.bids.iter().rev(), m.asks.iter());
    (events, m.last_update_id, time)
}

/// Current subscriptions as the `subscriptions` message's `events` array.
fn render_subscriptions(subs: &BTreeMap<&'static str, Vec<usize>>, shared: &Shared) -> String {
    let map: serde_json::Map<String, Value> = subs
        .iter()
        .map(|(ch, syms)| {
            let ids: Vec<&str> = syms
                .iter()
                .map(|&i| shared.products[i].id.as_str())
                .collect();
            (ch.to_string(), json!(ids))
        })
        .collect();
    json!([{ "subscriptions": map }]).to_string()
}

#[cfg(test)]
mod tests;
