//! Exchange side of the bridge: adapters that turn exchange frames into normalized
//! [`Event`]s, the socket that carries them, and the order-book synchroniser.
//!
//! - [`Adapter`] is the seam for new exchanges. It is chosen at run time from the feed's
//!   config ([`adapter_for`]), never a compile-time type parameter, so one binary serves any
//!   mix of feeds. An adapter knows wire formats (endpoints, subscribe frames, parsing,
//!   REST snapshots); it knows nothing about sockets, reconnects or book state.
//! - [`connection`] owns one exchange socket per feed: connect, subscribe, heartbeat,
//!   stale detection, reconnect with backoff, rotation; it hands raw book diffs to
//!   [`book_sync`], which turns REST snapshot + diff stream into a chain-exact book.
//! - [`normalize`] is the stateless path for `mdbridge normalize`: one raw frame per input
//!   line → one JSON event per output line, no sockets, no book state.
//!
//! This module never imports `bus` or `gateway`: events leave through a bounded
//! `tokio::sync::mpsc::Sender<Event>` owned by `app`.

pub mod book_sync;
pub mod connection;
mod feed_books;
pub mod registry;
mod socket;
mod trades;
mod wire_json;
pub mod wire_time;
pub mod ws_book;

use std::future::Future;
use std::io::{BufRead, Write};
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{FeedChannel, FeedConfig};
use crate::event::{Book, BookAction, Event, Exchange, Level};
use crate::health::HealthHandle;

pub use book_sync::{BookDiff, BookSnapshot, BookSync, SnapshotRequest};

/// What a loop does about an error: every error enum of this module maps onto it, and the
/// loops match on this, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Try the same operation again (after a delay).
    Retry,
    /// Drop the socket and connect again (with backoff).
    Reconnect,
    /// The order book can no longer be trusted: emit `resync`, fetch a new snapshot.
    Resync,
    /// Count it, log it, skip this frame and carry on.
    Skip,
    /// Retrying cannot help (bad configuration): stop this feed.
    Fatal,
}

/// Why a frame could not be turned into events. Always [`Recovery::Skip`]: one bad frame
/// says nothing about the next one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("not a JSON object")]
    NotObject,
    #[error("unsupported event type `{0}`")]
    UnknownEvent(String),
    #[error("frame of unknown shape (no event type, not an ack)")]
    UnknownShape,
    #[error("bad `{kind}` payload: {reason}")]
    Payload { kind: &'static str, reason: String },
    #[error("unknown symbol `{0}` (no configured mapping and no known quote asset)")]
    UnknownSymbol(String),
    /// A refused frame that still carried the venue's connection-wide message number: it
    /// is counted like any refused frame, and the number still moves the connection on.
    #[error("{source}")]
    Numbered {
        sequence: u64,
        source: Box<ParseError>,
    },
}

impl ParseError {
    pub fn recovery(&self) -> Recovery {
        Recovery::Skip
    }

    /// `self`, carrying `sequence` when there is one.
    pub fn with_sequence(self, sequence: Option<u64>) -> ParseError {
        match sequence {
            Some(sequence) => ParseError::Numbered {
                sequence,
                source: Box::new(self),
            },
            None => self,
        }
    }

    /// The connection-wide message number of the refused frame, where it had one.
    pub fn sequence(&self) -> Option<u64> {
        match self {
            ParseError::Numbered { sequence, .. } => Some(*sequence),
            _ => None,
        }
    }
}

/// Why a REST order-book snapshot could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot request failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("snapshot request answered HTTP {status}: {body}")]
    Status {
        status: u16,
        body: String,
        /// The server's `Retry-After` (Binance sends it with 429 and 418).
        retry_after: Option<std::time::Duration>,
    },
    #[error("snapshot body not understood: {0}")]
    Decode(String),
    #[error("bad snapshot url: {0}")]
    Url(String),
    #[error("this venue sends its book snapshots on the WebSocket, not over REST")]
    Unsupported,
}

impl SnapshotError {
    /// How long the exchange asked us to stay away, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            SnapshotError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    pub fn recovery(&self) -> Recovery {
        match self {
            SnapshotError::Url(_) | SnapshotError::Unsupported => Recovery::Fatal,
            _ => Recovery::Retry,
        }
    }
}

