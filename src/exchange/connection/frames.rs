//! What one frame does to a feed: read it off a socket (pings, closes, the venue's
//! connection sequence), hand each parsed item to the books, the trade de-duplication or
//! the subscription bookkeeping, and fetch REST snapshots. Bad frames are counted and
//! logged rate-limited, never fatal.

use futures_util::SinkExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, error, warn};

use super::{ConnError, Feed, SnapshotResult, KEEP_BUFFER, MAX_RETRY_AFTER};
use crate::event::{now_micros, Event, StatusState};
use crate::exchange::socket::Socket;
use crate::exchange::ws_book::Outcome;
use crate::exchange::{Parsed, SnapshotError, SnapshotRequest};
use crate::metrics;

impl Feed {
    pub(super) fn spawn_fetch(
        &self,
        fetches: &mut JoinSet<()>,
        tx: &mpsc::Sender<SnapshotResult>,
        req: SnapshotRequest,
    ) {
        let fetch =
            self.adapter
                .fetch_snapshot(&self.http, &self.rest_url, &req.symbol, self.depth_limit);
        let tx = tx.clone();
        let slots = self.fetch_slots.clone();
        debug!(exchange = %self.exchange, symbol = %req.symbol, delay_ms = req.delay.as_millis() as u64, "fetching book snapshot");
        fetches.spawn(async move {
            if !req.delay.is_zero() {
                sleep(req.delay).await;
            }
            // Closed only if the feed is gone, and then nobody waits for the answer.
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            let result = fetch.await;
            if let Some(wait) = result.as_ref().err().and_then(SnapshotError::retry_after) {
                // Keep the slot while the exchange asked us to stay away, so the feed's
                // other fetches slow down with this one.
                warn!(
                    wait_ms = wait.as_millis() as u64,
                    "exchange asked to retry the snapshot later"
                );
                sleep(wait.min(MAX_RETRY_AFTER)).await;
            }
            let _ = tx.send((req.symbol, req.generation, result)).await;
        });
    }

    pub(super) fn invalid_frame(&mut self, cause: &dyn std::fmt::Display, frame: &[u8]) {
        metrics::exchange_frame_invalid(self.exchange);
        self.invalid_frames += 1;
        // First one and every 1000th: a broken feed must not flood the log.
        if self.invalid_frames == 1 || self.invalid_frames % 1000 == 0 {
            let shown = String::from_utf8_lossy(&frame[..frame.len().min(200)]);
            warn!(exchange = %self.exchange, %cause, frame = %shown, count = self.invalid_frames, "invalid exchange frame skipped");
        }
    }

    /// Turns one read off `sock` into parsed items (none for control frames and bad
    /// frames); `Err` when the socket is lost.
    pub(super) async fn receive(
        &mut self,
        sock: &mut Socket,
        msg: Option<Result<Message, WsError>>,
        buf: &mut Vec<u8>,
    ) -> Result<Vec<Parsed>, ConnError> {
        let ts_recv = now_micros();
        sock.stale_at = Instant::now() + self.stale_after;
        let bytes: &[u8] = match &msg {
            None => return Err(ConnError::Closed("end of stream".into())),
            Some(Err(e)) => return Err(ConnError::Socket(e.to_string())),
            Some(Ok(Message::Close(frame))) => {
                let why = frame.as_ref().map_or_else(
                    || "close frame without reason".to_string(),
                    |f| format!("code {} {}", u16::from(f.code), f.reason),
                );
                return Err(ConnError::Closed(why));
            }
            Some(Ok(Message::Ping(_))) => {
                // tungstenite queued the pong; write it now, not at the next read.
                sock.ws
                    .flush()
                    .await
                    .map_err(|e| ConnError::Socket(e.to_string()))?;
                return Ok(Vec::new());
            }
            Some(Ok(Message::Pong(_) | Message::Frame(_))) => return Ok(Vec::new()),
            Some(Ok(Message::Text(t))) => t.as_bytes(),
            Some(Ok(Message::Binary(b))) => b,
        };
        buf.clear();
        buf.extend_from_slice(bytes);
        let parsed = match self.adapter.parse(buf, ts_recv) {
            Ok(p) => p,
            Err(e) => {
                // Recovery::Skip for every parse error: count, log, carry on (its message
                // number, if it had one, still counts).
                self.invalid_frame(&e, bytes);
                e.sequence().map(Parsed::Sequence).into_iter().collect()
            }
        };
        // One large message (a Coinbase book snapshot) must not keep its buffer.
        if buf.capacity() > KEEP_BUFFER {
            *buf = Vec::with_capacity(KEEP_BUFFER);
        }
        let mut items = Vec::with_capacity(parsed.len());
        for item in parsed {
            match item {
                Parsed::Sequence(seq) => {
                    if let Err((expected, got)) = sock.check_sequence(seq) {
                        return Err(ConnError::SequenceGap { expected, got });
                    }
                }
                other => items.push(other),
            }
        }
        Ok(items)
    }

    /// Handles one item of the socket whose events are emitted (not `ServerShutdown`).
    pub(super) fn handle(
        &mut self,
        item: Parsed,
        sock: &mut Socket,
        out: &mut Vec<Event>,
        fetches: &mut JoinSet<()>,
        snap_tx: &mpsc::Sender<SnapshotResult>,
    ) {
        match item {
            Parsed::Event(e) => {
                if self.trades.fresh(&e) {
                    out.push(e);
                }
            }
            Parsed::Book { book, checksum } => {
                let symbol = book.symbol.clone();
                match self.books.ws(book, checksum, out) {
                    Some(Outcome::Ok) => {}
                    Some(Outcome::NeedSnapshot(why)) => {
                        self.need_snapshot.get_or_insert(format!("{symbol}: {why}"));
                    }
                    None => {
                        let why = format!("book message for unsubscribed symbol {symbol}");
                        self.invalid_frame(&why, symbol.as_bytes());
                    }
                }
            }
            Parsed::Diff(d) => match self.books.rest(&d.symbol) {
                Some(book) => {
                    if let Some(req) = book.on_diff(d, out) {
                        self.spawn_fetch(fetches, snap_tx, req);
                    }
                }
                None => {
                    let why = format!("book diff for unsubscribed symbol {}", d.symbol);
                    self.invalid_frame(&why, d.symbol.as_bytes());
                }
            },
            Parsed::Ack { ref id } | Parsed::Refused { ref id, .. } if !sock.subscribed => {
                let id = id.clone();
                if let Parsed::Refused { detail, .. } = &item {
                    error!(exchange = %self.exchange, url = %self.ws_url, %detail, "the exchange refused a subscription: the feed is unhealthy");
                    metrics::exchange_subscribe_refused(self.exchange);
                    out.push(Event::status(
                        self.exchange,
                        StatusState::Error,
                        Some(format!("subscription refused by the exchange: {detail}")),
                    ));
                    sock.refused.get_or_insert_with(|| detail.clone());
                }
                if sock.on_answer(id) && sock.refused.is_none() {
                    out.push(self.on_subscribed());
                }
            }
            Parsed::Ack { .. } | Parsed::ServerShutdown | Parsed::Sequence(_) => {}
            Parsed::Refused { detail, .. } => {
                error!(exchange = %self.exchange, %detail, "request refused");
                out.push(Event::status(
                    self.exchange,
                    StatusState::Error,
                    Some(detail),
                ));
            }
        }
    }
}
