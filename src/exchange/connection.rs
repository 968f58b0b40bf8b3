//! One exchange socket per feed (or per shard of a large feed, see [`super::run_feed`]):
//! subscribe, heartbeat, stale detection, reconnect with backoff, rotation, book
//! synchronisation and status events. Opening and closing one socket is [`super::socket`].
//!
//! One task owns the socket (no split halves; two sockets for a moment while rotating, both
//! polled in the same `select!`): it reads frames, answers pings, hands book
//! diffs to a [`BookSync`] per symbol and receives REST snapshots from helper tasks over a
//! channel, so a slow snapshot never stops frame reading. No venue rule lives here: the
//! adapter describes its venue (pacing, book sync mode, trade ids), [`super::feed_books`]
//! and [`super::trades`] apply it. Events leave through the bounded
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
//!   marks the feed's health down and takes the socket out of the `exchange_connected`
//!   gauge (a count of subscribed sockets, so shards and several feeds add up), counts
//!   `exchange_reconnect` with a reason label, and puts every live book into `resync`
//!   (a `status` `resync` event per book; a fresh snapshot follows on the new connection).
//! - No frame at all (data or ping — Binance pings every 20 s) for `stale_after_ms`
//!   means a half-open connection: it is dropped and reconnected the same way.
//! - Rotation, make-before-break ([`rotation`]): after `rotate_after_secs` (default 23.5 h,
//!   before Binance's 24 h cut) a second socket to the same URL is opened and subscribed
//!   while the current one is still read and still the only source of events. The new
//!   socket's trades and book messages are held (at most 16 384, more counts as a failure
//!   of the new socket); its tickers and candles are dropped. The feed switches once the
//!   new socket has every subscription acknowledged and continues every live book (a
//!   REST-snapshot book: its first diff starts at or before the next update id the book
//!   needs; a WebSocket-snapshot book: it has sent its own snapshot, emitted at the switch
//!   with the book's numbering going on; an executor tells its bots `resync` before any
//!   snapshot in the middle of a chain) and its trades lose
//!   none (by the venue's trade-id rule). At the switch the held items are replayed
//!   through the books and the trade de-duplication; books not yet live start over. The
//!   old socket is then sent the venue's unsubscribe requests and closed. No status event is emitted;
//!   `exchange_reconnects_total{reason="rotate"}` counts it.
//! - A venue that numbers the messages of a connection (Coinbase `sequence_num`): a gap
//!   ends the connection (`sequence_gap`) and every book it carried resyncs; a
//!   WebSocket-snapshot book that needs a fresh snapshot ends it too (`book_resync`).
//! - If the new socket cannot be opened or fails before the switch, the current one is kept
//!   and rotation is tried again after 1 s, doubling up to 60 s (the exchange's own cut is
//!   then a normal reconnect). If it is open but has not caught up within 10 s (or
//!   `rotate_after`, if shorter), the feed falls back to a plain reconnect at once:
//!   `disconnected`, books `resync`, `reconnecting` (reason `rotate_fallback`).
//! - A venue whose client must speak first (`Heartbeat::ClientSends`) gets its frame every
//!   `every` on the current socket; server pings are answered below, server heartbeat
//!   messages only feed the stale timer.
//! - A venue's shutdown notice (Binance `serverShutdown`) drops the connection on our terms and a new one is
//!   made at once (no backoff delay); books resync as after any reconnect.
//! - Pings are answered by tungstenite (it queues the pong); the pong is flushed right away
//!   so it does not wait for the next read.
//! - `connected` is emitted (socket counted in the gauge, backoff reset) when every
//!   SUBSCRIBE request has been accepted; health goes up, and again when data flows.
//! - A refused SUBSCRIBE emits `error` with the exchange's reason and keeps the feed's
//!   health down with that reason for as long as the connection lasts (the streams that
//!   were accepted still flow); no `connected` is emitted: never a silent green.
//! - Shutdown: the token is checked while connecting, waiting, reading and sending; the
//!   socket is closed with a Close frame (bounded wait) and the feed returns.
//! - A bad URL is fatal for the feed (`error` event, health down); everything else retries
//!   forever.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

mod frames;
mod rotation;

use super::feed_books::FeedBooks;
use super::socket::{OpenOptions, Socket, CONNECT_TIMEOUT};
use super::trades::TradeDedup;
use super::{Adapter, BookSnapshot, Heartbeat, Parsed, Recovery, SnapshotError};
use crate::config::{FeedChannel, FeedConfig};
use crate::event::{Event, Exchange, StatusState};
use crate::health::HealthHandle;
use crate::metrics;
use rotation::{Overlap, Rotation, Step, ROTATE_RETRY_MIN, ROTATE_SWITCH_TIMEOUT};