/// One unit an adapter extracts from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A finished normalized event (trade, ticker, candle).
    Event(Event),
    /// A raw order-book diff for the synchroniser (or, in `normalize`, a stateless delta).
    Diff(BookDiff),
    /// A request was accepted (Binance `{"result":null,"id":1}`): a control frame, no
    /// event. `id` is the key the request was sent under ([`Adapter::subscribe_frames`]);
    /// None when the answer names no request (then every request counts as answered).
    Ack { id: Option<AckId> },
    /// A request was refused (`{"error":{...},"id":1}`): becomes a `status` `error` event.
    Refused { id: Option<AckId>, detail: String },
    /// The exchange announced it will close the connection soon: reconnect now.
    ServerShutdown,
    /// A book message of a venue that sends its snapshots on the WebSocket
    /// ([`BookSyncMode::WsSnapshot`]): `action` says snapshot or update, sizes are absolute,
    /// `seq`/`prev_seq` carry the venue's own per-book sequence when it has one (Coinbase:
    /// none, its sequence numbers the connection). [`ws_book::WsBookSync`] chains them.
    /// `checksum` is the venue's checksum of the book once this message is applied (Kraken,
    /// OKX: CRC32 of the top levels; an OKX signed value is cast), checked by
    /// [`Adapter::book_checksum`]; None when the venue sends none.
    Book { book: Book, checksum: Option<u32> },
    /// The number the venue gave this message on this connection (Coinbase
    /// `sequence_num`): the connection checks they follow each other; a gap means every
    /// book the socket carries lost updates.
    Sequence(u64),
}

/// What a venue's answer names to say which request it answers: Binance a number it
/// echoes (`"id":1`), OKX or Bybit a string they echo (`"id":"1a"`, `"req_id":"t1"`),
/// Coinbase the channel it subscribed (`level2`). The adapter picks the key when it writes
/// the request and reads the same key back from the answer; nothing else interprets it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AckId {
    Num(u64),
    Text(String),
}

impl From<u64> for AckId {
    fn from(n: u64) -> AckId {
        AckId::Num(n)
    }
}

impl From<&str> for AckId {
    fn from(s: &str) -> AckId {
        AckId::Text(s.to_string())
    }
}

impl From<String> for AckId {
    fn from(s: String) -> AckId {
        AckId::Text(s)
    }
}

impl std::fmt::Display for AckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AckId::Num(n) => write!(f, "{n}"),
            AckId::Text(s) => f.write_str(s),
        }
    }
}

/// How a venue's order books are synchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookSyncMode {
    /// REST snapshot + diff stream with update-id ranges ([`BookSync`], Binance).
    RestSnapshot,
    /// Snapshot and updates both on the WebSocket ([`ws_book::WsBookSync`], Coinbase).
    WsSnapshot,
}

/// A venue's check of a WebSocket-snapshot book against the checksum of the message just
/// applied (see [`Adapter::book_checksum`]): true when they agree. Plain data in, no I/O.
pub type BookChecksum = fn(&crate::book::OrderBook, u32) -> bool;

/// Who keeps a quiet connection alive, and how. Any frame at all feeds the stale timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// The venue sends WebSocket pings; the socket answers them (Binance: every 20 s).
    ServerPings,
    /// The venue sends heartbeat messages on a channel the adapter subscribes to
    /// (Coinbase `heartbeats`, every second); they parse to nothing.
    ServerMessages,
    /// The client sends `frame` every `every` (e.g. a text `ping`); the venue's answer
    /// parses to nothing.
    ClientSends {
        every: std::time::Duration,
        frame: &'static str,
    },
}

/// What identifies a trade when de-duplicating across a rotation or a repeated batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TradeIds {
    /// Numeric ids increasing per symbol (Binance): anything not above the last is a repeat.
    Increasing,
    /// Opaque strings (Coinbase): a bounded set of the ids seen recently per symbol.
    Opaque,
}

