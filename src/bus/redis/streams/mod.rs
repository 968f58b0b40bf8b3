//! Executor consumption of durable channels (PROTOCOL §3, docs/protocol.md §3): Redis
//! Streams read with a consumer group, handed to the bot router, acknowledged after
//! fan-out, retried, dead-lettered, and checked for entries lost to trimming.
//!
//! Owns: one task ([`StreamConsumer`]) with its own connection (blocking reads never share
//! the multiplexed one), which streams to read (`targets`), the read/deliver loop
//! (`reader`), retries and claims (`retry`), dead letters (`dead`) and trim-gap
//! detection (`trim`). Does not own: which channels are durable and the key names
//! ([`crate::durable`]), the append (publisher side), `since` replay (router), the admin
//! API and lag metrics (monitor), redelivery dedup and the bots' `gap` error (router,
//! `gateway::router::durable`).
//!
//! Behaviour:
//! - Streams read = the durable channels the local bots hold: exact patterns that are
//!   durable, and wildcards expanded against the registry SET `{p}streams`, re-read every
//!   `block_ms` (at least 100 ms) while a wildcard is held, so a wildcard reaches streams
//!   created after the subscription. At most [`MAX_STREAMS`] streams.
//! - A group this consumer creates starts at the Redis time the pattern was first held
//!   (not at `$`): Redis's `TIME` when the consumer noticed, less the time it took to notice
//!   (measured on this process's clock by a watcher of the interest, since a blocking read
//!   may hold it for up to `block_ms`) and a 250 ms margin. So entries appended between the
//!   bot's `subscribed` reply and the consumer noticing it are not skipped, and a plain
//!   subscribe is not handed seconds of history. An
//!   existing group goes on from its own cursor: a channel held again after a pause gets
//!   what was appended meanwhile (up to `MAXLEN`; a `gap` beyond).
//! - Group `DurableConfig::group_name`, consumer = the instance name; `XGROUP CREATE key
//!   group $|<ms>-0 MKSTREAM`, `BUSYGROUP` ignored. After every (re)connect each stream's
//!   own pending entries are read first (id `0`, then after the last id returned), then
//!   new ones (`>`, `COUNT read_count BLOCK block_ms`).
//! - Each entry is decoded with the `[redis]` [`DecodePolicy`] (size, signature, event vs
//!   channel; no age bound: entries are legitimately old), its envelope id must be the
//!   entry id, and it is handed to the router's bus input, awaited (backpressure: entries
//!   wait in Redis, never dropped). The router acks after fan-out ([`Acked`]); acks are
//!   batched into one `XACK` per stream per loop turn.
//! - An entry that cannot be handled is not acked: retried after `retry_backoff_ms` ×
//!   `retry_backoff_factor`^(deliveries-1) by `XCLAIM`ing it to itself (the delivery
//!   counter counts), up to `max_deliveries`, then `XADD {stream}:dead MAXLEN ~ 10000`
//!   plus `XACK` in one `MULTI`. Later entries keep flowing meanwhile.
//! - Entries pending longer than `claim_idle_ms` on *other* consumers of the group are
//!   taken over with `XPENDING … IDLE` + `XCLAIM` (not `XAUTOCLAIM`: it cannot leave out
//!   this consumer's own entries, which may still sit in the router's queue and would be
//!   delivered twice). Entries deleted meanwhile are skipped (Redis 7 drops them from the
//!   pending list) and counted as trimmed.
//! - Trim gaps (`trim`): per (`src`, stream) `seq` jumps, confirmed by the first id the
//!   stream still holds being past the last entry this consumer read; the router tells
//!   the channel's bots (`gap`).
//! - Reconnects like the subscriber: exponential backoff with jitter, a fresh [`Target`]
//!   resolve per session, health and [`BusState`] down when a session ends, up when the
//!   next one is connected; `redis_connected{role="consume"}`.

mod dead;
mod reader;
mod reply;
mod retry;
mod targets;
mod trim;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::subscriber::RateLimit;
use super::target::Target;
use super::{backoff, Recovery, RedisFailure};
use crate::bus::delivery::{Acked, StreamNotice};
use crate::bus::{BusState, Interest};
use crate::config::{DurableConfig, RedisConfig};
use crate::durable::{DurablePolicy, StreamId};
use crate::envelope::{BusMessage, DecodePolicy};
use crate::event::{Channel, Pattern};
use crate::health::HealthHandle;
use crate::metrics;

/// Most streams one executor reads at once (a wildcard over a huge registry is cut here,
/// logged).
pub const MAX_STREAMS: usize = 4_096;
/// Cap of each dead-letter stream: `XADD … MAXLEN ~ 10000`.
pub const DEAD_LETTER_MAXLEN: u64 = 10_000;

