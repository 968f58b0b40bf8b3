//! One exchange socket per feed: connect, subscribe, heartbeat, stale detection,
//! reconnect with backoff, rotation, book synchronisation and status events.
//!
//! One task owns the socket (no split halves): it reads frames, answers pings, hands book
//! diffs to a [`BookSync`] per symbol and receives REST snapshots from helper tasks over a
//! channel, so a slow snapshot never stops frame reading. Events leave through the bounded
//! `events` channel with `send().await`: when the consumer is slow the socket is simply
//! read more slowly (backpressure), nothing is buffered without bound.
//!
//! Reconnect behaviour:
//! - Connecting times out after 10 s; a failed connect counts as a failed attempt.
//! - Before every new attempt a `status` `reconnecting` event is emitted with the attempt
//!   number, the delay and the last error; the delay comes from `backon`'s
//!   `ExponentialBuilder` (from `reconnect_min_ms`, factor 2, with jitter, capped at
//!   `reconnect_max_ms`). The sequence restarts from the minimum once a connection got as
//!   far as having all its subscriptions acknowledged.
//! - A lost socket (error, close frame, end of stream) emits `disconnected` with the reason,
//!   marks the feed's health down and the `exchange_connected` gauge 0, counts
//!   `exchange_reconnect` with a reason label, and puts every live book into `resync`
//!   (a `status` `resync` event per book; a fresh snapshot follows on the new connection).
//! - No frame at all (data or ping — Binance pings every 20 s) for `stale_after_ms`
//!   means a half-open connection: it is dropped and reconnected the same way.
//! - Rotation: after `rotate_after_secs` (default 23.5 h, before Binance's 24 h cut) and on
//!   Binance's `serverShutdown` notice the connection is dropped on our terms and a new one
//!   is made at once (no backoff delay); books resync as after any reconnect.
//! - Pings are answered by tungstenite (it queues the pong); the pong is flushed right away
//!   so it does not wait for the next read.
//! - `connected` is emitted (gauge 1, backoff reset) when every SUBSCRIBE request has been
//!   answered; health goes up when data then flows. A refused subscription emits `error`.
//! - Shutdown: the token is checked while connecting, waiting, reading and sending; the
//!   socket is closed with a Close frame (bounded wait) and the feed returns.
//! - A bad URL is fatal for the feed (`error` event, health down); everything else retries
//!   forever.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Adapter, BookSnapshot, BookSync, Parsed, Recovery, SnapshotError, SnapshotRequest};
use crate::config::{FeedChannel, FeedConfig};
use crate::event::{now_micros, Event, Exchange, StatusState};
use crate::health::HealthHandle;
use crate::metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Gap between SUBSCRIBE requests: Binance allows 5 incoming messages per second.
const SUBSCRIBE_PACING: Duration = Duration::from_millis(250);
/// Capacity of the channel bringing snapshots back from the fetch tasks.
const SNAPSHOT_CHANNEL: usize = 64;
/// REST order-book snapshots one feed fetches at once.
const SNAPSHOT_FETCHES_IN_FLIGHT: usize = 4;
/// Longest `Retry-After` honoured as given; longer ones are cut (the feed stays responsive).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);

/// Why a connection ended (other than shutdown).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("bad url `{0}`")]
    Url(String),
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("socket error: {0}")]
    Socket(String),
    #[error("closed by the exchange: {0}")]
    Closed(String),
    #[error("no frame for {0:?}: connection presumed dead")]
    Stale(Duration),
    #[error("rotating the connection after {0:?}")]
    Rotate(Duration),
    #[error("the exchange announced a server shutdown")]
    ServerShutdown,
}

impl ConnError {
    pub fn recovery(&self) -> Recovery {
        match self {
            ConnError::Url(_) => Recovery::Fatal,
            _ => Recovery::Reconnect,
        }
    }

    /// Label for `mdbridge_exchange_reconnects_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            ConnError::Url(_) => "bad_url",
            ConnError::Connect(_) | ConnError::ConnectTimeout(_) => "connect_failed",
            ConnError::Socket(_) => "socket_error",
            ConnError::Closed(_) => "closed",
            ConnError::Stale(_) => "stale",
            ConnError::Rotate(_) => "rotate",
            ConnError::ServerShutdown => "server_shutdown",
        }
    }

    /// Planned reconnects happen at once, without backoff.
    fn planned(&self) -> bool {
        matches!(self, ConnError::Rotate(_) | ConnError::ServerShutdown)
    }
}

enum SessionEnd {
    Shutdown,
    Lost {
        error: ConnError,
        /// The socket was open (so `disconnected` is news).
        opened: bool,
        /// Every subscription was answered (so the backoff starts over).
        subscribed: bool,
    },
}

type SnapshotResult = (String, u64, Result<BookSnapshot, SnapshotError>);

