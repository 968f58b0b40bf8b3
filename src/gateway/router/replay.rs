//! Bot recovery with `since` (PROTOCOL §4): the router replays a durable channel's stream
//! to one client, then switches it to live events with no gap and no duplicate.
//!
//! Per (client, channel) a [`Replay`] goes through:
//! - **Fetching**: a task reads the stream's bounds (`XINFO STREAM`) and pages of entries
//!   (`XRANGE`); each answer comes back as [`Command::Replayed`] (matched by fetch id;
//!   dropping the replay aborts the task, so a client that leaves cancels its reads).
//!   Entries after the cursor go to the client at once. Meanwhile the live messages of the
//!   channel (from the stream consumer, `id: Some`, in id order) are not fanned out to this
//!   client but buffered, at most [`BUFFER_MAX`]; on overflow the buffer is dropped and the
//!   replay simply reads further pages (the dropped messages are in the stream).
//! - The **switch** happens once a page reaches the first buffered id, or — with nothing
//!   buffered — the stream's end (a short page): the buffered messages after the cursor
//!   are delivered, then `{"type":"recovered","channel":…,"count":N}`, N counting every
//!   event delivered between `subscribed` and `recovered`.
//! - **Done**: live messages with an id at or below the last one delivered are duplicates
//!   of the replay (a stream consumer behind the replay): skipped for this client until the
//!   first newer one, then the entry is forgotten and the client is an ordinary subscriber.
//!   After a switch with nothing buffered, that first newer live message is held and the
//!   stream read up to it first: the live source may have started after the last page was
//!   read (a subscription taking effect), and what it never delivered is in the stream.
//!
//! What this relies on, and nothing more: an entry is in the stream before it is
//! delivered live, and once the live source delivers a channel it does so in id order
//! without holes (trim gaps are announced separately, as `gap`).
//!
//! Truncation: when entries after `since` were deleted (`max-deleted-entry-id` past it, or
//! no stream at all for a `since` above `0-0`), or more than `[durable] max_replay` entries
//! follow it, the client first gets `{"type":"error","code":"history_truncated",…}`, then
//! the replay of what the stream still holds (at most the newest `max_replay`), then
//! `recovered` and live events. A failed read gives `replay_failed`, then live events.
//!
//! A `book` channel is state, not history: `since` on a durable book takes the normal
//! snapshot path and `recovered` (count 0) follows the snapshot once the book is live.
//!
//! Backpressure: a page is read only while the client's queue is at most half full, and a
//! page is at most half the queue, so a replay never pushes a reading bot into
//! `drop_oldest`. Pages aim at [`PAGE_BYTES`] (sized from the largest entry seen).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{push_reply, ClientEntry, Command, Router};
use crate::bus::StreamStore;
use crate::durable::{DurablePolicy, StreamId};
use crate::envelope::BusMessage;
use crate::event::{Channel, EventType};
use crate::gateway::client::{ClientId, ClientQueue};
use crate::gateway::protocol::{ErrorCode, Reply, ReqId, Since};
pub(super) use reads::durable_latest;
pub use reads::Replayed;
use reads::{spawn_read, start};

/// Live messages buffered per replaying (client, channel) before the buffer is dropped
/// in favour of further stream pages.
pub(super) const BUFFER_MAX: usize = 10_000;
/// Most entries one page reads.
pub(super) const PAGE_MAX: usize = 512;
/// What a page aims at, in bytes (pages shrink when entries are large).
pub(super) const PAGE_BYTES: usize = 1 << 20;

/// The durable replay side of the router.
pub(super) struct Replays {
    streams: Option<Arc<dyn StreamStore>>,
    policy: DurablePolicy,
    max_replay: u64,
    pub(super) page_max: usize,
    pub(super) buffer_max: usize,
    /// Per channel, the clients replaying it or just switched (Done).
    active: HashMap<Channel, Vec<Replay>>,
    /// Where read answers go (the router's command input).
    commands: Option<mpsc::Sender<Command>>,
    /// Per book channel, the clients that asked `since` and wait for a live book.
    books: HashMap<Channel, Vec<Arc<ClientQueue>>>,
    next_fetch: u64,
}

