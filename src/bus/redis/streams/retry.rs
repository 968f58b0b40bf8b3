//! Entries that could not be handled, and entries other consumers left behind.
//!
//! - [`Retries`]: this consumer's schedule of failed entries (bounded: beyond
//!   [`MAX_SCHEDULED`] a failed entry simply stays pending and comes back on the next
//!   reconnect or through a peer's claim). A due entry is `XCLAIM`ed back to this consumer
//!   (min idle 0: Redis counts the delivery) and handled again.
//! - [`Consumer::failed`]: after `max_deliveries` deliveries (Redis's counter, read with
//!   `XPENDING`) the entry is dead-lettered ([`super::dead`]); before, it is scheduled
//!   `retry_backoff_ms × retry_backoff_factor^(deliveries-1)` ahead. It is never acked in
//!   between, and later entries keep flowing.
//! - [`Consumer::claim`]: every `claim_idle_ms / 2` (100 ms .. 10 s), entries idle longer
//!   than `claim_idle_ms` on other consumers of the group (`XPENDING … IDLE`) are taken
//!   over with `XCLAIM` and handed to the router as claimed ([`StreamNotice::Claimed`]).
//!
//! [`StreamNotice::Claimed`]: crate::bus::delivery::StreamNotice::Claimed

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::dead::{dead_letter, DeadLetter};
use super::reader::Source;
use super::reply::parse_entries;
use super::{retry_delay, Consumer, End};
use crate::durable::StreamId;
use crate::event::Channel;
use crate::metrics;

/// Failed entries scheduled at most.
pub const MAX_SCHEDULED: usize = 10_000;

/// Failed entries waiting for their next delivery.
#[derive(Default)]
pub(super) struct Retries {
    due: BTreeSet<(Instant, Channel, StreamId)>,
    index: HashMap<(Channel, StreamId), Instant>,
}

impl Retries {
    /// False when the schedule is full (the entry stays pending unscheduled).
    pub fn schedule(&mut self, channel: &Channel, id: StreamId, at: Instant) -> bool {
        self.forget(channel, id);
        if self.index.len() >= MAX_SCHEDULED {
            return false;
        }
        self.due.insert((at, channel.clone(), id));
        self.index.insert((channel.clone(), id), at);
        true
    }

    pub fn contains(&self, channel: &Channel, id: StreamId) -> bool {
        self.index.contains_key(&(channel.clone(), id))
    }

    pub fn forget(&mut self, channel: &Channel, id: StreamId) {
        if let Some(at) = self.index.remove(&(channel.clone(), id)) {
            self.due.remove(&(at, channel.clone(), id));
        }
    }

    /// Keeps the entries of channels for which `keep` holds.
    pub fn retain(&mut self, keep: impl Fn(&Channel) -> bool) {
        self.due.retain(|(_, c, _)| keep(c));
        self.index.retain(|(c, _), _| keep(c));
    }

    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _, _)| *at)
    }

    /// Removes and returns the entries due at `now`, earliest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<(Channel, StreamId)> {
        let mut out = Vec::new();
        while let Some((at, _, _)) = self.due.first() {
            if *at > now {
                break;
            }
            if let Some((_, c, id)) = self.due.pop_first() {
                self.index.remove(&(c.clone(), id));
                out.push((c, id));
            }
        }
        out
    }
}

/// One `XPENDING` extended row: id, consumer, idle ms, deliveries.
type PendingRow = (String, String, u64, u64);

impl Consumer {
    /// Claimed entries not handed over yet (see [`Consumer::handle`]); bounded.
    fn note_unhanded(&mut self, channel: &Channel, ids: impl Iterator<Item = StreamId>) {
        for id in ids {
            if self.unhanded.len() >= MAX_SCHEDULED {
                return;
            }
            self.unhanded.insert((channel.clone(), id));
        }
    }

