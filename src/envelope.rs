//! The bus envelope (PROTOCOL §3) and [`BusMessage`], the unit that travels on every bus.
//!
//! An event is serialized exactly once, inside its envelope. The bytes bots receive are a
//! slice of the envelope's bytes ([`BusMessage::event_json`]), so neither the in-process
//! path nor the Redis path ever re-encodes an event, and a message received from Redis is
//! forwarded to bots without touching its event text.
//!
//! Wire shape: `{"src":"<uuid>","seq":N,"ts_pub":µs,"id":"<stream id>"?,"event":{...}}`,
//! plus `,"kid":"…","sig":"…"` before the closing brace when signing is on
//! ([`crate::bus::signing`]).
//!
//! Decoding is the trust boundary for everything read from Redis, pub/sub payloads and
//! `last:`/`snapshot:` values alike ([`BusMessage::decode_with`] and a [`DecodePolicy`]):
//! size bound first, then the signature (when keys are configured), then the envelope's
//! syntax, then the event against its channel ([`crate::bus::validate`]). Sequence
//! sanity is the subscriber's (`crate::bus::seq`): it needs state across envelopes.

use std::io::Write;
use std::ops::Range;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::bus::signing::{Keyring, SignatureError};
use crate::bus::validate::{self, Invalid, MAX_FUTURE_MICROS};
use crate::config::{RedisConfig, DEFAULT_MAX_ENVELOPE_BYTES};
use crate::durable::{BadStreamId, StreamId};
use crate::event::{now_micros, Book, Channel, Event, EventType};

/// Why an envelope read from the bus was refused; [`EnvelopeError::reason`] is its label
/// in `mdbridge_envelopes_invalid_total`.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope of {len} bytes is over redis.max_envelope_bytes ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("envelope is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("envelope `src` is not a UUID")]
    BadSrc,
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("signed envelope published {age_ms} ms ago, over redis.max_envelope_age_ms: a replay")]
    Stale { age_ms: u64 },
    #[error(transparent)]
    BadId(#[from] BadStreamId),
}

impl EnvelopeError {
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::TooLarge { .. } => "too_large",
            EnvelopeError::Json(_) => "json",
            EnvelopeError::BadSrc => "src",
            EnvelopeError::Invalid(e) => e.reason(),
            EnvelopeError::Signature(_) => "signature",
            EnvelopeError::Stale { .. } => "stale",
            EnvelopeError::BadId(_) => "id",
        }
    }
}

/// What an envelope read from Redis must satisfy besides being well formed and valid for
/// its channel: a size bound and, when keys are configured, a signature.
#[derive(Clone, Debug)]
pub struct DecodePolicy {
    pub max_bytes: usize,
    /// `Some`: only envelopes signed with one of these keys are accepted.
    pub keys: Option<Arc<Keyring>>,
    /// `Some(µs)`: an envelope whose `ts_pub` is older than this is refused as a replay.
    /// Only meaningful for live pub/sub with signatures (`ts_pub` is then authentic);
    /// latest-value keys are legitimately old on quiet channels.
    pub max_age_micros: Option<u64>,
}

impl Default for DecodePolicy {
    fn default() -> Self {
        DecodePolicy {
            max_bytes: DEFAULT_MAX_ENVELOPE_BYTES,
            keys: None,
            max_age_micros: None,
        }
    }
}

impl DecodePolicy {
    /// `redis.max_envelope_bytes` and `redis.signing_keys`: for latest-value keys.
    pub fn from_config(config: &RedisConfig) -> DecodePolicy {
        DecodePolicy {
            max_bytes: config.max_envelope_bytes,
            keys: Keyring::from_config(config),
            max_age_micros: None,
        }
    }

    /// [`DecodePolicy::from_config`] plus, when signatures are required,
    /// `redis.max_envelope_age_ms` (0: none): for live pub/sub envelopes.
    pub fn for_pubsub(config: &RedisConfig) -> DecodePolicy {
        let mut policy = DecodePolicy::from_config(config);
        if policy.signed() && config.max_envelope_age_ms > 0 {
            policy.max_age_micros = Some(config.max_envelope_age_ms.saturating_mul(1_000));
        }
        policy
    }

    /// Envelopes must be signed: their `seq` can be replayed but not forged.
    pub fn signed(&self) -> bool {
        self.keys.is_some()
    }

    /// The size bound alone, for a caller that can refuse before copying the payload.
    pub fn check_size(&self, len: usize) -> Result<(), EnvelopeError> {
        if len > self.max_bytes {
            return Err(EnvelopeError::TooLarge {
                len,
                max: self.max_bytes,
            });
        }
        Ok(())
    }
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
    /// Durable channels: the stream entry id, which is also in `envelope`.
    pub id: Option<StreamId>,
    event_range: Range<usize>,
    /// The parsed book, for book channels only (book caches apply it; others never parse).
    pub book: Option<Arc<Book>>,
}

