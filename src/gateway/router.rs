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
//!   `book` channels an order book that is Live (the chain holds) or syncing (deltas are
//!   buffered until a snapshot arrives from the bus, or the [`SnapshotStore`]'s snapshot
//!   and catch-up log meet them): see [`book_cache`].
//!
//! Fan-out is one hash lookup and a clone of the shared event bytes per subscriber; events
//! are never re-serialized. The router itself serializes only what it makes: `resync`
//! status events and book snapshots for late joiners (once per book change).
//!
//! Caches: with a store (executor, hybrid), a channel's state exists only while someone
//! subscribes to it (the Redis subscriber stops delivering it afterwards and a kept cache
//! would go stale; the next subscriber reads the store), so the router's memory and the
//! cost of subscribe/unsubscribe/disconnect follow what bots hold now, never history.
//! Without a store (demo), and for a hybrid's own channels, every message arrives anyway:
//! caches of channels that carry messages are kept whether watched or not.
//! Exact patterns resolve by hash lookup; a wildcard looks only at the channels held now.
//! Channels only a wildcard reached are capped ([`WILDCARD_CHANNELS_MAX`]): past it,
//! messages on new names pass without state (books: dropped), so made-up names published
//! into Redis cannot grow the router's memory.
//! Store reads (one task each, cancellable, answers matched by id) live in
//! [`store_reads`]; `since` replays of durable channels (stream reads, the live buffer and
//! the switch to live) in [`replay`].
//!
//! Bus state ([`bus_state`]): when the Redis subscriber reports the bus down, every client holding a
//! channel that comes through it gets one `status` `disconnected` per exchange (detail
//! "redis bus down: <cause>"), and live books end their chain with `resync`; when it is
//! back, the same clients get `connected` and the books sync again from the store.

mod book_cache;
mod bus_state;
mod durable;
mod replay;
mod store_reads;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::client::{ClientId, ClientQueue};
use super::protocol::{ErrorCode, Op, Reply, ReqId, Request, RequestError, Since};
use super::StatsInner;
use crate::bus::delivery::{Acked, StreamNotice};
use crate::bus::{BusState, Interest, SnapshotStore};
use crate::envelope::BusMessage;
use crate::event::{Channel, Event, EventType, Exchange, Pattern, StatusState};
use book_cache::{BookCache, Next};
use bus_state::next_bus_state;
pub use replay::Replayed;
use replay::{fan_out_except, Replays};
use store_reads::Fetch;
pub use store_reads::Fetched;

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
    /// Answer of store read number `fetch` for `channel`.
    Stored {
        channel: Channel,
        fetch: u64,
        result: Fetched,
    },
    /// Answer of replay read number `fetch` of `client`'s `since` on `channel`.
    Replayed {
        client: ClientId,
        channel: Channel,
        fetch: u64,
        result: Replayed,
    },
}

struct ClientEntry {
    queue: Arc<ClientQueue>,
    patterns: HashSet<Pattern>,
}

enum Cache {
    /// `trade`: nothing to replay.
    Nothing,
    /// `ticker`, `candle`, `status`: the last event.
    Latest {
        value: Option<(Utf8Bytes, u64)>,
        /// Store reads in a row that failed (the retry backoff exponent).
        failed: u32,
    },
    Book(Box<BookCache>),
}

impl Cache {
    fn for_kind(kind: EventType, now: Instant) -> Cache {
        match kind {
            EventType::Ticker | EventType::Candle | EventType::Status => Cache::Latest {
                value: None,
                failed: 0,
            },
            EventType::Book => Cache::Book(Box::new(BookCache::new(now))),
            EventType::Trade => Cache::Nothing,
        }
    }
}

struct ChannelState {
    subscribers: Vec<Arc<ClientQueue>>,
    cache: Cache,
    /// Fed by this instance's own publisher: the cache is complete whether watched or not.
    local: bool,
    /// A message arrived on it: without a store its cache is worth keeping unwatched.
    seen: bool,
    /// Created by a message that no exact pattern named (counted against the wildcard cap).
    by_wildcard: bool,
    fetch: Option<Fetch>,
}