    /// Entry `id` could not be handled (`reason`, `cause`): retry later or dead-letter.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn failed(
        &mut self,
        conn: &mut MultiplexedConnection,
        channel: &Channel,
        key: &str,
        id: StreamId,
        raw: &[u8],
        reason: &'static str,
        cause: &str,
        source: Source,
    ) -> Result<(), End> {
        metrics::envelope_invalid(reason);
        let deliveries = match source {
            Source::New => 1,
            Source::Claim { deliveries } => deliveries,
            Source::Pending | Source::Retry => match self.deliveries(conn, key, id).await {
                Ok(Some(n)) => n,
                // Not pending any more (acked or claimed meanwhile): nothing to do.
                Ok(None) => return Ok(()),
                Err(e) => return self.on_error(e, "XPENDING").await,
            },
        };
        if let Some(suppressed) = self.invalid_log.allow() {
            let cause: String = cause.escape_debug().take(300).collect();
            warn!(channel = %channel, id = %id, reason, cause, deliveries, suppressed, "durable entry cannot be handled");
        }
        if deliveries >= u64::from(self.durable.max_deliveries.max(1)) {
            let letter = DeadLetter {
                key,
                group: &self.group,
                consumer: &self.name,
                id,
                envelope: raw,
                error: cause,
                deliveries,
            };
            if let Err(e) = dead_letter(conn, &letter).await {
                return self.on_error(e, "dead letter").await;
            }
            metrics::stream_dead_letter();
            self.retries.forget(channel, id);
            warn!(channel = %channel, id = %id, deliveries, "durable entry moved to the dead-letter stream");
            return Ok(());
        }
        let at = Instant::now() + retry_delay(&self.durable, deliveries);
        if self.retries.schedule(channel, id, at) {
            metrics::stream_retry();
        }
        Ok(())
    }

    /// Redis's delivery counter of pending entry `id` (`None`: not pending).
    async fn deliveries(
        &mut self,
        conn: &mut MultiplexedConnection,
        key: &str,
        id: StreamId,
    ) -> ::redis::RedisResult<Option<u64>> {
        let rows: Vec<PendingRow> = ::redis::cmd("XPENDING")
            .arg(key)
            .arg(&self.group)
            .arg(id.to_string())
            .arg(id.to_string())
            .arg(1)
            .query_async(conn)
            .await?;
        Ok(rows.first().map(|r| r.3))
    }

    /// Claims back and handles every retry that is due.
    pub(super) async fn run_retries(
        &mut self,
        conn: &mut MultiplexedConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        for (channel, id) in self.retries.take_due(Instant::now()) {
            let Some(key) = self.streams.get(&channel).map(|s| s.key.clone()) else {
                continue;
            };
            let reply: Value = match ::redis::cmd("XCLAIM")
                .arg(&key)
                .arg(&self.group)
                .arg(&self.name)
                .arg(0)
                .arg(id.to_string())
                .query_async(conn)
                .await
            {
                Ok(v) => v,
                Err(e) => {
                    // Try again on the next turn.
                    self.retries.schedule(&channel, id, Instant::now());
                    return self.on_error(e, "XCLAIM").await;
                }
            };
            let entries = parse_entries(reply)
                .map_err(|cause| End::Reconnect(format!("XCLAIM reply: {cause}")))?;
            self.note_unhanded(&channel, entries.iter().map(|e| e.id));
            if entries.is_empty() {
                // Deleted (trimmed) while it waited; Redis 7 removed it from the PEL.
                metrics::stream_trimmed(1);
                continue;
            }
            for entry in entries {
                self.handle(conn, &channel, &key, entry, Source::Retry, shutdown)
                    .await?;
            }
        }
        Ok(())
    }

    /// Takes over entries idle longer than `claim_idle_ms` on other consumers.
    pub(super) async fn claim(
        &mut self,
        conn: &mut MultiplexedConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        let now = Instant::now();
        if now < self.claim_at {
            return Ok(());
        }
        let idle = self.durable.claim_idle_ms.max(1);
        self.claim_at = now
            + Duration::from_millis(idle / 2)
                .clamp(Duration::from_millis(100), Duration::from_secs(10));
        let streams: Vec<(Channel, String)> = self
            .streams
            .iter()
            .filter(|(_, s)| s.created)
            .map(|(c, s)| (c.clone(), s.key.clone()))
            .collect();
        for (channel, key) in streams {
            let rows: Vec<PendingRow> = match ::redis::cmd("XPENDING")
                .arg(&key)
                .arg(&self.group)
                .arg("IDLE")
                .arg(idle)
                .arg("-")
                .arg("+")
                .arg(self.durable.read_count.max(1))
                .query_async(conn)
                .await
            {
                Ok(rows) => rows,
                Err(e) => return self.on_error(e, "XPENDING").await,
            };
            let theirs: Vec<&PendingRow> = rows.iter().filter(|r| r.1 != self.name).collect();
            if theirs.is_empty() {
                continue;
            }
            let mut cmd = ::redis::cmd("XCLAIM");
            cmd.arg(&key).arg(&self.group).arg(&self.name).arg(idle);
            for r in &theirs {
                cmd.arg(&r.0);
            }
            let reply: Value = match cmd.query_async(conn).await {
                Ok(v) => v,
                Err(e) => return self.on_error(e, "XCLAIM").await,
            };
            let entries = parse_entries(reply)
                .map_err(|cause| End::Reconnect(format!("XCLAIM reply: {cause}")))?;
            let deleted = theirs.len().saturating_sub(entries.len()) as u64;
            if deleted > 0 {
                // Deleted before their consumer acked them: Redis 7 dropped them from the
                // pending list while claiming.
                metrics::stream_trimmed(deleted);
            }
            metrics::stream_claimed(entries.len() as u64);
            self.note_unhanded(&channel, entries.iter().map(|e| e.id));
            debug!(channel = %channel, claimed = entries.len(), deleted, "claimed idle entries from other consumers");
            let counts: HashMap<String, u64> = theirs.iter().map(|r| (r.0.clone(), r.3)).collect();
            for entry in entries {
                let deliveries = counts.get(&entry.id.to_string()).copied().unwrap_or(0) + 1;
                self.handle(
                    conn,
                    &channel,
                    &key,
                    entry,
                    Source::Claim { deliveries },
                    shutdown,
                )
                .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_ordered_bounded_and_forgettable() {
        let mut r = Retries::default();
        let c = Channel::parse("trade:binance:BTC-USDT").unwrap();
        let now = Instant::now();
        let id = |n| StreamId::new(n, 0);
        assert!(r.schedule(&c, id(2), now + Duration::from_secs(2)));
        assert!(r.schedule(&c, id(1), now + Duration::from_secs(1)));
        assert!(r.schedule(&c, id(3), now + Duration::from_secs(9)));
        assert!(r.contains(&c, id(1)));
        assert_eq!(r.next_due(), Some(now + Duration::from_secs(1)));
        r.forget(&c, id(1));
        assert_eq!(
            r.take_due(now + Duration::from_secs(5)),
            vec![(c.clone(), id(2))]
        );
        assert!(!r.contains(&c, id(2)));
        assert!(r.contains(&c, id(3)));
        r.retain(|_| false);
        assert_eq!(r.next_due(), None);
    }

    #[test]
    fn retry_delays_grow_by_the_factor() {
        let d = crate::config::DurableConfig::default();
        let ms = |n| retry_delay(&d, n).as_millis();
        assert_eq!((ms(1), ms(2), ms(3)), (1_000, 4_000, 16_000));
        assert_eq!(ms(99), 3_600_000, "capped");
    }
}
