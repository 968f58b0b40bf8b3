//! The live status page of the admin listener (`/`), and the data behind it.
//!
//! - `GET /` — one self-contained HTML page (no CDN, no build step: the file is compiled
//!   into the binary) that renders what the stream below sends.
//! - `GET /api/status` — one [`StatusSnapshot`] as JSON.
//! - `GET /api/status/stream` — Server-Sent Events, one snapshot per second. The admin
//!   listener closes every connection after `header_timeout_ms + request_timeout_ms`
//!   (a slow reader must not hold a connection), so a stream ends itself a second before
//!   that and tells the browser to reconnect after 250 ms (`retry:`): the page does so
//!   without a visible gap.
//!
//! A snapshot is read from the same sources as `/health` and `/metrics`: the health
//! registry and the Prometheus handle (counters are parsed from its rendering, so the page
//! can never disagree with what Prometheus scrapes), plus a Redis `PING` round trip for
//! roles that use Redis, and the durable streams as the stream monitor last read them
//! (`metrics::streams`). Totals are sent as they are; the page turns two successive
//! snapshots into rates. This module only reads; it never reaches into the roles.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde::Serialize;

use crate::bus::redis::target::MasterWatch;
use crate::bus::redis::Target;
use crate::health::ComponentHealth;
use crate::http::AdminState;
use crate::metrics::streams::StreamFigures;

const PAGE: &str = include_str!("page.html");
/// One snapshot per this on the stream.
const STREAM_EVERY: Duration = Duration::from_secs(1);
/// A stream ends this long before the admin listener would cut its connection.
const RECONNECT_MARGIN: Duration = Duration::from_secs(1);
/// The browser reconnects this soon after a stream ended (SSE `retry:`).
const RECONNECT_AFTER: Duration = Duration::from_millis(250);
/// A Redis round trip slower than this is reported as missing.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

/// The page's routes, to merge into the admin router.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(snapshot))
        .route("/api/status/stream", get(stream_snapshots))
}

/// Everything the page shows, at one instant.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusSnapshot {
    pub instance: String,
    pub role: &'static str,
    /// µs since the epoch, when this snapshot was taken.
    pub at: u64,
    /// Every health component (feeds, Redis connections, bot server) as `/health` has it.
    pub components: BTreeMap<String, ComponentHealth>,
    /// `mdbridge_exchange_events_total` per (exchange, type).
    pub events: Vec<EventCount>,
    pub redis: RedisStatus,
    pub bots: BotStatus,
    pub bus: BusStatus,
    /// Durable streams as the stream monitor last read them (at most [`MAX_STREAMS_SHOWN`]).
    pub streams: Vec<StreamFigures>,
}