/// A future returned by [`Adapter::fetch_snapshot`] (boxed to keep the trait object-safe).
pub type SnapshotFuture = Pin<Box<dyn Future<Output = Result<BookSnapshot, SnapshotError>> + Send>>;

/// The seam between the generic connection machinery and one exchange's wire format.
///
/// Object-safe: feeds hold an `Arc<dyn Adapter>` chosen from config at run time.
pub trait Adapter: Send + Sync {
    /// The exchange name written into every event (`binance`, or `sim` when speaking
    /// Binance's protocol to the simulator).
    fn exchange(&self) -> Exchange;
    /// The public WebSocket endpoint used when the feed has no `url`.
    fn default_ws_url(&self) -> &'static str;
    /// The public REST base used when the feed has no `rest_url` (empty when the venue's
    /// books need no REST call).
    fn default_rest_url(&self) -> &'static str {
        ""
    }
    /// Most streams one connection may carry; a feed with more is sharded over several
    /// connections ([`shard_symbols`]).
    fn max_streams_per_connection(&self) -> usize {
        usize::MAX
    }
    /// Gap between two subscribe requests on one socket (the venue's inbound rate limit).
    fn subscribe_pacing(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// How this venue's books are synchronised.
    fn book_sync(&self) -> BookSyncMode {
        BookSyncMode::RestSnapshot
    }
    /// How this venue's WebSocket-snapshot books are verified, if it sends checksums
    /// ([`Parsed::Book`] `checksum`): called after each applied snapshot or update with the
    /// book; a mismatch is handled like a gap (`resync`, then a fresh snapshot).
    fn book_checksum(&self) -> Option<BookChecksum> {
        None
    }
    /// How this venue's trades are told apart.
    fn trade_ids(&self) -> TradeIds {
        TradeIds::Increasing
    }
    /// How this venue's quiet connections are kept open.
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::ServerPings
    }
    /// How long the venue lets one connection live before it cuts it (Binance: 24 h);
    /// the feed rotates before that, whatever `rotate_after_secs` says.
    fn max_connection_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
    /// Text frames to send after connecting, in order, each under the key its answer
    /// names ([`Parsed::Ack`] / [`Parsed::Refused`] carry it back; any [`AckId`]).
    fn subscribe_frames(
        &self,
        symbols: &[String],
        channels: &[FeedChannel],
    ) -> Vec<(AckId, String)>;
    /// The frames that drop what [`Self::subscribe_frames`] asked for, keyed the same way
    /// (Binance `UNSUBSCRIBE`, Coinbase `unsubscribe`). Sent on a socket the feed lets go
    /// (the old one at a rotation's cut-over) before it is closed, so the venue stops
    /// sending at once; their answers are not awaited. Empty: closing is enough.
    fn unsubscribe_frames(
        &self,
        _symbols: &[String],
        _channels: &[FeedChannel],
    ) -> Vec<(AckId, String)> {
        Vec::new()
    }
    /// Parses one frame. `frame` is a scratch buffer the parser may modify in place
    /// (simd-json unescapes into it); `ts_recv` is when the frame was read off the socket.
    fn parse(&self, frame: &mut Vec<u8>, ts_recv: u64) -> Result<Vec<Parsed>, ParseError>;
    /// Fetches a REST order-book snapshot of `symbol` (normalized, `BTC-USDT`). Only
    /// asked of [`BookSyncMode::RestSnapshot`] venues.
    fn fetch_snapshot(
        &self,
        _http: &reqwest::Client,
        _rest_url: &str,
        _symbol: &str,
        _limit: u32,
    ) -> SnapshotFuture {
        Box::pin(async { Err(SnapshotError::Unsupported) })
    }
}

/// Why no adapter could be built for a feed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdapterError {
    #[error("no adapter for exchange `{0}` yet (supported: {list})", list = registry::names().join(", "))]
    Unsupported(Exchange),
}

impl AdapterError {
    pub fn recovery(&self) -> Recovery {
        Recovery::Fatal
    }
}

