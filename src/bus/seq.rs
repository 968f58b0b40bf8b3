//! Sequence sanity for envelopes received from Redis: per (`src`, channel), which `seq`
//! continues the stream, which is a duplicate, how many went missing, and what is an
//! anomaly (PROTOCOL §3: `seq` rises by one per envelope of one `src` on one channel).
//!
//! Redis is a trust boundary: anything that can `PUBLISH` can put any `src` and `seq` in
//! an envelope, and the `src` of the real publisher is visible in each of its envelopes.
//! So no single envelope may move the baseline the others are judged by:
//!
//! - An envelope that does not continue the stream (a gap, a jump far ahead, a step back)
//!   is delivered but *not adopted*: it becomes the baseline only when the very next
//!   envelope of that (`src`, channel) continues from it. A forged `seq = 2^64-1` is
//!   therefore one delivered outlier; the genuine envelopes after it keep continuing the
//!   old baseline and keep flowing.
//! - Duplicates (an envelope received through both an exact and a pattern subscription)
//!   are recognised with a 64-bit window of the seqs seen just below the baseline, plus
//!   the pending outlier itself, never by "anything at or below the highest seq seen".
//!   One forged envelope can therefore suppress at most one genuine one (the one whose
//!   `seq` it took), never a range.
//! - Loss is counted when a gap is confirmed, and only for gaps up to [`JUMP_WINDOW`];
//!   a larger jump is an anomaly, not 10^19 lost envelopes.
//! - With signed envelopes ([`SeqTracker::new`] with `authenticated`), `seq` cannot be
//!   forged, only replayed: gaps are adopted at once and a step back is a replay, dropped.
//! - State is bounded: at most [`MAX_SOURCES_PER_CHANNEL`] sources per channel (the least
//!   recently seen is evicted), at most [`MAX_CHANNELS`] channels (beyond, new channels go
//!   untracked until silent ones are forgotten), and a (`src`, channel) silent for
//!   [`FORGET_AFTER_TICKS`] ticks is forgotten (a restarted publisher has a new `src`).
//!
//! This module only judges; counting metrics and dropping is the subscriber's job.

use std::collections::HashMap;

use uuid::Uuid;

use crate::event::Channel;

/// Largest gap counted as lost envelopes; a bigger jump ahead is an [`Anomaly::Jump`].
/// 100 000 is minutes of the busiest channel, far more than any pub/sub reconnect loses.
pub const JUMP_WINDOW: u64 = 100_000;

/// Ticks (probe intervals) after which a silent (`src`, channel) is forgotten.
pub const FORGET_AFTER_TICKS: u64 = 600;

/// Publishers tracked per channel. Normally one (two while a publisher is replaced).
pub const MAX_SOURCES_PER_CHANNEL: usize = 8;

/// Channels tracked at once. The subscriber only tracks channels some bot's pattern
/// matches, but a wildcard pattern matches any number of forged channel names.
pub const MAX_CHANNELS: usize = 65_536;

/// Width of the duplicate window below the baseline.
const WINDOW_BITS: u64 = 64;

/// Why an envelope's `seq` does not fit its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anomaly {
    /// More than [`JUMP_WINDOW`] ahead of the baseline.
    Jump,
    /// Behind the baseline, and not a duplicate of anything recent.
    Back,
}

impl Anomaly {
    /// The `kind` label of `mdbridge_envelope_seq_anomalies_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Anomaly::Jump => "jump",
            Anomaly::Back => "back",
        }
    }
}

/// What one envelope's `seq` says about its (`src`, channel) stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// The next one (or the first seen from this `src`): deliver.
    InOrder,
    /// Continues the stream after this many envelopes that never arrived: deliver.
    Gap(u64),
    /// A gap within [`JUMP_WINDOW`] not yet confirmed by the next envelope: deliver;
    /// the loss is counted once the stream continues from here.
    Unconfirmed,
    /// Does not fit the stream: deliver and count; adopted only if the next envelope
    /// continues from it.
    Outlier(Anomaly),
    /// Seen already: drop.
    Duplicate,
    /// (Authenticated only) a step back: an old envelope replayed; drop.
    Replay,
}

