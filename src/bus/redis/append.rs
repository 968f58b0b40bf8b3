//! The durable append (PROTOCOL §3): one server-side step that picks a durable envelope's
//! stream id, writes `"id":"<id>",` into the envelope, appends it to the capped stream and
//! publishes the very same bytes on the channel.
//!
//! The envelope must contain its own entry id, and the stream entry must hold exactly the
//! published payload, so the id cannot be left to `XADD … *` (which returns it only after
//! the entry is written). The script chooses it the way Redis does for `*` — the server's
//! millisecond clock, or the last entry's id plus one when the clock has not moved past it —
//! and falls back to `XINFO STREAM`'s `last-generated-id` when the newest entry was deleted
//! (`XADD` refuses ids at or below it). Being one script, append and publish never
//! disagree and no other client's command runs in between.
//!
//! This module owns the script and how it is called (`EVALSHA`, loaded with `SCRIPT
//! LOAD` on every new connection and again on `NOSCRIPT` after a Redis restart or
//! `SCRIPT FLUSH`). It does not decide which channels are durable ([`crate::durable`]),
//! nor buffer or retry (the publisher does).

use ::redis::aio::MultiplexedConnection;
use ::redis::{Pipeline, RedisError, RedisResult, Script};

use crate::durable::{BadStreamId, StreamCap, StreamId};

/// KEYS[1]: the stream. ARGV: pub/sub channel, `~` or `=`, maxlen, envelope head, tail.
/// Returns the new entry's id.
const APPEND_LUA: &str = r#"
local key = KEYS[1]
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = 0
local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
local function after(id)
  local lms, lseq = string.match(id, '^(%d+)-(%d+)$')
  lms = tonumber(lms)
  if lms >= ms then
    ms = lms
    seq = tonumber(lseq) + 1
  end
end
if newest then after(newest[1]) end
local function add()
  local id = string.format('%.0f-%.0f', ms, seq)
  local envelope = ARGV[4] .. '"id":"' .. id .. '",' .. ARGV[5]
  local ok = redis.pcall('XADD', key, 'MAXLEN', ARGV[2], ARGV[3], id, 'envelope', envelope)
  if type(ok) == 'table' and ok.err then return nil, ok end
  return id, envelope
end
local id, envelope = add()
if not id then
  -- The newest entry was deleted: ids must still grow past the last one generated.
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then after(info[i + 1]) end
  end
  id, envelope = add()
  if not id then return redis.error_reply(envelope.err) end
end
redis.call('PUBLISH', ARGV[1], envelope)
return id
"#;

/// The loaded append script; cheap to clone.
#[derive(Clone)]
pub struct AppendScript {
    script: Script,
}

impl Default for AppendScript {
    fn default() -> Self {
        AppendScript::new()
    }
}

impl AppendScript {
    pub fn new() -> AppendScript {
        AppendScript {
            script: Script::new(APPEND_LUA),
        }
    }

    /// The script's SHA1, as `EVALSHA` names it.
    pub fn sha(&self) -> &str {
        self.script.get_hash()
    }

    /// `SCRIPT LOAD`: once per new connection, and after a `NOSCRIPT` reply.
    pub async fn load(&self, conn: &mut MultiplexedConnection) -> RedisResult<()> {
        let _: String = ::redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(APPEND_LUA)
            .query_async(conn)
            .await?;
        Ok(())
    }

    /// Adds one append to `pipe`: `head`/`tail` are [`BusMessage::id_split`]'s halves,
    /// `stream_key` is `{p}stream:{channel}`, `pubsub` is `{p}{channel}`. Its reply is the
    /// new id as a string ([`parse_id`]).
    ///
    /// [`BusMessage::id_split`]: crate::envelope::BusMessage::id_split
    pub fn add_to(
        &self,
        pipe: &mut Pipeline,
        stream_key: &str,
        pubsub: &str,
        cap: StreamCap,
        head: &[u8],
        tail: &[u8],
    ) {
        pipe.cmd("EVALSHA")
            .arg(self.sha())
            .arg(1)
            .arg(stream_key)
            .arg(pubsub)
            .arg(cap.operator())
            .arg(cap.maxlen)
            .arg(head)
            .arg(tail);
    }

