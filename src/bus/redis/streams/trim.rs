//! Entries lost to trimming: a group that falls further behind than `MAXLEN` loses entries
//! without any Redis error, so the consumer looks for them.
//!
//! Evidence: per (`src`, stream) the envelopes' `seq` is contiguous (one publisher appends
//! every envelope of its channel), so a jump says entries of that publisher are missing
//! between two entries this consumer read. Confirmation: the first entry the stream still
//! holds (`XRANGE key - + COUNT 1`) is past the last entry this consumer read, so what
//! followed it is gone. Only then is the jump counted (`mdbridge_stream_trimmed_total`),
//! logged (rate-limited) and announced to the channel's bots (`gap`).
//!
//! Limits (docs/operations.md): in a group with one consumer per executor (broadcast) this
//! is exact. In a work-sharing group the peers' shares make every consumer see jumps; they
//! are confirmed only when the stream no longer holds the entry after this consumer's
//! last one, so a trim that runs close behind the group can be reported although a peer
//! delivered the missing entries, and the count is this publisher's jump, not what the
//! group as a whole lost. Entries trimmed while no consumer of the group ran (before the
//! first entry read after a restart) have no `seq` to compare with and are not reported;
//! the group's lag (monitor) shows them. A publisher that dropped envelopes before they
//! reached the stream is not a trim (the stream then still holds the entry before).

use std::collections::HashMap;

use ::redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use super::{Consumer, End};
use crate::bus::delivery::StreamNotice;
use crate::durable::StreamId;
use crate::event::Channel;
use crate::metrics;

/// Publishers followed per stream before the table starts over (one is normal).
const MAX_SOURCES: usize = 64;
/// Longest wait for the router to finish what preceded a gap (acks are never lost in
/// practice; this only bounds a stuck router).
const GAP_ORDER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// A larger jump is counted as this many (a forged `seq` must not overflow a counter).
const MAX_GAP: u64 = 100_000_000;

/// What this consumer read last from one stream.
#[derive(Debug, Default)]
pub(super) struct TrimTrack {
    last_seen: Option<StreamId>,
    seqs: HashMap<Uuid, u64>,
}

impl TrimTrack {
    /// A new entry whose `seq` is not above the last one read from the same publisher in
    /// this stream: appended again (a publisher re-sending after a lost reply) or an old
    /// envelope re-appended by someone with write access (its id is not signed). Either
    /// way the bots have it already.
    pub fn is_repeat(&self, src: Uuid, seq: u64) -> bool {
        self.seqs.get(&src).is_some_and(|&last| seq <= last)
    }

    /// Records entry `id` (`src`, `seq`). `Some((missing, last id before))` when `seq`
    /// jumps ahead of the publisher's previous one in this stream.
    pub fn observe(&mut self, src: Uuid, seq: u64, id: StreamId) -> Option<(u64, StreamId)> {
        let before = self.last_seen;
        let jump = match (self.seqs.get(&src), before) {
            (Some(&prev), Some(before)) if seq > prev.saturating_add(1) => {
                Some(((seq - prev - 1).min(MAX_GAP), before))
            }
            _ => None,
        };
        if self.seqs.len() >= MAX_SOURCES && !self.seqs.contains_key(&src) {
            self.seqs.clear();
        }
        let entry = self.seqs.entry(src).or_insert(seq);
        *entry = (*entry).max(seq);
        self.last_seen = Some(before.map_or(id, |b| b.max(id)));
        jump
    }
}

impl Consumer {
    /// Confirms a `seq` jump of `lost` entries after `before` and announces it.
    pub(super) async fn confirm_gap(
        &mut self,
        conn: &mut MultiplexedConnection,
        channel: &Channel,
        key: &str,
        lost: u64,
        before: StreamId,
        shutdown: &CancellationToken,
    ) -> Result<(), End> {
        // Asked once per stream per read: any answer after the read will do (the first
        // entry only moves forward), and a work-sharing group jumps on most entries.
        let first = match self.first_held.get(channel) {
            Some(first) => *first,
            None => {
                let rows: ::redis::RedisResult<Vec<(String, ::redis::Value)>> =
                    ::redis::cmd("XRANGE")
                        .arg(key)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(conn)
                        .await;
                let first = match rows {
                    Ok(rows) => rows.first().and_then(|(id, _)| id.parse::<StreamId>().ok()),
                    Err(e) => return self.on_error(e, "XRANGE").await,
                };
                self.first_held.insert(channel.clone(), first);
                first
            }
        };
        if first.is_none_or(|f| f <= before) {
            // The stream still holds what followed: a peer's share or a publisher's drop.
            return Ok(());
        }
        metrics::stream_trimmed(lost);
        if let Some(suppressed) = self.trim_log.allow() {
            warn!(channel = %channel, lost, group = %self.group, suppressed, "durable entries trimmed before this group read them");
        }
        // The bots must see the gap after the entries before it and before those after:
        // wait until the router has acked everything handed to it on this channel (the
        // notice then goes out before the next entry, and the router reads notices first).
        let deadline = tokio::time::Instant::now() + GAP_ORDER_WAIT;
        while self.outstanding.get(channel).is_some_and(|&n| n > 0) {
            tokio::select! {
                _ = shutdown.cancelled() => return Err(End::Stop),
                a = self.acks.recv(), if self.acks_open => match a {
                    Some(a) => self.router_acked(a),
                    None => self.acks_open = false,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let notice = StreamNotice::Gap {
            channel: channel.clone(),
            lost,
        };
        tokio::select! {
            _ = shutdown.cancelled() => Err(End::Stop),
            r = self.notices.send(notice) => r.map_err(|_| End::Stop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_are_reported_per_publisher_with_the_last_id_before() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut t = TrimTrack::default();
        let id = |n| StreamId::new(n, 0);
        assert_eq!(t.observe(a, 1, id(1)), None, "no baseline yet");
        assert_eq!(t.observe(a, 2, id(2)), None);
        assert_eq!(t.observe(b, 7, id(3)), None, "first of another publisher");
        assert_eq!(t.observe(a, 6, id(9)), Some((3, id(3))));
        assert_eq!(t.observe(a, 4, id(10)), None, "a step back is no gap");
        assert_eq!(
            t.observe(a, 7, id(11)),
            None,
            "the baseline stays at the highest"
        );
        assert_eq!(t.observe(b, 9, id(12)), Some((1, id(11))));
    }
}
