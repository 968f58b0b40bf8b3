//! The router: one task that owns every piece of routing state and processes, in order,
//! bus messages and client commands.
//!
//! Because a single task handles both, "`subscribed` reply → latest value / snapshot →
//! live events" is exact without any locking: nothing can slip in between. The router
//! never awaits anything but its two input channels; pushing to a client queue is a short
//! synchronous call that never blocks (see [`super::client`]), so a slow bot cannot slow
//! the router or another bot.
//!
//! State:
//! - per pattern, the clients holding it (its key set is the [`Interest`] published to the
//!   Redis subscriber);
//! - per known channel, the resolved subscriber list (each client at most once, however
//!   many of its patterns match) and a cache: the latest `ticker`/`candle` value, or for
//!   `book` channels an [`OrderBook`] that is Live (the chain holds) or Syncing (deltas
//!   are buffered until a snapshot arrives from the bus or the [`SnapshotStore`]).
//!
//! Fan-out is one hash lookup and a clone of the shared event bytes per subscriber; events
//! are never re-serialized. The router itself serializes only what it makes: `resync`
//! status events and book snapshots for late joiners (once per book change).
//!
//! Caches: with a store (executor, hybrid), a channel's cache is kept only while someone
//! subscribes to it, because the Redis subscriber stops delivering it afterwards and a
//! kept cache would go stale; the next subscriber fetches from the store. Without a store
//! (demo) every message arrives anyway, so caches are kept for every channel seen.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::client::{ClientId, ClientQueue, Push};
use super::protocol::{ErrorCode, Op, Reply, ReqId, Request, RequestError};
use super::StatsInner;
use crate::book::OrderBook;
use crate::bus::{Interest, SnapshotStore};
use crate::envelope::BusMessage;
use crate::event::{Book, BookAction, Channel, Event, EventType, Pattern, StatusState};

/// Deltas kept per Syncing book; older ones are dropped (the snapshot will be newer anyway).
const SYNC_BUFFER_MAX: usize = 10_000;
/// Wait before asking the store again; the publisher refreshes snapshot keys every second.
const REFETCH_DELAY: Duration = Duration::from_millis(200);
/// A store that does not answer within this is treated as having nothing.
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the connection tasks and store fetches tell the router.
pub enum Command {
    Connect {
        id: ClientId,
        queue: Arc<ClientQueue>,
    },
    Request {
        id: ClientId,
        request: Request,
    },
    /// A request the reader refused; routed here so replies keep the request order.
    Refused {
        id: ClientId,
        error: RequestError,
    },
    Disconnect {
        id: ClientId,
    },
    /// Answer of [`SnapshotStore::latest`] for `channel`.
    Stored {
        channel: Channel,
        result: Option<BusMessage>,
    },
}

struct ClientEntry {
    queue: Arc<ClientQueue>,
    patterns: HashSet<Pattern>,
}

enum Cache {
    /// `trade`, `status`: nothing to replay.
    Nothing,
    /// `ticker`, `candle`: the last event.
    Latest {
        value: Option<(Utf8Bytes, u64)>,
        fetching: bool,
    },
    Book(Box<BookCache>),
}

impl Cache {
    fn for_kind(kind: EventType) -> Cache {
        match kind {
            EventType::Ticker | EventType::Candle | EventType::Status => Cache::Latest {
                value: None,
                fetching: false,
            },
            EventType::Book => Cache::Book(Box::default()),
            EventType::Trade => Cache::Nothing,
        }
    }
}

#[derive(Default)]
struct BookCache {
    book: OrderBook,
    /// The last book event applied: stamps snapshots made from `book`.
    template: Option<Arc<Book>>,
    /// Live: every delta forwarded chains onto the previous book message.
    live: bool,
    /// Syncing: deltas waiting for a snapshot, oldest first.
    buffer: VecDeque<BusMessage>,
    fetching: bool,
    /// The snapshot event for late joiners, encoded once per book change.
    encoded: Option<Utf8Bytes>,
}

