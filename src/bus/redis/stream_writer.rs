//! The publisher's side of durable channels (issue 10; PROTOCOL §3): append + publish in
//! one script call, and a bounded buffer that carries durable envelopes through Redis
//! outages.
//!
//! The publisher's writer ([`super::publisher`]) builds one pipeline per batch. For an
//! envelope on a channel [`DurablePolicy`] marks durable, [`StreamWriter::add`] puts the
//! append script ([`AppendScript`]) where the `PUBLISH` would have gone, so the append
//! stays pipelined and ordered with the batch's `last:`/`snapshot:`/`booklog:` writes (a
//! book message's log write still precedes its publish). Non-durable envelopes take the
//! unchanged path; with no durable channel configured every hook here is one `is_empty`.
//!
//! - **Script.** Loaded (`SCRIPT LOAD`) once per connection before the first append
//!   ([`StreamWriter::prepare`]). The pipeline's replies are read one by one, so after a
//!   `NOSCRIPT` (Redis restarted, failed over, `SCRIPT FLUSH`) the script is loaded again
//!   and exactly the appends that failed with `NOSCRIPT` are sent again, in order, before
//!   anything newer: an append that succeeded is never repeated. (Should another client
//!   load the script in the middle of our pipeline, appends of one channel after the
//!   first failed one could succeed and land before the resent ones; only a concurrent
//!   `SCRIPT LOAD` racing a flush can cause that.)
//! - **Registry.** `SADD {p}streams <channel>` before a channel's first append of each
//!   connection session (and again after any failed batch).
//! - **Outages.** While Redis is unreachable (or `LOADING`), durable envelopes are kept in
//!   an ordered buffer of at most `[durable] buffer_bytes` (envelope bytes plus a fixed
//!   per-entry overhead) and appended, in order, before newer ones once the connection is
//!   back. A batch that failed with a connection error puts its durable envelopes back at
//!   the front. Such an append may have been executed with its reply lost: after the
//!   reconnect, before resending, the newest entries of each such stream
//!   (`XREVRANGE key + - COUNT n`, n = the envelopes in doubt) are read and what this
//!   publisher (`src`) already appended, by `seq`, is skipped. That check needs the entries
//!   to still be the newest ones; if another writer appended more than that in between,
//!   an envelope may be appended twice (at least once, with a new id each time; the `seq`
//!   shows it to consumers).
//! - **Overflow** drops the *oldest* buffered envelope: like the stream's own `MAXLEN`
//!   and `drop_oldest` for bots, the freshest market data is worth the most, and the gap
//!   sits at one place per channel. Drops are counted
//!   (`mdbridge_stream_buffer_dropped_total`) and, once Redis is back, announced per
//!   channel as a `status` event (state `error`, the detail names the channel and the
//!   count) sent into the publisher's own event queue, so the Sequencer gives it its `seq`
//!   like any status; the `seq` gap in the stream shows the same loss.
//! - Error replies to an append other than those above (`OOM`, `NOPERM`, …) drop it and
//!   count it as a failed publish, like a refused `PUBLISH`.
//!
//! This module does not decide which channels are durable ([`crate::durable`]), nor own
//! the script ([`super::append`]), the connection or the reconnects (the writer does).

use std::collections::{HashMap, HashSet, VecDeque};

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::{Pipeline, RedisError, RedisResult, Value};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};
use uuid::Uuid;

use super::append::AppendScript;
use super::{Recovery, RedisFailure};
use crate::config::DurableConfig;
use crate::durable::{registry_key, stream_key, DurablePolicy, StreamCap};
use crate::envelope::BusMessage;
use crate::event::{Channel, Event, StatusState};
use crate::metrics;

/// Memory a buffered envelope costs besides its bytes (the message struct, its channel).
const ENTRY_OVERHEAD: u64 = std::mem::size_of::<BusMessage>() as u64 + 64;

/// Most rounds of "load the script, resend what got `NOSCRIPT`" for one batch.
const NOSCRIPT_ROUNDS: usize = 2;