/// Streams a snapshot carries at most (one is sent every second).
pub const MAX_STREAMS_SHOWN: usize = 100;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventCount {
    pub exchange: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct RedisStatus {
    /// False for roles without Redis (demo).
    pub used: bool,
    /// Round trip of one `PING`, when it answered.
    pub rtt_us: Option<u64>,
    /// `mdbridge_redis_connected` per role (`publish`, `subscribe`).
    pub connected: BTreeMap<String, bool>,
    pub reconnects: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct BotStatus {
    pub clients: u64,
    pub subscriptions: u64,
    pub frames_sent: u64,
    pub frames_dropped: u64,
    pub slow_disconnects: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct BusStatus {
    pub published: u64,
    pub received: u64,
    pub lost: u64,
    /// `mdbridge_book_resyncs_total` per exchange.
    pub resyncs: BTreeMap<String, u64>,
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(PAGE),
    )
        .into_response()
}

async fn snapshot(State(state): State<AdminState>) -> Json<StatusSnapshot> {
    let mut redis = RedisProbe::default();
    Json(take(&state, &mut redis).await)
}

async fn stream_snapshots(
    State(state): State<AdminState>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let lifetime = state.limits.header_timeout + state.limits.request_timeout;
    let ends = Instant::now() + lifetime.saturating_sub(RECONNECT_MARGIN).max(STREAM_EVERY);
    let events = stream::unfold(
        (state, RedisProbe::default(), true),
        move |(state, mut redis, first)| async move {
            if !first {
                if Instant::now() + STREAM_EVERY > ends {
                    return None;
                }
                tokio::time::sleep(STREAM_EVERY).await;
            }
            let snap = take(&state, &mut redis).await;
            let event = SseEvent::default()
                .json_data(&snap)
                .unwrap_or_else(|_| SseEvent::default().data("{}"))
                .retry(RECONNECT_AFTER);
            Some((Ok(event), (state, redis, false)))
        },
    );
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// A Redis connection kept for the life of one stream, so each tick times a `PING`, not a
/// connection set-up. With Sentinel it follows the master the sentinels name.
#[derive(Default)]
struct RedisProbe {
    conn: Option<(redis::aio::MultiplexedConnection, MasterWatch)>,
}

impl RedisProbe {
    async fn rtt(&mut self, target: &Target) -> Option<u64> {
        if self.conn.as_ref().is_some_and(|(_, w)| w.has_moved()) {
            self.conn = None;
        }
        let attempt = async {
            if self.conn.is_none() {
                let (conn, resolved) = target.connect().await.ok()?;
                let watch = target.watch(&resolved);
                self.conn = Some((conn, watch));
            }
            let (conn, _) = self.conn.as_mut()?;
            let started = Instant::now();
            redis::cmd("PING")
                .query_async::<String>(conn)
                .await
                .ok()
                .map(|_| started.elapsed().as_micros() as u64)
        };
        let rtt = tokio::time::timeout(PING_TIMEOUT, attempt)
            .await
            .ok()
            .flatten();
        if rtt.is_none() {
            self.conn = None;
        }
        rtt
    }
}

async fn take(state: &AdminState, probe: &mut RedisProbe) -> StatusSnapshot {
    let rtt_us = match &state.redis {
        Some(target) => probe.rtt(target).await,
        None => None,
    };
    let mut snap = from_metrics(&crate::metrics::render(&state.metrics));
    snap.instance = state.instance.clone();
    snap.role = state.role;
    snap.components = state.health.report();
    snap.redis.used = state.redis.is_some();
    snap.redis.rtt_us = rtt_us;
    snap.streams = crate::metrics::streams::current()
        .iter()
        .take(MAX_STREAMS_SHOWN)
        .cloned()
        .collect();
    snap
}

/// The counters and gauges the page shows, read from a Prometheus text rendering.
pub fn from_metrics(text: &str) -> StatusSnapshot {
    let mut snap = StatusSnapshot {
        instance: String::new(),
        role: "",
        at: crate::event::now_micros(),
        components: BTreeMap::new(),
        events: Vec::new(),
        redis: RedisStatus::default(),
        bots: BotStatus::default(),
        bus: BusStatus::default(),
        streams: Vec::new(),
    };
    for sample in text.lines().filter_map(Sample::parse) {
        let v = sample.value.max(0.0) as u64;
        match sample.name {
            "mdbridge_exchange_events_total" => snap.events.push(EventCount {
                exchange: sample.label("exchange").to_string(),
                kind: sample.label("type").to_string(),
                total: v,
            }),
            "mdbridge_redis_connected" => {
                snap.redis
                    .connected
                    .insert(sample.label("role").to_string(), v > 0);
            }
            "mdbridge_redis_reconnects_total" => snap.redis.reconnects += v,
            "mdbridge_bot_clients" => snap.bots.clients = v,
            "mdbridge_bot_subscriptions" => snap.bots.subscriptions = v,
            "mdbridge_bot_frames_sent_total" => snap.bots.frames_sent += v,
            "mdbridge_bot_frames_dropped_total" => snap.bots.frames_dropped += v,
            "mdbridge_bot_disconnects_total" if sample.label("reason") == "slow" => {
                snap.bots.slow_disconnects += v
            }
            "mdbridge_envelopes_published_total" => snap.bus.published += v,
            "mdbridge_envelopes_received_total" => snap.bus.received += v,
            "mdbridge_envelopes_lost_total" => snap.bus.lost += v,
            "mdbridge_book_resyncs_total" => {
                *snap
                    .bus
                    .resyncs
                    .entry(sample.label("exchange").to_string())
                    .or_default() += v
            }
            _ => {}
        }
    }
    snap
}

/// One line of the Prometheus text format: `name{k="v",...} value`.
struct Sample<'a> {
    name: &'a str,
    labels: &'a str,
    value: f64,
}

impl<'a> Sample<'a> {
    fn parse(line: &'a str) -> Option<Sample<'a>> {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let value = value.parse().ok()?;
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    /// The value of label `key`, or "" (the exporter never puts `",` inside our values).
    fn label(&self, key: &str) -> &'a str {
        self.labels
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim_matches('"'))
            .unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_series_the_page_shows() {
        let text = "\
# TYPE mdbridge_exchange_events_total counter
mdbridge_exchange_events_total{exchange=\"binance\",type=\"trade\"} 120
mdbridge_exchange_events_total{exchange=\"binance\",type=\"book\"} 7
mdbridge_redis_connected{role=\"publish\"} 1
mdbridge_redis_connected{role=\"subscribe\"} 0
mdbridge_bot_clients 3
mdbridge_bot_frames_dropped_total{reason=\"queue_full\"} 5
mdbridge_bot_frames_dropped_total{reason=\"other\"} 1
mdbridge_bot_disconnects_total{reason=\"slow\"} 2
mdbridge_bot_disconnects_total{reason=\"closed\"} 9
mdbridge_book_resyncs_total{exchange=\"binance\",side=\"bus\"} 4
mdbridge_book_resyncs_total{exchange=\"binance\",side=\"exchange\"} 1
mdbridge_delivery_latency_seconds_bucket{le=\"0.001\"} 10
";
        let s = from_metrics(text);
        assert_eq!(
            s.events,
            vec![
                EventCount {
                    exchange: "binance".into(),
                    kind: "trade".into(),
                    total: 120
                },
                EventCount {
                    exchange: "binance".into(),
                    kind: "book".into(),
                    total: 7
                },
            ]
        );
        assert_eq!(s.redis.connected.get("publish"), Some(&true));
        assert_eq!(s.redis.connected.get("subscribe"), Some(&false));
        assert_eq!(s.bots.clients, 3);
        assert_eq!(s.bots.frames_dropped, 6);
        assert_eq!(s.bots.slow_disconnects, 2);
        assert_eq!(s.bus.resyncs.get("binance"), Some(&5));
    }
}
