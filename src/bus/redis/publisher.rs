//! The publishing side of the Redis bus: a bounded queue, one writer task, one pipeline
//! per batch.
//!
//! [`RedisPublisher::publish`] never waits on the network: it puts the already-encoded
//! envelope into a bounded queue and, when that is full, drops and counts it. The writer
//! task waits for the first queued envelope and then takes whatever else is already queued
//! (up to `publish_batch_max`) without waiting, so an idle bridge adds no latency and a busy
//! one batches naturally. Each batch is one pipeline:
//!
//! - `PUBLISH {p}{channel} <envelope>` for every envelope;
//! - `SET {p}last:{channel} <envelope> PX ttl` for `ticker`, `candle` and `status` events;
//! - `SET {p}snapshot:{channel} <envelope> PX ttl` + `DEL {p}booklog:{channel}` for a
//!   `book` snapshot that is still the newest state of its book;
//! - `RPUSH {p}booklog:{channel} <envelope>` for every other book message, then once per
//!   book per batch `LTRIM … -booklog_max -1` and `PEXPIRE … ttl`.
//!
//! Within the pipeline each log write comes *before* its `PUBLISH`: a subscriber that has
//! received a delta and then reads snapshot + log finds that delta in the log.
//!
//! The writer also keeps an [`OrderBook`] per book channel and, every
//! `snapshot_interval_ms`, writes a fresh full snapshot of each changed book to
//! `{p}snapshot:{channel}` and empties its log in the same pipeline: the envelope `seq` is
//! that of the last message published on the channel and the book `seq` is the last
//! delta's, so a reader can chain the next delta on. The snapshot may be *ahead* of the
//! log (it includes messages still queued here); readers skip log entries up to its `seq`.
//! A book whose log reaches half of `booklog_max`, or whose exchange snapshot was already
//! superseded when its batch went out, gets its snapshot written right after that batch,
//! so the key is current and the log always reaches back to it.
//!
//! Expiry (`latest_ttl_ms`, 0 = none): every refresh renews (`PEXPIRE`) the `last:`,
//! `snapshot:` and `booklog:` keys this publisher wrote, so they live exactly as long as a
//! publisher keeps them; a dead publisher's keys vanish within the ttl.
//!
//! Pub/sub is fire-and-forget: what is lost shows as a `seq` gap at the subscribers.
//!
//! Durable channels (`[durable] channels`) differ in two ways, both owned by
//! [`stream_writer`](super::stream_writer): their envelopes are appended to their stream
//! and published by one script call in place of the `PUBLISH`, and while Redis is
//! unreachable they are kept in a bounded buffer (not dropped) and appended after the
//! reconnect, in order and before newer durable envelopes, a chunk per loop turn
//! ([`backlog`]) so the queue keeps draining meanwhile.
//!
//! Reconnect behaviour:
//!
//! - The first connection is made in the background at spawn; until it is up, envelopes
//!   wait in the queue (beyond its bound they are dropped as `queue_full`), so a normal
//!   start loses nothing.
//! - An idle connection is checked with a `PING` every `snapshot_interval_ms`, so a dead
//!   Redis shows in health even when nothing is published.
//! - Any error on a pipeline counts the whole batch as failed (reason = the error's
//!   class, see [`RedisFailure`]). A connection failure (including a reply slower than
//!   `probe_timeout_ms`) or `READONLY` (a replica after a failover) marks health down,
//!   sets `redis_connected{role="publish"}` to 0 and drops the connection. An error reply
//!   on a healthy connection does not: `OOM` is counted
//!   (`redis_error_replies{role="publish",reason="redis_oom"}`) and logged rate-limited;
//!   `LOADING` also pauses sending for [`LOADING_PAUSE`](super::error::LOADING_PAUSE);
//!   `NOPERM`/auth errors and `LOADING` mark health down until a pipeline succeeds.
//! - A background task reconnects after an exponential backoff with jitter
//!   (`reconnect_min_ms` .. `reconnect_max_ms`); meanwhile the writer keeps draining the
//!   queue (dropping and counting) so memory stays bounded and the queue is fresh when the
//!   connection returns (durable envelopes: see above). Each attempt asks the [`Target`]
//!   afresh (with Sentinel: the current master, `ROLE`-checked), and with Sentinel a watch
//!   ends the connection when the sentinels name another master (see
//!   [`target`](super::target)).
//! - On success: `redis_reconnects{role="publish"}` + 1, health up, the backoff restarts
//!   from the minimum, and every book snapshot and `last:` value is rewritten at the next
//!   refresh (a restarted Redis has lost its keys).
//! - On shutdown the queue is closed, what is already queued is flushed (for at most
//!   [`FLUSH_DEADLINE`]), the books' snapshots are written once more (at most 500 ms more),
//!   and the task exits.
//!   It also exits, after flushing, when every [`RedisPublisher`] handle is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::Pipeline;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