/// What the publisher needs to know about durable channels.
#[derive(Clone, Debug, Default)]
pub struct StreamSetup {
    pub policy: DurablePolicy,
    /// `[durable] buffer_bytes`.
    pub buffer_bytes: u64,
    /// Where the overflow `status` events go: the queue the Sequencer reads. Weak, so the
    /// writer never keeps that queue open at shutdown.
    pub notices: Option<mpsc::WeakSender<Event>>,
}

impl StreamSetup {
    pub fn from_config(config: &DurableConfig) -> StreamSetup {
        StreamSetup {
            policy: DurablePolicy::from_config(config),
            buffer_bytes: config.buffer_bytes,
            notices: None,
        }
    }

    /// Overflow notices go into `events` (see the module docs).
    pub fn with_notices(mut self, events: &mpsc::Sender<Event>) -> StreamSetup {
        self.notices = Some(events.downgrade());
        self
    }
}

/// The keys and cap of one durable channel, made once.
#[derive(Debug)]
struct Route {
    stream: String,
    pubsub: String,
    cap: StreamCap,
}

/// One append in the pipeline being built: its command index and its envelope's index
/// in the batch.
#[derive(Debug, Clone, Copy)]
struct Slot {
    at: usize,
    msg: usize,
}

/// One stream entry as `XRANGE`/`XREVRANGE` return it: id and field/value pairs.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// How a batch's appends went (see [`StreamWriter::settle`]).
#[derive(Debug, Default)]
struct Settled {
    /// Appends the pipeline held.
    durable: u64,
    appended: u64,
    /// A command other than an append failed (or the whole pipeline did): the batch's
    /// non-durable envelopes count as failed, as before durable channels.
    plain_failure: Option<RedisFailure>,
    /// The first failure of any command: what the writer acts on (reconnect, pause,
    /// health).
    failure: Option<RedisFailure>,
}

/// Durable-channel state of one publisher writer.
pub(super) struct StreamWriter {
    policy: DurablePolicy,
    script: AppendScript,
    prefix: String,
    /// This publisher's `src`, as envelopes spell it (the duplicate check).
    src: String,
    /// Per channel seen: its route when durable. Bounded like the writer's `last:` keys,
    /// by the channels the feeds produce.
    routes: HashMap<Channel, Option<Route>>,
    /// Channels `SADD`ed to `{p}streams` in this connection session.
    registered: HashSet<Channel>,
    /// The script was loaded on this connection.
    loaded: bool,
    backlog: VecDeque<BusMessage>,
    backlog_bytes: u64,
    max_bytes: u64,
    /// Envelopes the full buffer dropped since the last announcement, per channel.
    dropped: HashMap<Channel, u64>,
    /// Per channel: envelopes at the front of the buffer whose append may have happened
    /// (their pipeline failed with a connection error).
    unsure: HashMap<Channel, usize>,
    /// Appends of the pipeline being built.
    slots: Vec<Slot>,
    notices: Option<mpsc::WeakSender<Event>>,
}

impl StreamWriter {
    pub(super) fn new(setup: StreamSetup, prefix: &str, src: Uuid) -> StreamWriter {
        StreamWriter {
            policy: setup.policy,
            script: AppendScript::new(),
            prefix: prefix.to_string(),
            src: src.to_string(),
            routes: HashMap::new(),
            registered: HashSet::new(),
            loaded: false,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            max_bytes: setup.buffer_bytes,
            dropped: HashMap::new(),
            unsure: HashMap::new(),
            slots: Vec::new(),
            notices: setup.notices,
        }
    }

    /// Some channel is durable.
    pub(super) fn is_active(&self) -> bool {
        !self.policy.is_empty()
    }

    /// A new connection: the script and the registry entries must be sent again.
    pub(super) fn connected(&mut self) {
        self.loaded = false;
        self.registered.clear();
    }

