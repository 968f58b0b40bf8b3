//! One book channel's cache inside the router, and how it gets (and stays) exact.
//!
//! Phases:
//! - **Waiting**: no usable book. Deltas from the bus are buffered (oldest first, at most
//!   [`SYNC_BUFFER_MAX`]); the router fetches the store's snapshot **and** its catch-up log
//!   (one atomic read, see `bus::redis::store`).
//! - **Candidate**: the store's snapshot + log made a book, but no bus delta has confirmed
//!   yet that the bus subscription (made at the same time as the read) misses nothing in
//!   between. Nobody has seen it. The next bus delta either chains onto it (→ Live, one
//!   snapshot to the subscribers) or not (→ Waiting, read again at once: the log is written
//!   before each PUBLISH, so the new read holds that delta's predecessors). A quiet book
//!   is read once more after [`SETTLE`] and then trusted.
//! - **Live**: every delta forwarded chains onto the previous book message; a late joiner
//!   gets a snapshot made from the book (encoded once per change). A delta behind the book
//!   is a duplicate only if its seq is one of the last [`RECENT_SEQS`] of the book's chain;
//!   any other is a break (resync, read the store again): else one forged bus snapshot
//!   with a huge seq would make every genuine delta look like a duplicate, for good.
//!
//! Sync from the store: start at the newest snapshot (the key's, or a newer one inside the
//! log), apply the log's deltas after its `seq`, then the buffered bus deltas after that
//! (duplicates skipped by `seq`); any hole → read again, spaced by an exponential backoff
//! from [`RETRY_BASE`] to [`RETRY_CAP`]. A missing key tells the subscribers once that
//! nothing publishes the book yet. Resync statuses go out only on a real break of a live
//! chain (or the bus going down), never because a subscription is new.
//!
//! This module owns no task and no I/O: it returns [`Next`] and the router fetches.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{fan_out, status_text};
use crate::book::OrderBook;
use crate::bus::StoredBook;
use crate::envelope::BusMessage;
use crate::event::{Book, BookAction, Channel, Event, StatusState};
use crate::gateway::client::{ClientQueue, Push};

/// Deltas kept per Waiting book; older ones are dropped (the snapshot will be newer anyway).
pub(super) const SYNC_BUFFER_MAX: usize = 10_000;
/// Book seqs remembered as applied: a delta behind the book is a duplicate only if its seq
/// is one of these; any other is a break (e.g. a forged snapshot far ahead pinned the book).
pub(super) const RECENT_SEQS: usize = 64;
/// Time for a new bus subscription to take effect: a stored book read before this, with no
/// bus delta to confirm it, is read once more before anyone sees it. It matters only for
/// quiet books (an active one is confirmed by its next delta), so it is generous: a busy
/// host may take a while to make the subscription.
pub(super) const SETTLE: Duration = Duration::from_secs(1);
/// First retry delay of a store read that found nothing usable...
pub(super) const RETRY_BASE: Duration = Duration::from_millis(100);
/// ...doubling up to this.
pub(super) const RETRY_CAP: Duration = Duration::from_secs(30);

/// What the router should do after a cache event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    Idle,
    /// Read the store after `delay`; `replace`: even if a read is already under way or
    /// scheduled (else only when none is).
    Fetch {
        delay: Duration,
        replace: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Candidate,
    Live,
}

pub(super) struct BookCache {
    book: OrderBook,
    /// The last book event applied: stamps snapshots made from `book`.
    template: Option<Arc<Book>>,
    phase: Phase,
    /// Waiting: deltas from the bus, oldest first.
    buffer: VecDeque<BusMessage>,
    /// The snapshot event for late joiners, encoded once per book change.
    encoded: Option<Utf8Bytes>,
    /// Before this, a stored book no bus delta confirmed is not trusted (see [`SETTLE`]).
    settle_at: Instant,
    /// Store reads in a row that found nothing usable (the backoff exponent).
    attempt: u32,
    /// The book was live at some point: a missing key is then a hiccup, not "no publisher".
    ever_live: bool,
    /// The "no publisher yet" status the subscribers got (late joiners get it too).
    missing: Option<(Utf8Bytes, u64)>,
    /// The last [`RECENT_SEQS`] seqs of the book's chain, oldest first: what a delta behind
    /// the book must be to count as a duplicate delivery.
    recent: VecDeque<u64>,
}