/// Capacity of the channel bringing snapshots back from the fetch tasks.
const SNAPSHOT_CHANNEL: usize = 64;
/// REST order-book snapshots one feed fetches at once.
const SNAPSHOT_FETCHES_IN_FLIGHT: usize = 4;
/// Longest `Retry-After` honoured as given; longer ones are cut (the feed stays responsive).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Frame buffer capacity kept between frames; a larger one is given back after use.
const KEEP_BUFFER: usize = 256 * 1024;

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
    #[error("rotation: the new connection did not catch up within {0:?}")]
    RotateStalled(Duration),
    #[error("the exchange announced a server shutdown")]
    ServerShutdown,
    #[error("message sequence gap on the connection: expected {expected}, got {got}")]
    SequenceGap { expected: u64, got: u64 },
    #[error("book needs a fresh snapshot: {0}")]
    BookResync(String),
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
            ConnError::RotateStalled(_) => "rotate_fallback",
            ConnError::ServerShutdown => "server_shutdown",
            ConnError::SequenceGap { .. } => "sequence_gap",
            ConnError::BookResync(_) => "book_resync",
        }
    }

    /// Planned reconnects happen at once, without backoff.
    fn planned(&self) -> bool {
        matches!(
            self,
            ConnError::Rotate(_) | ConnError::RotateStalled(_) | ConnError::ServerShutdown
        )
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
    max_message_bytes: usize,
    http: reqwest::Client,
    /// REST snapshots in flight at once for this feed: after a reconnect every book wants
    /// one, and a burst of depth requests (weight 50 each at limit 1000) is how an IP gets
    /// rate-limited.
    fetch_slots: Arc<Semaphore>,
    events: mpsc::Sender<Event>,
    health: HealthHandle,
    shutdown: CancellationToken,
    books: FeedBooks,
    /// Trade ids emitted, by the venue's rule (repeats across a rotation or a batch).
    trades: TradeDedup,
    /// Set while handling a frame when a book needs a fresh snapshot that only a new
    /// subscription gives (WebSocket-snapshot venues): the session ends after the frame.
    need_snapshot: Option<String>,
    invalid_frames: u64,
    /// This feed's socket is counted in the `exchange_connected` gauge.
    counted_connected: std::sync::atomic::AtomicBool,
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

/// When to rotate: `rotate_after_secs`, but never later than 30 minutes before the venue
/// cuts a connection (or at 95 % of so short a lifetime).
fn rotate_after(configured_secs: u64, lifetime: Option<Duration>) -> Duration {
    let configured = Duration::from_secs(configured_secs.max(1));
    match lifetime {
        None => configured,
        Some(life) => {
            let margin = Duration::from_secs(30 * 60).min(life / 20);
            configured.min(life.saturating_sub(margin).max(Duration::from_secs(1)))
        }
    }
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
        FeedBooks::new(
            exchange,
            &feed.symbols,
            adapter.book_sync(),
            adapter.book_checksum(),
        )
    } else {
        FeedBooks::default()
    };
    let trades = TradeDedup::new(adapter.trade_ids());
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
        rotate_after: rotate_after(feed.rotate_after_secs, adapter.max_connection_lifetime()),
        max_message_bytes: feed.max_message_bytes,
        adapter,
        http,
        fetch_slots: Arc::new(Semaphore::new(SNAPSHOT_FETCHES_IN_FLIGHT)),
        events,
        health,
        shutdown,
        books,
        trades,
        need_snapshot: None,
        invalid_frames: 0,
        counted_connected: std::sync::atomic::AtomicBool::new(false),
    };
    let mut backoff = new_backoff(&feed);
    let mut attempt: u32 = 0;
    let mut next: Option<(Duration, String)> = None;
    loop {
        if let Some((delay, why)) = next.take() {
            attempt += 1;
            let detail = format!("attempt {attempt} in {} ms after: {why}", delay.as_millis());
            info!(exchange = %exchange, attempt, delay_ms = delay.as_millis() as u64, cause = %why, "reconnecting");
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
                state.set_connected(false);
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
                    // Said once, by the `reconnecting` line that follows (it carries the cause).
                    debug!(exchange = %exchange, cause = %error, "exchange connect failed");
                }
                let reason = error.to_string();
                state.books.disconnect_all(&reason, &mut out);
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
    state.set_connected(false);
    state.health.down("stopped");
}

impl Feed {
    /// Counts this feed's socket in (or out of) the `exchange_connected` gauge, once.
    fn set_connected(&self, up: bool) {
        // One task owns the feed; the atomic only makes `&self` enough.
        let was = self
            .counted_connected
            .swap(up, std::sync::atomic::Ordering::Relaxed);
        if was != up {
            metrics::exchange_connected(self.exchange, up);
        }
    }

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

