//! One session of the stream consumer: connect, then turn after turn: flush acks, follow
//! the interest and the registry, create groups, run due retries and claims, read (own
//! pending first, then new entries with a blocking `XREADGROUP`) and hand entries over.
//!
//! Every entry goes through [`Consumer::handle`]: decoded, checked for a trim gap, handed
//! to the router — or, when it cannot be handled, scheduled for a retry or dead-lettered.

use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Value};

use super::reply::{parse_streams, Entry};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{targets, Consumer, Cursor, End, StreamState};
use crate::bus::delivery::{Acked, StreamNotice};
use crate::bus::redis::io_timeout;
use crate::bus::BusState;
use crate::durable::{stream_key, StreamId};
use crate::envelope::BusMessage;
use crate::event::Channel;
use crate::metrics;

/// How an entry reached this consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// A new entry (`>`): its first delivery.
    New,
    /// This consumer's own pending entry, read again after a (re)connect.
    Pending,
    /// Claimed from another consumer; `deliveries` counts this one.
    Claim { deliveries: u64 },
    /// Claimed back for a scheduled retry.
    Retry,
}

/// Entries handed to the router and not acked yet, at most (then the consumer waits for
/// acks): a share of the router's input, which pub/sub uses too.
const MAX_IN_FLIGHT: u64 = 4_096;
/// Longest wait for that (acks are not lost in practice; this only bounds a stuck router).
const IN_FLIGHT_WAIT: Duration = Duration::from_secs(5);

/// Acks buffered before they are dropped (the entries then stay pending and are dropped as
/// redeliveries later): only reached while every `XACK` keeps failing.
const MAX_UNACKED: usize = 1_000_000;