struct Replay {
    queue: Arc<ClientQueue>,
    req: ReqId,
    /// The last id delivered to the client.
    cursor: StreamId,
    /// The last id read from the stream (valid or not): the next page starts after it.
    read_to: Option<StreamId>,
    count: u64,
    truncated: bool,
    /// Switched with no live message seen: the live source may have started after the
    /// last page was read (a subscription taking effect), so the first live message is
    /// checked against the stream before it is delivered.
    verify: bool,
    /// Reading for that check: its switch sends no second `recovered`.
    verifying: bool,
    /// `None`: switched (Done).
    fetching: Option<Fetching>,
}

struct Fetching {
    id: u64,
    task: AbortHandle,
    /// Entries the read asks for.
    asked: usize,
    /// Live messages held back, in id order.
    buffer: VecDeque<(StreamId, Utf8Bytes, u64)>,
    /// The largest entry seen (sizes the next page).
    largest: usize,
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Replays {
    pub(super) fn new() -> Replays {
        Replays {
            streams: None,
            policy: DurablePolicy::default(),
            max_replay: 0,
            page_max: PAGE_MAX,
            buffer_max: BUFFER_MAX,
            active: HashMap::new(),
            commands: None,
            books: HashMap::new(),
            next_fetch: 0,
        }
    }

    pub(super) fn configure(
        &mut self,
        streams: Arc<dyn StreamStore>,
        policy: DurablePolicy,
        max_replay: usize,
        commands: mpsc::Sender<Command>,
    ) {
        self.commands = Some(commands);
        self.streams = Some(streams);
        self.policy = policy;
        self.max_replay = max_replay as u64;
    }

    /// The stream store to read `channel`'s latest value from, when it is durable.
    pub(super) fn durable_streams(&self, channel: &Channel) -> Option<Arc<dyn StreamStore>> {
        self.streams
            .clone()
            .filter(|_| self.policy.is_durable(channel))
    }

    /// Why `since` cannot be honoured for `client` (the request is then refused whole).
    pub(super) fn check(&self, client: &ClientEntry, since: &Since) -> Result<(), String> {
        for (channel, _) in since {
            if self.streams.is_none() || !self.policy.is_durable(channel) {
                return Err(format!(
                    "`since` needs a durable channel; `{channel}` is not durable on this server"
                ));
            }
            if client.patterns.iter().any(|p| p.matches(channel)) {
                return Err(format!(
                    "already subscribed to `{channel}`: unsubscribe first to replay it with `since`"
                ));
            }
        }
        Ok(())
    }

    /// A live message of a channel someone replays: buffered for the replaying clients
    /// (and dropped for switched ones when it is a duplicate). Returns the clients the
    /// normal fan-out must skip; empty (no allocation) when nobody replays the channel.
    pub(super) fn on_live(&mut self, msg: &BusMessage, text: &Utf8Bytes) -> Vec<ClientId> {
        if self.active.is_empty() {
            return Vec::new();
        }
        let Some(replays) = self.active.get_mut(&msg.channel) else {
            return Vec::new();
        };
        let buffer_max = self.buffer_max;
        let page_max = self.page_max;
        let mut skip = Vec::with_capacity(replays.len());
        let (streams, commands) = (&self.streams, &self.commands);
        let next_fetch = &mut self.next_fetch;
        replays.retain_mut(|r| {
            let Some(id) = msg.id else {
                // Durable channels come from the stream consumer with ids; a message
                // without one cannot be placed: not for a client mid-replay.
                if r.fetching.is_some() {
                    skip.push(r.queue.id());
                }
                return true;
            };
            match &mut r.fetching {
                Some(f) => {
                    skip.push(r.queue.id());
                    if f.buffer.len() >= buffer_max {
                        // The stream holds them: read further pages instead.
                        f.buffer.clear();
                    }
                    f.buffer.push_back((id, text.clone(), msg.ts_recv));
                    true
                }
                None if id <= r.cursor => {
                    skip.push(r.queue.id());
                    true
                }
                None if r.verify => {
                    // Anything between the cursor and this first live message? Read the
                    // stream up to it first (it waits in the buffer).
                    r.verify = false;
                    let (Some(streams), Some(commands), Some(from)) =
                        (streams.clone(), commands, r.cursor.next())
                    else {
                        return false;
                    };
                    *next_fetch += 1;
                    let asked = page_max.min(r.queue.capacity() / 2).max(1);
                    let task = spawn_read(commands, &r.queue, &msg.channel, *next_fetch, {
                        move |channel: Channel| async move {
                            match streams.range(&channel, from, asked).await {
                                Ok(page) => Replayed::Page(page),
                                Err(e) => Replayed::Failed(e.to_string()),
                            }
                        }
                    });
                    r.verifying = true;
                    r.fetching = Some(Fetching {
                        id: *next_fetch,
                        task,
                        asked,
                        buffer: VecDeque::from([(id, text.clone(), msg.ts_recv)]),
                        largest: 0,
                    });
                    skip.push(r.queue.id());
                    true
                }
                // Past the replay: an ordinary subscriber from now on.
                None => false,
            }
        });
        if replays.is_empty() {
            self.active.remove(&msg.channel);
        }
        skip
    }

    /// The clients a stored latest value must not reach: those replaying `channel` or
    /// just switched (they have that history, or get it live).
    pub(super) fn skip_stored(&self, channel: &Channel) -> Vec<ClientId> {
        self.active
            .get(channel)
            .map(|rs| rs.iter().map(|r| r.queue.id()).collect())
            .unwrap_or_default()
    }

    /// The client left `channel` (or the connection): its replay and reads are dropped.
    pub(super) fn forget(&mut self, client: ClientId, channel: &Channel) {
        if let Some(rs) = self.active.get_mut(channel) {
            rs.retain(|r| r.queue.id() != client);
            if rs.is_empty() {
                self.active.remove(channel);
            }
        }
        if let Some(qs) = self.books.get_mut(channel) {
            qs.retain(|q| q.id() != client);
            if qs.is_empty() {
                self.books.remove(channel);
            }
        }
    }

    pub(super) fn forget_client(&mut self, client: ClientId) {
        for rs in self.active.values_mut() {
            rs.retain(|r| r.queue.id() != client);
        }
        self.active.retain(|_, rs| !rs.is_empty());
        for qs in self.books.values_mut() {
            qs.retain(|q| q.id() != client);
        }
        self.books.retain(|_, qs| !qs.is_empty());
    }

    /// Book channels: `recovered` (count 0) to the waiting clients once the book is live
    /// (the snapshot went out just before).
    pub(super) fn book_live(&mut self, channel: &Channel, live: bool) {
        if !live || self.books.is_empty() {
            return;
        }
        if let Some(waiting) = self.books.remove(channel) {
            for q in waiting {
                recovered(&q, channel, 0);
                crate::metrics::stream_replay("recovered");
            }
        }
    }
}

impl Router {
    /// Makes `since` work: replays come from `streams` for the channels `policy` names
    /// durable, at most `max_replay` entries each.
    pub fn with_streams(
        mut self,
        streams: Arc<dyn StreamStore>,
        policy: DurablePolicy,
        max_replay: usize,
    ) -> Router {
        let commands = self.commands.clone();
        self.replay.configure(streams, policy, max_replay, commands);
        self
    }

