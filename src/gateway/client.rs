//! One bot's outbound queue: bounded, never blocking the router, with the slow-client policy.
//!
//! The router (and only the router) pushes frames; the client's writer task drains them in
//! batches. A push takes a short `std::sync::Mutex` (never held across an await) and wakes
//! the writer through a [`Notify`], whose stored permit means no wake-up is ever lost.
//!
//! - Market frames count against `queue_size`. When the queue is full, `drop_oldest`
//!   removes the oldest market frame (counted); a dropped `book` frame breaks that bot's
//!   chain, so every other queued frame of that book is removed too and the channel is
//!   marked broken: the router then sends the bot a `resync` status and a fresh snapshot
//!   instead of the next delta. `disconnect` marks the client for closing (counted).
//! - Control replies (`subscribed`, `error`, `pong`) are never dropped. They are bounded by
//!   the bot's own request rate; a bot that floods requests without reading replies past
//!   another `queue_size` frames is closed as slow.
//!
//! This module knows nothing about sockets; `mod.rs` owns the writer task.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use super::StatsInner;
use crate::config::SlowClientPolicy;
use crate::event::Channel;

/// Identifies one bot connection for the lifetime of the process.
pub type ClientId = u64;

/// One frame waiting for the writer.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A market event (or a router-made status/snapshot). `book` names the book channel for
    /// book frames, so a drop can invalidate the rest of that chain.
    Market {
        text: Utf8Bytes,
        ts_recv: u64,
        book: Option<Channel>,
    },
    /// A reply to the bot's request: never dropped.
    Control(Utf8Bytes),
}

/// What became of a pushed market frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// Not queued: this bot lost the book's chain; it needs a resync status and a snapshot.
    Broken,
    /// Not queued: the client is closing.
    Closed,
}

/// Why the writer must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Slow,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Outbound>,
    market: usize,
    control: usize,
    closing: Option<CloseReason>,
    /// Book channels whose chain this bot lost through `drop_oldest`.
    broken_books: HashSet<Channel>,
}

/// The bounded queue between the router and one bot's writer task.
pub struct ClientQueue {
    id: ClientId,
    state: Mutex<State>,
    notify: Notify,
    capacity: usize,
    policy: SlowClientPolicy,
    /// Cancelled when the client must go now (slow): interrupts a writer stuck in a write.
    kill: CancellationToken,
    stats: Arc<StatsInner>,
}

impl ClientQueue {
    pub fn new(
        id: ClientId,
        capacity: usize,
        policy: SlowClientPolicy,
        stats: Arc<StatsInner>,
    ) -> ClientQueue {
        ClientQueue {
            id,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            capacity: capacity.max(1),
            policy,
            kill: CancellationToken::new(),
            stats,
        }
    }

    pub fn id(&self) -> ClientId {
        self.id
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent in a way that
        // matters more than losing the bot; keep serving.
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Queues a market frame; never blocks. A `book` frame for a chain this bot lost is not
    /// queued: [`Push::Broken`] tells the router to send a resync status and a snapshot.
    pub fn push_market(&self, text: Utf8Bytes, ts_recv: u64, book: Option<&Channel>) -> Push {
        let mut st = self.lock();
        if st.closing.is_some() {
            return Push::Closed;
        }
        if let Some(channel) = book {
            if !st.broken_books.is_empty() && st.broken_books.remove(channel) {
                return Push::Broken;
            }
        }
        if st.market >= self.capacity {
            match self.policy {
                SlowClientPolicy::DropOldest => {
                    let dropped = drop_oldest_market(&mut st);
                    if dropped > 0 {
                        crate::metrics::bot_frames_dropped(dropped as u64, "queue_full");
                        self.stats
                            .frames_dropped
                            .fetch_add(dropped as u64, Ordering::Relaxed);
                    }
                    // If that cut this frame's own chain, the frame no longer follows what
                    // the bot has: the router sends a resync and a snapshot in its place.
                    if let Some(channel) = book {
                        if st.broken_books.remove(channel) {
                            return Push::Broken;
                        }
                    }
                }
                SlowClientPolicy::Disconnect => {
                    self.close_locked(&mut st, CloseReason::Slow);
                    return Push::Closed;
                }
            }
        }
        st.frames.push_back(Outbound::Market {
            text,
            ts_recv,
            book: book.cloned(),
        });
        st.market += 1;
        drop(st);
        self.notify.notify_one();
        Push::Queued
    }

    /// Queues a control reply; never dropped (see the module docs for the bound).
    pub fn push_control(&self, text: Utf8Bytes) {
        let mut st = self.lock();
        if st.closing.is_some() {
            return;
        }
        if st.control >= self.capacity {
            self.close_locked(&mut st, CloseReason::Slow);
            return;
        }
        st.frames.push_back(Outbound::Control(text));
        st.control += 1;
        drop(st);
        self.notify.notify_one();
    }

    fn close_locked(&self, st: &mut State, reason: CloseReason) {
        if st.closing.is_none() {
            st.closing = Some(reason);
            st.frames.clear();
            st.market = 0;
            st.control = 0;
            self.kill.cancel();
            self.notify.notify_one();
        }
    }

    /// Moves up to `max` frames into `out`. Returns the close reason once the client must go.
    pub fn take_batch(&self, out: &mut Vec<Outbound>, max: usize) -> Option<CloseReason> {
        let mut st = self.lock();
        if let Some(reason) = st.closing {
            return Some(reason);
        }
        let st = &mut *st;
        let n = st.frames.len().min(max);
        for frame in st.frames.drain(..n) {
            match frame {
                Outbound::Market { .. } => st.market -= 1,
                Outbound::Control(_) => st.control -= 1,
            }
            out.push(frame);
        }
        None
    }

    /// Waits until something was pushed (or the client is closing) since the last wait.
    pub async fn notified(&self) {
        self.notify.notified().await
    }

    /// Cancelled when the client must be dropped at once.
    pub fn kill_token(&self) -> &CancellationToken {
        &self.kill
    }

    /// Market frames queued now (a `since` replay reads its next page only below half).
    pub fn market_len(&self) -> usize {
        self.lock().market
    }

    /// `queue_size`: market frames held at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn is_closing(&self) -> bool {
        self.lock().closing.is_some()
    }