impl Seen {
    /// False for what must not reach bots.
    pub fn deliver(self) -> bool {
        !matches!(self, Seen::Duplicate | Seen::Replay)
    }
}

/// The state of one (`src`, channel).
#[derive(Debug, Clone)]
struct Stream {
    src: Uuid,
    /// The baseline: the last `seq` that continued the stream.
    last: u64,
    /// Bit `i` set: `last - i` was seen (bit 0 is `last` itself).
    window: u64,
    /// An outlier delivered but not adopted, waiting for `outlier + 1`.
    outlier: Option<u64>,
    /// Outliers between `last` and the current one that were delivered and replaced:
    /// not lost, so subtracted from the gap when it is confirmed.
    delivered_in_gap: u64,
    seen_at: u64,
}

impl Stream {
    fn new(src: Uuid, seq: u64, now: u64) -> Stream {
        Stream {
            src,
            last: seq,
            window: 1,
            outlier: None,
            delivered_in_gap: 0,
            seen_at: now,
        }
    }

    fn is_recent_duplicate(&self, seq: u64) -> bool {
        seq <= self.last
            && self.last - seq < WINDOW_BITS
            && self.window & (1 << (self.last - seq)) != 0
    }

    /// Makes `seq` the baseline (`shift` = how far it moved up; `None`: re-baselined).
    fn adopt(&mut self, seq: u64, shift: Option<u64>) {
        self.window = match shift {
            Some(s) if s < WINDOW_BITS => (self.window << s) | 1,
            _ => 1,
        };
        self.last = seq;
        self.outlier = None;
        self.delivered_in_gap = 0;
    }

    fn observe(&mut self, seq: u64, authenticated: bool) -> Seen {
        if self.last.checked_add(1) == Some(seq) {
            self.adopt(seq, Some(1));
            return Seen::InOrder;
        }
        if self.is_recent_duplicate(seq) || self.outlier == Some(seq) {
            return Seen::Duplicate;
        }
        if authenticated {
            // The seq is signed: a genuine stream only ever moves up.
            if seq < self.last {
                return Seen::Replay;
            }
            let gap = seq - self.last - 1;
            self.adopt(seq, Some(gap + 1));
            return if gap <= JUMP_WINDOW {
                Seen::Gap(gap)
            } else {
                Seen::Outlier(Anomaly::Jump)
            };
        }
        if let Some(outlier) = self.outlier {
            if outlier.checked_add(1) == Some(seq) {
                // Confirmed: the stream really continues from the outlier.
                let lost = if outlier > self.last && outlier - self.last - 1 <= JUMP_WINDOW {
                    (outlier - self.last - 1).saturating_sub(self.delivered_in_gap)
                } else {
                    0
                };
                self.adopt(outlier, None);
                self.adopt(seq, Some(1));
                return if lost > 0 {
                    Seen::Gap(lost)
                } else {
                    Seen::InOrder
                };
            }
            if outlier > self.last && outlier < seq {
                self.delivered_in_gap += 1;
            }
        }
        self.outlier = Some(seq);
        if seq < self.last {
            Seen::Outlier(Anomaly::Back)
        } else if seq - self.last - 1 <= JUMP_WINDOW {
            Seen::Unconfirmed
        } else {
            Seen::Outlier(Anomaly::Jump)
        }
    }
}

/// Per (`src`, channel) sequence state, with a coarse clock for forgetting.
#[derive(Default)]
pub struct SeqTracker {
    streams: HashMap<Channel, Vec<Stream>>,
    tick: u64,
    /// `seq` is covered by a verified signature: it can be replayed, never forged.
    authenticated: bool,
}

impl SeqTracker {
    /// `authenticated`: every envelope judged here carried a valid signature.
    pub fn new(authenticated: bool) -> SeqTracker {
        SeqTracker {
            authenticated,
            ..SeqTracker::default()
        }
    }