mod backlog;

use super::store::booklog_key;
use super::stream_writer::{StreamSetup, StreamWriter};
use super::subscriber::RateLimit;
use super::target::{MasterWatch, Resolved, Target, TargetError};
use super::{backoff, Recovery, RedisFailure};
use crate::book::OrderBook;
use crate::bus::Bus;
use crate::config::RedisConfig;
use crate::durable::DurablePolicy;
use crate::envelope::BusMessage;
use crate::event::{now_micros, Book, BookAction, Channel, Event, EventType};
use crate::health::HealthHandle;
use crate::metrics;

/// Longest the writer spends flushing the queue at shutdown.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Handle to the Redis publishing pipeline; cheap to clone. Implements [`Bus`].
#[derive(Clone)]
pub struct RedisPublisher {
    tx: mpsc::Sender<BusMessage>,
    books: SharedBooks,
    /// Durable channels wait for room in the queue instead of being dropped.
    durable: Arc<DurablePolicy>,
}

/// The books behind the `snapshot:` keys. Updated by `publish` *before* the queue, so an
/// envelope dropped on a full queue never leaves a book behind: the key stays exact and
/// readers that saw the `seq` gap recover from it. Locked only for CPU work, never across
/// an await.
type SharedBooks = Arc<Mutex<HashMap<Channel, BookState>>>;

impl RedisPublisher {
    /// Starts the writer task. `src` is this instance's uuid (the `src` of the periodic
    /// snapshot envelopes). The task runs until `shutdown` is cancelled or every handle is
    /// dropped, flushing what is queued before it returns.
    pub fn spawn(
        config: RedisConfig,
        src: Uuid,
        health: HealthHandle,
        shutdown: CancellationToken,
    ) -> (RedisPublisher, JoinHandle<()>) {
        RedisPublisher::spawn_with_streams(config, src, StreamSetup::default(), health, shutdown)
    }

    /// [`RedisPublisher::spawn`] with durable channels (`streams`, see
    /// [`stream_writer`](super::stream_writer)).
    pub fn spawn_with_streams(
        config: RedisConfig,
        src: Uuid,
        streams: StreamSetup,
        health: HealthHandle,
        shutdown: CancellationToken,
    ) -> (RedisPublisher, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.publish_queue_size.max(1));
        let books = SharedBooks::default();
        let writer_books = books.clone();
        let durable = Arc::new(streams.policy.clone());
        let task = tokio::spawn(async move {
            match Target::new(&config, "publish") {
                Ok(target) => {
                    Writer::new(config, src, target, health, writer_books, streams)
                        .run(rx, shutdown)
                        .await
                }
                Err(e) => {
                    // Config validation and the startup check refuse such settings; stay
                    // alive and count, never panic.
                    health.down(e.to_string());
                    drain_forever(rx, shutdown).await;
                }
            }
        });
        (RedisPublisher { tx, books, durable }, task)
    }
}

impl Bus for RedisPublisher {
    async fn publish(&self, msg: BusMessage) {
        if msg.book.is_some() {
            track_book(&mut lock(&self.books), &msg);
        }
        match self.tx.try_send(msg) {
            Ok(()) => {}
            // Redis appends slower than the feeds deliver: a durable envelope is not
            // dropped, the caller waits (and through its bounded queue, the exchange
            // socket's reader). While Redis is down the writer keeps taking envelopes
            // into its byte-bounded buffer, so this wait ends.
            Err(mpsc::error::TrySendError::Full(msg))
                if !self.durable.is_empty() && self.durable.is_durable(&msg.channel) =>
            {
                metrics::stream_publish_wait();
                if self.tx.send(msg).await.is_err() {
                    metrics::envelopes_publish_failed(1, "shutdown");
                }
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::envelopes_publish_failed(1, "queue_full")
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::envelopes_publish_failed(1, "shutdown")
            }
        }
    }
}