impl BookCache {
    fn snapshot_text(&mut self) -> Option<(Utf8Bytes, u64)> {
        let template = self.template.as_ref()?;
        if self.encoded.is_none() {
            let json = Event::Book(self.book.to_snapshot(template)).to_json();
            self.encoded = Utf8Bytes::try_from(json).ok();
        }
        self.encoded.clone().map(|t| (t, template.ts_recv))
    }

    fn reset(&mut self, snapshot: &Arc<Book>) -> bool {
        self.buffer.clear();
        self.encoded = None;
        match self.book.reset(snapshot) {
            Ok(()) => {
                self.template = Some(snapshot.clone());
                self.live = true;
                true
            }
            Err(e) => {
                tracing::warn!(cause = %e, "book snapshot refused");
                self.live = false;
                false
            }
        }
    }
}

struct ChannelState {
    subscribers: Vec<Arc<ClientQueue>>,
    cache: Cache,
    /// Fed by this instance's own publisher: the cache is complete whether watched or not.
    local: bool,
}

impl ChannelState {
    fn has(&self, id: ClientId) -> bool {
        self.subscribers.iter().any(|q| q.id() == id)
    }
}

/// Routing state; consumed by [`Router::run`].
pub struct Router {
    clients: HashMap<ClientId, ClientEntry>,
    patterns: HashMap<Pattern, HashSet<ClientId>>,
    channels: HashMap<Channel, ChannelState>,
    interest: watch::Sender<Interest>,
    store: Option<Arc<dyn SnapshotStore>>,
    /// For store fetches, whose answers come back as commands.
    commands: mpsc::Sender<Command>,
    stats: Arc<StatsInner>,
    max_subscriptions: usize,
}

impl Router {
    pub fn new(
        interest: watch::Sender<Interest>,
        store: Option<Arc<dyn SnapshotStore>>,
        commands: mpsc::Sender<Command>,
        stats: Arc<StatsInner>,
        max_subscriptions: usize,
    ) -> Router {
        Router {
            clients: HashMap::new(),
            patterns: HashMap::new(),
            channels: HashMap::new(),
            interest,
            store,
            commands,
            stats,
            max_subscriptions,
        }
    }