    pub(super) fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Adds `msg`'s append to `pipe` if its channel is durable (then the caller must not
    /// `PUBLISH` it: the script does). `index` is its place in the batch.
    pub(super) fn add(&mut self, pipe: &mut Pipeline, msg: &BusMessage, index: usize) -> bool {
        if !self.is_active() {
            return false;
        }
        let Some(route) = route_of(&mut self.routes, &self.policy, &self.prefix, &msg.channel)
        else {
            return false;
        };
        // A message that already carries an id (none is built so today) goes out as it is.
        let Some((head, tail)) = msg.id_split() else {
            return false;
        };
        if !self.registered.contains(&msg.channel) {
            pipe.cmd("SADD")
                .arg(registry_key(&self.prefix))
                .arg(msg.channel.as_str())
                .ignore();
            self.registered.insert(msg.channel.clone());
        }
        self.script
            .add_to(pipe, &route.stream, &route.pubsub, route.cap, &head, &tail);
        self.slots.push(Slot {
            at: pipe.len() - 1,
            msg: index,
        });
        true
    }

    /// The pipeline being built holds appends (its replies must be read one by one).
    pub(super) fn has_appends(&self) -> bool {
        !self.slots.is_empty()
    }

    /// Redis cannot take `batch` now: its durable envelopes join the back of the buffer;
    /// returns how many others it held (dropped, for the caller to count).
    pub(super) fn stash(&mut self, batch: &mut Vec<BusMessage>) -> u64 {
        self.slots.clear();
        if !self.is_active() {
            let n = batch.len() as u64;
            batch.clear();
            return n;
        }
        let mut others = 0;
        for msg in batch.drain(..) {
            if route_of(&mut self.routes, &self.policy, &self.prefix, &msg.channel).is_some() {
                self.backlog_bytes += cost(&msg);
                self.backlog.push_back(msg);
            } else {
                others += 1;
            }
        }
        self.trim();
        others
    }

    /// The oldest `max` buffered envelopes, to be sent now.
    pub(super) fn take_chunk(&mut self, max: usize) -> Vec<BusMessage> {
        let n = max.min(self.backlog.len());
        let chunk: Vec<BusMessage> = self.backlog.drain(..n).collect();
        let bytes: u64 = chunk.iter().map(cost).sum();
        self.backlog_bytes = self.backlog_bytes.saturating_sub(bytes);
        metrics::stream_buffered_bytes(self.backlog_bytes);
        chunk
    }