async fn drain_forever(mut rx: mpsc::Receiver<BusMessage>, shutdown: CancellationToken) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            n = rx.recv_many(&mut batch, 1024) => {
                if n == 0 {
                    return;
                }
                metrics::envelopes_publish_failed(n as u64, "redis_down");
                batch.clear();
            }
        }
    }
}

/// What the publisher remembers about one book channel.
struct BookState {
    book: OrderBook,
    /// The last book event seen: exchange, symbol and times for the snapshot.
    template: Arc<Book>,
    /// Envelope `seq` of the last message published on the channel.
    last_seq: u64,
    /// The book changed since its snapshot key was last written.
    dirty: bool,
    /// A delta did not chain: no snapshot is written until the next exchange snapshot.
    broken: bool,
    /// Entries pushed to `{p}booklog:` since the snapshot key was last written.
    logged: usize,
    /// `{p}booklog:{channel}`, made on first use by the writer.
    log_key: String,
}

/// A `last:` key this publisher wrote, renewed (and after a Redis restart rewritten) by the
/// refresh. One per ticker/candle/status channel the feeds produce: bounded by the config.
struct LatestKey {
    key: String,
    payload: Bytes,
}

/// What one connect attempt gives: a connection to the (resolved) master, or why not.
type Connected = Result<(MultiplexedConnection, Resolved), TargetError>;
type Connecting = JoinHandle<Connected>;

struct Writer {
    config: RedisConfig,
    src: Uuid,
    /// Asked on every (re)connect: with Sentinel, the current master.
    target: Target,
    health: HealthHandle,
    conn: Option<MultiplexedConnection>,
    /// Sentinel: fires when the sentinels name another master than `conn`'s.
    watch: MasterWatch,
    connecting: Option<Connecting>,
    delays: Box<dyn Iterator<Item = Duration> + Send>,
    /// A connection was up before: the next success is a reconnect.
    was_connected: bool,
    /// A pipeline went out since the last refresh tick (else the tick pings).
    sent_since_tick: bool,
    books: SharedBooks,
    /// An error reply marked health down (see `failed`); the next success clears it.
    degraded: bool,
    /// `LOADING`: nothing is sent before this.
    paused_until: Option<Instant>,
    error_log: RateLimit,
    latest: HashMap<Channel, LatestKey>,
    /// Redis came back (and may have lost its keys): the next refresh rewrites `last:` keys.
    rewrite_latest: bool,
    /// Signs the refreshed snapshot envelopes (`[redis] signing_keys`), like the Sequencer.
    keys: Option<Arc<crate::bus::signing::Keyring>>,
    /// Durable channels: appends, and their buffer while Redis is unreachable.
    streams: StreamWriter,
}

