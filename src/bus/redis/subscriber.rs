//! The receiving side of the Redis bus: one pub/sub connection that follows the gateway's
//! [`Interest`], turns Redis messages back into [`BusMessage`]s and hands them on.
//!
//! - The interest becomes subscriptions through [`Plan`](super::interest::Plan): exact
//!   patterns `SUBSCRIBE {p}{channel}`, wildcards `PSUBSCRIBE {p}{pattern}`, at most
//!   `max_patterns` of them (beyond that, covering patterns). Every received channel is
//!   checked again against the current interest ([`Filter`](super::interest::Filter));
//!   what does not match (a cover's extra, Redis's `*` also matching `:`, stragglers after
//!   an unsubscribe) is dropped.
//! - Interest changes are reconciled on the live connection in one pipelined round trip:
//!   new subscriptions first, then the removed ones unsubscribed, no reconnect. A failure
//!   is handled by its class: a connection error (or timeout) rebuilds the session; an
//!   error reply keeps the connection, marks health down and is retried later. (redis-rs
//!   0.29 hands a (P)SUBSCRIBE's error reply back as a success, so in practice an ACL
//!   refusal shows only in Redis's `ACL LOG`; see docs/operations.md.)
//! - Envelopes whose `src` is this instance's are dropped (hybrid: delivered locally),
//!   recognised by their first bytes before any parse.
//! - Durable channels (`[durable] channels`) come from their streams
//!   ([`streams`](super::streams)), not from here: exact durable patterns are not
//!   subscribed, and an envelope carrying a stream `id` on a durable channel (a wildcard
//!   delivered it) is dropped before decoding, its `seq` not counted.
//! - Every payload is decoded under the [`DecodePolicy`] of `[redis]` (size bound,
//!   signature when keys are configured, event valid for its channel); what fails is
//!   counted by reason, logged (rate-limited) and skipped.
//! - Per (`src`, channel) the `seq` is judged by a [`SeqTracker`] (see [`crate::bus::seq`]):
//!   confirmed gaps count as lost, a repeat (overlapping SUBSCRIBE and PSUBSCRIBE deliver
//!   one publish twice) is dropped as a duplicate, a jump far ahead or a step back is
//!   counted as an anomaly and never silences the channel. One tick per probe interval
//!   lets it forget the `src` of a restarted publisher.
//! - Messages are drained promptly into `out`: Redis cuts a subscriber that falls
//!   behind its `client-output-buffer-limit pubsub`.
//!
//! Reconnect behaviour:
//!
//! - redis-rs's `aio::PubSub` never reconnects: when its stream ends or a command on it
//!   fails, the whole session (its one pub/sub connection) is rebuilt after
//!   an exponential backoff with jitter (`reconnect_min_ms` .. `reconnect_max_ms`), and
//!   the whole current interest is subscribed again. Each session asks the [`Target`]
//!   afresh (with Sentinel: the current master), and with Sentinel a watch ends the
//!   session when the sentinels name another master, even if the old one stays silent but
//!   connected (see [`target`](super::target)).
//! - Health goes down when a session ends and up once the new one is subscribed;
//!   `redis_connected{role="subscribe"}` follows, and each rebuilt session adds one to
//!   `redis_reconnects{role="subscribe"}`. The backoff restarts from the minimum after a
//!   session came up.
//! - A half-open TCP connection raises no error, so every `probe_interval_ms` a probe
//!   `PING <nonce>` is sent on the pub/sub connection itself (Redis answers it in
//!   subscribed mode with `["pong", nonce]`). A pong not back within `probe_timeout_ms`
//!   counts a `redis_probe_timeouts` and the session is rebuilt. The probe needs no
//!   `PUBLISH`, so an executor's ACL user can be denied publishing altogether.
//! - The bus state ([`BusState`]) follows the same transitions as health: `Down(cause)` when
//!   a session ends (not on shutdown), `Up` once the new one is subscribed; the gateway
//!   tells the bots of affected channels.
//! - Sequence tracking survives reconnects, so envelopes missed while disconnected are
//!   counted as lost when the next one arrives.
//! - The task ends when `shutdown` is cancelled or the receiver of `out` is dropped.

use std::time::Duration;

use ::redis::aio::PubSubSink;
use ::redis::Msg;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::interest::{reconcile, Filter, Plan};
use super::target::Target;
use super::{backoff, io_timeout, Recovery, RedisFailure};
use crate::bus::seq::{Seen, SeqTracker};
use crate::bus::{BusState, Interest};
use crate::config::RedisConfig;
use crate::durable::DurablePolicy;
use crate::envelope::{BusMessage, DecodePolicy};
use crate::event::Channel;
use crate::health::HealthHandle;
use crate::metrics;