    /// Processes commands and bus messages until `stop`. Commands first: a subscription
    /// should take effect before the next burst of market data.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut local: Option<mpsc::Receiver<BusMessage>>,
        mut messages: mpsc::Receiver<BusMessage>,
        stop: CancellationToken,
    ) {
        let mut bus_open = true;
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                msg = recv_local(&mut local) => match msg {
                    Some(msg) => self.on_message(msg, true),
                    None => local = None,
                },
                msg = messages.recv(), if bus_open => match msg {
                    Some(msg) => self.on_message(msg, false),
                    None => {
                        tracing::debug!("bus closed; the router keeps serving commands");
                        bus_open = false;
                    }
                },
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Connect { id, queue } => {
                self.clients.insert(
                    id,
                    ClientEntry {
                        queue,
                        patterns: HashSet::new(),
                    },
                );
            }
            Command::Request { id, request } => self.on_request(id, request),
            Command::Refused { id, error } => {
                if let Some(c) = self.clients.get(&id) {
                    send_error(&c.queue, &error);
                }
            }
            Command::Disconnect { id } => self.on_disconnect(id),
            Command::Stored { channel, result } => self.on_stored(channel, result),
        }
    }

    fn on_request(&mut self, id: ClientId, request: Request) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        let queue = client.queue.clone();
        let req = request.req;
        match request.op {
            Op::Ping => push_reply(&queue, &Reply::Pong { req }),
            Op::Subscribe { patterns, since } => self.subscribe(id, &queue, patterns, since, req),
            Op::Unsubscribe { patterns } => self.unsubscribe(id, &queue, patterns, req),
        }
    }

    fn subscribe(
        &mut self,
        id: ClientId,
        queue: &Arc<ClientQueue>,
        patterns: Vec<Pattern>,
        since: bool,
        req: ReqId,
    ) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let fresh: Vec<Pattern> = patterns
            .iter()
            .filter(|p| !client.patterns.contains(*p))
            .cloned()
            .collect();
        if client.patterns.len() + fresh.len() > self.max_subscriptions {
            let error = RequestError::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "this connection holds {} patterns; {} more would exceed the limit of {}",
                    client.patterns.len(),
                    fresh.len(),
                    self.max_subscriptions
                ),
                req,
            );
            send_error(queue, &error);
            return;
        }
        client.patterns.extend(fresh.iter().cloned());
        push_reply(
            queue,
            &Reply::Subscribed {
                channels: Reply::names(&patterns),
                req: req.clone(),
            },
        );
        if since {
            let error = RequestError::new(
                ErrorCode::NotSupported,
                "durable replay (`since`) is not supported yet; subscribed to live events only",
                req,
            );
            send_error(queue, &error);
        }
        let mut interest_changed = false;
        for pattern in &fresh {
            let holders = self.patterns.entry(pattern.clone()).or_default();
            interest_changed |= holders.is_empty();
            holders.insert(id);
            self.add_to_channels(pattern, queue);
        }
        self.count_subscriptions(fresh.len() as i64);
        if interest_changed {
            self.publish_interest();
        }
    }

    /// Adds `queue` to every known channel `pattern` matches (and creates the channel of an
    /// exact pattern), delivering each channel's latest value or snapshot first.
    fn add_to_channels(&mut self, pattern: &Pattern, queue: &Arc<ClientQueue>) {
        if !pattern.is_wildcard() {
            if let Ok(channel) = Channel::parse(pattern.as_str()) {
                let kind = channel.kind();
                self.channels
                    .entry(channel)
                    .or_insert_with(|| ChannelState {
                        subscribers: Vec::new(),
                        cache: Cache::for_kind(kind),
                        local: false,
                    });
            }
        }
        let mut fetch = Vec::new();
        for (channel, state) in self.channels.iter_mut() {
            if !pattern.matches(channel) || state.has(queue.id()) {
                continue;
            }
            state.subscribers.push(queue.clone());
            if deliver_initial(channel, state, queue, self.store.is_some()) {
                fetch.push(channel.clone());
            }
        }
        for channel in fetch {
            self.fetch(channel, None);
        }
    }

    fn unsubscribe(
        &mut self,
        id: ClientId,
        queue: &Arc<ClientQueue>,
        patterns: Vec<Pattern>,
        req: ReqId,
    ) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        let missing: Vec<&str> = patterns
            .iter()
            .filter(|p| !client.patterns.contains(*p))
            .map(|p| p.as_str())
            .collect();
        if !missing.is_empty() {
            let error = RequestError::new(
                ErrorCode::NotSubscribed,
                format!("not subscribed to {}", missing.join(", ")),
                req,
            );
            send_error(queue, &error);
            return;
        }
        self.remove_patterns(id, &patterns);
        push_reply(
            queue,
            &Reply::Unsubscribed {
                channels: Reply::names(&patterns),
                req,
            },
        );
    }

    fn on_disconnect(&mut self, id: ClientId) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        let patterns: Vec<Pattern> = client.patterns.iter().cloned().collect();
        self.remove_patterns(id, &patterns);
        self.clients.remove(&id);
    }

    /// Drops `patterns` from client `id` and from every channel where no other pattern of
    /// the client still matches.
    fn remove_patterns(&mut self, id: ClientId, patterns: &[Pattern]) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        for p in patterns {
            client.patterns.remove(p);
        }
        let remaining = &client.patterns;
        let queue = &client.queue;
        let keep_unwatched = self.store.is_none();
        for (channel, state) in self.channels.iter_mut() {
            if !patterns.iter().any(|p| p.matches(channel))
                || remaining.iter().any(|p| p.matches(channel))
            {
                continue;
            }
            let before = state.subscribers.len();
            state.subscribers.retain(|q| q.id() != id);
            if state.subscribers.len() != before {
                queue.clear_broken(channel);
                if state.subscribers.is_empty() && !keep_unwatched && !state.local {
                    state.cache = Cache::for_kind(channel.kind());
                }
            }
        }
        let mut interest_changed = false;
        for p in patterns {
            if let Some(holders) = self.patterns.get_mut(p) {
                holders.remove(&id);
                if holders.is_empty() {
                    self.patterns.remove(p);
                    interest_changed = true;
                }
            }
        }
        self.count_subscriptions(-(patterns.len() as i64));
        if interest_changed {
            self.publish_interest();
        }
    }

    fn count_subscriptions(&self, delta: i64) {
        if delta == 0 {
            return;
        }
        crate::metrics::bot_subscriptions(delta as f64);
        if delta > 0 {
            self.stats
                .subscriptions
                .fetch_add(delta as u64, Ordering::Relaxed);
        } else {
            self.stats
                .subscriptions
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }

    fn publish_interest(&self) {
        let set: BTreeSet<Pattern> = self.patterns.keys().cloned().collect();
        self.interest.send_replace(Arc::new(set));
    }

    /// One bus message: update the channel's cache, then fan the same bytes out.
    /// `local`: the message comes from this instance's own publisher (hybrid), which
    /// delivers every message of its channels, so their caches are kept exact even while
    /// nobody subscribes — a bot that joins gets a snapshot at once, with no store lookup.
    fn on_message(&mut self, msg: BusMessage, local: bool) {
        if !self.channels.contains_key(&msg.channel) {
            let subscribers = self.resolve(&msg.channel);
            self.channels.insert(
                msg.channel.clone(),
                ChannelState {
                    subscribers,
                    cache: Cache::for_kind(msg.kind()),
                    local: false,
                },
            );
        }
        let Some(state) = self.channels.get_mut(&msg.channel) else {
            return;
        };
        state.local |= local;
        let maintain = self.store.is_none() || state.local;
        if state.subscribers.is_empty() && !maintain {
            // Nobody listens and the store can serve the next subscriber: keep nothing.
            return;
        }
        let Ok(text) = Utf8Bytes::try_from(msg.event_json()) else {
            tracing::warn!(channel = %msg.channel, "event is not UTF-8; skipped");
            return;
        };
        match &mut state.cache {
            Cache::Nothing => fan_out(&state.subscribers, &text, msg.ts_recv),
            Cache::Latest { value, .. } => {
                *value = Some((text.clone(), msg.ts_recv));
                fan_out(&state.subscribers, &text, msg.ts_recv);
            }
            Cache::Book(_) => {
                if let Some(fetch) = on_book(&msg.channel, state, msg.clone(), text) {
                    if fetch {
                        self.fetch(msg.channel.clone(), None);
                    }
                }
            }
        }
    }

    /// Subscribers of a channel seen for the first time: every client with a matching pattern.
    fn resolve(&self, channel: &Channel) -> Vec<Arc<ClientQueue>> {
        let mut ids: BTreeSet<ClientId> = BTreeSet::new();
        for (pattern, holders) in &self.patterns {
            if pattern.matches(channel) {
                ids.extend(holders.iter().copied());
            }
        }
        ids.iter()
            .filter_map(|id| self.clients.get(id).map(|c| c.queue.clone()))
            .collect()
    }

    /// Asks the store for `channel`'s latest value (after `delay`); the answer comes back as
    /// [`Command::Stored`].
    fn fetch(&mut self, channel: Channel, delay: Option<Duration>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        match &mut state.cache {
            Cache::Latest { fetching, .. } => *fetching = true,
            Cache::Book(b) => b.fetching = true,
            Cache::Nothing => return,
        }
        let commands = self.commands.clone();
        tokio::spawn(async move {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
            let result = match tokio::time::timeout(STORE_TIMEOUT, store.latest(&channel)).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    tracing::warn!(channel = %channel, cause = %e, "snapshot store lookup failed");
                    None
                }
                Err(_) => {
                    tracing::warn!(channel = %channel, "snapshot store lookup timed out");
                    None
                }
            };
            // The router is gone only during shutdown; nobody needs the answer then.
            let _ = commands.send(Command::Stored { channel, result }).await;
        });
    }

    fn on_stored(&mut self, channel: Channel, result: Option<BusMessage>) {
        let result = result.filter(|m| m.channel == channel);
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        let watched = !state.subscribers.is_empty();
        match &mut state.cache {
            Cache::Nothing => {}
            Cache::Latest { value, fetching } => {
                *fetching = false;
                // A live event that arrived meanwhile is newer than the stored one; and with
                // nobody watching, no live event will replace a stored value: keep none.
                if value.is_none() && watched {
                    if let Some(msg) = result {
                        if let Ok(text) = Utf8Bytes::try_from(msg.event_json()) {
                            *value = Some((text.clone(), msg.ts_recv));
                            fan_out(&state.subscribers, &text, msg.ts_recv);
                        }
                    }
                }
            }
            Cache::Book(cache) => {
                cache.fetching = false;
                if cache.live || !watched {
                    return;
                }
                let snapshot = result.and_then(|m| {
                    let book = m.book.clone()?;
                    (book.action == BookAction::Snapshot).then_some((m, book))
                });
                let retry = match snapshot {
                    None => true,
                    Some((_, book)) => !sync_from_snapshot(&channel, state, book),
                };
                if retry {
                    self.fetch(channel, Some(REFETCH_DELAY));
                }
            }
        }
    }
}