impl Consumer {
    pub(super) async fn session(&mut self, shutdown: &CancellationToken, sessions: u64) -> End {
        let resolved = tokio::select! {
            _ = shutdown.cancelled() => return End::Stop,
            r = self.target.resolve() => match r {
                Ok(r) => r,
                Err(e) => return End::Reconnect(format!("resolve: {e}")),
            },
        };
        // Its own connection: a blocking read holds it for up to block_ms, so replies may
        // take that long plus the usual I/O bound.
        let io = io_timeout(&self.redis);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(io)
            .set_response_timeout(io + Duration::from_millis(self.durable.block_ms));
        let connect = resolved
            .client
            .get_multiplexed_async_connection_with_config(&config);
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return End::Stop,
            c = connect => c,
        };
        let mut conn = match connected {
            Ok(c) => c,
            Err(e) => {
                let failure = crate::bus::redis::RedisFailure::classify(&e);
                return End::Reconnect(format!("connect: {failure}"));
            }
        };
        // A new session re-reads its pending entries: acks of the last one that never came
        // back (lost, or the router's queue was full) must not hold deliveries back.
        self.in_flight = 0;
        self.outstanding.clear();
        for s in self.streams.values_mut() {
            s.created = false;
            s.cursor = Cursor::Pending(StreamId::MIN);
        }
        if sessions > 0 {
            metrics::redis_reconnect("consume");
        }
        metrics::redis_connected("consume", true);
        self.health.up(None);
        BusState::set_up(&self.bus_state);
        self.session_was_up = true;
        let mut master_watch = self.target.watch(&resolved);
        info!(redis = %resolved.shown(&self.target), group = %self.group, consumer = %self.name, "redis stream consumer connected");
        loop {
            // A turn is never cut short by the master watch: an entry claimed but not yet
            // handed over would look like a redelivery when re-read. It is checked between
            // turns (each lasts about one blocking read) and fails the commands anyway.
            if master_watch.has_moved() {
                return End::Reconnect(master_watch.moved().await);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                turn = self.turn(&mut conn, shutdown) => match turn {
                    Ok(()) => {}
                    Err(End::Stop) => break,
                    Err(end) => return end,
                },
            }
        }
        // Shutting down: what the router acked so far need not be delivered again.
        self.drain_acks();
        let last = Duration::from_millis(self.durable.block_ms) + io;
        let _ = tokio::time::timeout(last, self.flush_acks(&mut conn)).await;
        End::Stop
    }

    async fn turn(
        &mut self,
        conn: &mut MultiplexedConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        if shutdown.is_cancelled() {
            return Err(End::Stop);
        }
        let failures = self.failures;
        self.drain_acks();
        self.flush_acks(conn).await?;
        self.refresh(conn).await?;
        self.create_groups(conn).await?;
        self.run_retries(conn, shutdown).await?;
        self.claim(conn, shutdown).await?;
        self.read(conn, shutdown).await?;
        if self.degraded && self.failures == failures {
            // A whole turn without an error reply: what was refused works again.
            self.degraded = false;
            self.health.up(None);
        }
        Ok(())
    }

    pub(super) fn drain_acks(&mut self) {
        while let Ok(a) = self.acks.try_recv() {
            self.router_acked(a);
        }
    }

    /// The router is done with an entry this consumer handed over.
    pub(super) fn router_acked(&mut self, a: Acked) {
        if !self.policy.is_durable(&a.channel) {
            // An id-carrying envelope pub/sub delivered on a channel this executor does not
            // consume (its publisher lists more durable channels): no group to ack in.
            return;
        }
        if let Some(n) = self.outstanding.get_mut(&a.channel) {
            *n = n.saturating_sub(1);
            self.in_flight = self.in_flight.saturating_sub(1);
            if *n == 0 {
                self.outstanding.remove(&a.channel);
            }
        }
        self.note_ack(a.channel, a.id);
    }

    fn note_ack(&mut self, channel: Channel, id: StreamId) {
        if self.unacked_total >= MAX_UNACKED {
            return;
        }
        self.unacked_total += 1;
        self.unacked.entry(channel).or_default().push(id);
    }

    /// One `XACK` per stream with every id the router acknowledged, in one round trip.
    async fn flush_acks(&mut self, conn: &mut MultiplexedConnection) -> Result<(), End> {
        if self.unacked.is_empty() {
            return Ok(());
        }
        let mut pipe = ::redis::pipe();
        let mut n = 0u64;
        for (channel, ids) in &self.unacked {
            let cmd = pipe
                .cmd("XACK")
                .arg(stream_key(&self.redis.key_prefix, channel.as_str()))
                .arg(&self.group);
            for id in ids {
                cmd.arg(id.to_string());
            }
            n += ids.len() as u64;
        }
        match pipe.query_async::<Vec<u64>>(conn).await {
            Ok(_) => {
                metrics::stream_acked(n);
                self.unacked.clear();
                self.unacked_total = 0;
                Ok(())
            }
            Err(e) => self.on_error(e, "XACK").await,
        }
    }

    /// Follows the interest and (while a wildcard is held) the registry.
    async fn refresh(&mut self, conn: &mut MultiplexedConnection) -> Result<(), End> {
        let changed = self.interest_open && self.interest.has_changed().unwrap_or(false);
        let interest = self.interest.borrow_and_update().clone();
        let wildcards = interest.iter().any(|p| p.is_wildcard());
        let every = Duration::from_millis(self.durable.block_ms.max(100));
        let registry_due = wildcards && self.registry_at.is_none_or(|at| at.elapsed() >= every);
        if !changed && !registry_due && !self.refresh_now {
            return Ok(());
        }
        self.refresh_now = false;
        // When the interest changed (measured here, so no clock but Redis's is compared).
        let changed_at = self
            .interest_changed_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if interest.iter().any(|p| !self.held_since.contains_key(p)) {
            // Back-dated to when the interest changed (the consumer may have noticed a
            // blocking read later), plus a margin for the Redis round trips: entries
            // appended right after the bot's `subscribed` reply are not skipped, and a
            // plain subscribe is not handed seconds of history.
            let waited = changed_at.map_or(Duration::ZERO, |at| at.elapsed());
            let margin = u64::try_from(waited.as_millis())
                .unwrap_or(u64::MAX)
                .saturating_add(super::NOTICE_MARGIN_MS);
            let now = match targets::redis_time_ms(conn).await {
                Ok(ms) => ms.saturating_sub(margin),
                Err(e) => {
                    self.refresh_now = true;
                    return self.on_error(e, "TIME").await;
                }
            };
            for p in interest.iter() {
                self.held_since.entry(p.clone()).or_insert(now);
            }
        }
        self.held_since.retain(|p, _| interest.contains(p));
        if registry_due {
            match targets::read_registry(conn, &self.redis.key_prefix).await {
                Ok(channels) => self.registry = channels,
                Err(e) => return self.on_error(e, "SMEMBERS").await,
            }
            self.registry_at = Some(tokio::time::Instant::now());
        } else if !wildcards {
            self.registry.clear();
            self.registry_at = None;
        }
        let wanted = targets::wanted(&interest, &self.policy, &self.registry, &self.held_since);
        if wanted.len() >= super::MAX_STREAMS {
            if let Some(suppressed) = self.error_log.allow() {
                warn!(
                    streams = wanted.len(),
                    suppressed, "durable streams to read capped"
                );
            }
        }
        self.streams.retain(|c, _| wanted.contains_key(c));
        self.retries.retain(|c| wanted.contains_key(c));
        self.unhanded.retain(|(c, _)| wanted.contains_key(c));
        for (channel, start) in wanted {
            self.streams
                .entry(channel.clone())
                .or_insert_with(|| StreamState {
                    key: stream_key(&self.redis.key_prefix, channel.as_str()),
                    start,
                    created: false,
                    cursor: Cursor::Pending(StreamId::MIN),
                    trim: Default::default(),
                });
        }
        Ok(())
    }

    /// `XGROUP CREATE key group $|<ms>-0 MKSTREAM` for the streams new in this session
    /// (one at a time: an existing group answers `BUSYGROUP`, which would fail a pipeline).
    async fn create_groups(&mut self, conn: &mut MultiplexedConnection) -> Result<(), End> {
        let todo: Vec<(Channel, String, super::Start)> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.created)
            .map(|(c, s)| (c.clone(), s.key.clone(), s.start))
            .collect();
        for (channel, key, start) in todo {
            let from = match start {
                super::Start::Latest => "$".to_string(),
                super::Start::At(ms) => format!("{ms}-0"),
            };
            let r: ::redis::RedisResult<()> = ::redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&key)
                .arg(&self.group)
                .arg(from)
                .arg("MKSTREAM")
                .query_async(conn)
                .await;
            match r {
                Ok(()) => {}
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return self.on_error(e, "XGROUP CREATE").await,
            }
            if let Some(s) = self.streams.get_mut(&channel) {
                s.created = true;
            }
        }
        Ok(())
    }

    /// Own pending entries first (non-blocking, per stream after the last id returned),
    /// else new ones with a blocking read; with no stream at all, waits for a change.
    async fn read(
        &mut self,
        conn: &mut MultiplexedConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        // `COUNT` applies per stream: shared out so one reply holds at most
        // max(read_count, streams) entries, however many streams are read.
        let count = (self.durable.read_count / self.streams.len().max(1)).max(1);
        let pending: Vec<(String, StreamId)> = self
            .streams
            .values()
            .filter(|s| s.created)
            .filter_map(|s| match s.cursor {
                Cursor::Pending(after) => Some((s.key.clone(), after)),
                Cursor::New => None,
            })
            .collect();
        let history = !pending.is_empty();
        let reads: Vec<(String, String)> = if history {
            pending
                .into_iter()
                .map(|(k, after)| (k, after.to_string()))
                .collect()
        } else {
            self.streams
                .values()
                .filter(|s| s.created)
                .map(|s| (s.key.clone(), ">".to_string()))
                .collect()
        };
        if reads.is_empty() {
            return self.idle(shutdown).await;
        }
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(&self.group).arg(&self.name);
        cmd.arg("COUNT").arg(count);
        if !history {
            cmd.arg("BLOCK")
                .arg(self.block_for().as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS");
        for (k, _) in &reads {
            cmd.arg(k);
        }
        for (_, id) in &reads {
            cmd.arg(id);
        }
        let reply: Value = match cmd.query_async(conn).await {
            Ok(v) => v,
            Err(e) => return self.on_error(e, "XREADGROUP").await,
        };
        self.first_held.clear();
        let streams = match parse_streams(reply) {
            Ok(s) => s,
            Err(cause) => return Err(End::Reconnect(format!("XREADGROUP reply: {cause}"))),
        };
        if history {
            // A stream whose own pending list is exhausted moves on to new entries.
            for (key, _) in &reads {
                let done = streams
                    .iter()
                    .find(|(k, _)| k == key)
                    .is_none_or(|(_, e)| e.is_empty());
                if done {
                    if let Some(s) = self.streams.values_mut().find(|s| &s.key == key) {
                        s.cursor = Cursor::New;
                    }
                }
            }
        }
        for (key, entries) in streams {
            let Some(channel) = self.channel_of(&key) else {
                continue;
            };
            for entry in entries {
                let id = entry.id;
                let source = if history {
                    Source::Pending
                } else {
                    Source::New
                };
                self.handle(conn, &channel, &key, entry, source, shutdown)
                    .await?;
                if history {
                    if let Some(s) = self.streams.get_mut(&channel) {
                        s.cursor = Cursor::Pending(id);
                    }
                }
            }
        }
        Ok(())
    }

    /// How long a blocking read may wait: `block_ms`, less when a retry or claim is due.
    fn block_for(&self) -> Duration {
        let mut block = Duration::from_millis(self.durable.block_ms.max(1));
        let now = tokio::time::Instant::now();
        if let Some(due) = self.retries.next_due() {
            block = block.min(due.saturating_duration_since(now));
        }
        block.min(self.claim_at.saturating_duration_since(now))
    }

    /// Nothing to read: wait for the interest, an ack, or the next registry / retry turn.
    async fn idle(&mut self, shutdown: &CancellationToken) -> Result<(), End> {
        let wait = self.block_for().max(Duration::from_millis(1));
        tokio::select! {
            _ = shutdown.cancelled() => return Err(End::Stop),
            r = self.interest.changed(), if self.interest_open => {
                // `changed` marks the value seen: remember to recompute.
                self.refresh_now = true;
                if r.is_err() {
                    self.interest_open = false;
                }
            }
            a = self.acks.recv(), if self.acks_open => match a {
                Some(a) => self.router_acked(a),
                None => self.acks_open = false,
            },
            _ = tokio::time::sleep(wait) => {}
        }
        Ok(())
    }

    pub(super) fn channel_of(&self, key: &str) -> Option<Channel> {
        let name = key
            .strip_prefix(&self.redis.key_prefix)?
            .strip_prefix("stream:")?;
        Channel::parse(name).ok()
    }

    /// Decodes one entry and hands it over, or schedules its retry / dead-letters it.
    pub(super) async fn handle(
        &mut self,
        conn: &mut MultiplexedConnection,
        channel: &Channel,
        key: &str,
        entry: Entry,
        source: Source,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        let id = entry.id;
        // Claimed (or claimed back for a retry) but never handed over before a session
        // ended: older than what the router delivered, so it must go the claimed way.
        let source = match source {
            Source::Pending if self.unhanded.contains(&(channel.clone(), id)) => Source::Retry,
            other => other,
        };
        self.handle_entry(conn, channel, key, entry, source, shutdown)
            .await?;
        self.unhanded.remove(&(channel.clone(), id));
        Ok(())
    }

    async fn handle_entry(
        &mut self,
        conn: &mut MultiplexedConnection,
        channel: &Channel,
        key: &str,
        entry: Entry,
        source: Source,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        let id = entry.id;
        let Some(fields) = entry.fields else {
            // Deleted (trimmed) while it was pending here: nothing left to deliver.
            metrics::stream_trimmed(1);
            self.retries.forget(channel, id);
            self.note_ack(channel.clone(), id);
            return Ok(());
        };
        if source == Source::Pending && self.retries.contains(channel, id) {
            // Waiting for its retry.
            return Ok(());
        }
        let raw = fields
            .into_iter()
            .find(|(k, _)| k == b"envelope")
            .map(|(_, v)| Bytes::from(v));
        let decoded = match &raw {
            None => Err(("id", "stream entry has no `envelope` field".to_string())),
            Some(raw) => {
                match BusMessage::decode_with(channel.clone(), raw.clone(), &self.decode) {
                    Ok(m) if m.id == Some(id) => Ok(m),
                    Ok(m) => Err((
                        "id",
                        format!(
                            "envelope id {} is not the entry id {id}",
                            m.id.map_or_else(|| "(none)".to_string(), |i| i.to_string())
                        ),
                    )),
                    Err(e) => Err((e.reason(), e.to_string())),
                }
            }
        };
        match decoded {
            Ok(msg) => {
                self.retries.forget(channel, id);
                self.deliver(conn, channel, key, msg, source, shutdown)
                    .await
            }
            Err((reason, cause)) => {
                let raw = raw.unwrap_or_default();
                self.failed(conn, channel, key, id, &raw, reason, &cause, source)
                    .await
            }
        }
    }

    async fn deliver(
        &mut self,
        conn: &mut MultiplexedConnection,
        channel: &Channel,
        key: &str,
        msg: BusMessage,
        source: Source,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        match source {
            Source::New | Source::Pending => {
                let repeat = source == Source::New
                    && self
                        .streams
                        .get(channel)
                        .is_some_and(|s| s.trim.is_repeat(msg.src, msg.seq));
                if repeat {
                    // Never handed to the router: acked here, counted with redeliveries.
                    crate::metrics::stream_redelivery_dropped();
                    if let Some(id) = msg.id {
                        self.note_ack(channel.clone(), id);
                    }
                    return Ok(());
                }
                let seen = self
                    .streams
                    .get_mut(channel)
                    .and_then(|s| s.trim.observe(msg.src, msg.seq, msg.id.unwrap_or_default()));
                if let (Source::New, Some((lost, before))) = (source, seen) {
                    self.confirm_gap(conn, channel, key, lost, before, shutdown)
                        .await?;
                }
                // The router's input is shared with pub/sub (which drops when it is full):
                // keep at most MAX_IN_FLIGHT entries in it, so a backlog never crowds it.
                let deadline = tokio::time::Instant::now() + IN_FLIGHT_WAIT;
                while self.in_flight >= MAX_IN_FLIGHT {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(End::Stop),
                        a = self.acks.recv(), if self.acks_open => match a {
                            Some(a) => self.router_acked(a),
                            None => self.acks_open = false,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
                let out = self.out.clone();
                let permit = loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(End::Stop),
                        a = self.acks.recv(), if self.acks_open => match a {
                            Some(a) => self.router_acked(a),
                            None => self.acks_open = false,
                        },
                        p = out.reserve() => match p {
                            Ok(p) => break p,
                            Err(_) => return Err(End::Stop),
                        },
                    }
                };
                permit.send(msg);
            }
            Source::Claim { .. } | Source::Retry => {
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(End::Stop),
                    r = self.notices.send(StreamNotice::Claimed(msg)) => if r.is_err() {
                        return Err(End::Stop);
                    },
                }
            }
        }
        *self.outstanding.entry(channel.clone()).or_default() += 1;
        self.in_flight += 1;
        metrics::stream_delivered(1);
        Ok(())
    }
}