    /// `since` for one fresh exact channel of a `subscribe` (the pattern is registered):
    /// a book takes the snapshot path, other types start a replay.
    pub(super) fn start_since(
        &mut self,
        queue: &Arc<ClientQueue>,
        channel: &Channel,
        since: StreamId,
        req: &ReqId,
    ) {
        let Ok(pattern) = crate::event::Pattern::parse(channel.as_str()) else {
            return;
        };
        if channel.kind() == EventType::Book {
            self.replay
                .books
                .entry(channel.clone())
                .or_default()
                .push(queue.clone());
            self.add_to_channels(&pattern, queue, false);
            let live = self.book_is_live(channel);
            self.replay.book_live(channel, live);
            return;
        }
        // Joins without the latest value: the replay brings the history instead.
        self.add_to_channels(&pattern, queue, true);
        let Some(streams) = self.replay.streams.clone() else {
            return;
        };
        let id = self.next_replay_fetch();
        let max = self.replay.max_replay;
        let asked = self.page_for(queue, 0);
        let Some(commands) = self.replay.commands.clone() else {
            return;
        };
        let task = spawn_read(
            &commands,
            queue,
            channel,
            id,
            move |channel: Channel| async move {
                start(streams.as_ref(), &channel, since, max, asked).await
            },
        );
        self.replay
            .active
            .entry(channel.clone())
            .or_default()
            .push(Replay {
                queue: queue.clone(),
                req: req.clone(),
                cursor: since,
                read_to: None,
                count: 0,
                truncated: false,
                verify: false,
                verifying: false,
                fetching: Some(Fetching {
                    id,
                    task,
                    asked,
                    buffer: VecDeque::new(),
                    largest: 0,
                }),
            });
    }

