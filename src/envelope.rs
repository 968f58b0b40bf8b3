//! The bus envelope (PROTOCOL §3) and [`BusMessage`], the unit that travels on every bus.
//!
//! An event is serialized exactly once, inside its envelope. The bytes bots receive are a
//! slice of the envelope's bytes ([`BusMessage::event_json`]), so neither the in-process
//! path nor the Redis path ever re-encodes an event, and a message received from Redis is
//! forwarded to bots without touching its event text.
//!
//! Wire shape: `{"src":"<uuid>","seq":N,"ts_pub":µs,"id":"<stream id>"?,"event":{...}}`.

use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::event::{Book, Channel, Event, EventType};

/// Why an envelope read from the bus was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("envelope `src` is not a UUID: {0}")]
    BadSrc(String),
    #[error("event type `{found}` does not belong on channel `{channel}`")]
    WrongChannel { channel: String, found: EventType },
}

/// An envelope with its event, ready for any sink: Redis, the router, a `last:` key.
#[derive(Clone, Debug)]
pub struct BusMessage {
    pub channel: Channel,
    /// Instance that published it.
    pub src: Uuid,
    /// Per (`src`, channel) sequence, from 1.
    pub seq: u64,
    /// `ts_recv` of the event: when the host read the frame off the exchange socket.
    pub ts_recv: u64,
    /// The exact envelope bytes (what Redis carries).
    pub envelope: Bytes,
    event_range: Range<usize>,
    /// The parsed book, for book channels only (book caches apply it; others never parse).
    pub book: Option<Arc<Book>>,
}

#[derive(Deserialize)]
struct EnvelopeRef<'a> {
    #[serde(borrow)]
    src: &'a str,
    seq: u64,
    #[allow(dead_code)]
    ts_pub: u64,
    #[serde(default, borrow)]
    #[allow(dead_code)]
    id: Option<&'a str>,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// The two fields routing needs, read without building the whole event.
#[derive(Deserialize)]
struct EventHead {
    #[serde(rename = "type")]
    kind: EventType,
    ts_recv: u64,
}

/// Initial envelope buffer: fits trades, tickers and deltas; big snapshots grow it once.
const ENVELOPE_CAPACITY_HINT: usize = 512;

impl BusMessage {
    /// Wraps `event` in an envelope: the one and only serialization of this event.
    pub fn encode(src: Uuid, seq: u64, ts_pub: u64, event: Event) -> BusMessage {
        BusMessage::encode_on(event.channel(), src, seq, ts_pub, event)
    }

    /// [`BusMessage::encode`] for a caller that already has the event's channel
    /// (`channel` must be `event.channel()`).
    pub fn encode_on(
        channel: Channel,
        src: Uuid,
        seq: u64,
        ts_pub: u64,
        event: Event,
    ) -> BusMessage {
        debug_assert_eq!(channel, event.channel());
        let ts_recv = event.ts_recv();
        let mut buf = BytesMut::with_capacity(ENVELOPE_CAPACITY_HINT);
        buf.put_slice(b"{\"src\":\"");
        buf.put_slice(
            src.as_hyphenated()
                .encode_lower(&mut Uuid::encode_buffer())
                .as_bytes(),
        );
        let mut out = buf.writer();
        // Writing into memory cannot fail, and the event is plain strings and integers.
        let _ = write!(out, "\",\"seq\":{seq},\"ts_pub\":{ts_pub},\"event\":");
        let start = out.get_ref().len();
        // The event is serialized straight into the envelope: no intermediate buffer.
        let _ = serde_json::to_writer(&mut out, &event);
        let mut buf = out.into_inner();
        let end = buf.len();
        buf.put_u8(b'}');
        let book = match event {
            Event::Book(b) => Some(Arc::new(b)),
            _ => None,
        };
        BusMessage {
            channel,
            src,
            seq,
            ts_recv,
            envelope: buf.freeze(),
            event_range: start..end,
            book,
        }
    }

    /// Reads an envelope received on `channel`. Only book events are fully parsed.
    pub fn decode(channel: Channel, payload: Bytes) -> Result<BusMessage, EnvelopeError> {
        let env: EnvelopeRef<'_> = serde_json::from_slice(&payload)?;
        let src =
            Uuid::parse_str(env.src).map_err(|_| EnvelopeError::BadSrc(env.src.to_string()))?;
        let raw = env.event.get();
        // `raw` borrows from `payload`, so its offset locates the event inside the envelope.
        let start = raw.as_ptr() as usize - payload.as_ptr() as usize;
        let event_range = start..start + raw.len();
        let head: EventHead = serde_json::from_str(raw)?;
        if head.kind != channel.kind() {
            return Err(EnvelopeError::WrongChannel {
                channel: channel.to_string(),
                found: head.kind,
            });
        }
        let book = if head.kind == EventType::Book {
            match serde_json::from_str::<Event>(raw)? {
                Event::Book(b) => Some(Arc::new(b)),
                _ => None,
            }
        } else {
            None
        };
        let seq = env.seq;
        Ok(BusMessage {
            channel,
            src,
            seq,
            ts_recv: head.ts_recv,
            envelope: payload.clone(),
            event_range,
            book,
        })
    }

    /// The event object alone: what a bot receives. Shares the envelope's memory.
    pub fn event_json(&self) -> Bytes {
        self.envelope.slice(self.event_range.clone())
    }

    pub fn kind(&self) -> EventType {
        self.channel.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Exchange, Side, Trade};

    fn trade() -> Event {
        Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: Some(1),
            ts_recv: 2,
            trade_id: "7".into(),
            price: "100.10".into(),
            size: "0.50000000".into(),
            side: Some(Side::Buy),
        })
    }

    #[test]
    fn encode_then_decode_round_trips_and_slices_the_event() {
        let src = Uuid::new_v4();
        let msg = BusMessage::encode(src, 5, 99, trade());
        let env: serde_json::Value = serde_json::from_slice(&msg.envelope).unwrap();
        assert_eq!(env["src"], src.to_string());
        assert_eq!(env["seq"], 5);
        assert_eq!(env["ts_pub"], 99);
        assert_eq!(env["event"]["price"], "100.10");
        assert_eq!(msg.event_json(), Bytes::from(trade().to_json()));

        let back = BusMessage::decode(msg.channel.clone(), msg.envelope.clone()).unwrap();
        assert_eq!(back.src, src);
        assert_eq!(back.seq, 5);
        assert_eq!(back.ts_recv, 2);
        assert_eq!(back.event_json(), msg.event_json());
        assert!(back.book.is_none());
    }

    #[test]
    fn decode_refuses_garbage_and_mismatched_channels() {
        let chan = Channel::parse("trade:binance:BTC-USDT").unwrap();
        for bad in [
            &b"not json"[..],
            br#"{"src":"x","seq":1,"ts_pub":1,"event":{"type":"trade","ts_recv":1}}"#,
            br#"{"src":"6f1c8e9a-3a4b-4c5d-8e9f-0a1b2c3d4e5f","seq":1,"ts_pub":1}"#,
            br#"{"src":"6f1c8e9a-3a4b-4c5d-8e9f-0a1b2c3d4e5f","seq":1,"ts_pub":1,"event":{"type":"book","ts_recv":1}}"#,
        ] {
            assert!(BusMessage::decode(chan.clone(), Bytes::copy_from_slice(bad)).is_err());
        }
    }
}