    /// Before building a pipeline: loads the script once per connection and skips
    /// buffered envelopes that a lost reply already appended. `Err` only when the
    /// connection is unusable (the writer reconnects or pauses); other failures are logged
    /// and sending goes on (an append then fails by itself and is counted).
    pub(super) async fn prepare(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> Result<(), RedisFailure> {
        // A pipeline cut off at shutdown (flush deadline) may have left its slots.
        self.slots.clear();
        if !self.is_active() {
            return Ok(());
        }
        if !self.loaded {
            if let Err(e) = self.script.load(conn).await {
                unusable(RedisFailure::classify(&e), "cannot load the append script")?;
            }
            self.loaded = true;
        }
        if !self.unsure.is_empty() {
            let unsure = std::mem::take(&mut self.unsure);
            if let Err(e) = self.skip_appended(conn, &unsure).await {
                let failure = RedisFailure::classify(&e);
                if matches!(
                    failure.recovery(),
                    Recovery::Reconnect | Recovery::WaitAndRetry(_)
                ) {
                    self.unsure = unsure;
                }
                unusable(failure, "cannot check the streams for lost replies")?;
            }
        }
        Ok(())
    }

    /// Drops from the buffer what this publisher already appended (see the module docs).
    async fn skip_appended(
        &mut self,
        conn: &mut MultiplexedConnection,
        unsure: &HashMap<Channel, usize>,
    ) -> RedisResult<()> {
        let channels: Vec<(&Channel, usize)> = unsure.iter().map(|(c, n)| (c, *n)).collect();
        let mut pipe = Pipeline::with_capacity(channels.len());
        for (channel, n) in &channels {
            pipe.cmd("XREVRANGE")
                .arg(stream_key(&self.prefix, channel.as_str()))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(*n);
        }
        let newest: Vec<Vec<Entry>> = pipe.query_async(conn).await?;
        for ((channel, _), entries) in channels.iter().zip(newest) {
            let Some(last) = entries
                .iter()
                .filter_map(|(_, fields)| own_seq(&self.src, fields))
                .max()
            else {
                continue;
            };
            let before = self.backlog.len();
            let mut bytes = 0;
            self.backlog.retain(|m| {
                let there = m.channel == **channel && m.seq <= last;
                if there {
                    bytes += cost(m);
                }
                !there
            });
            let skipped = (before - self.backlog.len()) as u64;
            if skipped > 0 {
                self.backlog_bytes = self.backlog_bytes.saturating_sub(bytes);
                metrics::stream_appended(skipped);
                metrics::envelopes_published(skipped);
                info!(channel = %channel, skipped, "durable envelopes already in their stream (reply lost); not appended again");
            }
        }
        metrics::stream_buffered_bytes(self.backlog_bytes);
        Ok(())
    }

    /// Reads the replies of a pipeline that held appends: counts what was published and
    /// appended, puts back what Redis did not (or may not have) executed, reloads the
    /// script and resends what failed with `NOSCRIPT`. `batch` is the batch the pipeline
    /// was built from. Returns the failure the writer must act on (reconnect, pause,
    /// health), if any.
    pub(super) async fn settle(
        &mut self,
        conn: &mut MultiplexedConnection,
        reply: RedisResult<Vec<Value>>,
        batch: &[BusMessage],
    ) -> Option<RedisFailure> {
        let settled = self.settle_appends(conn, reply, batch).await;
        // Non-durable envelopes fail together on any other error, as without streams.
        let plain = (batch.len() as u64).saturating_sub(settled.durable);
        match &settled.plain_failure {
            Some(failure) => metrics::envelopes_publish_failed(plain, failure.reason()),
            None => metrics::envelopes_published(plain),
        }
        metrics::envelopes_published(settled.appended);
        settled.failure
    }

    async fn settle_appends(
        &mut self,
        conn: &mut MultiplexedConnection,
        reply: RedisResult<Vec<Value>>,
        batch: &[BusMessage],
    ) -> Settled {
        let slots = std::mem::take(&mut self.slots);
        let mut settled = Settled {
            durable: slots.len() as u64,
            ..Settled::default()
        };
        let mut outcome = Outcome::default();
        match reply {
            Err(e) => {
                // Which appends Redis executed is unknown: all go back, to be checked.
                let failure = RedisFailure::classify(&e);
                outcome.unsure.extend(slots.iter().map(|s| s.msg));
                settled.plain_failure = Some(failure.clone());
                settled.failure = Some(failure);
            }
            Ok(values) => {
                let mut next = slots.iter().peekable();
                let mut seen = 0;
                for (i, value) in values.into_iter().enumerate() {
                    let slot = next.next_if(|s| s.at == i);
                    seen += usize::from(slot.is_some());
                    match (slot, value) {
                        (Some(slot), value) => outcome.judge(slot.msg, value, &mut settled),
                        (None, Value::ServerError(e)) => {
                            let failure = RedisFailure::classify(&RedisError::from(e));
                            settled.plain_failure.get_or_insert(failure.clone());
                            settled.failure.get_or_insert(failure);
                        }
                        (None, _) => {}
                    }
                }
                // Fewer replies than commands: nothing says what happened to the rest, so
                // the connection is not to be trusted either.
                if seen < slots.len() {
                    outcome.unsure.extend(slots[seen..].iter().map(|s| s.msg));
                    settled.failure.get_or_insert(short_reply());
                }
            }
        }
        self.resend_noscript(conn, &mut outcome, &mut settled, batch)
            .await;
        if outcome.appended > 0 {
            metrics::stream_appended(outcome.appended);
        }
        settled.appended = outcome.appended;
        if settled.failure.is_some() || !outcome.back.is_empty() || !outcome.unsure.is_empty() {
            self.registered.clear();
        }
        // Put back in batch order: the not-executed and the unsure ones interleave.
        let mut back: Vec<(usize, bool)> = outcome.back.iter().map(|&m| (m, false)).collect();
        back.extend(outcome.unsure.iter().map(|&m| (m, true)));
        back.sort_unstable();
        self.requeue_front(&back, batch);
        settled
    }

    /// Loads the script and resends the appends that got `NOSCRIPT`, in order, until none
    /// is left (at most [`NOSCRIPT_ROUNDS`]; what still fails is dropped and counted).
    async fn resend_noscript(
        &mut self,
        conn: &mut MultiplexedConnection,
        outcome: &mut Outcome,
        settled: &mut Settled,
        batch: &[BusMessage],
    ) {
        let mut round = 0;
        while !outcome.retry.is_empty() {
            let retry = std::mem::take(&mut outcome.retry);
            round += 1;
            if round > NOSCRIPT_ROUNDS {
                metrics::envelopes_publish_failed(retry.len() as u64, "redis_noscript");
                warn!(
                    dropped = retry.len(),
                    "Redis keeps answering NOSCRIPT to the append script; durable envelopes dropped"
                );
                return;
            }
            self.loaded = false;
            if let Err(e) = self.script.load(conn).await {
                let failure = RedisFailure::classify(&e);
                for m in retry {
                    outcome.judge_failure(m, failure.clone(), settled);
                }
                return;
            }
            self.loaded = true;
            let mut pipe = Pipeline::with_capacity(retry.len());
            for &m in &retry {
                if let Some(route) = route_of(
                    &mut self.routes,
                    &self.policy,
                    &self.prefix,
                    &batch[m].channel,
                ) {
                    if let Some((head, tail)) = batch[m].id_split() {
                        self.script.add_to(
                            &mut pipe,
                            &route.stream,
                            &route.pubsub,
                            route.cap,
                            &head,
                            &tail,
                        );
                    }
                }
            }
            match conn.req_packed_commands(&pipe, 0, pipe.len()).await {
                Ok(values) if values.len() == retry.len() => {
                    for (m, value) in retry.into_iter().zip(values) {
                        outcome.judge(m, value, settled);
                    }
                }
                Ok(_) => {
                    settled.failure.get_or_insert(short_reply());
                    outcome.unsure.extend(retry);
                    return;
                }
                Err(e) => {
                    let failure = RedisFailure::classify(&e);
                    settled.failure.get_or_insert(failure);
                    outcome.unsure.extend(retry);
                    return;
                }
            }
        }
    }

    /// Puts `msgs` (batch indices, in order; `true` = may have been appended) back at the
    /// front of the buffer, ahead of everything buffered since.
    fn requeue_front(&mut self, msgs: &[(usize, bool)], batch: &[BusMessage]) {
        if msgs.is_empty() {
            return;
        }
        for &(m, unsure) in msgs.iter().rev() {
            let msg = batch[m].clone();
            if unsure {
                *self.unsure.entry(msg.channel.clone()).or_default() += 1;
            }
            self.backlog_bytes += cost(&msg);
            self.backlog.push_front(msg);
        }
        self.trim();
    }

    /// Drops the oldest envelopes until the buffer fits its bound.
    fn trim(&mut self) {
        let mut dropped = 0;
        while self.backlog_bytes > self.max_bytes {
            let Some(old) = self.backlog.pop_front() else {
                self.backlog_bytes = 0;
                break;
            };
            self.backlog_bytes = self.backlog_bytes.saturating_sub(cost(&old));
            *self.dropped.entry(old.channel).or_default() += 1;
            dropped += 1;
        }
        if dropped > 0 {
            metrics::stream_buffer_dropped(dropped);
        }
        metrics::stream_buffered_bytes(self.backlog_bytes);
    }

    /// Redis is back: tells each channel's consumers, through the publisher's own event
    /// queue, how many of its envelopes the full buffer dropped.
    pub(super) fn announce_gaps(&mut self) {
        if self.dropped.is_empty() {
            return;
        }
        let events = self.notices.as_ref().and_then(mpsc::WeakSender::upgrade);
        for (channel, count) in self.dropped.drain() {
            warn!(channel = %channel, dropped = count, buffer_bytes = self.max_bytes, "durable envelopes were dropped while Redis was unreachable: the publisher's buffer was full");
            let detail = format!(
                "durable channel {channel}: {count} envelopes dropped while Redis was unreachable (publisher buffer of {} bytes full); its stream has a gap",
                self.max_bytes
            );
            let event = Event::status(channel.exchange(), StatusState::Error, Some(detail));
            if let Some(tx) = &events {
                if tx.try_send(event).is_err() {
                    warn!(channel = %channel, "event queue full: the gap status was not published");
                }
            }
        }
    }

    /// Shutdown: what could not be appended is given up; returns how many.
    pub(super) fn abandon(&mut self) -> u64 {
        let left = self.backlog.len() as u64;
        self.backlog.clear();
        self.backlog_bytes = 0;
        metrics::stream_buffered_bytes(0);
        left
    }
}

/// What became of each append of a batch (batch indices, in batch order).
#[derive(Default)]
struct Outcome {
    appended: u64,
    /// Got `NOSCRIPT`: load the script and resend.
    retry: Vec<usize>,
    /// Not executed (`READONLY`, `LOADING`): back to the buffer.
    back: Vec<usize>,
    /// Maybe executed (the reply was lost): back to the buffer, checked before resending.
    unsure: Vec<usize>,
}

impl Outcome {
    fn judge(&mut self, msg: usize, reply: Value, settled: &mut Settled) {
        match reply {
            Value::ServerError(e) => {
                self.judge_failure(msg, RedisFailure::classify(&RedisError::from(e)), settled)
            }
            _ => self.appended += 1,
        }
    }