    fn open_options(&self) -> OpenOptions {
        OpenOptions {
            pacing: self.adapter.subscribe_pacing(),
            max_message_bytes: self.max_message_bytes,
            stale_after: self.stale_after,
        }
    }

    /// One connection, from connect to loss. Never returns while the socket is healthy;
    /// a rotation (make-before-break) swaps the socket inside the session.
    async fn session(&mut self) -> SessionEnd {
        let lost = |error: ConnError, opened: bool, subscribed: bool| SessionEnd::Lost {
            error,
            opened,
            subscribed,
        };
        if url::Url::parse(&self.ws_url).is_err() {
            return lost(ConnError::Url(self.ws_url.clone()), false, false);
        }
        let requests = self.adapter.subscribe_frames(&self.symbols, &self.channels);
        let mut sock = tokio::select! {
            _ = self.shutdown.cancelled() => return SessionEnd::Shutdown,
            r = Socket::open(self.ws_url.clone(), requests.clone(), self.open_options()) => match r {
                Ok(sock) => sock,
                Err(e) => {
                    let opened = !matches!(e, ConnError::Connect(_) | ConnError::ConnectTimeout(_));
                    return lost(e, opened, false);
                }
            },
        };
        debug!(exchange = %self.exchange, url = %self.ws_url, "exchange socket open");
        // Trade ids of this session's connections; a new session may face a restarted
        // (simulated) exchange whose ids start over.
        self.trades.new_session();
        self.need_snapshot = None;

        let (snap_tx, mut snap_rx) = mpsc::channel::<SnapshotResult>(SNAPSHOT_CHANNEL);
        // Dropped with the session: fetches of a dead connection are aborted.
        let mut fetches = JoinSet::new();
        let mut rotation = Rotation::Idle {
            at: Instant::now() + self.rotate_after,
        };
        let mut rotate_retry = ROTATE_RETRY_MIN;
        let mut flowing = false;
        let mut healthy = false;
        let mut streaming = false;
        let mut refused_shown = false;
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        // Venues that want the client to speak first on a quiet connection.
        let client_ping = match self.adapter.heartbeat() {
            Heartbeat::ClientSends { every, frame } => {
                Some((every.max(Duration::from_millis(10)), frame))
            }
            Heartbeat::ServerPings | Heartbeat::ServerMessages => None,
        };
        let ping_every = client_ping.map_or(Duration::from_secs(3600), |(every, _)| every);
        let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
        let mut out: Vec<Event> = Vec::new();
        if sock.subscribed {
            out.push(self.on_subscribed());
        }
        loop {
            if !self.emit_all(std::mem::take(&mut out)).await {
                sock.close().await;
                return SessionEnd::Shutdown;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    sock.close().await;
                    return SessionEnd::Shutdown;
                }
                Some((symbol, generation, result)) = snap_rx.recv() => {
                    if let Some(book) = self.books.rest(&symbol) {
                        if let Some(req) = book.on_snapshot(generation, result, &mut out) {
                            self.spawn_fetch(&mut fetches, &snap_tx, req);
                        }
                    }
                }
                Some(_) = fetches.join_next(), if !fetches.is_empty() => {}
                msg = sock.ws.next() => {
                    let parsed = match self.receive(&mut sock, msg, &mut buf).await {
                        Ok(p) => p,
                        Err(e) => return lost(e, true, sock.subscribed),
                    };
                    for item in parsed {
                        if let Parsed::ServerShutdown = item {
                            // Emit what this frame produced, then leave on our terms.
                            let _ = self.emit_all(std::mem::take(&mut out)).await;
                            return lost(ConnError::ServerShutdown, true, sock.subscribed);
                        }
                        if matches!(item, Parsed::Event(_) | Parsed::Diff(_) | Parsed::Book { .. }) {
                            flowing = true;
                        }
                        self.handle(item, &mut sock, &mut out, &mut fetches, &snap_tx);
                    }
                    if let Some(why) = self.need_snapshot.take() {
                        let _ = self.emit_all(std::mem::take(&mut out)).await;
                        let subscribed = sock.subscribed;
                        sock.close().await;
                        return lost(ConnError::BookResync(why), true, subscribed);
                    }
                    // Healthy once every subscription is acknowledged: a quiet market is not a
                    // fault (a silent socket is caught by the stale timer). Once per state
                    // change, since the registry takes a lock.
                    if let Some(why) = &sock.refused {
                        if !refused_shown {
                            refused_shown = true;
                            self.health.down(format!("the exchange refused a subscription: {why}"));
                        }
                    } else if sock.subscribed && !healthy {
                        healthy = true;
                        self.health.up(Some(format!("subscribed at {}", self.ws_url)));
                    }
                    if flowing && !streaming && sock.refused.is_none() {
                        streaming = true;
                        self.health.up(Some(format!("streaming from {}", self.ws_url)));
                    }
                }
                step = rotation.step() => {
                    match step {
                        Step::Due => {
                            info!(exchange = %self.exchange, url = %self.ws_url, "rotating the exchange connection: opening the new one");
                            let open = Socket::open(self.ws_url.clone(), requests.clone(), self.open_options());
                            rotation = Rotation::Opening(Box::pin(async move { open.await.map(Box::new) }));
                            continue;
                        }
                        Step::Opened(Ok(new)) => {
                            debug!(exchange = %self.exchange, "rotation: new socket open");
                            rotation = Rotation::Overlap(Box::new(Overlap {
                                sock: *new,
                                deadline: Instant::now() + self.rotate_after.min(ROTATE_SWITCH_TIMEOUT),
                                buffered: VecDeque::new(),
                                first_update: HashMap::new(),
                                ws_snapshots: Default::default(),
                                first_trade: HashMap::new(),
                            }));
                        }
                        Step::Frame(msg) => {
                            let Rotation::Overlap(o) = &mut rotation else { continue };
                            let failed = match self.receive(&mut o.sock, msg, &mut buf).await {
                                Ok(parsed) => self.overlap_frame(o, parsed, &mut out).err(),
                                Err(e) => Some(e.to_string()),
                            };
                            if let Some(why) = failed {
                                rotation = self.rotation_failed(&why, &mut rotate_retry);
                                continue;
                            }
                        }
                        Step::Opened(Err(e)) => {
                            rotation = self.rotation_failed(&e, &mut rotate_retry);
                            continue;
                        }
                        Step::TimedOut => {
                            let timeout = self.rotate_after.min(ROTATE_SWITCH_TIMEOUT);
                            warn!(exchange = %self.exchange, "rotation: the new connection did not catch up in time: reconnecting");
                            let subscribed = sock.subscribed;
                            sock.close().await;
                            return lost(ConnError::RotateStalled(timeout), true, subscribed);
                        }
                    }
                }
                _ = sleep_until(sock.stale_at) => return lost(ConnError::Stale(self.stale_after), true, sock.subscribed),
                _ = ping.tick(), if client_ping.is_some() => {
                    if let Some((_, frame)) = client_ping {
                        if let Err(e) = sock.ws.send(Message::text(frame)).await {
                            return lost(ConnError::Socket(e.to_string()), true, sock.subscribed);
                        }
                    }
                }
            }
            // Switch once the new socket is subscribed and continues every live book.
            if let Rotation::Overlap(o) = &rotation {
                if self.ready_to_switch(o) {
                    let Rotation::Overlap(o) = std::mem::replace(
                        &mut rotation,
                        Rotation::Idle {
                            at: Instant::now() + self.rotate_after,
                        },
                    ) else {
                        unreachable!()
                    };
                    self.switch(&mut sock, *o, &mut out, &mut fetches, &snap_tx);
                    rotate_retry = ROTATE_RETRY_MIN;
                }
            }
        }
    }

    fn on_subscribed(&self) -> Event {
        info!(exchange = %self.exchange, url = %self.ws_url, symbols = self.symbols.len(), "exchange feed subscribed");
        self.set_connected(true);
        Event::status(
            self.exchange,
            StatusState::Connected,
            Some(format!("{} ({} symbols)", self.ws_url, self.symbols.len())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_comes_before_the_venues_cut() {
        let day = Some(Duration::from_secs(24 * 3600));
        assert_eq!(rotate_after(84_600, day), Duration::from_secs(84_600));
        assert_eq!(
            rotate_after(30 * 3600, day),
            Duration::from_secs(84_600),
            "capped"
        );
        assert_eq!(
            rotate_after(30 * 3600, None),
            Duration::from_secs(30 * 3600)
        );
        assert_eq!(
            rotate_after(600, Some(Duration::from_secs(200))),
            Duration::from_secs(190)
        );
        assert_eq!(rotate_after(0, None), Duration::from_secs(1));
    }

    /// Every reason label exists from start (metrics::init), so none may be missing there.
    #[test]
    fn every_reconnect_reason_is_initialised_in_metrics() {
        let d = Duration::from_secs(1);
        for e in [
            ConnError::Url(String::new()),
            ConnError::Connect(String::new()),
            ConnError::ConnectTimeout(d),
            ConnError::Socket(String::new()),
            ConnError::Closed(String::new()),
            ConnError::Stale(d),
            ConnError::Rotate(d),
            ConnError::RotateStalled(d),
            ConnError::ServerShutdown,
            ConnError::SequenceGap {
                expected: 1,
                got: 2,
            },
            ConnError::BookResync(String::new()),
        ] {
            assert!(
                metrics::EXCHANGE_RECONNECT_REASONS.contains(&e.reason()),
                "{} missing from metrics::EXCHANGE_RECONNECT_REASONS",
                e.reason()
            );
        }
    }
}