impl BookCache {
    pub(super) fn new(now: Instant) -> BookCache {
        BookCache {
            book: OrderBook::new(),
            template: None,
            phase: Phase::Waiting,
            buffer: VecDeque::new(),
            encoded: None,
            settle_at: now + SETTLE,
            attempt: 0,
            ever_live: false,
            missing: None,
            recent: VecDeque::with_capacity(RECENT_SEQS),
        }
    }

    pub(super) fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// A new subscriber: the snapshot when live, else what the others were told. Returns
    /// true when the book is not live (a store read is needed unless one is under way).
    pub(super) fn join(&mut self, channel: &Channel, queue: &ClientQueue) -> bool {
        if self.is_live() {
            self.send_snapshot(channel, queue);
            return false;
        }
        if let Some((text, ts)) = &self.missing {
            queue.push_market(text.clone(), *ts, None);
        }
        true
    }

    /// A book message from the bus; `text` is its event JSON.
    pub(super) fn on_message(
        &mut self,
        channel: &Channel,
        subscribers: &[Arc<ClientQueue>],
        msg: BusMessage,
        text: &Utf8Bytes,
    ) -> Next {
        let Some(book) = msg.book.clone() else {
            return Next::Idle;
        };
        if book.action == BookAction::Snapshot {
            // A snapshot in the middle of a live chain (the host resynced): the book's own
            // subscribers hear `resync` first, as they do when the break is seen here.
            if self.is_live() {
                let (status, ts) = resync_status(channel, "the exchange feed resynchronised");
                fan_out(subscribers, &status, ts);
            }
            // Anything buffered came earlier on the bus, so this snapshot supersedes it.
            let mut fresh = OrderBook::new();
            match fresh.reset(&book) {
                Ok(()) => {
                    self.book = fresh;
                    self.recent.clear();
                    self.remember(book.seq);
                    self.template = Some(book);
                    self.go_live();
                    fan_out_book(channel, subscribers, self, text, msg.ts_recv);
                }
                Err(e) => {
                    tracing::warn!(channel = %channel, cause = %e, "book snapshot refused");
                    self.phase = Phase::Waiting;
                    self.encoded = None;
                    self.buffer.clear();
                }
            }
            return Next::Idle;
        }
        let seq = book.seq.unwrap_or(0);
        match self.phase {
            Phase::Waiting => {
                if self.buffer.len() >= SYNC_BUFFER_MAX {
                    self.buffer.pop_front();
                }
                self.buffer.push_back(msg);
                Next::Fetch {
                    delay: Duration::ZERO,
                    replace: false,
                }
            }
            Phase::Candidate => {
                if self.book.seq().is_some_and(|at| seq <= at) {
                    if self.recent.contains(&seq) {
                        return Next::Idle;
                    }
                    // Behind the book yet never part of its chain: the store's book and the
                    // bus disagree. Nobody has seen this book: read again.
                    tracing::debug!(channel = %channel, seq, "delta behind the candidate book is not one of its own; reading again");
                    self.phase = Phase::Waiting;
                    self.buffer.clear();
                    self.buffer.push_back(msg);
                    return self.retry(true);
                }
                match self.book.apply(&book) {
                    Ok(()) => {
                        // Confirmed: the bus carries on exactly where the store left off.
                        self.remember(book.seq);
                        self.template = Some(book);
                        self.go_live();
                        if let Some((snapshot, ts)) = self.snapshot_text() {
                            fan_out_book(channel, subscribers, self, &snapshot, ts);
                        }
                        Next::Idle
                    }
                    Err(_) => {
                        // Messages went out between the read and the subscription taking
                        // effect: they are in the log now, read again.
                        self.phase = Phase::Waiting;
                        self.buffer.clear();
                        self.buffer.push_back(msg);
                        self.retry(true)
                    }
                }
            }
            Phase::Live => {
                if let Some(at) = self.book.seq().filter(|at| seq <= *at) {
                    if self.recent.contains(&seq) {
                        // Already applied (a duplicate delivery): passing it on would break
                        // chains.
                        return Next::Idle;
                    }
                    // Behind the book but never applied: the book is not the publisher's
                    // (e.g. a forged snapshot far ahead); dropping these as duplicates would
                    // pin it for good. Start over from the store's genuine book.
                    tracing::warn!(channel = %channel, seq, book_seq = at, "delta behind the book that it never applied; resyncing from the store");
                    self.start_resync(
                        channel,
                        subscribers,
                        "a delta behind the book broke its chain",
                    );
                    self.buffer.push_back(msg);
                    return Next::Fetch {
                        delay: Duration::ZERO,
                        replace: true,
                    };
                }
                match self.book.apply(&book) {
                    Ok(()) => {
                        self.remember(book.seq);
                        self.template = Some(book);
                        self.encoded = None;
                        fan_out_book(channel, subscribers, self, text, msg.ts_recv);
                        Next::Idle
                    }
                    Err(e) => {
                        self.start_resync(channel, subscribers, &e.to_string());
                        self.buffer.push_back(msg);
                        Next::Fetch {
                            delay: Duration::ZERO,
                            replace: false,
                        }
                    }
                }
            }
        }
    }