/// The Redis subscriber task. See the module docs for its behaviour.
pub struct RedisSubscriber;

impl RedisSubscriber {
    /// Starts the subscriber. `src` is this instance's uuid: envelopes carrying it are
    /// dropped.
    pub fn spawn(
        config: RedisConfig,
        src: Uuid,
        interest: watch::Receiver<Interest>,
        out: mpsc::Sender<BusMessage>,
        health: HealthHandle,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let (bus_state, _) = watch::channel(BusState::Up);
        Self::spawn_with_state(config, src, interest, out, health, bus_state, shutdown)
    }

    /// [`RedisSubscriber::spawn`] that also reports the bus up/down on `bus_state`.
    pub fn spawn_with_state(
        config: RedisConfig,
        src: Uuid,
        interest: watch::Receiver<Interest>,
        out: mpsc::Sender<BusMessage>,
        health: HealthHandle,
        bus_state: watch::Sender<BusState>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        Self::spawn_durable(
            config,
            src,
            DurablePolicy::default(),
            interest,
            out,
            health,
            bus_state,
            shutdown,
        )
    }

    /// [`RedisSubscriber::spawn_with_state`] leaving the `durable` channels to the stream
    /// consumer.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_durable(
        config: RedisConfig,
        src: Uuid,
        durable: DurablePolicy,
        interest: watch::Receiver<Interest>,
        out: mpsc::Sender<BusMessage>,
        health: HealthHandle,
        bus_state: watch::Sender<BusState>,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let target = match Target::new(&config, "subscribe") {
                Ok(t) => t,
                Err(e) => {
                    // Validation and the startup check refuse such settings; never panic.
                    health.down(e.to_string());
                    warn!(cause = %e, "redis subscriber has no usable client");
                    return;
                }
            };
            let policy = DecodePolicy::for_pubsub(&config);
            let mut sub = Subscriber {
                config,
                src,
                target,
                interest,
                interest_open: true,
                out,
                health,
                tracker: SeqTracker::new(policy.signed()),
                policy,
                own_prefix: own_prefix(&src),
                invalid_log: RateLimit::new(Duration::from_secs(10)),
                anomaly_log: RateLimit::new(Duration::from_secs(10)),
                overflow_log: RateLimit::new(Duration::from_secs(10)),
                session_was_up: false,
                refused_log: RateLimit::new(Duration::from_secs(10)),
                bus_state,
                durable,
            };
            sub.run(shutdown).await;
        })
    }
}

/// Why one session ended.
enum End {
    /// Shutdown, or nobody is left to deliver to: stop for good.
    Stop,
    /// The connection failed, ended or went silent: rebuild it.
    Reconnect(String),
}

struct Subscriber {
    config: RedisConfig,
    src: Uuid,
    /// Asked at the start of every session: with Sentinel, the current master.
    target: Target,
    interest: watch::Receiver<Interest>,
    /// False once the interest sender is gone: the last interest stays in force.
    interest_open: bool,
    out: mpsc::Sender<BusMessage>,
    health: HealthHandle,
    tracker: SeqTracker,
    /// What a payload must satisfy (size, signature, event vs channel).
    policy: DecodePolicy,
    /// `{"src":"<own uuid>"`: how every envelope this instance encodes begins.
    own_prefix: Vec<u8>,
    invalid_log: RateLimit,
    anomaly_log: RateLimit,
    overflow_log: RateLimit,
    /// Set when a session got as far as subscribing; the reconnect loop then resets its
    /// backoff.
    session_was_up: bool,
    /// Subscriptions refused with an error reply (ACL, loading): logged at most this often.
    refused_log: RateLimit,
    bus_state: watch::Sender<BusState>,
    /// Durable channels: read from their streams, not from pub/sub.
    durable: DurablePolicy,
}

