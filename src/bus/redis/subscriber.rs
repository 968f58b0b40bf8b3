//! The receiving side of the Redis bus: one pub/sub connection that follows the gateway's
//! [`Interest`], turns Redis messages back into [`BusMessage`]s and hands them on.
//!
//! - Exact patterns become `SUBSCRIBE {p}{channel}`, wildcard patterns `PSUBSCRIBE
//!   {p}{pattern}`. Redis's `*` also matches `:`, so every received channel is checked
//!   again with [`Pattern::matches`] against the current interest; what does not match
//!   (including stragglers after an unsubscribe) is dropped.
//! - Interest changes are reconciled on the live connection: new patterns subscribed,
//!   removed ones unsubscribed, no reconnect.
//! - Envelopes whose `src` is this instance's are dropped (hybrid: delivered locally),
//!   recognised by their first bytes before any parse.
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
//!   fails, the whole session (pub/sub connection and probe connection) is rebuilt after
//!   an exponential backoff with jitter (`reconnect_min_ms` .. `reconnect_max_ms`), and
//!   the whole current interest is subscribed again.
//! - Health goes down when a session ends and up once the new one is subscribed;
//!   `redis_connected{role="subscribe"}` follows, and each rebuilt session adds one to
//!   `redis_reconnects{role="subscribe"}`. The backoff restarts from the minimum after a
//!   session came up.
//! - A half-open TCP connection raises no error, so every `probe_interval_ms` a probe is
//!   published (on a separate normal connection) to `{p}probe:{src}`, to which the
//!   subscription also listens. A probe not back within `probe_timeout_ms` counts a
//!   `redis_probe_timeouts` and the session is rebuilt. Probes are never forwarded.
//! - Sequence tracking survives reconnects, so envelopes missed while disconnected are
//!   counted as lost when the next one arrives.
//! - The task ends when `shutdown` is cancelled or the receiver of `out` is dropped.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use ::redis::aio::{MultiplexedConnection, PubSubSink};
use ::redis::{Client, Msg};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{backoff, connect, io_timeout, probe_key, redact};
use crate::bus::seq::{Seen, SeqTracker};
use crate::bus::Interest;
use crate::config::RedisConfig;
use crate::envelope::{BusMessage, DecodePolicy};
use crate::event::{Channel, Pattern};
use crate::health::HealthHandle;
use crate::metrics;

/// The Redis subscriber task. See the module docs for its behaviour.
pub struct RedisSubscriber;