    fn judge_failure(&mut self, msg: usize, failure: RedisFailure, settled: &mut Settled) {
        match failure.recovery() {
            Recovery::ReloadScript => return self.retry.push(msg),
            Recovery::Reconnect => match failure {
                RedisFailure::Connection(_) => self.unsure.push(msg),
                _ => self.back.push(msg),
            },
            Recovery::WaitAndRetry(_) => self.back.push(msg),
            Recovery::Drop | Recovery::Fatal => {
                metrics::envelopes_publish_failed(1, failure.reason())
            }
        }
        settled.failure.get_or_insert(failure);
    }
}

/// The route of `channel`, made on first sight; `None` when it is not durable.
fn route_of<'a>(
    routes: &'a mut HashMap<Channel, Option<Route>>,
    policy: &DurablePolicy,
    prefix: &str,
    channel: &Channel,
) -> Option<&'a Route> {
    if !routes.contains_key(channel) {
        let route = policy.cap(channel).map(|cap| Route {
            stream: stream_key(prefix, channel.as_str()),
            pubsub: super::channel_key(prefix, channel),
            cap,
        });
        routes.insert(channel.clone(), route);
    }
    routes.get(channel).and_then(Option::as_ref)
}

/// A pipeline answered with fewer replies than it had commands.
fn short_reply() -> RedisFailure {
    RedisFailure::Connection("redis answered a pipeline with fewer replies than commands".into())
}

/// What a buffered envelope counts against `buffer_bytes`.
fn cost(msg: &BusMessage) -> u64 {
    msg.envelope.len() as u64 + ENTRY_OVERHEAD
}

/// `Err` for failures after which nothing can be sent on this connection now; others are
/// logged and sending goes on.
fn unusable(failure: RedisFailure, what: &str) -> Result<(), RedisFailure> {
    match failure.recovery() {
        Recovery::Reconnect | Recovery::WaitAndRetry(_) => Err(failure),
        _ => {
            warn!(cause = %failure, "{what}");
            Ok(())
        }
    }
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    src: &'a str,
    seq: u64,
}

/// The `seq` of a stream entry's envelope if this publisher (`src`) wrote it.
fn own_seq(src: &str, fields: &[(String, Vec<u8>)]) -> Option<u64> {
    let (_, envelope) = fields.iter().find(|(name, _)| name == "envelope")?;
    let head: Head<'_> = serde_json::from_slice(envelope).ok()?;
    (head.src == src).then_some(head.seq)
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
