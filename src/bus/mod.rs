//! The bus between the exchange side and the bot side: traits and the publishing pipeline.
//!
//! - [`Sequencer`] turns each [`Event`] into a [`BusMessage`]: it assigns the per-channel
//!   `seq` of this instance's `src` and serializes the event once, inside its envelope.
//! - [`Bus`] is the seam for transports: [`memory::MemoryBus`] (demo, hybrid local
//!   delivery) and [`redis::RedisPublisher`] (pipelined PUBLISH plus latest-value keys).
//!   [`Tee`] sends one message to two buses (hybrid).
//! - [`redis::RedisSubscriber`] is the receiving side: it follows the [`Interest`] set the
//!   gateway publishes, self-filters by `src`, counts lost and duplicate envelopes.
//! - Redis is a trust boundary: [`validate`] checks each event read from it against its
//!   channel and PROTOCOL §2, [`seq`] keeps one forged `seq` from silencing a channel,
//!   [`signing`] signs envelopes and verifies them (opt-in, `[redis] signing_keys`).
//! - [`SnapshotStore`] lets the gateway fetch the latest value or book snapshot of a
//!   channel (`{p}last:` / `{p}snapshot:` keys) when a bot subscribes; for books also the
//!   short log of book messages published since that snapshot (`{p}booklog:`), read in
//!   the same atomic step, so the gateway can catch up to the live chain exactly.
//! - [`StreamStore`] lets the gateway read a durable channel's stream (`{p}stream:`):
//!   its bounds and pages of entries, for a bot's `since` replay, and its newest entry.
//! - [`BusState`]: whether the receiving side currently has the bus (the Redis subscriber
//!   sets it, the gateway tells bots).
//!
//! This module never imports `gateway` or `exchange`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use uuid::Uuid;

use crate::durable::StreamId;
use crate::envelope::BusMessage;
use crate::event::{now_micros, Channel, Event, Pattern};

pub mod delivery;
pub mod memory;
pub mod redis;
#[cfg(test)]
pub(crate) mod redis_test_server;
pub mod seq;
pub mod signing;
pub mod throttle;
pub mod validate;

/// The subscription patterns some local bot holds; the Redis subscriber follows this set.
pub type Interest = Arc<BTreeSet<Pattern>>;

/// Errors of the bus layer.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("bad envelope: {0}")]
    Envelope(#[from] crate::envelope::EnvelopeError),
    #[error("bus closed")]
    Closed,
    /// A stored value was larger than `redis.max_snapshot_bytes`; it was not read.
    #[error("stored value `{key}` holds {bytes} bytes, over the limit of {limit}")]
    TooLarge { key: String, bytes: u64, limit: u64 },
    /// Redis could not be reached (refused, timed out, bad URL): the one-line startup error.
    #[error("cannot reach Redis at {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// A transport that carries published messages.
pub trait Bus: Send + Sync + 'static {
    /// Hands `msg` to the transport. Never blocks on the network: a transport that cannot
    /// keep up drops and counts (Redis) or applies backpressure to the caller (memory).
    fn publish(&self, msg: BusMessage) -> impl Future<Output = ()> + Send;
}

/// Sends each message to two buses: hybrid publishes to Redis and delivers locally.
pub struct Tee<A, B>(pub A, pub B);

impl<A: Bus, B: Bus> Bus for Tee<A, B> {
    async fn publish(&self, msg: BusMessage) {
        self.0.publish(msg.clone()).await;
        self.1.publish(msg).await;
    }
}

/// Boxed future returned by [`SnapshotStore`] (object safe, so the gateway can hold a `dyn`).
pub type StoreFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<BusMessage>, BusError>> + Send + 'a>>;

/// A book as the store holds it: the newest snapshot and the book messages published
/// around and after it, oldest first. Entries of `log` older than the snapshot are
/// possible (the reader skips them by `seq`); a snapshot inside `log` supersedes the key.
#[derive(Debug, Clone)]
pub struct StoredBook {
    pub snapshot: BusMessage,
    pub log: Vec<BusMessage>,
}

/// Boxed future returned by [`SnapshotStore::book`].
pub type BookFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<StoredBook>, BusError>> + Send + 'a>>;

/// Where the gateway finds what a late joiner needs before live events.
pub trait SnapshotStore: Send + Sync + 'static {
    /// `book` channels: the newest full snapshot envelope; `ticker`/`candle`: the newest
    /// event's envelope; other types: `None`.
    fn latest(&self, channel: &Channel) -> StoreFuture<'_>;

    /// `book` channels: the snapshot and the log after it, read atomically, so that the
    /// log's deltas chain onto the snapshot. A store without a log serves the snapshot
    /// alone (the gateway then relies on the deltas it buffered from the bus).
    fn book(&self, channel: &Channel) -> BookFuture<'_> {
        let channel = channel.clone();
        Box::pin(async move {
            Ok(self.latest(&channel).await?.map(|snapshot| StoredBook {
                snapshot,
                log: Vec::new(),
            }))
        })
    }
}

/// What a durable channel's stream holds now (`XINFO STREAM`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamBounds {
    /// Entries held.
    pub len: u64,
    /// The oldest entry held (`None`: empty).
    pub first: Option<StreamId>,
    /// The newest id ever added (`last-generated-id`; also with the entry deleted since).
    pub last: StreamId,
    /// The newest id ever deleted by `XDEL` (Redis 7 does not move it when trimming):
    /// an entry after a bot's `since` was lost when this is past it. `None`: the server
    /// does not say (Redis < 7).
    pub max_deleted: Option<StreamId>,
    /// Entries ever added (`entries-added`, Redis 7): equal to `len` when nothing was ever
    /// trimmed or deleted.
    pub added: Option<u64>,
}