impl RedisSubscriber {
    /// Starts the subscriber. `src` is this instance's uuid: envelopes carrying it are
    /// dropped, and the liveness probe uses it in its channel name.
    pub fn spawn(
        config: RedisConfig,
        src: Uuid,
        interest: watch::Receiver<Interest>,
        out: mpsc::Sender<BusMessage>,
        health: HealthHandle,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let client = match Client::open(config.url.as_str()) {
                Ok(c) => c,
                Err(e) => {
                    // Config validation refuses such URLs; never panic on one that slipped by.
                    health.down(format!("bad redis url: {e}"));
                    warn!(cause = %e, "redis subscriber has no usable url");
                    return;
                }
            };
            let policy = DecodePolicy::for_pubsub(&config);
            let mut sub = Subscriber {
                probe_channel: probe_key(&config.key_prefix, &src),
                config,
                src,
                client,
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
    client: Client,
    probe_channel: String,
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
}

/// What is subscribed on the current connection, as Redis channel names / patterns.
#[derive(Default)]
struct Subscribed {
    exact: BTreeSet<String>,
    wild: BTreeSet<String>,
}

/// The current interest, split for a cheap per-message check.
#[derive(Default)]
struct Filter {
    exact: HashSet<String>,
    wild: Vec<Pattern>,
}

impl Filter {
    fn new(interest: &Interest) -> Filter {
        let mut f = Filter::default();
        for p in interest.iter() {
            if p.is_wildcard() {
                f.wild.push(p.clone());
            } else {
                f.exact.insert(p.as_str().to_string());
            }
        }
        f
    }

    fn matches(&self, channel: &Channel) -> bool {
        self.exact.contains(channel.as_str()) || self.wild.iter().any(|p| p.matches(channel))
    }
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
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One connection's life: connect, subscribe everything, pump messages until it fails.
    async fn session(&mut self, shutdown: &CancellationToken, sessions: u64) -> End {
        let timeout = io_timeout(&self.config);
        let pubsub = match tokio::time::timeout(timeout, self.client.get_async_pubsub()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return End::Reconnect(format!("connect: {e}")),
            Err(_) => return End::Reconnect("connect: timed out".into()),
        };
        let probe_conn = match connect(&self.client, timeout).await {
            Ok(c) => c,
            Err(e) => return End::Reconnect(format!("probe connection: {e}")),
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed = Subscribed::default();
        if let Err(e) = bounded(timeout, sink.subscribe(self.probe_channel.as_str())).await {
            return End::Reconnect(format!("subscribe probe: {e}"));
        }
        let interest = self.interest.borrow_and_update().clone();
        let mut filter = Filter::new(&interest);
        if let Err(e) = reconcile(
            &mut sink,
            &mut subscribed,
            &interest,
            &self.config.key_prefix,
            timeout,
        )
        .await
        {
            return End::Reconnect(format!("subscribe: {e}"));
        }
        if sessions > 0 {
            metrics::redis_reconnect("subscribe");
        }
        metrics::redis_connected("subscribe", true);
        self.health.up(None);
        self.session_was_up = true;
        info!(url = %redact(&self.config.url), patterns = interest.len(), "redis subscriber connected");

        let probe_every = Duration::from_millis(self.config.probe_interval_ms.max(1));
        let probe_timeout = Duration::from_millis(self.config.probe_timeout_ms.max(1));
        let mut probe_tick = tokio::time::interval(probe_every);
        probe_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut probe_nonce = 0u64;
        // Deadline of the oldest probe not yet seen back.
        let mut probe_due: Option<Instant> = None;

        loop {
            tokio::select! {
                // Messages before timers: a probe counts as missing only once everything
                // already received has been read, so a busy subscription never times out
                // on a probe that sits in its own backlog.
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
                    if let Err(e) = reconcile(&mut sink, &mut subscribed, &interest, &self.config.key_prefix, timeout).await {
                        return End::Reconnect(format!("subscribe: {e}"));
                    }
                }
                msg = stream.next() => match msg {
                    None => return End::Reconnect("connection closed".into()),
                    Some(msg) => {
                        if msg.get_channel_name() == self.probe_channel {
                            if probe_payload(&msg) == Some(probe_nonce) {
                                probe_due = None;
                            }
                            continue;
                        }
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
                _ = sleep_until(probe_due) => {
                    metrics::redis_probe_timeout();
                    return End::Reconnect(format!("probe not back within {} ms", probe_timeout.as_millis()));
                }
                _ = probe_tick.tick() => {
                    self.tracker.tick();
                    if probe_due.is_none() {
                        probe_nonce += 1;
                        probe_due = Some(Instant::now() + probe_timeout);
                        send_probe(probe_conn.clone(), self.probe_channel.clone(), probe_nonce);
                    }
                }
            }
        }
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

/// Brings the connection's subscriptions in line with `interest`.
async fn reconcile(
    sink: &mut PubSubSink,
    subscribed: &mut Subscribed,
    interest: &Interest,
    prefix: &str,
    timeout: Duration,
) -> ::redis::RedisResult<()> {
    let mut exact = BTreeSet::new();
    let mut wild = BTreeSet::new();
    for p in interest.iter() {
        let key = format!("{prefix}{p}");
        if p.is_wildcard() {
            wild.insert(key);
        } else {
            exact.insert(key);
        }
    }
    let sub: Vec<&String> = exact.difference(&subscribed.exact).collect();
    let unsub: Vec<&String> = subscribed.exact.difference(&exact).collect();
    let psub: Vec<&String> = wild.difference(&subscribed.wild).collect();
    let punsub: Vec<&String> = subscribed.wild.difference(&wild).collect();
    // Redis refuses these commands without arguments: send only non-empty ones.
    if !sub.is_empty() {
        bounded(timeout, sink.subscribe(sub)).await?;
    }
    if !psub.is_empty() {
        bounded(timeout, sink.psubscribe(psub)).await?;
    }
    if !unsub.is_empty() {
        bounded(timeout, sink.unsubscribe(unsub)).await?;
    }
    if !punsub.is_empty() {
        bounded(timeout, sink.punsubscribe(punsub)).await?;
    }
    subscribed.exact = exact;
    subscribed.wild = wild;
    Ok(())
}

/// A subscription command that takes longer than `timeout` means a dead connection.
async fn bounded(
    timeout: Duration,
    fut: impl std::future::Future<Output = ::redis::RedisResult<()>>,
) -> ::redis::RedisResult<()> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(::redis::RedisError::from((
            ::redis::ErrorKind::IoError,
            "subscription command timed out",
        ))),
    }
}

/// Publishes probe `nonce` without holding up the message loop; a failure shows up as
/// the probe not coming back.
fn send_probe(mut conn: MultiplexedConnection, channel: String, nonce: u64) {
    tokio::spawn(async move {
        let sent: ::redis::RedisResult<i64> = ::redis::cmd("PUBLISH")
            .arg(channel)
            .arg(nonce.to_string())
            .query_async(&mut conn)
            .await;
        if let Err(e) = sent {
            debug!(cause = %e, "probe publish failed");
        }
    });
}

fn probe_payload(msg: &Msg) -> Option<u64> {
    std::str::from_utf8(msg.get_payload_bytes())
        .ok()?
        .parse()
        .ok()
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
struct RateLimit {
    period: Duration,
    next: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            next: None,
            suppressed: 0,
        }
    }

    /// `Some(number suppressed since the last line)` when a line may be logged now.
    fn allow(&mut self) -> Option<u64> {
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