    pub(super) fn on_replayed(
        &mut self,
        client: ClientId,
        channel: Channel,
        fetch: u64,
        result: Replayed,
    ) {
        let Some(rs) = self.replay.active.get_mut(&channel) else {
            return;
        };
        let Some(at) = rs.iter().position(|r| {
            r.queue.id() == client && r.fetching.as_ref().is_some_and(|f| f.id == fetch)
        }) else {
            return;
        };
        let r = &mut rs[at];
        let page = match result {
            Replayed::Start {
                truncated,
                page,
                last,
            } => {
                r.cursor = r.cursor.min(last);
                if let Some(message) = truncated {
                    r.truncated = true;
                    push_reply(
                        &r.queue,
                        &Reply::ChannelError {
                            code: ErrorCode::HistoryTruncated,
                            channel: channel.to_string(),
                            message,
                            req: r.req.clone(),
                        },
                    );
                }
                page
            }
            Replayed::Page(page) => Some(page),
            Replayed::Failed(cause) => {
                tracing::warn!(channel = %channel, cause = %cause, "since replay failed; live events follow");
                push_reply(
                    &r.queue,
                    &Reply::ChannelError {
                        code: ErrorCode::ReplayFailed,
                        channel: channel.to_string(),
                        message: format!("the stream could not be read ({cause}); live events follow without recovered"),
                        req: r.req.clone(),
                    },
                );
                if !r.verifying {
                    crate::metrics::stream_replay("failed");
                }
                r.verifying = false;
                switch(r, &channel, false);
                return;
            }
        };
        let Some(f) = r.fetching.as_mut() else {
            return;
        };
        // No page: nothing after the cursor when the stream was looked at.
        let mut read = 0;
        if let Some(page) = page {
            let mut delivered = 0u64;
            for msg in page.messages {
                let Some(id) = msg.id else { continue };
                if id <= r.cursor {
                    continue;
                }
                if let Ok(text) = Utf8Bytes::try_from(msg.event_json()) {
                    r.queue.push_market(text, msg.ts_recv, None);
                    r.cursor = id;
                    delivered += 1;
                }
            }
            r.count += delivered;
            crate::metrics::stream_replayed(delivered);
            if let Some(last) = page.last {
                r.read_to = Some(r.read_to.map_or(last, |t| t.max(last)));
            }
            f.largest = f.largest.max(page.largest);
            read = page.read;
        }
        // With live messages held, the pages must reach the first of them (the live
        // source may have started late, after the stream's end was read); without, the
        // stream's end will do, and the first live message is checked later.
        let from = r.read_to.unwrap_or(r.cursor).next();
        let covered = match (f.buffer.front(), r.read_to) {
            (Some((first, _, _)), Some(read_to)) => read_to >= *first,
            (Some(_), None) => false,
            (None, _) => read < f.asked,
        };
        let Some(from) = from.filter(|_| !covered) else {
            if !r.verifying {
                let outcome = if r.truncated {
                    "truncated"
                } else {
                    "recovered"
                };
                crate::metrics::stream_replay(outcome);
            }
            let first = !r.verifying;
            r.verify = first && f.buffer.is_empty();
            r.verifying = false;
            switch(r, &channel, first);
            return;
        };
        let largest = f.largest;
        let queue = r.queue.clone();
        let Some(streams) = self.replay.streams.clone() else {
            return;
        };
        let asked = self.page_for(&queue, largest);
        let id = self.next_replay_fetch();
        let Some(commands) = self.replay.commands.clone() else {
            return;
        };
        let task = spawn_read(
            &commands,
            &queue,
            &channel,
            id,
            move |channel: Channel| async move {
                match streams.range(&channel, from, asked).await {
                    Ok(page) => Replayed::Page(page),
                    Err(e) => Replayed::Failed(e.to_string()),
                }
            },
        );
        if let Some(f) = self
            .replay
            .active
            .get_mut(&channel)
            .and_then(|rs| rs.iter_mut().find(|r| r.queue.id() == client))
            .and_then(|r| r.fetching.as_mut())
        {
            // Replacing the handle of the finished read: aborting it is a no-op.
            f.id = id;
            f.task = task;
            f.asked = asked;
        }
    }