impl Writer {
    fn new(
        config: RedisConfig,
        src: Uuid,
        target: Target,
        health: HealthHandle,
        books: SharedBooks,
        streams: StreamSetup,
    ) -> Writer {
        let delays = Box::new(backoff(&config));
        let keys = crate::bus::signing::Keyring::from_config(&config);
        Writer {
            streams: StreamWriter::new(streams, &config.key_prefix, src),
            keys,
            config,
            src,
            target,
            health,
            conn: None,
            watch: MasterWatch::none(),
            connecting: None,
            delays,
            was_connected: false,
            sent_since_tick: false,
            books,
            degraded: false,
            paused_until: None,
            error_log: RateLimit::new(Duration::from_secs(10)),
            latest: HashMap::new(),
            rewrite_latest: false,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<BusMessage>, shutdown: CancellationToken) {
        self.start_connecting(Duration::ZERO);
        let batch_max = self.config.publish_batch_max.max(1);
        let mut batch: Vec<BusMessage> = Vec::with_capacity(batch_max);
        let period = Duration::from_millis(self.config.snapshot_interval_ms.max(1));
        let mut refresh = tokio::time::interval_at(Instant::now() + period, period);
        refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Shutdown first: a busy queue must not hold off the flush deadline.
                biased;
                _ = shutdown.cancelled() => break,
                done = wait_connecting(&mut self.connecting) => self.connected(done),
                reason = self.watch.moved() => self.lost_connection(&reason),
                // Before the queue: under sustained load the queue is always ready and would
                // starve the refresh; the tick is ready only once per period.
                _ = refresh.tick() => {
                    if !std::mem::replace(&mut self.sent_since_tick, false) {
                        self.ping().await;
                    }
                    // After a LOADING pause: the buffer goes on.
                    self.send_backlog_chunk().await;
                    self.refresh_snapshots(None).await;
                }
                // Before the very first connection the queue holds what arrives (up to its
                // bound) so a normal start loses nothing; after that, see `send_batch`.
                n = rx.recv_many(&mut batch, batch_max), if self.was_connected => {
                    if n == 0 {
                        // Every handle is gone and the queue is empty: finish as on shutdown.
                        break;
                    }
                    self.send_batch(&mut batch).await;
                }
                // Durable envelopes buffered during an outage, a chunk per turn, when the
                // queue has nothing (send_batch also sends one per batch).
                _ = std::future::ready(()), if self.backlog_ready() => {
                    self.send_backlog_chunk().await;
                }
            }
        }
        self.flush(rx).await;
    }

    /// Sends what is already queued, bounded by [`FLUSH_DEADLINE`]; the rest is counted.
    async fn flush(mut self, mut rx: mpsc::Receiver<BusMessage>) {
        rx.close();
        let deadline = Instant::now() + FLUSH_DEADLINE;
        if self.conn.is_none() {
            // Give a reconnect in progress its chance, within the same deadline.
            if let Ok(done) =
                tokio::time::timeout_at(deadline, wait_connecting(&mut self.connecting)).await
            {
                self.connected(done);
            }
        }
        let batch_max = self.config.publish_batch_max.max(1);
        let mut batch = Vec::with_capacity(batch_max);
        while Instant::now() < deadline {
            if rx.recv_many(&mut batch, batch_max).await == 0 {
                break;
            }
            let n = batch.len() as u64;
            if tokio::time::timeout_at(deadline, self.send_batch(&mut batch))
                .await
                .is_err()
            {
                // Cut off mid-pipeline: whether Redis got it is unknown; count it as failed.
                metrics::envelopes_publish_failed(n, "shutdown");
                break;
            }
        }
        if Instant::now() < deadline && self.streams.has_backlog() {
            let _ = tokio::time::timeout_at(deadline, self.send_backlog()).await;
        }
        let unsent = self.streams.abandon();
        if unsent > 0 {
            warn!(
                dropped = unsent,
                "durable envelopes still buffered at shutdown (Redis unreachable or flush deadline passed); not appended"
            );
        }
        let mut left = batch.len() as u64 + unsent;
        while rx.try_recv().is_ok() {
            left += 1;
        }
        if left > 0 {
            metrics::envelopes_publish_failed(left, "shutdown");
            warn!(
                dropped = left,
                "publisher flush deadline passed; envelopes dropped"
            );
        }
        if self.conn.is_some() {
            // A short extra allowance: the snapshot keys are worth one more write.
            let _ = tokio::time::timeout(Duration::from_millis(500), self.refresh_snapshots(None))
                .await;
        }
        if let Some(task) = self.connecting.take() {
            task.abort();
        }
        metrics::redis_connected("publish", false);
        self.health.down("shut down");
    }

    fn start_connecting(&mut self, delay: Duration) {
        // Resolved afresh each time: after a failover the sentinels name the new master.
        let target = self.target.clone();
        self.connecting = Some(tokio::spawn(async move {
            target.backoff(delay).await;
            target.connect().await
        }));
    }

    fn connected(&mut self, done: Result<Connected, tokio::task::JoinError>) {
        self.connecting = None;
        match done {
            Ok(Ok((conn, resolved))) => {
                self.conn = Some(conn);
                self.streams.connected();
                self.watch = self.target.watch(&resolved);
                if self.was_connected {
                    metrics::redis_reconnect("publish");
                }
                self.was_connected = true;
                self.delays = Box::new(backoff(&self.config));
                // A restarted Redis lost its keys: rewrite every snapshot and latest value at
                // the next refresh.
                for state in lock(&self.books).values_mut() {
                    state.dirty = true;
                }
                self.rewrite_latest = true;
                metrics::redis_connected("publish", true);
                self.health.up(None);
                info!(redis = %resolved.shown(&self.target), "redis publisher connected");
            }
            Ok(Err(e)) => {
                self.health.down(format!("connect: {e}"));
                debug!(cause = %e, "redis publisher connect failed");
                let delay = self.next_delay();
                self.start_connecting(delay);
            }
            Err(e) => {
                // The connect task panicked or was aborted: try again like any failure.
                let delay = self.next_delay();
                warn!(cause = %e, "redis publisher connect task failed");
                self.start_connecting(delay);
            }
        }
    }

    fn next_delay(&mut self) -> Duration {
        self.delays
            .next()
            .unwrap_or(Duration::from_millis(self.config.reconnect_max_ms))
    }

    /// Acts on a failed command by its class ([`RedisFailure::recovery`]): only a dead
    /// connection or a `READONLY` replica is reconnected. An error reply from a healthy
    /// connection (`OOM`, `LOADING`, `NOPERM`...) is counted and logged (rate-limited);
    /// `LOADING` also pauses sending for a moment; `NOPERM`/auth and `LOADING` mark
    /// health down until a pipeline succeeds again.
    fn failed(&mut self, failure: RedisFailure) {
        let pause = match failure.recovery() {
            Recovery::Reconnect => return self.lost_connection(&failure),
            Recovery::WaitAndRetry(pause) => Some(pause),
            // The append script's NOSCRIPT is handled where it is sent (stream_writer).
            Recovery::Drop | Recovery::ReloadScript | Recovery::Fatal => None,
        };
        metrics::redis_error_reply("publish", failure.reason());
        if let Some(pause) = pause {
            self.paused_until = Some(Instant::now() + pause);
        }
        if matches!(
            failure.recovery(),
            Recovery::Fatal | Recovery::WaitAndRetry(_)
        ) {
            self.health.down(format!("redis: {failure}"));
            self.degraded = true;
        }
        if let Some(suppressed) = self.error_log.allow() {
            warn!(cause = %failure, suppressed, "redis refused a publisher pipeline; envelopes dropped, connection kept");
        }
    }

    /// A pipeline went through: whatever error reply marked health down is over.
    fn succeeded(&mut self) {
        if std::mem::take(&mut self.degraded) {
            self.health.up(None);
        }
    }

    fn lost_connection(&mut self, cause: &dyn std::fmt::Display) {
        self.degraded = false;
        self.conn = None;
        self.watch = MasterWatch::none();
        metrics::redis_connected("publish", false);
        self.health.down(format!("redis: {cause}"));
        warn!(cause = %cause, "redis publisher lost its connection; reconnecting");
        let delay = self.next_delay();
        self.start_connecting(delay);
    }

    /// Tracks the books, then sends the batch as one pipeline (or counts it as failed;
    /// durable envelopes are buffered instead, see `stream_writer`).
    async fn send_one(&mut self, batch: &mut Vec<BusMessage>) {
        let n = batch.len();
        if n == 0 {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            let dropped = self.streams.stash(batch);
            metrics::envelopes_publish_failed(dropped, "redis_down");
            return;
        };
        if let Some(until) = self.paused_until {
            if Instant::now() < until {
                let dropped = self.streams.stash(batch);
                metrics::envelopes_publish_failed(dropped, "redis_loading");
                return;
            }
            self.paused_until = None;
        }
        if let Err(failure) = self.streams.prepare(conn).await {
            let dropped = self.streams.stash(batch);
            metrics::envelopes_publish_failed(dropped, failure.reason());
            return self.failed(failure);
        }
        let prefix = &self.config.key_prefix;
        let ttl = self.config.latest_ttl_ms;
        let log_max = self.config.booklog_max.max(1);
        let mut pipe = Pipeline::with_capacity(n + n / 4);
        // Book channels whose log grew in this batch (trimmed and renewed once each), and
        // those whose log is half full (snapshot written right after the batch).
        let mut logs: Vec<Channel> = Vec::new();
        let mut full: Vec<Channel> = Vec::new();
        {
            let mut books = lock(&self.books);
            for (i, msg) in batch.iter().enumerate() {
                let payload: &[u8] = &msg.envelope;
                match msg.kind() {
                    EventType::Ticker | EventType::Candle | EventType::Status => {
                        let key = match self.latest.get_mut(&msg.channel) {
                            Some(l) => {
                                l.payload = msg.envelope.clone();
                                &l.key
                            }
                            None => {
                                &self
                                    .latest
                                    .entry(msg.channel.clone())
                                    .or_insert(LatestKey {
                                        key: super::last_key(prefix, &msg.channel),
                                        payload: msg.envelope.clone(),
                                    })
                                    .key
                            }
                        };
                        set_with_ttl(&mut pipe, key, payload, ttl);
                    }
                    EventType::Book => {
                        // Tracked by `publish` before the queue, so normally present.
                        let Some(state) = books.get_mut(&msg.channel) else {
                            pipe.cmd("RPUSH")
                                .arg(booklog_key(prefix, &msg.channel))
                                .arg(payload)
                                .ignore();
                            if !logs.contains(&msg.channel) {
                                logs.push(msg.channel.clone());
                            }
                            if !self.streams.add(&mut pipe, msg, i) {
                                pipe.cmd("PUBLISH")
                                    .arg(super::channel_key(prefix, &msg.channel))
                                    .arg(payload)
                                    .ignore();
                            }
                            continue;
                        };
                        if state.log_key.is_empty() {
                            // Made once per book, not per message.
                            state.log_key = booklog_key(prefix, &msg.channel);
                        }
                        // Only while it is still the newest state of the book: deltas that
                        // came after it (queued or dropped) are in the tracked book, which
                        // the refresh writes instead; meanwhile the snapshot goes to the log.
                        if is_snapshot(msg) && state.last_seq == msg.seq {
                            set_with_ttl(
                                &mut pipe,
                                &super::snapshot_key(prefix, &msg.channel),
                                payload,
                                ttl,
                            );
                            pipe.cmd("DEL").arg(&state.log_key).ignore();
                            state.logged = 0;
                        } else {
                            pipe.cmd("RPUSH").arg(&state.log_key).arg(payload).ignore();
                            state.logged += 1;
                            // A superseded exchange snapshot (deltas already queued after
                            // it) leaves the key behind the book: write the tracked book now.
                            if (state.logged >= log_max.div_ceil(2) || is_snapshot(msg))
                                && !full.contains(&msg.channel)
                            {
                                full.push(msg.channel.clone());
                            }
                            if !logs.contains(&msg.channel) {
                                logs.push(msg.channel.clone());
                            }
                        }
                    }
                    EventType::Trade => {}
                }
                // A durable envelope: the append script publishes it (stream_writer).
                if self.streams.add(&mut pipe, msg, i) {
                    continue;
                }
                pipe.cmd("PUBLISH")
                    .arg(super::channel_key(prefix, &msg.channel))
                    .arg(payload)
                    .ignore();
            }
        }
        for channel in &logs {
            let log = booklog_key(prefix, channel);
            pipe.cmd("LTRIM")
                .arg(&log)
                .arg(-(log_max as i64))
                .arg(-1)
                .ignore();
            if ttl > 0 {
                pipe.cmd("PEXPIRE").arg(&log).arg(ttl).ignore();
            }
        }
        self.sent_since_tick = true;
        metrics::publish_batch(n);
        if self.streams.has_appends() {
            // Replies read one by one: each append's outcome matters (stream_writer).
            let reply = conn.req_packed_commands(&pipe, 0, pipe.len()).await;
            let failure = self.streams.settle(conn, reply, batch).await;
            batch.clear();
            match failure {
                Some(failure) => self.failed(failure),
                None => {
                    self.succeeded();
                    if !full.is_empty() {
                        self.refresh_snapshots(Some(&full)).await;
                    }
                }
            }
            return;
        }
        batch.clear();
        match pipe.query_async::<()>(conn).await {
            Ok(()) => {
                metrics::envelopes_published(n as u64);
                self.succeeded();
                if !full.is_empty() {
                    self.refresh_snapshots(Some(&full)).await;
                }
            }
            Err(e) => {
                // Under OOM Redis still accepts the PUBLISHes and refuses the SETs; the
                // first error reply is all a pipeline returns, so the batch counts as failed.
                let failure = RedisFailure::classify(&e);
                metrics::envelopes_publish_failed(n as u64, failure.reason());
                self.failed(failure);
            }
        }
    }

    /// An idle connection can die unnoticed; a PING per idle refresh period keeps health
    /// true and starts the reconnect before the next envelope needs it.
    async fn ping(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = ::redis::cmd("PING").query_async::<()>(conn).await {
            self.failed(RedisFailure::classify(&e));
        }
    }

    /// Writes a fresh snapshot envelope (and empties the log) for every book that changed
    /// since its last write — or only for `only` — and renews the expiry of every key this
    /// publisher keeps (`last:` keys rewritten after a reconnect).
    async fn refresh_snapshots(&mut self, only: Option<&[Channel]>) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let prefix = &self.config.key_prefix;
        let ttl = self.config.latest_ttl_ms;
        let mut pipe = Pipeline::new();
        let mut written = Vec::new();
        {
            let books = lock(&self.books);
            for (channel, state) in books.iter() {
                if only.is_some_and(|only| !only.contains(channel)) {
                    continue;
                }
                let log = booklog_key(prefix, channel);
                if !state.dirty || state.broken || !state.book.has_snapshot() {
                    if ttl > 0 && only.is_none() {
                        pipe.cmd("PEXPIRE")
                            .arg(super::snapshot_key(prefix, channel))
                            .arg(ttl)
                            .ignore();
                        pipe.cmd("PEXPIRE").arg(&log).arg(ttl).ignore();
                    }
                    continue;
                }
                let snapshot = state.book.to_snapshot(&state.template);
                let msg = BusMessage::encode_signed(
                    channel.clone(),
                    self.src,
                    state.last_seq,
                    now_micros(),
                    Event::Book(snapshot),
                    self.keys.as_deref(),
                );
                let payload: &[u8] = &msg.envelope;
                set_with_ttl(
                    &mut pipe,
                    &super::snapshot_key(prefix, channel),
                    payload,
                    ttl,
                );
                // Everything logged so far is in this snapshot (the tracked book is at least
                // as new as anything sent): the log starts afresh after it.
                pipe.cmd("DEL").arg(&log).ignore();
                written.push((channel.clone(), state.last_seq));
            }
        }
        let rewrite = only.is_none() && std::mem::take(&mut self.rewrite_latest);
        if only.is_none() {
            for latest in self.latest.values() {
                if rewrite {
                    set_with_ttl(&mut pipe, &latest.key, &latest.payload, ttl);
                } else if ttl > 0 {
                    pipe.cmd("PEXPIRE").arg(&latest.key).arg(ttl).ignore();
                }
            }
        }
        if pipe.is_empty() {
            return;
        }
        match pipe.query_async::<()>(conn).await {
            Ok(()) => {
                let mut books = lock(&self.books);
                for (channel, seq) in written {
                    if let Some(state) = books.get_mut(&channel) {
                        state.logged = 0;
                        // Only if nothing newer arrived while the write was in flight.
                        if state.last_seq == seq {
                            state.dirty = false;
                        }
                    }
                }
            }
            Err(e) => {
                self.rewrite_latest |= rewrite;
                self.failed(RedisFailure::classify(&e));
            }
        }
    }
}