impl ChannelState {
    fn new(kind: EventType, subscribers: Vec<Arc<ClientQueue>>) -> ChannelState {
        ChannelState {
            subscribers,
            cache: Cache::for_kind(kind, Instant::now()),
            local: false,
            seen: false,
            by_wildcard: false,
            fetch: None,
        }
    }

    fn has(&self, id: ClientId) -> bool {
        self.subscribers.iter().any(|q| q.id() == id)
    }
}

/// Channels created by messages only wildcards match, at most: beyond, messages are passed
/// on without state, so made-up names on the bus cannot grow the router's memory.
pub const WILDCARD_CHANNELS_MAX: usize = 65_536;

/// Routing state; consumed by [`Router::run`].
pub struct Router {
    clients: HashMap<ClientId, ClientEntry>,
    /// Every pattern some client holds, with its holders (the keys are the [`Interest`]).
    patterns: HashMap<Pattern, HashSet<ClientId>>,
    /// The wildcard keys of `patterns`: what a newly seen channel is matched against.
    wildcards: HashSet<Pattern>,
    channels: HashMap<Channel, ChannelState>,
    interest: watch::Sender<Interest>,
    store: Option<Arc<dyn SnapshotStore>>,
    /// For store fetches, whose answers come back as commands.
    commands: mpsc::Sender<Command>,
    stats: Arc<StatsInner>,
    max_subscriptions: usize,
    bus_state: Option<watch::Receiver<BusState>>,
    /// The bus is down, with its cause.
    bus_down: Option<String>,
    /// (client, exchange) pairs told `disconnected` while the bus is down.
    told_down: HashSet<(ClientId, Exchange)>,
    next_fetch: u64,
    /// When a failed store read was last logged.
    store_warned: Option<Instant>,
    /// Channels held with `by_wildcard`, and their cap ([`WILDCARD_CHANNELS_MAX`]).
    wildcard_channels: usize,
    wildcard_cap: usize,
    /// `since` replays of durable channels ([`replay`]).
    replay: Replays,
    /// Durable channels: acks, redelivery dedup, gap notices ([`durable`]).
    durable: durable::Durable,
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
            wildcards: HashSet::new(),
            channels: HashMap::new(),
            interest,
            store,
            commands,
            stats,
            max_subscriptions,
            bus_state: None,
            bus_down: None,
            told_down: HashSet::new(),
            next_fetch: 0,
            store_warned: None,
            wildcard_channels: 0,
            wildcard_cap: WILDCARD_CHANNELS_MAX,
            replay: Replays::new(),
            durable: durable::Durable::default(),
        }
    }

    /// Acks every durable message (one with a stream id) on `acks` once routed.
    pub fn with_acks(mut self, acks: mpsc::Sender<Acked>) -> Router {
        self.durable.acks = Some(acks);
        self
    }

    /// Gaps and claimed entries from the stream consumer, read before bus messages.
    pub fn with_notices(mut self, notices: mpsc::Receiver<StreamNotice>) -> Router {
        self.durable.notices = Some(notices);
        self
    }

    /// Follows the bus state (the Redis subscriber's) to tell bots when it is down or back.
    pub fn with_bus_state(mut self, state: watch::Receiver<BusState>) -> Router {
        self.bus_state = Some(state);
        self
    }

    /// Channels the router holds state for (also exported as `mdbridge_router_channels`).
    pub fn channel_count(&self) -> usize {
        self.channels.len()
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
        let mut bus_state = self.bus_state.take();
        let mut notices = self.durable.notices.take();
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                // Before messages: after a recovery, books must start over before the
                // first new delta is looked at.
                state = next_bus_state(&mut bus_state) => match state {
                    Some(state) => self.on_bus_state(state),
                    None => bus_state = None,
                },
                notice = durable::recv_notice(&mut notices) => match notice {
                    Some(notice) => self.on_notice(notice),
                    None => notices = None,
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

    pub fn on_command(&mut self, cmd: Command) {
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
            Command::Stored {
                channel,
                fetch,
                result,
            } => self.on_stored(channel, fetch, result),
            Command::Replayed {
                client,
                channel,
                fetch,
                result,
            } => self.on_replayed(client, channel, fetch, result),
        }
        crate::metrics::router_channels(self.channels.len());
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
        since: Since,
        req: ReqId,
    ) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        if let Err(message) = self.replay.check(client, &since) {
            send_error(
                queue,
                &RequestError::new(ErrorCode::BadRequest, message, req),
            );
            return;
        }
        let mut fresh: Vec<Pattern> = Vec::new();
        for p in &patterns {
            if !client.patterns.contains(p) && !fresh.contains(p) {
                fresh.push(p.clone());
            }
        }
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
        let mut interest_changed = false;
        for pattern in &fresh {
            let holders = self.patterns.entry(pattern.clone()).or_default();
            interest_changed |= holders.is_empty();
            holders.insert(id);
            if pattern.is_wildcard() {
                self.wildcards.insert(pattern.clone());
            }
            match since.iter().find(|(c, _)| c.as_str() == pattern.as_str()) {
                Some((channel, from)) => self.start_since(queue, channel, *from, &req),
                None => self.add_to_channels(pattern, queue, false),
            }
        }
        self.count_subscriptions(fresh.len() as i64);
        if interest_changed {
            self.publish_interest();
        }
    }

    /// Adds `queue` to the channels `pattern` matches (creating the channel of an exact
    /// pattern), delivering each channel's latest value or snapshot first (not when
    /// `quiet`: a `since` replay brings the history instead).
    fn add_to_channels(&mut self, pattern: &Pattern, queue: &Arc<ClientQueue>, quiet: bool) {
        // An exact pattern may name a channel no message has created yet: clients whose
        // wildcards match it must be in its subscriber list from the start too (otherwise
        // they would miss it until the channel's state is made again).
        let holders = match Channel::parse(pattern.as_str()) {
            Ok(channel) if !pattern.is_wildcard() && !self.channels.contains_key(&channel) => {
                self.resolve(&channel)
            }
            _ => Vec::new(),
        };
        let mut join = Joining {
            quiet,
            has_store: self.store.is_some(),
            bus_down: self.bus_down.as_deref(),
            told_down: &mut self.told_down,
            fetch: Vec::new(),
        };
        if pattern.is_wildcard() {
            for (channel, state) in self.channels.iter_mut() {
                if pattern.matches(channel) {
                    join.join(channel, state, queue);
                }
            }
        } else if let Ok(channel) = Channel::parse(pattern.as_str()) {
            let state = self
                .channels
                .entry(channel.clone())
                .or_insert_with(|| ChannelState::new(channel.kind(), Vec::new()));
            if state.by_wildcard {
                // Named now: no longer a channel only a wildcard reached.
                state.by_wildcard = false;
                self.wildcard_channels -= 1;
            }
            for other in holders.iter().filter(|q| q.id() != queue.id()) {
                join.join(&channel, state, other);
            }
            join.join(&channel, state, queue);
        }
        for channel in std::mem::take(&mut join.fetch) {
            self.fetch(&channel, Duration::ZERO);
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
        let mut unique: Vec<Pattern> = Vec::with_capacity(patterns.len());
        for p in &patterns {
            if !unique.contains(p) {
                unique.push(p.clone());
            }
        }
        self.remove_patterns(id, &unique);
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
        self.replay.forget_client(id);
        if !self.told_down.is_empty() {
            self.told_down.retain(|(c, _)| *c != id);
        }
    }

    /// Drops `patterns` (distinct, all held) from client `id` and from every channel where
    /// no other pattern of the client still matches; forgets channels nobody holds.
    fn remove_patterns(&mut self, id: ClientId, patterns: &[Pattern]) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        for p in patterns {
            client.patterns.remove(p);
        }
        // Only the channels these patterns reach: a lookup for exact ones, the channels
        // held now for wildcards.
        let mut reached: Vec<Channel> = Vec::new();
        for p in patterns {
            if p.is_wildcard() {
                reached.extend(self.channels.keys().filter(|c| p.matches(c)).cloned());
            } else if let Ok(c) = Channel::parse(p.as_str()) {
                if self.channels.contains_key(&c) {
                    reached.push(c);
                }
            }
        }
        let keep_seen = self.store.is_none();
        for channel in reached {
            if client.patterns.iter().any(|p| p.matches(&channel)) {
                continue;
            }
            let Some(state) = self.channels.get_mut(&channel) else {
                continue;
            };
            let before = state.subscribers.len();
            state.subscribers.retain(|q| q.id() != id);
            if state.subscribers.len() == before {
                continue;
            }
            client.queue.clear_broken(&channel);
            self.replay.forget(id, &channel);
            if state.subscribers.is_empty() && !(state.seen && (keep_seen || state.local)) {
                // Dropping the state cancels a store read under way.
                if let Some(gone) = self.channels.remove(&channel) {
                    if gone.by_wildcard {
                        self.wildcard_channels -= 1;
                    }
                }
            }
        }
        let mut interest_changed = false;
        for p in patterns {
            if let Some(holders) = self.patterns.get_mut(p) {
                holders.remove(&id);
                if holders.is_empty() {
                    self.patterns.remove(p);
                    self.wildcards.remove(p);
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
        // Durable: a redelivery is dropped; otherwise acked when this returns.
        let Some(_ack) = self.durable.admit(&msg) else {
            return;
        };
        if !self.channels.contains_key(&msg.channel) {
            let subscribers = self.resolve(&msg.channel);
            if subscribers.is_empty() && self.store.is_some() && !local {
                // Nobody listens (a straggler after an unsubscribe) and the store can serve
                // the next subscriber: keep nothing.
                return;
            }
            let named = Pattern::parse(msg.channel.as_str())
                .ok()
                .is_some_and(|p| self.patterns.contains_key(&p));
            let by_wildcard = !named && !local;
            if by_wildcard && self.wildcard_channels >= self.wildcard_cap {
                // Anyone who can publish to Redis can make up names: past the cap, pass the
                // message on without keeping anything. A book cannot be checked without
                // state, so its messages are dropped (a chain that does not hold is never
                // passed on).
                crate::metrics::router_wildcard_overflow();
                if msg.kind() != EventType::Book {
                    if let Ok(text) = Utf8Bytes::try_from(msg.event_json()) {
                        fan_out(&subscribers, &text, msg.ts_recv);
                    }
                }
                return;
            }
            let mut state = ChannelState::new(msg.kind(), subscribers);
            state.by_wildcard = by_wildcard;
            self.wildcard_channels += usize::from(by_wildcard);
            self.channels.insert(msg.channel.clone(), state);
            crate::metrics::router_channels(self.channels.len());
        }
        let Some(state) = self.channels.get_mut(&msg.channel) else {
            return;
        };
        state.local |= local;
        state.seen = true;
        let Ok(text) = Utf8Bytes::try_from(msg.event_json()) else {
            tracing::warn!(channel = %msg.channel, "event is not UTF-8; skipped");
            return;
        };
        // Clients replaying this channel (`since`) get it through their replay.
        let skip = self.replay.on_live(&msg, &text);
        let next = match &mut state.cache {
            Cache::Nothing => {
                fan_out_except(&state.subscribers, &skip, &text, msg.ts_recv);
                return;
            }
            Cache::Latest { value, .. } => {
                *value = Some((text.clone(), msg.ts_recv));
                fan_out_except(&state.subscribers, &skip, &text, msg.ts_recv);
                return;
            }
            Cache::Book(cache) => {
                // A refcount, not a copy: the message itself moves into the cache.
                let channel = msg.channel.clone();
                let next = cache.on_message(&channel, &state.subscribers, msg, &text);
                (channel, next)
            }
        };
        self.apply(&next.0, next.1);
    }

    /// A stream consumer's notice: a trim gap for the channel's bots, or a claimed entry.
    fn on_notice(&mut self, notice: StreamNotice) {
        match notice {
            StreamNotice::Gap { channel, lost } => {
                let frame = durable::gap_frame(&channel, lost);
                let subscribers = match self.channels.get(&channel) {
                    Some(state) => state.subscribers.clone(),
                    None => self.resolve(&channel),
                };
                for q in &subscribers {
                    q.push_control(frame.clone());
                }
            }
            StreamNotice::Claimed(msg) => {
                self.durable.set_claimed(true);
                self.on_message(msg, false);
                self.durable.set_claimed(false);
            }
        }
    }

    /// Subscribers of a channel seen for the first time: every client with a matching
    /// pattern (an exact lookup, then the wildcards held now).
    fn resolve(&self, channel: &Channel) -> Vec<Arc<ClientQueue>> {
        let mut ids: BTreeSet<ClientId> = BTreeSet::new();
        if let Some(holders) = Pattern::parse(channel.as_str())
            .ok()
            .and_then(|p| self.patterns.get(&p))
        {
            ids.extend(holders.iter().copied());
        }
        for pattern in &self.wildcards {
            if pattern.matches(channel) {
                if let Some(holders) = self.patterns.get(pattern) {
                    ids.extend(holders.iter().copied());
                }
            }
        }
        ids.iter()
            .filter_map(|id| self.clients.get(id).map(|c| c.queue.clone()))
            .collect()
    }

    /// Carries out what a book cache asked for (after any event of a book cache).
    fn apply(&mut self, channel: &Channel, next: Next) {
        self.replay_book_check(channel);
        if let Next::Fetch { delay, replace } = next {
            let busy = self
                .channels
                .get(channel)
                .is_some_and(|s| s.fetch.is_some());
            if replace || !busy {
                self.fetch(channel, delay);
            }
        }
    }
}

/// A new subscriber joining channels, with what it needs from the router.
struct Joining<'a> {
    /// Join without the latest value / snapshot (a `since` replay of a non-book channel).
    quiet: bool,
    has_store: bool,
    bus_down: Option<&'a str>,
    told_down: &'a mut HashSet<(ClientId, Exchange)>,
    /// Channels whose cache is empty and should be read from the store.
    fetch: Vec<Channel>,
}

impl Joining<'_> {
    /// Adds `queue` to `channel` and gives it what it needs before live events: the bus
    /// state if it is down, then the latest value or the book snapshot.
    fn join(&mut self, channel: &Channel, state: &mut ChannelState, queue: &Arc<ClientQueue>) {
        if state.has(queue.id()) {
            return;
        }
        state.subscribers.push(queue.clone());
        if let Some(cause) = self.bus_down {
            if !state.local && self.told_down.insert((queue.id(), channel.exchange())) {
                let (text, ts) = status_text(
                    channel.exchange(),
                    StatusState::Disconnected,
                    format!("redis bus down: {cause}"),
                );
                queue.push_market(text, ts, None);
            }
        }
        if self.quiet {
            return;
        }
        let idle = state.fetch.is_none();
        let fetch = match &mut state.cache {
            Cache::Nothing => false,
            Cache::Latest { value, .. } => match value {
                Some((text, ts_recv)) => {
                    queue.push_market(text.clone(), *ts_recv, None);
                    false
                }
                None => true,
            },
            // Not live: this bot gets the snapshot with everyone else once it is exact.
            Cache::Book(cache) => cache.join(channel, queue),
        };
        if fetch && idle && self.has_store {
            self.fetch.push(channel.clone());
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

/// A `status` event the router makes, encoded (ts null, ts_recv now).
fn status_text(exchange: Exchange, state: StatusState, detail: String) -> (Utf8Bytes, u64) {
    let event = Event::status(exchange, state, Some(detail));
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

fn push_reply(queue: &ClientQueue, reply: &Reply) {
    queue.push_control(Utf8Bytes::from(reply.to_json()));
}

fn send_error(queue: &ClientQueue, error: &RequestError) {
    crate::metrics::bot_request_refused(error.code.as_str());
    push_reply(queue, &error.reply());
}