/// The adapter for `exchange` (looked up in the [`registry`]), knowing the feed's
/// configured `symbols` (normalized) so it can map wire symbols back exactly. `Sim` speaks
/// Binance's protocol but labels events `sim`.
pub fn adapter_for(
    exchange: Exchange,
    symbols: &[String],
) -> Result<Arc<dyn Adapter>, AdapterError> {
    adapter_labelled(exchange, exchange, symbols)
}

/// The adapter of venue `venue` writing `label` into its events (a simulated venue
/// publishes under the label its operator chose, e.g. `sim`).
pub fn adapter_labelled(
    venue: Exchange,
    label: Exchange,
    symbols: &[String],
) -> Result<Arc<dyn Adapter>, AdapterError> {
    let spec = registry::venue(venue).ok_or(AdapterError::Unsupported(venue))?;
    Ok((spec.adapter)(label, symbols))
}

/// Splits `symbols` into groups whose streams (one per channel per symbol) fit in one
/// connection of at most `max_streams`. A symbol's channels stay together on one socket, so
/// its book and its trades share one ordering. Always at least one group.
pub fn shard_symbols(
    symbols: &[String],
    channels: &[FeedChannel],
    max_streams: usize,
) -> Vec<Vec<String>> {
    let per_socket = (max_streams / channels.len().max(1)).max(1);
    let shards: Vec<Vec<String>> = symbols.chunks(per_socket).map(<[String]>::to_vec).collect();
    if shards.is_empty() {
        vec![Vec::new()]
    } else {
        shards
    }
}

/// Runs one feed until `shutdown`: connects, subscribes, reconnects, emits events
/// (including status events connected/disconnected/reconnecting/resync/error) into `events`.
///
/// See [`connection`] for the reconnect behaviour. Returns when `shutdown` is cancelled,
/// when the `events` receiver is gone, or when the feed cannot work at all (no adapter for
/// the exchange: an `error` status event is emitted and the health stays down).
///
/// A feed with more streams than one connection may carry (Binance: 1 024) runs one
/// connection per shard of its symbols ([`shard_symbols`]), each with its own health
/// component `<feed>/socket<k>` and its own reconnects; the feed's own component then
/// says how it is split, and `/health` is green only when every socket is.
pub async fn run_feed(
    feed: FeedConfig,
    events: mpsc::Sender<Event>,
    health: HealthHandle,
    shutdown: CancellationToken,
) {
    let label = feed.label.unwrap_or(feed.exchange);
    let adapter = match adapter_labelled(feed.exchange, label, &feed.symbols) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(exchange = %feed.exchange, cause = %e, "feed not started");
            health.down(e.to_string());
            let _ = events
                .send(Event::status(
                    label,
                    crate::event::StatusState::Error,
                    Some(e.to_string()),
                ))
                .await;
            return;
        }
    };
    let shards = shard_symbols(
        &feed.symbols,
        &feed.channels,
        adapter.max_streams_per_connection(),
    );
    if shards.len() == 1 {
        connection::run(adapter, feed, events, health, shutdown).await;
        return;
    }
    let streams = feed.symbols.len() * feed.channels.len();
    tracing::info!(exchange = %feed.exchange, streams, sockets = shards.len(), "feed sharded over several connections");
    health.up(Some(format!(
        "{streams} streams over {} connections (see {}/socket<k>)",
        shards.len(),
        health.name()
    )));
    let mut sockets = tokio::task::JoinSet::new();
    for (k, symbols) in shards.into_iter().enumerate() {
        let adapter = match adapter_labelled(feed.exchange, label, &symbols) {
            Ok(a) => a,
            // Same exchange as above: cannot fail here, but never panic on it.
            Err(_) => continue,
        };
        let shard = FeedConfig {
            symbols,
            ..feed.clone()
        };
        let handle = health.part(&format!("socket{k}"));
        sockets.spawn(connection::run(
            adapter,
            shard,
            events.clone(),
            handle,
            shutdown.clone(),
        ));
    }
    while sockets.join_next().await.is_some() {}
    health.down("stopped");
}

/// Counts of one [`normalize`] run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NormalizeStats {
    pub lines: u64,
    pub events: u64,
    pub errors: u64,
}

