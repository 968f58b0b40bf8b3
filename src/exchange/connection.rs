//! One exchange socket per feed (or per shard of a large feed, see [`super::run_feed`]):
//! subscribe, heartbeat, stale detection, reconnect with backoff, rotation, book
//! synchronisation and status events. Opening and closing one socket is [`super::socket`].
//!
//! One task owns the socket (no split halves; two sockets for a moment while rotating, both
//! polled in the same `select!`): it reads frames, answers pings, hands book
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
//!   marks the feed's health down and takes the socket out of the `exchange_connected`
//!   gauge (a count of subscribed sockets, so shards and several feeds add up), counts
//!   `exchange_reconnect` with a reason label, and puts every live book into `resync`
//!   (a `status` `resync` event per book; a fresh snapshot follows on the new connection).
//! - No frame at all (data or ping — Binance pings every 20 s) for `stale_after_ms`
//!   means a half-open connection: it is dropped and reconnected the same way.
//! - Rotation, make-before-break: after `rotate_after_secs` (default 23.5 h, before
//!   Binance's 24 h cut) a second socket to the same URL is opened and subscribed while the
//!   current one is still read and still the only source of events. The new socket's trades
//!   and diffs are held (at most 16 384, more counts as a failure of the new socket); its
//!   tickers and candles are dropped. The feed switches once the new socket has every
//!   subscription acknowledged and, for every live book, its first diff starts at or
//!   before the next update id the book needs (`U <= last + 1`;
//!   update ids are global per symbol), and its first trade of a symbol is not past the
//!   next trade id. At the switch the held items are replayed: diffs through the books'
//!   `BookSync` (covered ones are ignored, the first new one may straddle), trades only if
//!   their id is above the last one emitted for the symbol (also checked afterwards); books
//!   not yet live start their sync over on the new socket. The old socket is then closed.
//!   No status event is emitted; `exchange_reconnects_total{reason="rotate"}` counts it.
//! - If the new socket cannot be opened or fails before the switch, the current one is kept
//!   and rotation is tried again after 1 s, doubling up to 60 s (the exchange's own cut is
//!   then a normal reconnect). If it is open but has not caught up within 10 s (or
//!   `rotate_after`, if shorter), the feed falls back to a plain reconnect at once:
//!   `disconnected`, books `resync`, `reconnecting` (reason `rotate_fallback`).
//! - Binance's `serverShutdown` notice drops the connection on our terms and a new one is
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
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::feed_books::{FeedBook, FeedBooks};
use super::socket::{OpenOptions, Socket, CONNECT_TIMEOUT};
use super::trades::TradeDedup;
use super::ws_book::Outcome;
use super::{Adapter, BookSnapshot, Parsed, Recovery, SnapshotError, SnapshotRequest};
use crate::config::{FeedChannel, FeedConfig};
use crate::event::{now_micros, Event, Exchange, StatusState};
use crate::health::HealthHandle;
use crate::metrics;

/// Capacity of the channel bringing snapshots back from the fetch tasks.
const SNAPSHOT_CHANNEL: usize = 64;
/// REST order-book snapshots one feed fetches at once.
const SNAPSHOT_FETCHES_IN_FLIGHT: usize = 4;
/// Longest `Retry-After` honoured as given; longer ones are cut (the feed stays responsive).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// Rotation: how long the new connection may take, once open, to be subscribed and to
/// continue every live book (or `rotate_after`, if shorter) before the feed falls back to
/// a plain reconnect.
const ROTATE_SWITCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Rotation: first and longest delay before trying again after the new connection failed.
const ROTATE_RETRY_MIN: Duration = Duration::from_secs(1);
const ROTATE_RETRY_MAX: Duration = Duration::from_secs(60);
/// Rotation: trades and diffs of the new connection held until the switch.
const ROTATE_BUFFER: usize = 16 * 1024;
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

type Opening = Pin<Box<dyn Future<Output = Result<Box<Socket>, ConnError>> + Send>>;

/// Where the make-before-break rotation of a session stands.
enum Rotation {
    /// Rotate at `at`.
    Idle { at: Instant },
    /// The new socket is connecting and subscribing (the current one is still read).
    Opening(Opening),
    /// Both sockets are read; events still come from the current one.
    Overlap(Box<Overlap>),
}

struct Overlap {
    sock: Socket,
    /// Give up (plain reconnect) if not switched by then.
    deadline: Instant,
    /// Trades and diffs of the new socket, replayed (deduplicated) at the switch.
    buffered: VecDeque<Parsed>,
    /// Per symbol, `U` of the new socket's first diff.
    first_update: HashMap<String, u64>,
    /// Symbols whose WebSocket book snapshot the new socket has sent.
    ws_snapshots: std::collections::HashSet<String>,
    /// Per symbol, the id of the new socket's first trade.
    first_trade: HashMap<String, String>,
}