struct Feed {
    adapter: Arc<dyn Adapter>,
    exchange: Exchange,
    symbols: Vec<String>,
    channels: Vec<FeedChannel>,
    ws_url: String,
    rest_url: String,
    depth_limit: u32,
    stale_after: Duration,
    rotate_after: Duration,
    http: reqwest::Client,
    /// REST snapshots in flight at once for this feed: after a reconnect every book wants
    /// one, and a burst of depth requests (weight 50 each at limit 1000) is how an IP gets
    /// rate-limited.
    fetch_slots: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    health: HealthHandle,
    shutdown: CancellationToken,
    books: HashMap<String, BookSync>,
    invalid_frames: u64,
}

fn new_backoff(feed: &FeedConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(feed.reconnect_min_ms.max(1)))
        .with_max_delay(Duration::from_millis(
            feed.reconnect_max_ms.max(feed.reconnect_min_ms).max(1),
        ))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs the feed's socket until `shutdown` (see the module doc for the behaviour).
pub async fn run(
    adapter: Arc<dyn Adapter>,
    feed: FeedConfig,
    events: mpsc::Sender<Event>,
    health: HealthHandle,
    shutdown: CancellationToken,
) {
    // rustls needs a process-wide crypto provider for wss:// and https://; idempotent.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let exchange = adapter.exchange();
    let books = if feed.channels.contains(&FeedChannel::Book) {
        feed.symbols
            .iter()
            .map(|s| (s.clone(), BookSync::new(exchange, s.clone())))
            .collect()
    } else {
        HashMap::new()
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(CONNECT_TIMEOUT)
        .build()
        .unwrap_or_default();
    let max_delay = Duration::from_millis(feed.reconnect_max_ms.max(feed.reconnect_min_ms).max(1));
    let mut state = Feed {
        exchange,
        ws_url: feed
            .url
            .clone()
            .unwrap_or_else(|| adapter.default_ws_url().to_string()),
        rest_url: feed
            .rest_url
            .clone()
            .unwrap_or_else(|| adapter.default_rest_url().to_string()),
        symbols: feed.symbols.clone(),
        channels: feed.channels.clone(),
        depth_limit: feed.depth_limit,
        stale_after: Duration::from_millis(feed.stale_after_ms.max(1)),
        rotate_after: Duration::from_secs(feed.rotate_after_secs.max(1)),
        adapter,
        http,
        fetch_slots: Arc::new(Semaphore::new(SNAPSHOT_FETCHES_IN_FLIGHT)),
        events,
        health,
        shutdown,
        books,
        invalid_frames: 0,
    };
    let mut backoff = new_backoff(&feed);
    let mut attempt: u32 = 0;
    let mut next: Option<(Duration, String)> = None;
    loop {
        if let Some((delay, why)) = next.take() {
            attempt += 1;
            let detail = format!("attempt {attempt} in {} ms after: {why}", delay.as_millis());
            info!(exchange = %exchange, attempt, delay_ms = delay.as_millis() as u64, "reconnecting");
            if !state
                .emit(Event::status(
                    exchange,
                    StatusState::Reconnecting,
                    Some(detail),
                ))
                .await
            {
                break;
            }
            tokio::select! {
                _ = state.shutdown.cancelled() => break,
                _ = sleep(delay) => {}
            }
        }
        match state.session().await {
            SessionEnd::Shutdown => break,
            SessionEnd::Lost {
                error,
                opened,
                subscribed,
            } => {
                metrics::exchange_connected(exchange, false);
                metrics::exchange_reconnect(exchange, error.reason());
                state.health.down(format!("disconnected: {error}"));
                let mut out = Vec::new();
                if opened {
                    if error.planned() {
                        info!(exchange = %exchange, cause = %error, "exchange connection closed");
                    } else {
                        warn!(exchange = %exchange, cause = %error, "exchange connection lost");
                    }
                    out.push(Event::status(
                        exchange,
                        StatusState::Disconnected,
                        Some(error.to_string()),
                    ));
                } else {
                    debug!(exchange = %exchange, cause = %error, "exchange connect failed");
                }
                let reason = error.to_string();
                for book in state.books.values_mut() {
                    book.on_disconnect(&reason, &mut out);
                }
                if !state.emit_all(out).await {
                    break;
                }
                if error.recovery() == Recovery::Fatal {
                    error!(exchange = %exchange, cause = %error, "feed stopped");
                    let _ = state
                        .emit(Event::status(
                            exchange,
                            StatusState::Error,
                            Some(error.to_string()),
                        ))
                        .await;
                    return;
                }
                if subscribed {
                    backoff = new_backoff(&feed);
                    attempt = 0;
                }
                let delay = if error.planned() {
                    Duration::ZERO
                } else {
                    backoff.next().unwrap_or(max_delay).min(max_delay)
                };
                next = Some((delay, reason));
            }
        }
    }
    metrics::exchange_connected(exchange, false);
    state.health.down("stopped");
}

impl Feed {
    /// Sends one event, giving up on shutdown or when the receiver is gone.
    async fn emit(&self, event: Event) -> bool {
        metrics::exchange_event(self.exchange, event.kind());
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            r = self.events.send(event) => r.is_ok(),
        }
    }

    async fn emit_all(&self, events: Vec<Event>) -> bool {
        for e in events {
            if !self.emit(e).await {
                return false;
            }
        }
        true
    }

    fn spawn_fetch(
        &self,
        fetches: &mut JoinSet<()>,
        tx: &mpsc::Sender<SnapshotResult>,
        req: SnapshotRequest,
    ) {
        let fetch =
            self.adapter
                .fetch_snapshot(&self.http, &self.rest_url, &req.symbol, self.depth_limit);
        let tx = tx.clone();
        let slots = self.fetch_slots.clone();
        debug!(exchange = %self.exchange, symbol = %req.symbol, delay_ms = req.delay.as_millis() as u64, "fetching book snapshot");
        fetches.spawn(async move {
            if !req.delay.is_zero() {
                sleep(req.delay).await;
            }
            // Closed only if the feed is gone, and then nobody waits for the answer.
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            let result = fetch.await;
            if let Some(wait) = result.as_ref().err().and_then(SnapshotError::retry_after) {
                // Keep the slot while the exchange asked us to stay away, so the feed's
                // other fetches slow down with this one.
                warn!(
                    wait_ms = wait.as_millis() as u64,
                    "exchange asked to retry the snapshot later"
                );
                sleep(wait.min(MAX_RETRY_AFTER)).await;
            }
            let _ = tx.send((req.symbol, req.generation, result)).await;
        });
    }

    fn invalid_frame(&mut self, cause: &dyn std::fmt::Display, frame: &[u8]) {
        metrics::exchange_frame_invalid(self.exchange);
        self.invalid_frames += 1;
        // First one and every 1000th: a broken feed must not flood the log.
        if self.invalid_frames == 1 || self.invalid_frames % 1000 == 0 {
            let shown = String::from_utf8_lossy(&frame[..frame.len().min(200)]);
            warn!(exchange = %self.exchange, %cause, frame = %shown, count = self.invalid_frames, "invalid exchange frame skipped");
        }
    }

    /// One connection, from connect to loss. Never returns while the socket is healthy.
    async fn session(&mut self) -> SessionEnd {
        let lost = |error: ConnError, opened: bool, subscribed: bool| SessionEnd::Lost {
            error,
            opened,
            subscribed,
        };
        if url::Url::parse(&self.ws_url).is_err() {
            return lost(ConnError::Url(self.ws_url.clone()), false, false);
        }
        let connect = timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async(self.ws_url.as_str()),
        );
        let mut ws = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            r = connect => match r {
                Err(_) => return lost(ConnError::ConnectTimeout(CONNECT_TIMEOUT), false, false),
                Ok(Err(e)) => return lost(ConnError::Connect(e.to_string()), false, false),
                Ok(Ok((ws, _response))) => ws,
            },
        };
        debug!(exchange = %self.exchange, url = %self.ws_url, "exchange socket open");

        let requests = self.adapter.subscribe_frames(&self.symbols, &self.channels);
        let mut pending_acks: HashSet<u64> = requests.iter().map(|(id, _)| *id).collect();
        for (i, (_, text)) in requests.into_iter().enumerate() {
            if i > 0 {
                sleep(SUBSCRIBE_PACING).await;
            }
            if let Err(e) = ws.send(Message::text(text)).await {
                return lost(ConnError::Socket(e.to_string()), true, false);
            }
        }

        let (snap_tx, mut snap_rx) = mpsc::channel::<SnapshotResult>(SNAPSHOT_CHANNEL);
        // Dropped with the session: fetches of a dead connection are aborted.
        let mut fetches = JoinSet::new();
        let rotate_at = Instant::now() + self.rotate_after;
        let mut stale_at = Instant::now() + self.stale_after;
        let mut subscribed = false;
        let mut flowing = false;
        let mut healthy = false;
        let mut streaming = false;
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut out: Vec<Event> = Vec::new();
        if pending_acks.is_empty() {
            subscribed = true;
            out.push(self.on_subscribed());
        }
        loop {
            if !self.emit_all(std::mem::take(&mut out)).await {
                let _ = timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                return SessionEnd::Shutdown;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    let _ = timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                    return SessionEnd::Shutdown;
                }
                Some((symbol, generation, result)) = snap_rx.recv() => {
                    if let Some(book) = self.books.get_mut(&symbol) {
                        if let Some(req) = book.on_snapshot(generation, result, &mut out) {
                            self.spawn_fetch(&mut fetches, &snap_tx, req);
                        }
                    }
                }
                Some(_) = fetches.join_next(), if !fetches.is_empty() => {}
                msg = ws.next() => {
                    let ts_recv = now_micros();
                    stale_at = Instant::now() + self.stale_after;
                    let bytes: &[u8] = match &msg {
                        None => return lost(ConnError::Closed("end of stream".into()), true, subscribed),
                        Some(Err(e)) => return lost(ConnError::Socket(e.to_string()), true, subscribed),
                        Some(Ok(Message::Close(frame))) => {
                            let why = frame.as_ref().map_or_else(
                                || "close frame without reason".to_string(),
                                |f| format!("code {} {}", u16::from(f.code), f.reason),
                            );
                            return lost(ConnError::Closed(why), true, subscribed);
                        }
                        Some(Ok(Message::Ping(_))) => {
                            // tungstenite queued the pong; write it now, not at the next read.
                            if let Err(e) = ws.flush().await {
                                return lost(ConnError::Socket(e.to_string()), true, subscribed);
                            }
                            continue;
                        }
                        Some(Ok(Message::Pong(_) | Message::Frame(_))) => continue,
                        Some(Ok(Message::Text(t))) => t.as_bytes(),
                        Some(Ok(Message::Binary(b))) => b,
                    };
                    buf.clear();
                    buf.extend_from_slice(bytes);
                    let parsed = match self.adapter.parse(&mut buf, ts_recv) {
                        Ok(p) => p,
                        Err(e) => {
                            // Recovery::Skip for every parse error: count, log, carry on.
                            self.invalid_frame(&e, bytes);
                            continue;
                        }
                    };
                    for item in parsed {
                        match item {
                            Parsed::Event(e) => {
                                out.push(e);
                                flowing = true;
                            }
                            Parsed::Diff(d) => {
                                flowing = true;
                                match self.books.get_mut(&d.symbol) {
                                    Some(book) => {
                                        if let Some(req) = book.on_diff(d, &mut out) {
                                            self.spawn_fetch(&mut fetches, &snap_tx, req);
                                        }
                                    }
                                    None => {
                                        let why = format!("book diff for unsubscribed symbol {}", d.symbol);
                                        self.invalid_frame(&why, bytes);
                                    }
                                }
                            }
                            Parsed::Ack { id } | Parsed::Refused { id, .. } if !subscribed => {
                                if let Parsed::Refused { detail, .. } = &item {
                                    error!(exchange = %self.exchange, %detail, "subscription refused");
                                    out.push(Event::status(self.exchange, StatusState::Error, Some(detail.clone())));
                                }
                                match id {
                                    Some(id) => {
                                        pending_acks.remove(&id);
                                    }
                                    // An answer that names no request (Binance's older error
                                    // shape) cannot be matched: count every request answered
                                    // rather than wait forever for acks.
                                    None => pending_acks.clear(),
                                }
                                if pending_acks.is_empty() {
                                    subscribed = true;
                                    out.push(self.on_subscribed());
                                }
                            }
                            Parsed::Ack { .. } => {}
                            Parsed::Refused { detail, .. } => {
                                error!(exchange = %self.exchange, %detail, "request refused");
                                out.push(Event::status(self.exchange, StatusState::Error, Some(detail)));
                            }
                            Parsed::ServerShutdown => {
                                // Emit what this frame produced, then leave on our terms.
                                let _ = self.emit_all(std::mem::take(&mut out)).await;
                                return lost(ConnError::ServerShutdown, true, subscribed);
                            }
                        }
                    }
                    // Healthy once every subscription is acknowledged: a quiet market is not a
                    // fault (a silent socket is caught by the stale timer). Once per state
                    // change, since the registry takes a lock.
                    if subscribed && !healthy {
                        healthy = true;
                        self.health.up(Some(format!("subscribed at {}", self.ws_url)));
                    }
                    if flowing && !streaming {
                        streaming = true;
                        self.health.up(Some(format!("streaming from {}", self.ws_url)));
                    }
                }
                _ = sleep_until(stale_at) => return lost(ConnError::Stale(self.stale_after), true, subscribed),
                _ = sleep_until(rotate_at) => return lost(ConnError::Rotate(self.rotate_after), true, subscribed),
            }
        }
    }

    fn on_subscribed(&self) -> Event {
        info!(exchange = %self.exchange, url = %self.ws_url, symbols = self.symbols.len(), "exchange feed subscribed");
        metrics::exchange_connected(self.exchange, true);
        Event::status(
            self.exchange,
            StatusState::Connected,
            Some(format!("{} ({} symbols)", self.ws_url, self.symbols.len())),
        )
    }
}
