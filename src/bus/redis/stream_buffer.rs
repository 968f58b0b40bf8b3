//! The publisher's buffer of durable envelopes while Redis cannot take them (unreachable,
//! `LOADING`): ordered, bounded, and careful not to append twice what a lost reply
//! already appended. Used by [`super::stream_writer`], which decides what goes in.
//!
//! - **Bound.** At most `[durable] buffer_bytes`, counting each envelope's bytes plus a
//!   fixed per-entry overhead ([`ENTRY_OVERHEAD`]). What is buffered goes out in order,
//!   oldest first, before newer durable envelopes (the writer defers those behind it).
//! - **Overflow** drops the *oldest* envelope: like the stream's own `MAXLEN` and
//!   `drop_oldest` for bots, the freshest market data is worth the most, and the gap sits
//!   at one place per channel. Drops are counted (`mdbridge_stream_buffer_dropped_total`)
//!   and, once Redis is back and the buffer through, announced per channel as a `status`
//!   event (state `error`, the detail names the channel and the count) sent into the
//!   publisher's own event queue, so the Sequencer gives it its `seq` like any status;
//!   the `seq` gap in the stream shows the same loss.
//! - **Lost replies.** A batch that failed with a connection error comes back to the
//!   front, its envelopes marked "in doubt": Redis may have executed them. Before they
//!   are resent, the newest entries of each such stream (`XREVRANGE key + - COUNT n`, n =
//!   the envelopes in doubt) are read and what this publisher (`src`) already appended,
//!   by `seq`, is skipped. That needs them to still be the newest entries: if another
//!   writer appended more than n in between, or the stream is gone (Redis restarted
//!   without persistence), an envelope is appended again (at least once, with a new id;
//!   the `seq` shows it to consumers).
//!
//! It does not talk to Redis otherwise, nor know which channels are durable.

use std::collections::{HashMap, VecDeque};

use ::redis::aio::MultiplexedConnection;
use ::redis::{Pipeline, RedisResult};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::durable::stream_key;
use crate::envelope::BusMessage;
use crate::event::{Channel, Event, StatusState};
use crate::metrics;

/// Memory a buffered envelope costs besides its bytes (the message struct, its channel).
pub(super) const ENTRY_OVERHEAD: u64 = std::mem::size_of::<BusMessage>() as u64 + 64;

/// One stream entry as `XRANGE`/`XREVRANGE` return it: id and field/value pairs.
type Entry = (String, Vec<(String, Vec<u8>)>);

/// Durable envelopes waiting for Redis, oldest first.
pub(super) struct StreamBuffer {
    backlog: VecDeque<BusMessage>,
    backlog_bytes: u64,
    max_bytes: u64,
    /// Envelopes dropped since the last announcement, per channel (bounded by the
    /// channels the feeds produce).
    dropped: HashMap<Channel, u64>,
    /// Per channel: envelopes at the front whose append may have happened.
    pub(super) unsure: HashMap<Channel, usize>,
    notices: Option<mpsc::WeakSender<Event>>,
}

impl StreamBuffer {
    pub(super) fn new(max_bytes: u64, notices: Option<mpsc::WeakSender<Event>>) -> StreamBuffer {
        StreamBuffer {
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            max_bytes,
            dropped: HashMap::new(),
            unsure: HashMap::new(),
            notices,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    /// Adds `msg` behind everything buffered; call [`StreamBuffer::trim`] after a run.
    pub(super) fn push_back(&mut self, msg: BusMessage) {
        self.backlog_bytes += cost(&msg);
        self.backlog.push_back(msg);
    }

    pub(super) fn has_unsure(&self) -> bool {
        !self.unsure.is_empty()
    }

    pub(super) fn take_unsure(&mut self) -> HashMap<Channel, usize> {
        std::mem::take(&mut self.unsure)
    }

    /// The check could not be made (connection lost): the doubt stays.
    pub(super) fn restore_unsure(&mut self, unsure: HashMap<Channel, usize>) {
        self.unsure = unsure;
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

    /// Drops from the buffer what this publisher already appended (see the module docs).
    pub(super) async fn skip_appended(
        &mut self,
        conn: &mut MultiplexedConnection,
        prefix: &str,
        src: &str,
        unsure: &HashMap<Channel, usize>,
    ) -> RedisResult<()> {
        let channels: Vec<(&Channel, usize)> = unsure.iter().map(|(c, n)| (c, *n)).collect();
        let mut pipe = Pipeline::with_capacity(channels.len());
        for (channel, n) in &channels {
            pipe.cmd("XREVRANGE")
                .arg(stream_key(prefix, channel.as_str()))
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(*n);
        }
        let newest: Vec<Vec<Entry>> = pipe.query_async(conn).await?;
        for ((channel, _), entries) in channels.iter().zip(newest) {
            let Some(last) = entries
                .iter()
                .filter_map(|(_, fields)| own_seq(src, fields))
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

    /// Puts `msgs` (in order; `true` = may have been appended) back at the front of the
    /// buffer, ahead of everything buffered since.
    pub(super) fn requeue_front(&mut self, msgs: Vec<(BusMessage, bool)>) {
        if msgs.is_empty() {
            return;
        }
        for (msg, unsure) in msgs.into_iter().rev() {
            if unsure {
                *self.unsure.entry(msg.channel.clone()).or_default() += 1;
            }
            self.backlog_bytes += cost(&msg);
            self.backlog.push_front(msg);
        }
        self.trim();
    }

    /// Drops the oldest envelopes until the buffer fits its bound.
    pub(super) fn trim(&mut self) {
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

    /// Redis is back and the buffer through: tells each channel's consumers, through the publisher's own event
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

/// What a buffered envelope counts against `buffer_bytes`.
fn cost(msg: &BusMessage) -> u64 {
    msg.envelope.len() as u64 + ENTRY_OVERHEAD
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