    /// One append on its own, loading the script on `NOSCRIPT` (for callers outside the
    /// publisher's pipeline: dead-letter requeue, tests).
    pub async fn append(
        &self,
        conn: &mut MultiplexedConnection,
        stream_key: &str,
        pubsub: &str,
        cap: StreamCap,
        head: &[u8],
        tail: &[u8],
    ) -> RedisResult<String> {
        let mut pipe = ::redis::pipe();
        self.add_to(&mut pipe, stream_key, pubsub, cap, head, tail);
        let first: RedisResult<(String,)> = pipe.query_async(conn).await;
        match first {
            Ok((id,)) => Ok(id),
            Err(e) if is_noscript(&e) => {
                self.load(conn).await?;
                let (id,): (String,) = pipe.query_async(conn).await?;
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }
}

/// Redis lost the script (restart, failover to a replica that never saw it, `SCRIPT
/// FLUSH`): load it and send again.
pub fn is_noscript(e: &RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
}

/// The id the script returned.
pub fn parse_id(reply: &str) -> Result<StreamId, BadStreamId> {
    reply.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::redis_test_server::RedisTestServer;
    use crate::envelope::BusMessage;
    use crate::event::{Event, Exchange, Side, Trade};
    use bytes::Bytes;
    use uuid::Uuid;

    fn trade(n: u64) -> BusMessage {
        BusMessage::encode(
            Uuid::new_v4(),
            n,
            1,
            Event::Trade(Trade {
                exchange: Exchange::Binance,
                symbol: "BTC-USDT".into(),
                ts: Some(1),
                ts_recv: 2,
                trade_id: n.to_string(),
                price: "1.0".into(),
                size: "2.0".into(),
                side: Some(Side::Sell),
            }),
        )
    }

    type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

    #[tokio::test]
    async fn appends_publish_the_entry_bytes_with_its_own_id_and_survive_script_flush() {
        let server = RedisTestServer::start();
        let client = ::redis::Client::open(server.url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let mut sub = client.get_async_pubsub().await.unwrap();
        sub.subscribe("md:trade:binance:BTC-USDT").await.unwrap();
        let script = AppendScript::new();
        script.load(&mut conn).await.unwrap();
        let cap = StreamCap {
            maxlen: 3,
            approximate: false,
        };
        let key = "md:stream:trade:binance:BTC-USDT";
        let mut ids = Vec::new();
        for n in 1..=5u64 {
            if n == 3 {
                let _: () = ::redis::cmd("SCRIPT")
                    .arg("FLUSH")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            if n == 4 {
                // The newest entry deleted: the next id still grows past it.
                let _: u64 = ::redis::cmd("XDEL")
                    .arg(key)
                    .arg(ids.last().map(|i: &StreamId| i.to_string()).unwrap())
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
            let (head, tail) = trade(n).id_split().unwrap();
            let id = script
                .append(
                    &mut conn,
                    key,
                    "md:trade:binance:BTC-USDT",
                    cap,
                    &head,
                    &tail,
                )
                .await
                .unwrap();
            ids.push(parse_id(&id).unwrap());
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let entries: Entries = ::redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        // Exact cap: the newest three of those not deleted.
        let held: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(
            held,
            [1, 3, 4].map(|i| ids[i].to_string()).to_vec(),
            "{ids:?}"
        );
        use futures_util::StreamExt;
        let mut messages = sub.on_message();
        for (n, id) in ids.iter().enumerate() {
            let msg = messages.next().await.unwrap();
            let payload: Vec<u8> = msg.get_payload().unwrap();
            let back = BusMessage::decode(
                crate::event::Channel::parse("trade:binance:BTC-USDT").unwrap(),
                Bytes::from(payload.clone()),
            )
            .unwrap();
            assert_eq!(back.id, Some(*id));
            assert_eq!(back.seq, n as u64 + 1);
            if let Some((_, fields)) = entries.iter().find(|(e, _)| *e == id.to_string()) {
                assert_eq!(fields, &vec![("envelope".to_string(), payload)]);
            }
        }
    }
}