/// The next local message; pending forever when there is no local input (or it closed).
async fn recv_local(local: &mut Option<mpsc::Receiver<BusMessage>>) -> Option<BusMessage> {
    match local.as_mut() {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What a new subscriber of `channel` gets before live events. Returns true when the
/// cache is empty and should be fetched from the store.
fn deliver_initial(
    channel: &Channel,
    state: &mut ChannelState,
    queue: &Arc<ClientQueue>,
    has_store: bool,
) -> bool {
    match &mut state.cache {
        Cache::Nothing => false,
        Cache::Latest { value, fetching } => match value {
            Some((text, ts_recv)) => {
                queue.push_market(text.clone(), *ts_recv, None);
                false
            }
            None => has_store && !*fetching,
        },
        Cache::Book(cache) => {
            if cache.live {
                send_snapshot(channel, cache, queue);
                false
            } else {
                // Syncing: this bot gets the snapshot with everyone else once it arrives.
                has_store && !cache.fetching
            }
        }
    }
}

/// A book message. Returns `Some(true)` when a store fetch should start.
fn on_book(
    channel: &Channel,
    state: &mut ChannelState,
    msg: BusMessage,
    text: Utf8Bytes,
) -> Option<bool> {
    let Cache::Book(cache) = &mut state.cache else {
        return None;
    };
    let book = msg.book.clone()?;
    match book.action {
        BookAction::Snapshot => {
            // A snapshot in the middle of a live chain (the host resynced): the book's own
            // subscribers hear `resync` first, as they do when the break is seen here.
            if cache.live {
                let status = resync_status(channel, "the exchange feed resynchronised");
                fan_out(&state.subscribers, &status.0, status.1);
            }
            // Anything buffered came earlier on the bus, so this snapshot supersedes it.
            if cache.reset(&book) {
                fan_out_book(channel, &state.subscribers, cache, &text, msg.ts_recv);
            }
            Some(false)
        }
        BookAction::Delta if !cache.live => {
            if cache.buffer.len() >= SYNC_BUFFER_MAX {
                cache.buffer.pop_front();
            }
            cache.buffer.push_back(msg);
            Some(!cache.fetching)
        }
        BookAction::Delta => {
            if let (Some(seq), Some(at)) = (book.seq, cache.book.seq()) {
                if seq <= at {
                    // Already applied (a duplicate delivery): passing it on would break chains.
                    return Some(false);
                }
            }
            match cache.book.apply(&book) {
                Ok(()) => {
                    cache.template = Some(book);
                    cache.encoded = None;
                    fan_out_book(channel, &state.subscribers, cache, &text, msg.ts_recv);
                    Some(false)
                }
                Err(e) => {
                    start_resync(channel, state, e.to_string(), [msg]);
                    Some(true)
                }
            }
        }
    }
}

/// The chain broke: tell the subscribers, buffer from `pending` on, wait for a snapshot.
fn start_resync(
    channel: &Channel,
    state: &mut ChannelState,
    reason: String,
    pending: impl IntoIterator<Item = BusMessage>,
) {
    let Cache::Book(cache) = &mut state.cache else {
        return;
    };
    crate::metrics::book_resync(channel.exchange(), "bus");
    tracing::info!(channel = %channel, cause = %reason, "book chain broken; resyncing");
    cache.live = false;
    cache.encoded = None;
    cache.buffer = pending.into_iter().collect();
    let status = resync_status(channel, &reason);
    fan_out(&state.subscribers, &status.0, status.1);
}

/// Applies a snapshot from the store to a Syncing book. Returns false when it is too old
/// for the buffered deltas (ask again later).
fn sync_from_snapshot(channel: &Channel, state: &mut ChannelState, book: Arc<Book>) -> bool {
    let Cache::Book(cache) = &mut state.cache else {
        return true;
    };
    let snap_seq = book.seq.unwrap_or(0);
    while cache
        .buffer
        .front()
        .is_some_and(|d| d.book.as_ref().and_then(|b| b.seq).unwrap_or(0) <= snap_seq)
    {
        cache.buffer.pop_front();
    }
    if let Some(first) = cache.buffer.front() {
        let prev = first.book.as_ref().and_then(|b| b.prev_seq);
        if prev != book.seq {
            tracing::debug!(channel = %channel, snapshot = snap_seq, next_prev = ?prev, "stored snapshot does not meet the buffered deltas");
            return false;
        }
    }
    let buffered = std::mem::take(&mut cache.buffer);
    if !cache.reset(&book) {
        cache.buffer = buffered;
        return false;
    }
    // Catch up on the buffered deltas before anyone sees the book: subscribers get one
    // snapshot of the current state, not an older snapshot followed by a burst of deltas
    // that waited (up to a snapshot refresh period) for it.
    let mut rest = buffered.into_iter();
    while let Some(delta) = rest.next() {
        let Some(d) = delta.book.clone() else {
            continue;
        };
        if let Err(e) = cache.book.apply(&d) {
            // A gap inside the buffer itself: sync again from this delta on.
            let reason = e.to_string();
            start_resync(channel, state, reason, std::iter::once(delta).chain(rest));
            return false;
        }
        cache.template = Some(d);
    }
    cache.encoded = None;
    if let Some((text, ts_recv)) = cache.snapshot_text() {
        fan_out_book(channel, &state.subscribers, cache, &text, ts_recv);
    }
    true
}

fn resync_status(channel: &Channel, reason: &str) -> (Utf8Bytes, u64) {
    let event = Event::status(
        channel.exchange(),
        StatusState::Resync,
        Some(format!("{channel}: {reason}; a fresh snapshot follows")),
    );
    let ts_recv = event.ts_recv();
    let text =
        Utf8Bytes::try_from(event.to_json()).unwrap_or_else(|_| Utf8Bytes::from_static("{}"));
    (text, ts_recv)
}

fn fan_out(subscribers: &[Arc<ClientQueue>], text: &Utf8Bytes, ts_recv: u64) {
    for q in subscribers {
        q.push_market(text.clone(), ts_recv, None);
    }
}

/// Fans a book frame out; a bot whose chain `drop_oldest` cut gets a resync status and a
/// snapshot of the book as it is after this frame instead.
fn fan_out_book(
    channel: &Channel,
    subscribers: &[Arc<ClientQueue>],
    cache: &mut BookCache,
    text: &Utf8Bytes,
    ts_recv: u64,
) {
    for q in subscribers {
        if q.push_market(text.clone(), ts_recv, Some(channel)) == Push::Broken {
            crate::metrics::book_resync(channel.exchange(), "bot_queue");
            let (status, ts) = resync_status(channel, "frames dropped for this slow connection");
            q.push_market(status, ts, None);
            send_snapshot(channel, cache, q);
        }
    }
}

fn send_snapshot(channel: &Channel, cache: &mut BookCache, queue: &ClientQueue) {
    if let Some((text, ts_recv)) = cache.snapshot_text() {
        queue.push_market(text, ts_recv, Some(channel));
    }
}

fn push_reply(queue: &ClientQueue, reply: &Reply) {
    queue.push_control(Utf8Bytes::from(reply.to_json()));
}

fn send_error(queue: &ClientQueue, error: &RequestError) {
    crate::metrics::bot_request_refused(error.code.as_str());
    push_reply(queue, &error.reply());
}
