//! Dead letters: an entry that failed `max_deliveries` times is copied to
//! `{stream}:dead` (fields `envelope` — the raw bytes —, `error`, `group`, `consumer`,
//! `source_id`, `deliveries`, `failed_at` in µs; capped `MAXLEN ~ 10000`) and acknowledged,
//! in one `MULTI`, so it is never both dead-lettered and still pending, nor lost in
//! between. Requeueing is the admin API's (h/dops).

use ::redis::aio::MultiplexedConnection;
use ::redis::RedisResult;

use super::DEAD_LETTER_MAXLEN;
use crate::durable::{dead_key, StreamId};
use crate::event::now_micros;

/// One failed entry and why.
pub(super) struct DeadLetter<'a> {
    pub key: &'a str,
    pub group: &'a str,
    pub consumer: &'a str,
    pub id: StreamId,
    pub envelope: &'a [u8],
    pub error: &'a str,
    pub deliveries: u64,
}

/// `XADD {key}:dead MAXLEN ~ 10000 * …` and `XACK key group id`, atomically.
pub(super) async fn dead_letter(
    conn: &mut MultiplexedConnection,
    d: &DeadLetter<'_>,
) -> RedisResult<()> {
    let mut pipe = ::redis::pipe();
    pipe.atomic();
    pipe.cmd("XADD")
        .arg(dead_key(d.key))
        .arg("MAXLEN")
        .arg("~")
        .arg(DEAD_LETTER_MAXLEN)
        .arg("*")
        .arg("envelope")
        .arg(d.envelope)
        .arg("error")
        .arg(d.error.chars().take(1_000).collect::<String>())
        .arg("group")
        .arg(d.group)
        .arg("consumer")
        .arg(d.consumer)
        .arg("source_id")
        .arg(d.id.to_string())
        .arg("deliveries")
        .arg(d.deliveries)
        .arg("failed_at")
        .arg(now_micros())
        .ignore();
    pipe.cmd("XACK")
        .arg(d.key)
        .arg(d.group)
        .arg(d.id.to_string())
        .ignore();
    pipe.query_async::<()>(conn).await
}