/// Stateless normalizer for `mdbridge normalize`: one raw frame per input line → one JSON
/// event per output line ([`Event::to_json`]); control frames (acks, heartbeats) produce
/// nothing; an unparseable line writes `line N: <reason>` to `errors` and the run goes on.
///
/// Book diffs become `delta` events with `seq` = the exchange's final update id and
/// `prev_seq` = its first update id − 1 (Binance `u` and `U - 1`). Symbols are mapped
/// without config by splitting off a known quote asset (see [`registry::binance::split_symbol`]).
/// Blank lines are counted but produce nothing. Errors only for I/O failures or an
/// exchange without an adapter.
pub fn normalize(
    exchange: Exchange,
    input: impl BufRead,
    mut output: impl Write,
    mut errors: impl Write,
) -> std::io::Result<NormalizeStats> {
    let adapter = adapter_for(exchange, &[])
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::Unsupported, e))?;
    let mut stats = NormalizeStats::default();
    let mut buf = Vec::with_capacity(4096);
    let mut line = Vec::with_capacity(4096);
    let mut input = input;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        stats.lines += 1;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        buf.clear();
        buf.extend_from_slice(text);
        // Stateless: ts_recv is when this tool read the line.
        match adapter.parse(&mut buf, crate::event::now_micros()) {
            Ok(parsed) => {
                for p in parsed {
                    let event = match p {
                        Parsed::Event(e) => e,
                        Parsed::Diff(d) => Event::Book(d.into_stateless_delta()),
                        Parsed::Book { book, .. } => Event::Book(book),
                        Parsed::Ack { .. }
                        | Parsed::Refused { .. }
                        | Parsed::ServerShutdown
                        | Parsed::Sequence(_) => continue,
                    };
                    output.write_all(&event.to_json())?;
                    output.write_all(b"\n")?;
                    stats.events += 1;
                }
            }
            Err(e) => {
                stats.errors += 1;
                writeln!(errors, "line {}: {e}", stats.lines)?;
            }
        }
    }
    output.flush()?;
    Ok(stats)
}

impl BookDiff {
    /// The diff as a stand-alone delta: `seq` = last update id, `prev_seq` = first − 1.
    pub fn into_stateless_delta(self) -> Book {
        Book {
            exchange: self.exchange,
            symbol: self.symbol,
            ts: self.ts,
            ts_recv: self.ts_recv,
            action: BookAction::Delta,
            bids: self.bids,
            asks: self.asks,
            seq: Some(self.last_update_id),
            prev_seq: Some(self.first_update_id.saturating_sub(1)),
        }
    }
}

/// Builds levels from `[price, size]` text pairs.
pub(crate) fn levels<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<Level> {
    pairs
        .into_iter()
        .map(|(p, q)| Level(p.into(), q.into()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_counts_and_reports_lines() {
        let input = concat!(
            r#"{"result":null,"id":1}"#,
            "\n",
            "not json\n",
            "\n",
            r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":7,"p":"1.0","q":"2.0","T":2,"m":false,"M":true}}"#,
            "\n",
            r#"{"e":"trade","E":1,"s":"XYZQQQ","t":7,"p":"1.0","q":"2.0","T":2,"m":false,"M":true}"#,
            "\n",
        );
        let mut out = Vec::new();
        let mut err = Vec::new();
        let stats = normalize(Exchange::Binance, input.as_bytes(), &mut out, &mut err).unwrap();
        assert_eq!(
            stats,
            NormalizeStats {
                lines: 5,
                events: 1,
                errors: 2
            }
        );
        let err = String::from_utf8(err).unwrap();
        let lines: Vec<&str> = err.lines().collect();
        assert!(lines[0].starts_with("line 2: invalid JSON"), "{err}");
        assert!(
            lines[1].starts_with("line 5: unknown symbol `XYZQQQ`"),
            "{err}"
        );
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.lines().count(), 1);
        assert!(out.contains(r#""symbol":"BTC-USDT""#), "{out}");
    }

    #[test]
    fn normalize_refuses_exchanges_without_adapter() {
        let r = normalize(Exchange::Kraken, &b""[..], Vec::new(), Vec::new());
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::Unsupported);
    }
}