/// Who this consumer is and how it reads.
#[derive(Debug, Clone)]
pub struct ConsumerSetup {
    pub redis: RedisConfig,
    pub durable: DurableConfig,
    /// The consumer group (`DurableConfig::group_name`).
    pub group: String,
    /// The consumer name inside the group (the instance name).
    pub consumer: String,
}

/// The channels the consumer talks through.
pub struct ConsumerLinks {
    /// The patterns local bots hold (the router's interest).
    pub interest: watch::Receiver<Interest>,
    /// The router's bus input.
    pub out: mpsc::Sender<BusMessage>,
    /// Acks from the router ([`crate::gateway::router::Router::with_acks`]).
    pub acks: mpsc::Receiver<Acked>,
    /// Gaps and claimed entries for the router.
    pub notices: mpsc::Sender<StreamNotice>,
    pub health: HealthHandle,
    pub bus_state: watch::Sender<BusState>,
}

/// The stream consumer task. See the module docs.
pub struct StreamConsumer;

impl StreamConsumer {
    pub fn spawn(
        setup: ConsumerSetup,
        links: ConsumerLinks,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let target = match Target::new(&setup.redis, "consume") {
                Ok(t) => t,
                Err(e) => {
                    links.health.down(e.to_string());
                    warn!(cause = %e, "redis stream consumer has no usable client");
                    return;
                }
            };
            let mut consumer = Consumer::new(setup, links, target);
            let watcher = watch_interest(
                consumer.interest.clone(),
                consumer.interest_changed_at.clone(),
            );
            consumer.run(shutdown).await;
            watcher.abort();
        })
    }
}

/// Records the moment of the first interest change the consumer has not looked at yet.
fn watch_interest(
    mut interest: watch::Receiver<Interest>,
    changed_at: Arc<Mutex<Option<std::time::Instant>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while interest.changed().await.is_ok() {
            let mut at = changed_at.lock().unwrap_or_else(PoisonError::into_inner);
            at.get_or_insert_with(std::time::Instant::now);
        }
    })
}

/// Added to the measured wait before a new interest was noticed, for the `TIME` round trip
/// and scheduling.
const NOTICE_MARGIN_MS: u64 = 250;

/// Why one session ended.
enum End {
    Stop,
    Reconnect(String),
}

/// Where reading one stream stands in this session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cursor {
    /// Own pending entries after this id (`0` first).
    Pending(StreamId),
    /// New entries (`>`).
    New,
}

/// Where a group created by this consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// `$`: entries appended from now on (no time known for the pattern).
    Latest,
    /// `<ms>-0`: the pattern was first held at Redis time `ms` (back-dated).
    At(u64),
}

struct StreamState {
    key: String,
    start: Start,
    /// `XGROUP CREATE` done in this session.
    created: bool,
    cursor: Cursor,
    trim: trim::TrimTrack,
}

struct Consumer {
    redis: RedisConfig,
    durable: DurableConfig,
    policy: DurablePolicy,
    decode: DecodePolicy,
    group: String,
    name: String,
    target: Target,
    interest: watch::Receiver<Interest>,
    interest_open: bool,
    out: mpsc::Sender<BusMessage>,
    acks: mpsc::Receiver<Acked>,
    acks_open: bool,
    notices: mpsc::Sender<StreamNotice>,
    health: HealthHandle,
    bus_state: watch::Sender<BusState>,
    streams: BTreeMap<Channel, StreamState>,
    /// Redis time (ms, back-dated) at which each held pattern was first seen.
    held_since: HashMap<Pattern, u64>,
    /// When the interest last changed, by this process's clock, before this consumer
    /// looked (a watcher task sets it): a blocking read may hold the consumer up to
    /// `block_ms` before it notices a new subscription.
    interest_changed_at: Arc<Mutex<Option<std::time::Instant>>>,
    /// Channels of the registry SET, as last read.
    registry: Vec<Channel>,
    registry_at: Option<tokio::time::Instant>,
    /// Recompute the streams on the next turn (start, errors).
    refresh_now: bool,
    /// Acks from the router not yet sent as `XACK`.
    unacked: HashMap<Channel, Vec<StreamId>>,
    /// Ids in `unacked`.
    unacked_total: usize,
    /// Per channel, entries handed to the router and not acked by it yet...
    outstanding: HashMap<Channel, u64>,
    /// ...and their sum.
    in_flight: u64,
    /// First entry each stream held, asked after the current read (`trim`).
    first_held: HashMap<Channel, Option<StreamId>>,
    retries: retry::Retries,
    /// Entries claimed (from a peer, or back for a retry) and not handed over yet.
    unhanded: std::collections::HashSet<(Channel, StreamId)>,
    claim_at: tokio::time::Instant,
    invalid_log: RateLimit,
    trim_log: RateLimit,
    error_log: RateLimit,
    session_was_up: bool,
    /// Health went down for an error reply: up again after the next good turn.
    degraded: bool,
    /// Error replies so far (a turn without one restores health).
    failures: u64,
}