enum Step {
    Due,
    Opened(Result<Box<Socket>, ConnError>),
    Frame(Option<Result<Message, WsError>>),
    TimedOut,
}

impl Rotation {
    /// Waits for the next thing the rotation has to act on.
    async fn step(&mut self) -> Step {
        match self {
            Rotation::Idle { at } => {
                sleep_until(*at).await;
                Step::Due
            }
            Rotation::Opening(open) => Step::Opened(open.as_mut().await),
            Rotation::Overlap(o) => tokio::select! {
                msg = o.sock.ws.next() => Step::Frame(msg),
                _ = sleep_until(o.deadline) => Step::TimedOut,
            },
        }
    }
}

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
        FeedBooks::new(exchange, &feed.symbols, adapter.book_sync())
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
        rotate_after: Duration::from_secs(feed.rotate_after_secs.max(1)),
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
                        if matches!(item, Parsed::Event(_) | Parsed::Diff(_) | Parsed::Book(_)) {
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

    /// Makes `new` the socket of the session (see the module doc): books continue on it,
    /// its held trades and diffs are replayed without repeats, the old socket is closed.
    fn switch(
        &mut self,
        sock: &mut Socket,
        new: Overlap,
        out: &mut Vec<Event>,
        fetches: &mut JoinSet<()>,
        snap_tx: &mpsc::Sender<SnapshotResult>,
    ) {
        let old = std::mem::replace(sock, new.sock);
        // Closed aside: the new socket is read meanwhile.
        tokio::spawn(old.close());
        self.books.continue_on_new_stream(out);
        let replayed = new.buffered.len();
        for item in new.buffered {
            self.handle(item, sock, out, fetches, snap_tx);
        }
        metrics::exchange_reconnect(self.exchange, ConnError::Rotate(self.rotate_after).reason());
        info!(exchange = %self.exchange, replayed, "rotated to the new exchange connection (make-before-break)");
    }

    /// The new socket of a rotation failed: keep the current one, try again later.
    fn rotation_failed(&self, why: &dyn std::fmt::Display, retry: &mut Duration) -> Rotation {
        warn!(exchange = %self.exchange, cause = %why, retry_in_ms = retry.as_millis() as u64, "rotation failed: keeping the current connection");
        let at = Instant::now() + *retry;
        *retry = (*retry * 2).min(ROTATE_RETRY_MAX);
        Rotation::Idle { at }
    }

    /// Turns one read off `sock` into parsed items (none for control frames and bad
    /// frames); `Err` when the socket is lost.
    async fn receive(
        &mut self,
        sock: &mut Socket,
        msg: Option<Result<Message, WsError>>,
        buf: &mut Vec<u8>,
    ) -> Result<Vec<Parsed>, ConnError> {
        let ts_recv = now_micros();
        sock.stale_at = Instant::now() + self.stale_after;
        let bytes: &[u8] = match &msg {
            None => return Err(ConnError::Closed("end of stream".into())),
            Some(Err(e)) => return Err(ConnError::Socket(e.to_string())),
            Some(Ok(Message::Close(frame))) => {
                let why = frame.as_ref().map_or_else(
                    || "close frame without reason".to_string(),
                    |f| format!("code {} {}", u16::from(f.code), f.reason),
                );
                return Err(ConnError::Closed(why));
            }
            Some(Ok(Message::Ping(_))) => {
                // tungstenite queued the pong; write it now, not at the next read.
                sock.ws
                    .flush()
                    .await
                    .map_err(|e| ConnError::Socket(e.to_string()))?;
                return Ok(Vec::new());
            }
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => return Ok(Vec::new()),
            Some(Ok(Message::Text(t))) => t.as_bytes(),
            Some(Ok(Message::Binary(b))) => b,
        };
        buf.clear();
        buf.extend_from_slice(bytes);
        let parsed = match self.adapter.parse(buf, ts_recv) {
            Ok(p) => p,
            Err(e) => {
                // Recovery::Skip for every parse error: count, log, carry on.
                self.invalid_frame(&e, bytes);
                Vec::new()
            }
        };
        // One large message (a Coinbase book snapshot) must not keep its buffer.
        if buf.capacity() > KEEP_BUFFER {
            *buf = Vec::with_capacity(KEEP_BUFFER);
        }
        let mut items = Vec::with_capacity(parsed.len());
        for item in parsed {
            match item {
                Parsed::Sequence(seq) => {
                    if let Err((expected, got)) = sock.check_sequence(seq) {
                        return Err(ConnError::SequenceGap { expected, got });
                    }
                }
                other => items.push(other),
            }
        }
        Ok(items)
    }

    /// Handles one item of the socket whose events are emitted (not `ServerShutdown`).
    fn handle(
        &mut self,
        item: Parsed,
        sock: &mut Socket,
        out: &mut Vec<Event>,
        fetches: &mut JoinSet<()>,
        snap_tx: &mpsc::Sender<SnapshotResult>,
    ) {
        match item {
            Parsed::Event(e) => {
                if self.trades.fresh(&e) {
                    out.push(e);
                }
            }
            Parsed::Book(b) => {
                let symbol = b.symbol.clone();
                match self.books.ws(b, out) {
                    Some(Outcome::Ok) => {}
                    Some(Outcome::NeedSnapshot(why)) => {
                        self.need_snapshot.get_or_insert(format!("{symbol}: {why}"));
                    }
                    None => {
                        let why = format!("book message for unsubscribed symbol {symbol}");
                        self.invalid_frame(&why, symbol.as_bytes());
                    }
                }
            }
            Parsed::Diff(d) => match self.books.rest(&d.symbol) {
                Some(book) => {
                    if let Some(req) = book.on_diff(d, out) {
                        self.spawn_fetch(fetches, snap_tx, req);
                    }
                }
                None => {
                    let why = format!("book diff for unsubscribed symbol {}", d.symbol);
                    self.invalid_frame(&why, d.symbol.as_bytes());
                }
            },
            Parsed::Ack { id } | Parsed::Refused { id, .. } if !sock.subscribed => {
                if let Parsed::Refused { detail, .. } = &item {
                    error!(exchange = %self.exchange, url = %self.ws_url, %detail, "the exchange refused a subscription: the feed is unhealthy");
                    metrics::exchange_subscribe_refused(self.exchange);
                    out.push(Event::status(
                        self.exchange,
                        StatusState::Error,
                        Some(format!("subscription refused by the exchange: {detail}")),
                    ));
                    sock.refused.get_or_insert_with(|| detail.clone());
                }
                if sock.on_answer(id) && sock.refused.is_none() {
                    out.push(self.on_subscribed());
                }
            }
            Parsed::Ack { .. } | Parsed::ServerShutdown | Parsed::Sequence(_) => {}
            Parsed::Refused { detail, .. } => {
                error!(exchange = %self.exchange, %detail, "request refused");
                out.push(Event::status(
                    self.exchange,
                    StatusState::Error,
                    Some(detail),
                ));
            }
        }
    }

    /// One frame of the new socket during a rotation: acks are counted, trades and diffs
    /// kept for the switch, tickers and candles dropped (the old socket still emits them).
    /// `Err` when the rotation has to be given up.
    fn overlap_frame(
        &mut self,
        o: &mut Overlap,
        parsed: Vec<Parsed>,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        for item in parsed {
            match item {
                Parsed::Event(Event::Trade(_)) | Parsed::Diff(_) | Parsed::Book(_) => {
                    if o.buffered.len() >= ROTATE_BUFFER {
                        return Err(format!(
                            "more than {ROTATE_BUFFER} events before the switch"
                        ));
                    }
                    match &item {
                        Parsed::Diff(d) => {
                            o.first_update
                                .entry(d.symbol.clone())
                                .or_insert(d.first_update_id);
                        }
                        Parsed::Book(b) if b.action == crate::event::BookAction::Snapshot => {
                            o.ws_snapshots.insert(b.symbol.clone());
                        }
                        Parsed::Event(Event::Trade(t)) => {
                            o.first_trade
                                .entry(t.symbol.clone())
                                .or_insert_with(|| t.trade_id.clone());
                        }
                        _ => {}
                    }
                    o.buffered.push_back(item);
                }
                Parsed::Event(_) => {}
                Parsed::Ack { id } => {
                    o.sock.on_answer(id);
                }
                Parsed::Refused { detail, .. } => {
                    error!(exchange = %self.exchange, %detail, "request refused on the new connection");
                    out.push(Event::status(
                        self.exchange,
                        StatusState::Error,
                        Some(detail.clone()),
                    ));
                    return Err(format!("request refused: {detail}"));
                }
                Parsed::ServerShutdown => {
                    return Err("the exchange announced a server shutdown".into());
                }
                Parsed::Sequence(_) => {}
            }
        }
        Ok(())
    }

    /// The new socket is subscribed and, for every live book, its first diff starts at or
    /// before the next update id the book needs (update ids are global per symbol, so its
    /// diffs continue the book without a new snapshot). Likewise its first trade of a
    /// symbol, when it has one, must not be past the next trade id (no trade is lost).
    fn ready_to_switch(&self, o: &Overlap) -> bool {
        let books = self
            .books
            .values()
            .all(|book| match (book, book.last_seq()) {
                (_, None) => true,
                (FeedBook::Rest(_), Some(last)) => o
                    .first_update
                    .get(book.symbol())
                    .is_some_and(|&first| first <= last + 1),
                // Its own snapshot restarts the book on the new socket.
                (FeedBook::Ws(_), Some(_)) => o.ws_snapshots.contains(book.symbol()),
            });
        let trades = o
            .first_trade
            .iter()
            .all(|(symbol, first)| self.trades.continues(symbol, first));
        o.sock.subscribed && books && trades
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