    /// The store's snapshot and log arrived.
    pub(super) fn on_stored(
        &mut self,
        channel: &Channel,
        subscribers: &[Arc<ClientQueue>],
        stored: StoredBook,
        now: Instant,
    ) -> Next {
        if self.is_live() {
            return Next::Idle;
        }
        // A snapshot inside the log is newer than the key (an exchange resync the publisher
        // could not write as the key yet): start from the newest one.
        let (base, rest) = match stored.log.iter().rposition(is_snapshot) {
            Some(i) => (&stored.log[i], &stored.log[i + 1..]),
            None => (&stored.snapshot, &stored.log[..]),
        };
        let Some(base) = base
            .book
            .clone()
            .filter(|b| b.action == BookAction::Snapshot)
        else {
            tracing::debug!(channel = %channel, "stored snapshot key holds no book snapshot");
            self.phase = Phase::Waiting;
            return self.retry(false);
        };
        let mut book = OrderBook::new();
        if let Err(e) = book.reset(&base) {
            tracing::warn!(channel = %channel, cause = %e, "stored book snapshot refused");
            self.phase = Phase::Waiting;
            return self.retry(false);
        }
        let mut recent = VecDeque::with_capacity(RECENT_SEQS);
        push_recent(&mut recent, base.seq);
        let mut template = base;
        for m in rest {
            let Some(d) = m.book.as_ref() else { continue };
            if is_old(&book, d) {
                // Part of the publisher's chain (it is in its log): a late copy from the
                // bus is a duplicate.
                push_recent(&mut recent, d.seq);
                continue;
            }
            if let Err(e) = book.apply(d) {
                // The log was trimmed or lost a message: the publisher's next snapshot
                // (within one refresh period) starts a whole one.
                tracing::debug!(channel = %channel, cause = %e, "stored log does not chain onto its snapshot");
                self.phase = Phase::Waiting;
                return self.retry(false);
            }
            push_recent(&mut recent, d.seq);
            template = d.clone();
        }
        // A delta from the bus proves the subscription live: whatever follows it comes by
        // the bus, and the log (written before each PUBLISH) holds everything up to it.
        let confirmed = !self.buffer.is_empty();
        while self
            .buffer
            .front()
            .and_then(|m| m.book.as_ref())
            .is_some_and(|d| is_old(&book, d))
        {
            self.buffer.pop_front();
        }
        if let Some(first) = self.buffer.front().and_then(|m| m.book.as_ref()) {
            if first.prev_seq != book.seq() {
                tracing::debug!(channel = %channel, "stored book does not meet the buffered deltas yet");
                self.phase = Phase::Waiting;
                return self.retry(true);
            }
        }
        while let Some(delta) = self.buffer.pop_front() {
            let Some(d) = delta.book.clone() else {
                continue;
            };
            if is_old(&book, &d) {
                continue;
            }
            if book.apply(&d).is_err() {
                // A hole in what the bus delivered itself: sync again from this delta on.
                self.buffer.push_front(delta);
                self.phase = Phase::Waiting;
                return self.retry(true);
            }
            push_recent(&mut recent, d.seq);
            template = d;
        }
        self.book = book;
        self.recent = recent;
        self.template = Some(template);
        self.encoded = None;
        if !confirmed && now < self.settle_at {
            self.phase = Phase::Candidate;
            return Next::Fetch {
                delay: self.settle_at - now,
                replace: true,
            };
        }
        // Subscribers get one snapshot of the current book, not an older one followed by a
        // burst of deltas.
        self.go_live();
        if let Some((text, ts)) = self.snapshot_text() {
            fan_out_book(channel, subscribers, self, &text, ts);
        }
        Next::Idle
    }

