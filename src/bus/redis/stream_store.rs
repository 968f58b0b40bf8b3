//! [`StreamStore`] for Redis: reads of durable channels' streams (`{p}stream:{channel}`)
//! for bots' `since` replay and durable latest values, on the [`RedisStore`]'s multiplexed
//! connection (same reconnect rules: a dead connection is dropped and the next call
//! connects afresh; errors go to the caller, which decides about retries).
//!
//! - `bounds`: `XINFO STREAM` (length, first entry, `last-generated-id`, and from Redis 7
//!   `entries-added` and `max-deleted-entry-id`, which only `XDEL` moves, not trimming).
//! - `range`: `XRANGE key <from> + COUNT n`. Each entry's `envelope` field is decoded under
//!   the store's [`DecodePolicy`](crate::envelope::DecodePolicy) (size, signature, event vs
//!   channel) and must carry its own entry id; other entries are skipped and counted in
//!   `mdbridge_envelopes_invalid_total`. The caller bounds a page's size by `count`.
//! - `count_back`: a short Lua script walks `XREVRANGE` in chunks server-side and returns
//!   only a count and an id, so finding where the newest `max_replay` entries start costs
//!   no transfer of entries.
//! - `newest`: `XREVRANGE key + - COUNT 1`.
//!
//! It owns no task, no cache and no policy about which channels are durable.

use ::redis::{Script, Value};
use bytes::Bytes;

use super::store::RedisStore;
use crate::bus::{StoreFuture, StreamBounds, StreamFuture, StreamPage, StreamStore};
use crate::durable::{stream_key, StreamId};
use crate::envelope::BusMessage;
use crate::event::Channel;
use crate::metrics;

/// KEYS[1]: the stream. ARGV: end (`+` or `(<id>`), start (`(<id>`), count. Returns the
/// number of entries in that window (newest first, at most count) and the oldest one's id.
const COUNT_BACK_LUA: &str = r#"
local r = redis.call('XREVRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', tonumber(ARGV[3]))
local n = #r
if n == 0 then return {0, ''} end
return {n, r[n][1]}
"#;

/// Entries one `count_back` call walks at most: the script holds them in Lua memory for
/// the call and Redis is single-threaded, so each call stays small and short (a
/// 100 000-entry walk is 100 round trips of about a millisecond).
const COUNT_BACK_CHUNK: u64 = 1_000;

/// One `XRANGE` entry: its id and its field/value pairs.
type RawEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

impl RedisStore {
    fn stream_key(&self, channel: &Channel) -> String {
        stream_key(&self.prefix, channel.as_str())
    }