    pub fn observe(&mut self, src: Uuid, channel: &Channel, seq: u64) -> Seen {
        let now = self.tick;
        let authenticated = self.authenticated;
        if let Some(streams) = self.streams.get_mut(channel) {
            if let Some(s) = streams.iter_mut().find(|s| s.src == src) {
                s.seen_at = now;
                return s.observe(seq, authenticated);
            }
            if streams.len() >= MAX_SOURCES_PER_CHANNEL {
                // Forged srcs must not grow memory: the least recently seen one goes. If
                // that was the genuine publisher, its next envelope simply starts afresh.
                if let Some(i) = (0..streams.len()).min_by_key(|&i| streams[i].seen_at) {
                    streams.swap_remove(i);
                }
            }
            streams.push(Stream::new(src, seq, now));
            return Seen::InOrder;
        }
        if self.streams.len() < MAX_CHANNELS {
            self.streams
                .insert(channel.clone(), vec![Stream::new(src, seq, now)]);
        }
        // A new src (or one forgotten while silent) starts wherever it is.
        Seen::InOrder
    }

    /// Advances the clock by one tick and forgets what has been silent for
    /// [`FORGET_AFTER_TICKS`] (a sweep every 64 ticks keeps the cost negligible).
    pub fn tick(&mut self) {
        self.tick += 1;
        if self.tick % 64 == 0 {
            let now = self.tick;
            self.streams.retain(|_, streams| {
                streams.retain(|s| now - s.seen_at < FORGET_AFTER_TICKS);
                !streams.is_empty()
            });
        }
    }