    /// Forgets a broken mark (the bot left the channel).
    pub fn clear_broken(&self, channel: &Channel) {
        self.lock().broken_books.remove(channel);
    }
}

/// Drops the oldest market frame; for a book frame, also every later frame of that book
/// (they no longer chain for this bot). Returns how many frames were dropped.
fn drop_oldest_market(st: &mut State) -> usize {
    let Some(pos) = st
        .frames
        .iter()
        .position(|f| matches!(f, Outbound::Market { .. }))
    else {
        return 0;
    };
    let Some(Outbound::Market { book, .. }) = st.frames.remove(pos) else {
        return 0;
    };
    let mut dropped = 1;
    if let Some(channel) = book {
        let before = st.frames.len();
        st.frames
            .retain(|f| !matches!(f, Outbound::Market { book: Some(c), .. } if *c == channel));
        dropped += before - st.frames.len();
        st.broken_books.insert(channel);
    }
    st.market -= dropped;
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(cap: usize, policy: SlowClientPolicy) -> ClientQueue {
        ClientQueue::new(1, cap, policy, Arc::new(StatsInner::default()))
    }

    fn texts(out: &[Outbound]) -> Vec<String> {
        out.iter()
            .map(|f| match f {
                Outbound::Market { text, .. } | Outbound::Control(text) => {
                    text.as_str().to_string()
                }
            })
            .collect()
    }

    #[test]
    fn drop_oldest_keeps_control_and_newest() {
        let q = q(2, SlowClientPolicy::DropOldest);
        q.push_control("c1".into());
        for m in ["m1", "m2", "m3"] {
            assert_eq!(q.push_market(m.into(), 0, None), Push::Queued);
        }
        let mut out = Vec::new();
        assert_eq!(q.take_batch(&mut out, 10), None);
        assert_eq!(texts(&out), ["c1", "m2", "m3"]);
        assert_eq!(q.stats.frames_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn dropping_a_book_frame_drops_its_chain_and_marks_it_broken() {
        let q = q(3, SlowClientPolicy::DropOldest);
        let book = Channel::parse("book:binance:BTC-USDT").unwrap();
        q.push_market("b1".into(), 0, Some(&book));
        q.push_market("t1".into(), 0, None);
        q.push_market("b2".into(), 0, Some(&book));
        q.push_market("t2".into(), 0, None);
        let mut out = Vec::new();
        q.take_batch(&mut out, 10);
        assert_eq!(texts(&out), ["t1", "t2"]);
        assert_eq!(q.push_market("b3".into(), 0, Some(&book)), Push::Broken);
        assert_eq!(
            q.push_market("b4".into(), 0, Some(&book)),
            Push::Queued,
            "reported once"
        );
    }

    #[test]
    fn disconnect_policy_closes_when_full() {
        let q = q(1, SlowClientPolicy::Disconnect);
        assert_eq!(q.push_market("m1".into(), 0, None), Push::Queued);
        assert_eq!(q.push_market("m2".into(), 0, None), Push::Closed);
        assert!(q.kill_token().is_cancelled());
        let mut out = Vec::new();
        assert_eq!(q.take_batch(&mut out, 10), Some(CloseReason::Slow));
        assert!(out.is_empty());
    }
}