    /// Decodes one entry: its `envelope` field, which must be an envelope of `channel`
    /// carrying the entry's own id. `None` (counted) otherwise.
    fn decode_entry(
        &self,
        channel: &Channel,
        id: StreamId,
        fields: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Option<BusMessage> {
        let Some((_, envelope)) = fields.into_iter().find(|(f, _)| f == b"envelope") else {
            metrics::envelope_invalid("field");
            return None;
        };
        match BusMessage::decode_with(channel.clone(), Bytes::from(envelope), &self.policy) {
            Ok(msg) if msg.id == Some(id) => Some(msg),
            Ok(_) => {
                // The envelope names another entry (or none): not what the append script
                // wrote, so its id cannot be trusted for ordering.
                metrics::envelope_invalid("id");
                None
            }
            Err(e) => {
                metrics::envelope_invalid(e.reason());
                None
            }
        }
    }
}

impl StreamStore for RedisStore {
    fn bounds(&self, channel: &Channel) -> StreamFuture<'_, Option<StreamBounds>> {
        let key = self.stream_key(channel);
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let reply: ::redis::RedisResult<Value> = ::redis::cmd("XINFO")
                .arg("STREAM")
                .arg(&key)
                .query_async(&mut conn)
                .await;
            let reply = match reply {
                // No such key: no stream (yet, or any more).
                Err(e)
                    if e.kind() == ::redis::ErrorKind::ResponseError
                        && e.to_string().contains("no such key") =>
                {
                    return Ok(None)
                }
                other => other,
            };
            let Some(info) = self.check(&key, reply)? else {
                return Ok(None);
            };
            Ok(Some(parse_info(info)))
        })
    }

    fn range(
        &self,
        channel: &Channel,
        from: StreamId,
        count: usize,
    ) -> StreamFuture<'_, StreamPage> {
        let key = self.stream_key(channel);
        let channel = channel.clone();
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let reply: ::redis::RedisResult<Vec<RawEntry>> = ::redis::cmd("XRANGE")
                .arg(&key)
                .arg(from.to_string())
                .arg("+")
                .arg("COUNT")
                .arg(count.max(1))
                .query_async(&mut conn)
                .await;
            let entries = self.check(&key, reply)?.unwrap_or_default();
            let mut page = StreamPage {
                read: entries.len(),
                ..StreamPage::default()
            };
            for (id, fields) in entries {
                let Ok(id) = id.parse::<StreamId>() else {
                    // Redis ids always parse; count it like any refused entry.
                    metrics::envelope_invalid("id");
                    page.skipped += 1;
                    continue;
                };
                page.last = Some(id);
                page.largest = page
                    .largest
                    .max(fields.iter().map(|(f, v)| f.len() + v.len()).sum());
                match self.decode_entry(&channel, id, fields) {
                    Some(msg) => page.messages.push(msg),
                    None => page.skipped += 1,
                }
            }
            Ok(page)
        })
    }

    fn count_back(
        &self,
        channel: &Channel,
        after: StreamId,
        max: u64,
    ) -> StreamFuture<'_, (u64, Option<StreamId>)> {
        let key = self.stream_key(channel);
        Box::pin(async move {
            let script = Script::new(COUNT_BACK_LUA);
            let start = format!("({after}");
            let mut end = "+".to_string();
            let mut walked = 0u64;
            let mut oldest = None;
            while walked < max {
                let chunk = (max - walked).min(COUNT_BACK_CHUNK);
                let mut conn = self.conn().await?;
                let reply: ::redis::RedisResult<(u64, String)> = script
                    .key(&key)
                    .arg(&end)
                    .arg(&start)
                    .arg(chunk)
                    .invoke_async(&mut conn)
                    .await;
                let Some((n, id)) = self.check(&key, reply)? else {
                    break;
                };
                walked += n;
                if n == 0 {
                    break;
                }
                let Ok(id) = id.parse::<StreamId>() else {
                    break;
                };
                oldest = Some(id);
                if n < chunk {
                    break;
                }
                end = format!("({id}");
            }
            Ok((walked, oldest))
        })
    }

    fn newest(&self, channel: &Channel) -> StoreFuture<'_> {
        let key = self.stream_key(channel);
        let channel = channel.clone();
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let reply: ::redis::RedisResult<Vec<RawEntry>> = ::redis::cmd("XREVRANGE")
                .arg(&key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await;
            let entries = self.check(&key, reply)?.unwrap_or_default();
            Ok(entries.into_iter().next().and_then(|(id, fields)| {
                let id = id.parse::<StreamId>().ok()?;
                self.decode_entry(&channel, id, fields)
            }))
        })
    }
}

/// The fields of an `XINFO STREAM` reply this module needs (RESP2: a flat key/value
/// array; RESP3: a map). Missing or odd fields are left at their defaults.
fn parse_info(info: Value) -> StreamBounds {
    let pairs: Vec<(Value, Value)> = match info {
        Value::Array(items) => {
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    let text = |v: &Value| -> Option<String> {
        match v {
            Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    };
    let id = |v: &Value| text(v).and_then(|t| t.parse::<StreamId>().ok());
    let mut bounds = StreamBounds::default();
    for (k, v) in &pairs {
        match text(k).as_deref() {
            Some("length") => {
                if let Value::Int(n) = v {
                    bounds.len = u64::try_from(*n).unwrap_or(0);
                }
            }
            Some("entries-added") => {
                if let Value::Int(n) = v {
                    bounds.added = u64::try_from(*n).ok();
                }
            }
            Some("last-generated-id") => bounds.last = id(v).unwrap_or_default(),
            Some("max-deleted-entry-id") => bounds.max_deleted = id(v),
            Some("first-entry") => {
                if let Value::Array(entry) = v {
                    bounds.first = entry.first().and_then(id);
                }
            }
            _ => {}
        }
    }
    bounds
}

#[cfg(test)]
pub(crate) mod tests;