/// Entries read from a stream, oldest first.
#[derive(Debug, Clone, Default)]
pub struct StreamPage {
    /// The valid entries, decoded, each with its `id`.
    pub messages: Vec<BusMessage>,
    /// Entries read, valid or not: fewer than asked means the end of the stream.
    pub read: usize,
    /// The id of the last entry read (valid or not): the next page starts after it.
    pub last: Option<StreamId>,
    /// Entries refused (not an envelope of the channel, bad signature, id mismatch).
    pub skipped: usize,
    /// The largest entry read, in bytes (to size the next page).
    pub largest: usize,
}

/// Boxed future of a [`StreamStore`] read.
pub type StreamFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BusError>> + Send + 'a>>;

/// Reads durable channels' streams (object safe, so the gateway can hold a `dyn`).
pub trait StreamStore: Send + Sync + 'static {
    /// The stream's bounds; `None` when there is no stream.
    fn bounds(&self, channel: &Channel) -> StreamFuture<'_, Option<StreamBounds>>;

    /// At most `count` entries with ids from `from` (inclusive), oldest first.
    fn range(
        &self,
        channel: &Channel,
        from: StreamId,
        count: usize,
    ) -> StreamFuture<'_, StreamPage>;

    /// Walks back from the newest entry over the entries with ids after `after`, at most
    /// `max` of them: how many it walked and the oldest id it reached (no entry is
    /// transferred).
    fn count_back(
        &self,
        channel: &Channel,
        after: StreamId,
        max: u64,
    ) -> StreamFuture<'_, (u64, Option<StreamId>)>;

    /// The newest valid entry (a durable ticker's latest value, with its id).
    fn newest(&self, channel: &Channel) -> StoreFuture<'_>;
}

/// Whether the receiving side of the bus is connected: the Redis subscriber sets it, the
/// router tells the bots of affected channels when it goes down and comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusState {
    Up,
    /// Down, with the cause as the subscriber saw it (connection lost, probe timed out).
    Down(String),
}

impl BusState {
    /// Marks the bus down with `cause`, unless it is already down (the first cause stays:
    /// every failed reconnect attempt is not news to a bot). True when it changed.
    pub fn set_down(state: &tokio::sync::watch::Sender<BusState>, cause: &str) -> bool {
        state.send_if_modified(|s| match s {
            BusState::Down(_) => false,
            BusState::Up => {
                *s = BusState::Down(cause.to_string());
                true
            }
        })
    }

    /// Marks the bus up. True when it changed.
    pub fn set_up(state: &tokio::sync::watch::Sender<BusState>) -> bool {
        state.send_if_modified(|s| {
            let changed = *s != BusState::Up;
            *s = BusState::Up;
            changed
        })
    }
}

/// Assigns `seq` per channel for this instance and encodes each event once (signed when
/// it holds keys).
pub struct Sequencer {
    src: Uuid,
    next: HashMap<Channel, u64>,
    keys: Option<Arc<signing::Keyring>>,
}

impl Sequencer {
    pub fn new(src: Uuid) -> Sequencer {
        Sequencer {
            src,
            next: HashMap::new(),
            keys: None,
        }
    }

    /// Signs every envelope with the first of `keys` (`None`: unsigned).
    pub fn with_keys(mut self, keys: Option<Arc<signing::Keyring>>) -> Sequencer {
        self.keys = keys;
        self
    }

    pub fn src(&self) -> Uuid {
        self.src
    }

    /// The envelope for `event`: `seq` is 1 for a channel's first event, then +1 each.
    pub fn wrap(&mut self, event: Event) -> BusMessage {
        let channel = event.channel();
        let seq = match self.next.get_mut(&channel) {
            Some(seq) => {
                *seq += 1;
                *seq
            }
            None => {
                self.next.insert(channel.clone(), 1);
                1
            }
        };
        BusMessage::encode_signed(
            channel,
            self.src,
            seq,
            now_micros(),
            event,
            self.keys.as_deref(),
        )
    }
}

/// Runs the publishing side until `events` closes: every event is wrapped once (signed
/// with the first of `keys`, if any) and handed to `bus`. Returns after the last event was
/// handed over (the flush on shutdown).
pub async fn run_publisher(
    mut events: tokio::sync::mpsc::Receiver<Event>,
    src: Uuid,
    keys: Option<Arc<signing::Keyring>>,
    bus: impl Bus,
) {
    let mut sequencer = Sequencer::new(src).with_keys(keys);
    while let Some(event) = events.recv().await {
        bus.publish(sequencer.wrap(event)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Exchange, StatusState};

    #[test]
    fn sequence_is_per_channel_from_one() {
        let mut s = Sequencer::new(Uuid::new_v4());
        let status = || Event::status(Exchange::Binance, StatusState::Connected, None);
        let a = s.wrap(status());
        let b = s.wrap(status());
        let other = s.wrap(Event::status(
            Exchange::Kraken,
            StatusState::Connected,
            None,
        ));
        assert_eq!((a.seq, b.seq, other.seq), (1, 2, 1));
        assert_eq!(a.src, s.src());
    }
}