    /// The store has no snapshot for this book. Once the misses have lasted a while
    /// ([`MISSING_NOTICE_AFTER`] reads in a row, about 1.5 s, so a bot joining while the
    /// publisher starts hears nothing alarming), and only then, the subscribers hear that
    /// nothing publishes it yet; the reads are spaced out.
    pub(super) fn on_missing(
        &mut self,
        channel: &Channel,
        subscribers: &[Arc<ClientQueue>],
    ) -> Next {
        if self.is_live() {
            return Next::Idle;
        }
        self.phase = Phase::Waiting;
        if !self.ever_live
            && self.buffer.is_empty()
            && self.missing.is_none()
            && self.attempt >= MISSING_NOTICE_AFTER
        {
            let status = status_text(
                channel.exchange(),
                StatusState::Error,
                format!("no publisher for {channel} yet; waiting"),
            );
            fan_out(subscribers, &status.0, status.1);
            self.missing = Some(status);
        }
        self.retry(false)
    }

    /// The store read failed (Redis down, timeout).
    pub(super) fn on_error(&mut self) -> Next {
        if self.is_live() {
            return Next::Idle;
        }
        self.phase = Phase::Waiting;
        self.retry(false)
    }

    /// The bus went down: whatever is published meanwhile is lost, so a live chain ends
    /// here (subscribers hear `resync`; the snapshot follows once the bus is back).
    pub(super) fn bus_down(&mut self, channel: &Channel, subscribers: &[Arc<ClientQueue>]) {
        if self.is_live() {
            self.start_resync(channel, subscribers, "the Redis bus is down");
        }
        self.phase = Phase::Waiting;
        self.buffer.clear();
    }

    /// The bus is back: subscriptions are being made again, read from the start.
    pub(super) fn bus_up(&mut self, settle_at: Instant) {
        self.settle_at = settle_at;
        self.attempt = 0;
    }

    /// `seq` is now part of the book's chain.
    fn remember(&mut self, seq: Option<u64>) {
        push_recent(&mut self.recent, seq);
    }

    fn go_live(&mut self) {
        self.phase = Phase::Live;
        self.ever_live = true;
        self.attempt = 0;
        self.missing = None;
        self.encoded = None;
        self.buffer.clear();
    }

