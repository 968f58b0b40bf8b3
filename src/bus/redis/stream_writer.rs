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
//! - **Outages.** While Redis is unreachable (or `LOADING`), durable envelopes wait in a
//!   bounded, ordered buffer ([`super::stream_buffer`]: overflow drops the oldest, counted
//!   and announced as a gap) and are appended, in order, before newer ones once the
//!   connection is back. A batch that failed with a connection error goes back to the
//!   front of it; what a lost reply had already appended is skipped before resending.
//! - Error replies to an append other than those above (`OOM`, `NOPERM`, …) drop it and
//!   count it as a failed publish, like a refused `PUBLISH`.
//!
//! This module does not decide which channels are durable ([`crate::durable`]), nor own
//! the script ([`super::append`]), the connection or the reconnects (the writer does).

use std::collections::{HashMap, HashSet};

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::{Pipeline, RedisError, RedisResult, Value};
use tokio::sync::mpsc;
use tracing::warn;
use uuid::Uuid;

use super::append::AppendScript;
use super::stream_buffer::StreamBuffer;
use super::{Recovery, RedisFailure};
use crate::config::DurableConfig;
use crate::durable::{registry_key, stream_key, DurablePolicy, StreamCap};
use crate::envelope::BusMessage;
use crate::event::{Channel, Event};
use crate::metrics;

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
    /// Durable envelopes waiting for Redis.
    buffer: StreamBuffer,
    /// Appends of the pipeline being built.
    slots: Vec<Slot>,
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
            buffer: StreamBuffer::new(setup.buffer_bytes, setup.notices),
            slots: Vec::new(),
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
        !self.buffer.is_empty()
    }

    /// Buffered envelopes still wait: the durable envelopes of `batch` join the back of
    /// the buffer, behind them; the others stay in `batch`.
    pub(super) fn defer(&mut self, batch: &mut Vec<BusMessage>) {
        if !self.is_active() {
            return;
        }
        let mut others = Vec::with_capacity(batch.len());
        for msg in batch.drain(..) {
            if route_of(&mut self.routes, &self.policy, &self.prefix, &msg.channel).is_some() {
                self.buffer.push_back(msg);
            } else {
                others.push(msg);
            }
        }
        *batch = others;
        self.buffer.trim();
    }

    /// The oldest `max` buffered envelopes, to be sent now.
    pub(super) fn take_chunk(&mut self, max: usize) -> Vec<BusMessage> {
        self.buffer.take_chunk(max)
    }

    /// Redis is back and the buffer through: announces what it dropped.
    pub(super) fn announce_gaps(&mut self) {
        self.buffer.announce_gaps();
    }

    /// Shutdown: what could not be appended is given up; returns how many.
    pub(super) fn abandon(&mut self) -> u64 {
        self.buffer.abandon()
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
                self.buffer.push_back(msg);
            } else {
                others += 1;
            }
        }
        self.buffer.trim();
        others
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
        if self.buffer.has_unsure() {
            let unsure = self.buffer.take_unsure();
            if let Err(e) = self
                .buffer
                .skip_appended(conn, &self.prefix, &self.src, &unsure)
                .await
            {
                let failure = RedisFailure::classify(&e);
                if matches!(
                    failure.recovery(),
                    Recovery::Reconnect | Recovery::WaitAndRetry(_)
                ) {
                    self.buffer.restore_unsure(unsure);
                }
                unusable(failure, "cannot check the streams for lost replies")?;
            }
        }
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
        self.buffer.requeue_front(
            back.into_iter()
                .map(|(m, unsure)| (batch[m].clone(), unsure))
                .collect(),
        );
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

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