    /// Number of (`src`, channel) streams tracked.
    pub fn len(&self) -> usize {
        self.streams.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Forgets channels no longer of interest, so the map does not grow without bound.
    pub fn retain(&mut self, mut keep: impl FnMut(&Channel) -> bool) {
        self.streams.retain(|c, _| keep(c));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chan(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    /// Feeds `seqs` to one stream and returns what each was judged.
    fn run(t: &mut SeqTracker, src: Uuid, seqs: &[u64]) -> Vec<Seen> {
        let c = chan("trade:binance:BTC-USDT");
        seqs.iter().map(|&s| t.observe(src, &c, s)).collect()
    }

    #[test]
    fn in_order_duplicates_and_sources_apart() {
        let mut t = SeqTracker::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        use Seen::*;
        assert_eq!(
            run(&mut t, a, &[7, 8, 8, 9, 8, 7]),
            [InOrder, InOrder, Duplicate, InOrder, Duplicate, Duplicate],
            "a new src starts wherever it is; repeats in the window are duplicates"
        );
        assert_eq!(run(&mut t, b, &[1, 2]), [InOrder, InOrder], "sources apart");
        let d = chan("trade:binance:ETH-USDT");
        assert_eq!(t.observe(a, &d, 3), InOrder, "channels apart");
        t.retain(|c| c == &d);
        assert_eq!(
            run(&mut t, a, &[100]),
            [InOrder],
            "a forgotten channel starts afresh"
        );
    }

    #[test]
    fn a_gap_is_counted_as_lost_once_the_next_envelope_confirms_it() {
        let mut t = SeqTracker::default();
        let a = Uuid::new_v4();
        use Seen::*;
        assert_eq!(
            run(&mut t, a, &[10, 13, 13, 14, 15]),
            [InOrder, Unconfirmed, Duplicate, Gap(2), InOrder]
        );
        // Losses in bursts: 11..=14 and 16 missing, 15 delivered in between.
        let mut t = SeqTracker::default();
        assert_eq!(
            run(&mut t, a, &[10, 15, 17, 18]),
            [InOrder, Unconfirmed, Unconfirmed, Gap(5)]
        );
    }

    #[test]
    fn one_forged_max_seq_does_not_silence_the_channel() {
        let mut t = SeqTracker::default();
        let a = Uuid::new_v4();
        use Seen::*;
        let seen = run(&mut t, a, &[1, 2, u64::MAX, 3, 4, 4, 5]);
        assert_eq!(
            seen,
            [
                InOrder,
                InOrder,
                Outlier(Anomaly::Jump),
                InOrder,
                InOrder,
                Duplicate,
                InOrder
            ]
        );
        // Even right after the outlier, a repeat of it is a duplicate, not a new outlier.
        assert_eq!(
            run(&mut t, a, &[u64::MAX, u64::MAX, 6]),
            [Outlier(Anomaly::Jump), Duplicate, InOrder]
        );
    }

    #[test]
    fn a_jump_beyond_the_window_is_an_anomaly_not_lost_envelopes() {
        let mut t = SeqTracker::default();
        let a = Uuid::new_v4();
        use Seen::*;
        let far = 10 + JUMP_WINDOW + 5;
        assert_eq!(
            run(&mut t, a, &[10, far, far + 1, far + 2]),
            [InOrder, Outlier(Anomaly::Jump), InOrder, InOrder],
            "confirmed: re-baselined, nothing counted as lost"
        );
        let mut t = SeqTracker::default();
        let edge = 10 + JUMP_WINDOW + 1;
        assert_eq!(
            run(&mut t, a, &[10, edge, edge + 1]),
            [InOrder, Unconfirmed, Gap(JUMP_WINDOW)],
            "a gap of exactly the window still counts"
        );
    }

    #[test]
    fn a_step_back_is_an_anomaly_and_rebaselines_only_when_confirmed() {
        let mut t = SeqTracker::default();
        let a = Uuid::new_v4();
        use Seen::*;
        // A publisher whose numbering restarted under the same src (or a replay): the new
        // line is adopted once confirmed, and duplicates are recognised on it.
        assert_eq!(
            run(&mut t, a, &[500, 501, 3, 4, 4, 5]),
            [
                InOrder,
                InOrder,
                Outlier(Anomaly::Back),
                InOrder,
                Duplicate,
                InOrder
            ]
        );
        // A single old one does not move the baseline.
        assert_eq!(
            run(&mut t, a, &[1, 6, 7]),
            [Outlier(Anomaly::Back), InOrder, InOrder]
        );
    }

    #[test]
    fn two_forged_envelopes_cannot_silence_the_channel_either() {
        // A forged pair is confirmed and adopted, but the genuine stream is then an
        // outlier that the next genuine envelope confirms: every genuine one is delivered.
        let mut t = SeqTracker::default();
        let a = Uuid::new_v4();
        let seen = run(&mut t, a, &[1, 2, u64::MAX - 1, u64::MAX, 3, 4, 5, 5]);
        let genuine: Vec<Seen> = [seen[0], seen[1], seen[4], seen[5], seen[6]].into();
        assert!(genuine.iter().all(|s| s.deliver()), "{seen:?}");
        assert_eq!(
            seen[7],
            Seen::Duplicate,
            "and duplicates are recognised again"
        );
    }

    #[test]
    fn authenticated_streams_adopt_gaps_and_drop_replays() {
        let mut t = SeqTracker::new(true);
        let a = Uuid::new_v4();
        use Seen::*;
        assert_eq!(
            run(&mut t, a, &[10, 11, 14, 14, 12, 3, 15]),
            [InOrder, InOrder, Gap(2), Duplicate, Replay, Replay, InOrder]
        );
        let far = 15 + JUMP_WINDOW + 2;
        assert_eq!(
            run(&mut t, a, &[far, far + 1]),
            [Outlier(Anomaly::Jump), InOrder]
        );
    }

    #[test]
    fn forged_sources_cannot_grow_the_tracker() {
        let mut t = SeqTracker::default();
        let c = chan("trade:binance:BTC-USDT");
        let genuine = Uuid::new_v4();
        assert_eq!(t.observe(genuine, &c, 1), Seen::InOrder);
        for _ in 0..1_000 {
            t.observe(Uuid::new_v4(), &c, 1);
        }
        assert_eq!(t.len(), MAX_SOURCES_PER_CHANNEL);
        // The genuine src was evicted at some point: it starts afresh, never blocked.
        assert!(t.observe(genuine, &c, 2).deliver());
    }

    #[test]
    fn silent_sources_are_forgotten() {
        let mut t = SeqTracker::default();
        let c = chan("trade:binance:BTC-USDT");
        let (old, live) = (Uuid::new_v4(), Uuid::new_v4());
        t.observe(old, &c, 1);
        t.observe(live, &c, 1);
        for i in 0..FORGET_AFTER_TICKS + 64 {
            t.tick();
            assert_eq!(t.observe(live, &c, i + 2), Seen::InOrder);
        }
        assert_eq!(t.len(), 1, "the silent src is gone, the live one kept");
        assert_eq!(t.observe(live, &c, FORGET_AFTER_TICKS + 66), Seen::InOrder);
    }
}