    fn next_replay_fetch(&mut self) -> u64 {
        self.replay.next_fetch += 1;
        self.replay.next_fetch
    }

    /// Entries the next page of `queue`'s replay asks for.
    fn page_for(&self, queue: &ClientQueue, largest: usize) -> usize {
        let by_bytes = PAGE_BYTES / largest.max(1);
        by_bytes
            .min(self.replay.page_max)
            .min(queue.capacity() / 2)
            .max(1)
    }

    fn book_is_live(&self, channel: &Channel) -> bool {
        self.channels
            .get(channel)
            .is_some_and(|s| matches!(&s.cache, super::Cache::Book(b) if b.is_live()))
    }

    /// After a book cache event: `recovered` to the `since` clients once it is live.
    pub(super) fn replay_book_check(&mut self, channel: &Channel) {
        if self.replay.books.contains_key(channel) {
            let live = self.book_is_live(channel);
            self.replay.book_live(channel, live);
        }
    }
}

/// Ends the fetching phase: the buffered live messages after the cursor, then (`ok`)
/// `recovered`; later live duplicates are skipped by [`Replays::on_live`].
fn switch(r: &mut Replay, channel: &Channel, ok: bool) {
    let Some(mut f) = r.fetching.take() else {
        return;
    };
    for (id, text, ts_recv) in f.buffer.drain(..) {
        if id > r.cursor {
            r.queue.push_market(text, ts_recv, None);
            r.cursor = id;
            r.count += 1;
        }
    }
    if ok {
        recovered(&r.queue, channel, r.count);
    }
}

/// [`super::fan_out`] but for the clients in `skip` (those replaying: usually none).
pub(super) fn fan_out_except(
    subscribers: &[Arc<ClientQueue>],
    skip: &[ClientId],
    text: &Utf8Bytes,
    ts_recv: u64,
) {
    for q in subscribers {
        if skip.is_empty() || !skip.contains(&q.id()) {
            q.push_market(text.clone(), ts_recv, None);
        }
    }
}

fn recovered(queue: &ClientQueue, channel: &Channel, count: u64) {
    push_reply(
        queue,
        &Reply::Recovered {
            channel: channel.to_string(),
            count,
        },
    );
}

mod reads;
#[cfg(test)]
mod tests;