impl Subscriber {
    async fn run(&mut self, shutdown: CancellationToken) {
        let mut delays = backoff(&self.config);
        let mut sessions = 0u64;
        loop {
            let end = tokio::select! {
                _ = shutdown.cancelled() => End::Stop,
                end = self.session(&shutdown, sessions) => end,
            };
            metrics::redis_connected("subscribe", false);
            match end {
                End::Stop => {
                    self.health.down("shut down");
                    return;
                }
                End::Reconnect(cause) => {
                    warn!(cause = %cause, "redis subscription lost; reconnecting");
                    BusState::set_down(&self.bus_state, &cause);
                    self.health.down(cause);
                }
            }
            if std::mem::take(&mut self.session_was_up) {
                delays = backoff(&self.config);
            }
            sessions += 1;
            let delay = delays
                .next()
                .unwrap_or(Duration::from_millis(self.config.reconnect_max_ms));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.target.backoff(delay) => {}
            }
        }
    }

    /// One connection's life: connect, subscribe everything, pump messages until it fails.
    async fn session(&mut self, shutdown: &CancellationToken, sessions: u64) -> End {
        let timeout = io_timeout(&self.config);
        // Resolved afresh per session: after a failover the sentinels name the new master
        // (and a node that says it is a replica is refused here, then retried after backoff).
        // Every step of a resolve is bounded by the I/O timeout.
        let resolved = match self.target.resolve().await {
            Ok(r) => r,
            Err(e) => return End::Reconnect(format!("resolve: {e}")),
        };
        let pubsub = match tokio::time::timeout(timeout, resolved.client.get_async_pubsub()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return End::Reconnect(format!("connect: {}", RedisFailure::classify(&e)))
            }
            Err(_) => return End::Reconnect("connect: timed out".into()),
        };
        let (sink, mut stream) = pubsub.split();
        let mut subscribed = Plan::default();
        let interest = self.interest.borrow_and_update().clone();
        let mut filter = Filter::new(&interest);
        let mut target = self.plan(&interest);
        // When an error reply refused part of the plan: when to try it again.
        let mut retry_at: Option<Instant> = None;
        if let Err(end) = self
            .apply(&sink, &mut subscribed, &target, timeout, &mut retry_at)
            .await
        {
            return end;
        }
        if sessions > 0 {
            metrics::redis_reconnect("subscribe");
        }
        metrics::redis_connected("subscribe", true);
        if retry_at.is_none() {
            self.health.up(None);
        }
        BusState::set_up(&self.bus_state);
        self.session_was_up = true;
        // Sentinel: ends the session when the sentinels name another master, even if this
        // connection (to a demoted or cut-off node) stays open and silent.
        let mut master_watch = self.target.watch(&resolved);
        info!(redis = %resolved.shown(&self.target), patterns = interest.len(), redis_patterns = target.wild.len(), "redis subscriber connected");

        let probe_every = Duration::from_millis(self.config.probe_interval_ms.max(1));
        let probe_timeout = Duration::from_millis(self.config.probe_timeout_ms.max(1));
        let mut probe_tick = tokio::time::interval(probe_every);
        probe_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut probe_nonce = 0u64;
        // Deadline of the oldest probe not yet seen back.
        let mut probe_due: Option<Instant> = None;
        let (probe_tx, mut probe_rx) = mpsc::channel::<u64>(4);

        loop {
            tokio::select! {
                // Messages before timers: drain what is already received first.
                biased;
                _ = shutdown.cancelled() => return End::Stop,
                changed = self.interest.changed(), if self.interest_open => {
                    if changed.is_err() {
                        self.interest_open = false;
                        continue;
                    }
                    let interest = self.interest.borrow_and_update().clone();
                    filter = Filter::new(&interest);
                    self.tracker.retain(|c| filter.matches(c));
                    target = self.plan(&interest);
                    if let Err(end) = self.apply(&sink, &mut subscribed, &target, timeout, &mut retry_at).await {
                        return end;
                    }
                }
                Some(nonce) = probe_rx.recv() => {
                    if nonce == probe_nonce {
                        probe_due = None;
                    }
                }
                _ = sleep_until(retry_at) => {
                    // Still armed: `apply` clears it (and restores health) on success.
                    if let Err(end) = self.apply(&sink, &mut subscribed, &target, timeout, &mut retry_at).await {
                        return end;
                    }
                }
                msg = stream.next() => match msg {
                    None => return End::Reconnect("connection closed".into()),
                    Some(msg) => {
                        if let Some(m) = self.accept(&msg, &filter) {
                            // Never wait here: redis-rs reads the socket into an unbounded
                            // queue whatever we do, so waiting would only move the backlog
                            // into unbounded memory. A full router queue drops (counted);
                            // a book that loses a delta resyncs from its snapshot key.
                            match self.out.try_send(m) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(m)) => {
                                    metrics::envelope_overflow();
                                    if let Some(held_back) = self.overflow_log.allow() {
                                        warn!(channel = %m.channel, held_back, "bot router queue full; envelopes dropped");
                                    }
                                }
                                Err(mpsc::error::TrySendError::Closed(_)) => return End::Stop,
                            }
                        }
                    }
                },
                reason = master_watch.moved() => return End::Reconnect(reason),
                _ = sleep_until(probe_due) => {
                    metrics::redis_probe_timeout();
                    return End::Reconnect(format!("probe not back within {} ms", probe_timeout.as_millis()));
                }
                _ = probe_tick.tick() => {
                    self.tracker.tick();
                    if probe_due.is_none() {
                        probe_nonce += 1;
                        probe_due = Some(Instant::now() + probe_timeout);
                        send_probe(sink.clone(), probe_nonce, probe_timeout, probe_tx.clone());
                    }
                }
            }
        }
    }

    fn plan(&self, interest: &Interest) -> Plan {
        if self.durable.is_empty() {
            return Plan::new(interest, &self.config.key_prefix, self.config.max_patterns);
        }
        // Exact durable channels come from their streams only.
        let live: Interest = std::sync::Arc::new(
            interest
                .iter()
                .filter(|p| {
                    p.is_wildcard()
                        || Channel::parse(p.as_str()).map_or(true, |c| !self.durable.is_durable(&c))
                })
                .cloned()
                .collect(),
        );
        Plan::new(&live, &self.config.key_prefix, self.config.max_patterns)
    }

    /// Applies `target`; a failure is handled by its class: a connection failure or a
    /// `READONLY` ends the session, an error reply (ACL refusal, loading) keeps the
    /// connection, marks health down and sets `retry_at` for another try.
    async fn apply(
        &mut self,
        sink: &PubSubSink,
        subscribed: &mut Plan,
        target: &Plan,
        timeout: Duration,
        retry_at: &mut Option<Instant>,
    ) -> Result<(), End> {
        let Err(e) = reconcile(sink, subscribed, target, timeout).await else {
            metrics::redis_subscribed_patterns(subscribed.wild.len());
            if retry_at.take().is_some() {
                // What was refused before is in place now.
                self.health.up(None);
            }
            return Ok(());
        };
        let failure = RedisFailure::classify(&e);
        let delay = match failure.recovery() {
            Recovery::Reconnect => return Err(End::Reconnect(format!("subscribe: {failure}"))),
            Recovery::WaitAndRetry(d) => d,
            Recovery::Drop | Recovery::ReloadScript | Recovery::Fatal => {
                Duration::from_millis(self.config.reconnect_max_ms.max(1))
            }
        };
        metrics::redis_error_reply("subscribe", failure.reason());
        self.health.down(format!("subscribe: {failure}"));
        if let Some(suppressed) = self.refused_log.allow() {
            warn!(cause = %failure, suppressed, "redis refused a subscription; retrying later");
        }
        *retry_at = Some(Instant::now() + delay);
        Ok(())
    }

    /// Turns one Redis message into a message to forward, or counts why not.
    fn accept(&mut self, msg: &Msg, filter: &Filter) -> Option<BusMessage> {
        let name = msg.get_channel_name();
        let Some(channel) = name
            .strip_prefix(self.config.key_prefix.as_str())
            .and_then(|n| Channel::parse(n).ok())
        else {
            self.invalid(name, "channel_name", "channel name is not a valid channel");
            return None;
        };
        if !filter.matches(&channel) {
            // Redis's glob is wider than ours, or an unsubscribe is still in flight.
            return None;
        }
        let raw = msg.get_payload_bytes();
        // A durable envelope (it carries its stream id): the stream consumer delivers it.
        if !self.durable.is_empty()
            && crate::envelope::id_field(raw).is_some()
            && self.durable.is_durable(&channel)
        {
            return None;
        }
        // Our own echo (hybrid) is recognised by its first bytes, before any copy or parse;
        // envelopes written by other encoders still get the full check below.
        if raw.starts_with(&self.own_prefix) {
            metrics::envelope_received();
            metrics::envelope_self_filtered();
            return None;
        }
        // Refused before the copy: a 20 MB payload costs no second 20 MB.
        let decoded = match self.policy.check_size(raw.len()).and_then(|()| {
            BusMessage::decode_with(channel, Bytes::copy_from_slice(raw), &self.policy)
        }) {
            Ok(m) => m,
            Err(e) => {
                self.invalid(name, e.reason(), &e.to_string());
                return None;
            }
        };
        // An id placed where the fast check above does not look (another encoder, or a
        // forged publish): on a durable channel only the stream consumer may deliver —
        // its ids move the router's redelivery floor and produce acks. Elsewhere the id
        // is not this executor's to honour: delivered as a plain pub/sub event.
        let mut decoded = decoded;
        if decoded.id.is_some() {
            if self.durable.is_durable(&decoded.channel) {
                return None;
            }
            decoded.id = None;
        }
        metrics::envelope_received();
        if decoded.src == self.src {
            metrics::envelope_self_filtered();
            return None;
        }
        let seen = self
            .tracker
            .observe(decoded.src, &decoded.channel, decoded.seq);
        match seen {
            Seen::InOrder | Seen::Unconfirmed => {}
            Seen::Gap(lost) => {
                metrics::envelopes_lost(lost);
                debug!(channel = %decoded.channel, src = %decoded.src, lost, "envelopes lost on pub/sub");
            }
            Seen::Duplicate => metrics::envelope_duplicate(),
            Seen::Outlier(kind) => self.anomaly(&decoded, kind.as_str(), "delivered"),
            Seen::Replay => self.anomaly(&decoded, "back", "dropped as a replay"),
        }
        seen.deliver().then_some(decoded)
    }

    fn anomaly(&mut self, m: &BusMessage, kind: &'static str, outcome: &str) {
        metrics::envelope_seq_anomaly(kind);
        if let Some(suppressed) = self.anomaly_log.allow() {
            warn!(channel = %m.channel, src = %m.src, seq = m.seq, kind, suppressed, "envelope seq does not fit its stream; {outcome}");
        }
    }

    fn invalid(&mut self, channel: &str, reason: &'static str, cause: &str) {
        metrics::envelope_invalid(reason);
        if let Some(suppressed) = self.invalid_log.allow() {
            // Attacker-controlled text: escaped (no forged log lines) and cut short.
            let cause: String = cause.escape_debug().take(300).collect();
            let channel: String = channel.escape_debug().take(200).collect();
            warn!(
                channel,
                reason, cause, suppressed, "envelope from redis refused"
            );
        }
    }
}