    /// The live chain broke: tell the subscribers, wait for a snapshot.
    fn start_resync(&mut self, channel: &Channel, subscribers: &[Arc<ClientQueue>], reason: &str) {
        crate::metrics::book_resync(channel.exchange(), "bus");
        tracing::info!(channel = %channel, cause = %reason, "book chain broken; resyncing");
        self.phase = Phase::Waiting;
        self.encoded = None;
        self.buffer.clear();
        let (status, ts) = resync_status(channel, reason);
        fan_out(subscribers, &status, ts);
    }

    /// The next read after one that found nothing usable. `soon`: the next read is expected
    /// to succeed (the first retry goes at once).
    fn retry(&mut self, soon: bool) -> Next {
        let attempt = self.attempt;
        self.attempt = self.attempt.saturating_add(1);
        let delay = if soon && attempt == 0 {
            Duration::ZERO
        } else {
            let exp = attempt.saturating_sub(u32::from(soon)).min(16);
            RETRY_BASE.saturating_mul(1 << exp).min(RETRY_CAP)
        };
        Next::Fetch {
            delay,
            replace: true,
        }
    }

    fn snapshot_text(&mut self) -> Option<(Utf8Bytes, u64)> {
        let template = self.template.as_ref()?;
        if self.encoded.is_none() {
            let json = Event::Book(self.book.to_snapshot(template)).to_json();
            self.encoded = Utf8Bytes::try_from(json).ok();
        }
        self.encoded.clone().map(|t| (t, template.ts_recv))
    }

    fn send_snapshot(&mut self, channel: &Channel, queue: &ClientQueue) {
        if let Some((text, ts_recv)) = self.snapshot_text() {
            queue.push_market(text, ts_recv, Some(channel));
        }
    }
}

/// Appends `seq` to a ring of [`RECENT_SEQS`] (no allocation once full).
fn push_recent(recent: &mut VecDeque<u64>, seq: Option<u64>) {
    let Some(seq) = seq else { return };
    if recent.len() >= RECENT_SEQS {
        recent.pop_front();
    }
    recent.push_back(seq);
}

/// The delay of retry number `attempt` (from 0): [`RETRY_BASE`] doubling up to [`RETRY_CAP`].
pub(super) fn backoff(attempt: u32) -> Duration {
    RETRY_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(RETRY_CAP)
}

fn is_snapshot(m: &BusMessage) -> bool {
    m.book
        .as_ref()
        .is_some_and(|b| b.action == BookAction::Snapshot)
}

/// `d` is already in `book` (its `seq` is not after the book's).
fn is_old(book: &OrderBook, d: &Book) -> bool {
    d.seq.unwrap_or(0) <= book.seq().unwrap_or(0)
}

/// Reads in a row that found no snapshot before the subscribers hear "no publisher yet"
/// (with the backoff from 100 ms, the fifth miss comes about 1.5 s after the first).
const MISSING_NOTICE_AFTER: u32 = 4;

fn resync_status(channel: &Channel, reason: &str) -> (Utf8Bytes, u64) {
    status_text(
        channel.exchange(),
        StatusState::Resync,
        format!("{channel}: {reason}; a fresh snapshot follows"),
    )
}

/// Fans a book frame out; a bot whose chain `drop_oldest` cut gets a resync status and a
/// snapshot of the book as it is after this frame instead.
fn fan_out_book(
    channel: &Channel,
    subscribers: &[Arc<ClientQueue>],
    cache: &mut BookCache,
    text: &Utf8Bytes,
    ts_recv: u64,
) {
    for q in subscribers {
        if q.push_market(text.clone(), ts_recv, Some(channel)) == Push::Broken {
            crate::metrics::book_resync(channel.exchange(), "bot_queue");
            let (status, ts) = resync_status(channel, "frames dropped for this slow connection");
            q.push_market(status, ts, None);
            cache.send_snapshot(channel, q);
        }
    }
}

#[cfg(test)]
mod tests;