#[derive(Deserialize)]
struct EnvelopeRef<'a> {
    #[serde(borrow)]
    src: &'a str,
    seq: u64,
    ts_pub: u64,
    #[serde(default, borrow)]
    id: Option<&'a str>,
    #[serde(borrow)]
    event: &'a RawValue,
}

/// What precedes the event object in an envelope.
const EVENT_KEY: &[u8] = b"\"event\":";

/// Where `"id":"<id>",` sits in an envelope body written by [`BusMessage::encode`] and the
/// append script: right after `"ts_pub":T,`. Signatures cover the body without it, since
/// Redis assigns the id after the publisher signed. `None`: no id field there.
pub(crate) fn id_field(body: &[u8]) -> Option<Range<usize>> {
    const TS_PUB: &[u8] = b",\"ts_pub\":";
    const ID_OPEN: &[u8] = b"\"id\":\"";
    // `{"src":"<36-char uuid>","seq":N` comes first: ts_pub is within the first ~90 bytes.
    let window = &body[..body.len().min(96)];
    let at = window.windows(TS_PUB.len()).position(|w| w == TS_PUB)? + TS_PUB.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    let start = at + digits + 1;
    if body.get(at + digits) != Some(&b',') || !body[start..].starts_with(ID_OPEN) {
        return None;
    }
    let value = start + ID_OPEN.len();
    // A stream id is at most 41 characters (two u64 and a dash).
    let len = body[value..].iter().take(42).position(|&b| b == b'"')?;
    let end = value + len + 1;
    (body.get(end) == Some(&b',')).then_some(start..end + 1)
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
        BusMessage::encode_signed(channel, src, seq, ts_pub, event, None)
    }

    /// [`BusMessage::encode_on`], signed with the first of `keys` when given.
    pub fn encode_signed(
        channel: Channel,
        src: Uuid,
        seq: u64,
        ts_pub: u64,
        event: Event,
        keys: Option<&Keyring>,
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
        match keys {
            Some(keys) => keys.seal(channel.as_str(), &mut buf),
            None => buf.put_u8(b'}'),
        }
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
            id: None,
            event_range: start..end,
            book,
        }
    }

    /// The envelope cut where a stream id goes: `head` is `{"src":…,"seq":N,"ts_pub":T,`
    /// and `tail` is `"event":{…}…}`; `head + "\"id\":\"<id>\"," + tail` is the envelope
    /// of entry `<id>`. The publisher's append script joins them server-side, once it knows
    /// the id. `None` for a message that already carries an id.
    pub fn id_split(&self) -> Option<(Bytes, Bytes)> {
        if self.id.is_some() {
            return None;
        }
        let cut = self.event_range.start.checked_sub(EVENT_KEY.len())?;
        Some((self.envelope.slice(..cut), self.envelope.slice(cut..)))
    }

    /// This message as stream entry `id` holds it: the same envelope with `"id":"<id>",`
    /// before `"event"` (what the append script writes and publishes, built here for the
    /// in-process path and tests). The signature, if any, stays valid: it does not cover
    /// the id (see [`id_field`]).
    pub fn with_id(&self, id: StreamId) -> BusMessage {
        let Some((head, tail)) = self.id_split() else {
            return self.clone();
        };
        let field = format!("\"id\":\"{id}\",");
        let mut buf = BytesMut::with_capacity(self.envelope.len() + field.len());
        buf.put_slice(&head);
        buf.put_slice(field.as_bytes());
        buf.put_slice(&tail);
        BusMessage {
            id: Some(id),
            event_range: self.event_range.start + field.len()..self.event_range.end + field.len(),
            envelope: buf.freeze(),
            ..self.clone()
        }
    }

    /// [`BusMessage::decode_with`] under the default policy: unsigned, 1 MiB.
    pub fn decode(channel: Channel, payload: Bytes) -> Result<BusMessage, EnvelopeError> {
        BusMessage::decode_with(channel, payload, &DecodePolicy::default())
    }

    /// Reads an envelope received on `channel` (from pub/sub or a latest-value key) and
    /// checks it against `policy` and the channel. Only book events are fully parsed.
    pub fn decode_with(
        channel: Channel,
        payload: Bytes,
        policy: &DecodePolicy,
    ) -> Result<BusMessage, EnvelopeError> {
        policy.check_size(payload.len())?;
        // Before parsing: an unsigned flood costs a suffix check, not a JSON parse.
        if let Some(keys) = &policy.keys {
            keys.verify(channel.as_str(), &payload)?;
        }
        let env: EnvelopeRef<'_> = serde_json::from_slice(&payload)?;
        let src = Uuid::parse_str(env.src).map_err(|_| EnvelopeError::BadSrc)?;
        let now = now_micros();
        validate::not_future("ts_pub", env.ts_pub, now.saturating_add(MAX_FUTURE_MICROS))?;
        if let Some(max_age) = policy.max_age_micros {
            let age = now.saturating_sub(env.ts_pub);
            if age > max_age {
                return Err(EnvelopeError::Stale {
                    age_ms: age / 1_000,
                });
            }
        }
        let raw = env.event.get();
        // `raw` borrows from `payload`, so its offset locates the event inside the envelope.
        let start = raw.as_ptr() as usize - payload.as_ptr() as usize;
        let event_range = start..start + raw.len();
        let checked = validate::event(&channel, raw, now)?;
        let id = env.id.map(str::parse::<StreamId>).transpose()?;
        Ok(BusMessage {
            channel,
            src,
            seq: env.seq,
            ts_recv: checked.ts_recv,
            envelope: payload.clone(),
            id,
            event_range,
            book: checked.book.map(Arc::new),
        })
    }

    /// The event object alone: what a bot receives. Shares the envelope's memory; on a
    /// durable channel it is the event with `"id":"<stream id>"` appended (PROTOCOL §4),
    /// built once here per message, then shared by every subscriber.
    pub fn event_json(&self) -> Bytes {
        let event = self.envelope.slice(self.event_range.clone());
        let Some(id) = self.id else {
            return event;
        };
        // The event is a JSON object: `{…}` with at least one field.
        let open = &event[..event.len().saturating_sub(1)];
        let field = format!(",\"id\":\"{id}\"}}");
        let mut buf = BytesMut::with_capacity(open.len() + field.len());
        buf.put_slice(open);
        buf.put_slice(field.as_bytes());
        buf.freeze()
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

    fn reason(policy: &DecodePolicy, channel: &str, payload: &[u8]) -> &'static str {
        let c = Channel::parse(channel).unwrap();
        match BusMessage::decode_with(c, Bytes::copy_from_slice(payload), policy) {
            Ok(_) => "ok",
            Err(e) => {
                // Every label is one the metrics module zero-initialises.
                assert!(crate::metrics::ENVELOPE_INVALID_REASONS.contains(&e.reason()));
                e.reason()
            }
        }
    }

    #[test]
    fn refusals_are_labelled_by_reason() {
        let p = DecodePolicy {
            max_bytes: 1024,
            ..DecodePolicy::default()
        };
        let ok = BusMessage::encode(Uuid::new_v4(), 1, 1, trade());
        let text = std::str::from_utf8(&ok.envelope).unwrap().to_string();
        assert_eq!(reason(&p, "trade:binance:BTC-USDT", &ok.envelope), "ok");
        let big = text.replace("\"7\"", &format!("\"{}\"", "7".repeat(1100)));
        assert_eq!(
            reason(&p, "trade:binance:BTC-USDT", big.as_bytes()),
            "too_large"
        );
        assert_eq!(reason(&p, "trade:binance:BTC-USDT", b"{"), "json");
        let bad_src = text.replacen("\"src\":\"", "\"src\":\"x", 1);
        assert_eq!(
            reason(&p, "trade:binance:BTC-USDT", bad_src.as_bytes()),
            "src"
        );
        assert_eq!(
            reason(&p, "trade:binance:ETH-USDT", &ok.envelope),
            "channel"
        );
        let price = text.replace("\"100.10\"", "100.10");
        assert_eq!(
            reason(&p, "trade:binance:BTC-USDT", price.as_bytes()),
            "field"
        );
        let ts_pub = text.replace("\"ts_pub\":1", &format!("\"ts_pub\":{}", u64::MAX));
        assert_eq!(
            reason(&p, "trade:binance:BTC-USDT", ts_pub.as_bytes()),
            "ts"
        );
    }

    fn keys(list: &[&str]) -> Arc<Keyring> {
        let keys: Vec<crate::config::SigningKey> =
            list.iter().map(|k| k.parse().unwrap()).collect();
        Arc::new(Keyring::new(&keys).unwrap())
    }

    #[test]
    fn signed_envelopes_round_trip_and_only_they_pass_when_keys_are_set() {
        let ring = keys(&["k1=0123456789abcdef-one"]);
        let chan = Channel::parse("trade:binance:BTC-USDT").unwrap();
        let src = Uuid::new_v4();
        let signed =
            BusMessage::encode_signed(chan.clone(), src, 3, 4, trade(), Some(ring.as_ref()));
        let env: serde_json::Value = serde_json::from_slice(&signed.envelope).unwrap();
        assert_eq!(env["kid"], "k1");
        assert_eq!(env["event"]["trade_id"], "7");
        assert_eq!(signed.event_json(), Bytes::from(trade().to_json()));

        let strict = DecodePolicy {
            keys: Some(ring.clone()),
            ..DecodePolicy::default()
        };
        let back = BusMessage::decode_with(chan.clone(), signed.envelope.clone(), &strict).unwrap();
        assert_eq!((back.src, back.seq), (src, 3));
        assert_eq!(back.event_json(), signed.event_json());
        // Unsigned executors read signed envelopes as before.
        assert!(BusMessage::decode(chan.clone(), signed.envelope.clone()).is_ok());

        let unsigned = BusMessage::encode(src, 3, 4, trade());
        assert_eq!(
            reason(&strict, chan.as_str(), &unsigned.envelope),
            "signature"
        );
        let other = keys(&["k1=0123456789abcdef-two"]);
        let forged =
            BusMessage::encode_signed(chan.clone(), src, 3, 4, trade(), Some(other.as_ref()));
        assert_eq!(
            reason(&strict, chan.as_str(), &forged.envelope),
            "signature"
        );
        let text = std::str::from_utf8(&signed.envelope).unwrap();
        let tampered = text.replace("\"seq\":3", "\"seq\":9");
        assert_eq!(
            reason(&strict, chan.as_str(), tampered.as_bytes()),
            "signature"
        );

        // With an age bound, an old signed envelope (ts_pub 4 µs after the epoch) is a
        // replay; a fresh one passes.
        let live = DecodePolicy {
            max_age_micros: Some(60_000_000),
            ..strict.clone()
        };
        assert_eq!(reason(&live, chan.as_str(), &signed.envelope), "stale");
        let fresh = BusMessage::encode_signed(
            chan.clone(),
            src,
            4,
            now_micros(),
            trade(),
            Some(ring.as_ref()),
        );
        assert_eq!(reason(&live, chan.as_str(), &fresh.envelope), "ok");
    }

    #[test]
    fn a_stream_id_goes_before_the_event_and_onto_the_bot_frame() {
        let ring = keys(&["k1=0123456789abcdef-one"]);
        let chan = Channel::parse("trade:binance:BTC-USDT").unwrap();
        let src = Uuid::new_v4();
        for signer in [None, Some(ring.as_ref())] {
            let plain = BusMessage::encode_signed(chan.clone(), src, 3, 4, trade(), signer);
            let id: StreamId = "1732300000000-7".parse().unwrap();
            let durable = plain.with_id(id);
            // What the append script builds from the split is the same envelope.
            let (head, tail) = plain.id_split().unwrap();
            let joined = [&head[..], br#""id":"1732300000000-7","#, &tail[..]].concat();
            assert_eq!(&durable.envelope[..], &joined[..]);
            let env: serde_json::Value = serde_json::from_slice(&durable.envelope).unwrap();
            assert_eq!(env["id"], "1732300000000-7");
            assert_eq!(env["seq"], 3);

            let policy = DecodePolicy {
                keys: signer.map(|_| ring.clone()),
                ..DecodePolicy::default()
            };
            let back =
                BusMessage::decode_with(chan.clone(), durable.envelope.clone(), &policy).unwrap();
            assert_eq!(back.id, Some(id));
            let bot: serde_json::Value = serde_json::from_slice(&back.event_json()).unwrap();
            let mut expected: serde_json::Value =
                serde_json::from_slice(&trade().to_json()).unwrap();
            expected["id"] = "1732300000000-7".into();
            assert_eq!(bot, expected);
            assert_eq!(back.event_json(), durable.event_json());
            assert!(back.id_split().is_none());
        }
        // The id is outside the signature, everything else stays covered.
        let signed =
            BusMessage::encode_signed(chan.clone(), src, 3, 4, trade(), Some(ring.as_ref()))
                .with_id(StreamId::new(1, 1));
        let strict = DecodePolicy {
            keys: Some(ring.clone()),
            ..DecodePolicy::default()
        };
        let text = std::str::from_utf8(&signed.envelope).unwrap();
        assert_eq!(
            reason(
                &strict,
                chan.as_str(),
                text.replace("\"seq\":3", "\"seq\":4").as_bytes()
            ),
            "signature"
        );
        let other_id = text.replace("1-1", "2-0");
        assert_eq!(reason(&strict, chan.as_str(), other_id.as_bytes()), "ok");
        let bad_id = text.replace("1-1", "x");
        assert_eq!(
            reason(&DecodePolicy::default(), chan.as_str(), bad_id.as_bytes()),
            "id"
        );
    }
}
