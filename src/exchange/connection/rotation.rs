//! Make-before-break rotation of a feed's socket: the second socket's state while both are
//! read ([`Overlap`]), when it may take over ([`Feed::ready_to_switch`]) and the switch
//! itself. What "continues a book" means is asked of the books ([`FeedBook`]) and of the
//! trade de-duplication, never decided here by venue. At the cut-over the old socket is sent
//! the venue's unsubscribe requests, then closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{error, info, warn};

use super::{ConnError, Feed, SnapshotResult};
use crate::event::{BookAction, Event, StatusState};
use crate::exchange::feed_books::FeedBook;
use crate::exchange::socket::Socket;
use crate::exchange::Parsed;
use crate::metrics;

/// Rotation: how long the new connection may take, once open, to be subscribed and to
/// continue every live book (or `rotate_after`, if shorter) before the feed falls back to
/// a plain reconnect.
pub(super) const ROTATE_SWITCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Rotation: first and longest delay before trying again after the new connection failed.
pub(super) const ROTATE_RETRY_MIN: Duration = Duration::from_secs(1);
pub(super) const ROTATE_RETRY_MAX: Duration = Duration::from_secs(60);
/// Rotation: trades and diffs of the new connection held until the switch.
const ROTATE_BUFFER: usize = 16 * 1024;

pub(super) type Opening = Pin<Box<dyn Future<Output = Result<Box<Socket>, ConnError>> + Send>>;

/// Where the make-before-break rotation of a session stands.
pub(super) enum Rotation {
    /// Rotate at `at`.
    Idle { at: Instant },
    /// The new socket is connecting and subscribing (the current one is still read).
    Opening(Opening),
    /// Both sockets are read; events still come from the current one.
    Overlap(Box<Overlap>),
}

pub(super) struct Overlap {
    pub(super) sock: Socket,
    /// Give up (plain reconnect) if not switched by then.
    pub(super) deadline: Instant,
    /// Trades and diffs of the new socket, replayed (deduplicated) at the switch.
    pub(super) buffered: VecDeque<Parsed>,
    /// Per symbol, `U` of the new socket's first diff.
    pub(super) first_update: HashMap<String, u64>,
    /// Symbols whose WebSocket book snapshot the new socket has sent.
    pub(super) ws_snapshots: HashSet<String>,
    /// Per symbol, the id of the new socket's first trade.
    pub(super) first_trade: HashMap<String, String>,
}

pub(super) enum Step {
    Due,
    Opened(Result<Box<Socket>, ConnError>),
    Frame(Option<Result<Message, WsError>>),
    TimedOut,
}

impl Rotation {
    /// Waits for the next thing the rotation has to act on.
    pub(super) async fn step(&mut self) -> Step {
        match self {
            Rotation::Idle { at } => {
                sleep_until(*at).await;
                Step::Due
            }
            Rotation::Opening(open) => Step::Opened(open.as_mut().await),
            Rotation::Overlap(o) => tokio::select! {
                msg = o.sock.ws.next() => Step::Frame(msg),
                _ = sleep_until(o.deadline) => Step::TimedOut,
            },
        }
    }
}

impl Feed {
    /// Makes `new` the socket of the session (see the module doc): books continue on it,
    /// its held trades and diffs are replayed without repeats, the old socket is closed.
    pub(super) fn switch(
        &mut self,
        sock: &mut Socket,
        new: Overlap,
        out: &mut Vec<Event>,
        fetches: &mut JoinSet<()>,
        snap_tx: &mpsc::Sender<SnapshotResult>,
    ) {
        let old = std::mem::replace(sock, new.sock);
        // Unsubscribed and closed aside: the new socket is read meanwhile.
        let bye = self
            .adapter
            .unsubscribe_frames(&self.symbols, &self.channels);
        tokio::spawn(old.leave(bye, self.adapter.subscribe_pacing()));
        self.books.continue_on_new_stream(out);
        let replayed = new.buffered.len();
        for item in new.buffered {
            self.handle(item, sock, out, fetches, snap_tx);
        }
        metrics::exchange_reconnect(self.exchange, ConnError::Rotate(self.rotate_after).reason());
        info!(exchange = %self.exchange, replayed, "rotated to the new exchange connection (make-before-break)");
    }

    /// The new socket of a rotation failed: keep the current one, try again later.
    pub(super) fn rotation_failed(
        &self,
        why: &dyn std::fmt::Display,
        retry: &mut Duration,
    ) -> Rotation {
        warn!(exchange = %self.exchange, cause = %why, retry_in_ms = retry.as_millis() as u64, "rotation failed: keeping the current connection");
        let at = Instant::now() + *retry;
        *retry = (*retry * 2).min(ROTATE_RETRY_MAX);
        Rotation::Idle { at }
    }

    /// One frame of the new socket during a rotation: acks are counted, trades and diffs
    /// kept for the switch, tickers and candles dropped (the old socket still emits them).
    /// `Err` when the rotation has to be given up.
    pub(super) fn overlap_frame(
        &mut self,
        o: &mut Overlap,
        parsed: Vec<Parsed>,
        out: &mut Vec<Event>,
    ) -> Result<(), String> {
        for item in parsed {
            match item {
                Parsed::Event(Event::Trade(_)) | Parsed::Diff(_) | Parsed::Book { .. } => {
                    if o.buffered.len() >= ROTATE_BUFFER {
                        return Err(format!(
                            "more than {ROTATE_BUFFER} events before the switch"
                        ));
                    }
                    match &item {
                        Parsed::Diff(d) => {
                            o.first_update
                                .entry(d.symbol.clone())
                                .or_insert(d.first_update_id);
                        }
                        Parsed::Book { book: b, .. } if b.action == BookAction::Snapshot => {
                            o.ws_snapshots.insert(b.symbol.clone());
                        }
                        Parsed::Event(Event::Trade(t)) => {
                            o.first_trade
                                .entry(t.symbol.clone())
                                .or_insert_with(|| t.trade_id.clone());
                        }
                        _ => {}
                    }
                    o.buffered.push_back(item);
                }
                Parsed::Event(_) => {}
                Parsed::Ack { id } => {
                    o.sock.on_answer(id);
                }
                Parsed::Refused { detail, .. } => {
                    error!(exchange = %self.exchange, %detail, "request refused on the new connection");
                    out.push(Event::status(
                        self.exchange,
                        StatusState::Error,
                        Some(detail.clone()),
                    ));
                    return Err(format!("request refused: {detail}"));
                }
                Parsed::ServerShutdown => {
                    return Err("the exchange announced a server shutdown".into());
                }
                Parsed::Sequence(_) => {}
            }
        }
        Ok(())
    }

    /// The new socket is subscribed and, for every live book, its first diff starts at or
    /// before the next update id the book needs (update ids are global per symbol, so its
    /// diffs continue the book without a new snapshot). Likewise its first trade of a
    /// symbol, when it has one, must not be past the next trade id (no trade is lost).
    pub(super) fn ready_to_switch(&self, o: &Overlap) -> bool {
        let books = self
            .books
            .values()
            .all(|book| match (book, book.last_seq()) {
                (_, None) => true,
                (FeedBook::Rest(_), Some(last)) => o
                    .first_update
                    .get(book.symbol())
                    .is_some_and(|&first| first <= last + 1),
                // Its own snapshot restarts the book on the new socket.
                (FeedBook::Ws(_), Some(_)) => o.ws_snapshots.contains(book.symbol()),
            });
        let trades = o
            .first_trade
            .iter()
            .all(|(symbol, first)| self.trades.continues(symbol, first));
        o.sock.subscribed && books && trades
    }
}