impl Consumer {
    fn new(setup: ConsumerSetup, links: ConsumerLinks, target: Target) -> Consumer {
        let policy = DurablePolicy::from_config(&setup.durable);
        let decode = DecodePolicy::from_config(&setup.redis);
        Consumer {
            redis: setup.redis,
            durable: setup.durable,
            policy,
            decode,
            group: setup.group,
            name: setup.consumer,
            target,
            interest: links.interest,
            interest_open: true,
            out: links.out,
            acks: links.acks,
            acks_open: true,
            notices: links.notices,
            health: links.health,
            bus_state: links.bus_state,
            streams: BTreeMap::new(),
            held_since: HashMap::new(),
            interest_changed_at: Arc::default(),
            registry: Vec::new(),
            registry_at: None,
            refresh_now: true,
            unacked: HashMap::new(),
            unacked_total: 0,
            outstanding: HashMap::new(),
            in_flight: 0,
            first_held: HashMap::new(),
            retries: retry::Retries::default(),
            unhanded: Default::default(),
            claim_at: tokio::time::Instant::now(),
            invalid_log: RateLimit::new(Duration::from_secs(10)),
            trim_log: RateLimit::new(Duration::from_secs(10)),
            error_log: RateLimit::new(Duration::from_secs(10)),
            session_was_up: false,
            degraded: false,
            failures: 0,
        }
    }

    async fn run(&mut self, shutdown: CancellationToken) {
        let mut delays = backoff(&self.redis);
        let mut sessions = 0u64;
        loop {
            // The session watches `shutdown` itself, to send the last acks on its way out.
            let end = self.session(&shutdown, sessions).await;
            metrics::redis_connected("consume", false);
            match end {
                End::Stop => {
                    self.health.down("shut down");
                    return;
                }
                End::Reconnect(cause) => {
                    warn!(cause = %cause, "redis stream consumer lost its connection; reconnecting");
                    BusState::set_down(&self.bus_state, &cause);
                    self.health.down(cause);
                }
            }
            if std::mem::take(&mut self.session_was_up) {
                delays = backoff(&self.redis);
            }
            sessions += 1;
            let delay = delays
                .next()
                .unwrap_or(Duration::from_millis(self.redis.reconnect_max_ms));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.target.backoff(delay) => {}
            }
        }
    }

    /// What to do after a failed command: a connection failure ends the session; an error
    /// reply (ACL, OOM, a stream deleted under us) is counted, logged, and the streams'
    /// groups are created again after a pause.
    pub(super) async fn on_error(&mut self, e: ::redis::RedisError, what: &str) -> Result<(), End> {
        let failure = RedisFailure::classify(&e);
        let pause = match failure.recovery() {
            Recovery::Reconnect => return Err(End::Reconnect(format!("{what}: {failure}"))),
            Recovery::WaitAndRetry(d) => d,
            Recovery::Drop | Recovery::ReloadScript | Recovery::Fatal => {
                Duration::from_millis(self.redis.reconnect_max_ms.max(1))
            }
        };
        metrics::redis_error_reply("consume", failure.reason());
        self.health.down(format!("{what}: {failure}"));
        self.degraded = true;
        self.failures += 1;
        if let Some(suppressed) = self.error_log.allow() {
            warn!(cause = %failure, what, suppressed, "redis refused a stream command; retrying later");
        }
        // NOGROUP (a stream deleted and recreated) heals by creating the groups again.
        for s in self.streams.values_mut() {
            s.created = false;
        }
        tokio::time::sleep(pause).await;
        Ok(())
    }
}

/// The delay before retry number `deliveries` (1 after the first failed delivery):
/// `backoff_ms × factor^(deliveries-1)`, capped at one hour.
pub(super) fn retry_delay(durable: &DurableConfig, deliveries: u64) -> Duration {
    let exp = u32::try_from(deliveries.saturating_sub(1)).unwrap_or(u32::MAX);
    let factor = u64::from(durable.retry_backoff_factor.max(1));
    let ms = durable
        .retry_backoff_ms
        .saturating_mul(factor.saturating_pow(exp))
        .min(3_600_000);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests;