/// `SET key value`, with `PX ttl` unless `ttl` is 0.
fn set_with_ttl(pipe: &mut Pipeline, key: &str, value: &[u8], ttl: u64) {
    let cmd = pipe.cmd("SET").arg(key).arg(value);
    if ttl > 0 {
        cmd.arg("PX").arg(ttl);
    }
    cmd.ignore();
}

/// Applies a book message to its channel's book (the publisher side of `snapshot:` keys).
fn track_book(books: &mut HashMap<Channel, BookState>, msg: &BusMessage) {
    let Some(event) = msg.book.as_ref() else {
        return;
    };
    let state = books
        .entry(msg.channel.clone())
        .or_insert_with(|| BookState {
            book: OrderBook::new(),
            template: event.clone(),
            last_seq: 0,
            dirty: false,
            broken: true,
            logged: 0,
            log_key: String::new(),
        });
    state.last_seq = msg.seq;
    state.template = event.clone();
    match state.book.apply(event) {
        Ok(()) => {
            // An exchange snapshot is written by the batch itself; deltas make the key stale.
            state.broken = false;
            state.dirty = event.action == BookAction::Delta;
        }
        Err(e) => {
            // The host guarantees chaining; if it ever breaks, a stale-but-consistent key is
            // better than a wrong one. The next snapshot repairs it.
            if !state.broken {
                warn!(channel = %msg.channel, cause = %e, "book on the bus does not chain; snapshot refresh paused");
            }
            state.broken = true;
            state.dirty = false;
        }
    }
}

fn lock(books: &SharedBooks) -> MutexGuard<'_, HashMap<Channel, BookState>> {
    books.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_snapshot(msg: &BusMessage) -> bool {
    msg.book
        .as_deref()
        .is_some_and(|b| b.action == BookAction::Snapshot)
}

/// Resolves when the background connect finishes; pending forever when none runs.
async fn wait_connecting(
    connecting: &mut Option<Connecting>,
) -> Result<Connected, tokio::task::JoinError> {
    match connecting.as_mut() {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}