/// The nonce a probe's pong carries back, if `reply` is one: `["pong", nonce]` on a
/// subscribed connection (RESP2), the bare `nonce` on one with no subscription yet.
fn pong_nonce(reply: &::redis::Value) -> Option<u64> {
    use ::redis::Value;
    let payload = match reply {
        Value::Array(items) if items.len() == 2 => &items[1],
        other => other,
    };
    match payload {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// Sends probe `nonce` as a `PING` on the pub/sub connection itself, without holding up
/// the message loop; the pong's nonce comes back on `back`. A failure shows up as the
/// probe not coming back.
fn send_probe(mut sink: PubSubSink, nonce: u64, timeout: Duration, back: mpsc::Sender<u64>) {
    tokio::spawn(async move {
        let reply = tokio::time::timeout(
            timeout,
            sink.ping_message::<::redis::Value>(nonce.to_string()),
        )
        .await;
        match reply {
            Ok(Ok(v)) => {
                if let Some(n) = pong_nonce(&v) {
                    let _ = back.try_send(n);
                }
            }
            Ok(Err(e)) => debug!(cause = %e, "probe ping failed"),
            Err(_) => {}
        }
    });
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The first bytes of every envelope `src` encodes (see `BusMessage::encode`).
fn own_prefix(src: &Uuid) -> Vec<u8> {
    format!("{{\"src\":\"{}\"", src.as_hyphenated()).into_bytes()
}

/// Lets one log line through per period; counts the ones held back.
pub(crate) struct RateLimit {
    period: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub(crate) fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            next: None,
            suppressed: 0,
        }
    }

    /// `Some(number suppressed since the last line)` when a line may be logged now.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|n| now < n) {
            self.suppressed += 1;
            return None;
        }
        self.next = Some(now + self.period);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_envelopes_are_recognised_without_decoding() {
        let src = Uuid::new_v4();
        let prefix = own_prefix(&src);
        let mine = crate::envelope::BusMessage::encode(
            src,
            1,
            1,
            crate::event::Event::status(
                crate::event::Exchange::Sim,
                crate::event::StatusState::Connected,
                None,
            ),
        );
        assert!(mine.envelope.starts_with(&prefix));
        let other = crate::envelope::BusMessage::encode(
            Uuid::new_v4(),
            1,
            1,
            crate::event::Event::status(
                crate::event::Exchange::Sim,
                crate::event::StatusState::Connected,
                None,
            ),
        );
        assert!(!other.envelope.starts_with(&prefix));
    }

    #[test]
    fn rate_limit_lets_one_through_per_period() {
        let mut r = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.next = Some(Instant::now());
        assert_eq!(r.allow(), Some(2));
    }
}
