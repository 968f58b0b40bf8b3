//! Dead letters of durable streams (PROTOCOL §3: `{stream}:dead`, fields `envelope`,
//! `error`, `group`, `consumer`, `source_id`, `deliveries`, `failed_at`) for operators:
//! [`dead_letters`] reads a page of them, [`requeue`] puts them back into the stream with
//! the real append script (a new id, written into the envelope and published like any
//! append) and only then `XDEL`s them.
//!
//! Pages are bounded (count and bytes), and so is one requeue of everything
//! ([`MAX_REQUEUE`]). The executor writes dead letters (not this module); the HTTP side is
//! `http::streams`.

use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;
use serde::Serialize;

use super::append::AppendScript;
use super::stream_admin::{AdminError, MAX_PAGE};
use crate::durable::{dead_key, stream_key, StreamCap, StreamId};
use crate::envelope::{id_field, BusMessage};
use crate::event::Channel;

/// Most dead letters one `{"all":true}` requeue moves; the answer says what remains.
pub const MAX_REQUEUE: usize = 1_000;
/// A dead-letter page stops growing past this many envelope bytes (at least one entry).
pub const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// One dead letter with every field PROTOCOL §3 gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Its id in the dead-letter stream (what requeue takes).
    pub id: String,
    /// The envelope exactly as it was (JSON text).
    pub envelope: Option<String>,
    pub error: Option<String>,
    pub group: Option<String>,
    pub consumer: Option<String>,
    pub source_id: Option<String>,
    pub deliveries: Option<u64>,
    /// µs since the epoch.
    pub failed_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadPage {
    pub dead_letters: Vec<DeadLetter>,
    /// Pass as `after` for the next page; `None` at the end.
    pub next: Option<String>,
    /// Entries in the dead-letter stream.
    pub total: u64,
}

type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Dead letters after `after` (from the oldest when `None`), at most `count`.
pub async fn dead_letters(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &Channel,
    after: Option<StreamId>,
    count: usize,
) -> Result<DeadPage, AdminError> {
    let key = stream_key(prefix, channel.as_str());
    let dead = dead_key(&key);
    let count = count.clamp(1, MAX_PAGE);
    let start = match after {
        Some(id) => match id.next() {
            Some(n) => n.to_string(),
            None => return empty_page(conn, &dead).await,
        },
        None => "-".to_string(),
    };
    let (kinds, total): ((String, String), u64) = {
        let (a, b, t): (String, String, u64) = ::redis::pipe()
            .cmd("TYPE")
            .arg(&key)
            .cmd("TYPE")
            .arg(&dead)
            .cmd("XLEN")
            .arg(&dead)
            .query_async(conn)
            .await?;
        ((a, b), t)
    };
    if kinds.0 == "none" && kinds.1 == "none" {
        return Err(AdminError::NotFound(channel.to_string()));
    }
    // One more than asked: tells whether another page follows.
    let entries: Entries = ::redis::cmd("XRANGE")
        .arg(&dead)
        .arg(&start)
        .arg("+")
        .arg("COUNT")
        .arg(count + 1)
        .query_async(conn)
        .await?;
    let mut more = entries.len() > count;
    let mut page = Vec::new();
    let mut bytes = 0usize;
    let mut entries = entries.into_iter().take(count).peekable();
    while let Some((id, fields)) = entries.next() {
        let letter = dead_letter(id, fields);
        bytes += letter.envelope.as_ref().map_or(0, String::len);
        page.push(letter);
        if bytes > MAX_PAGE_BYTES && entries.peek().is_some() {
            more = true;
            break;
        }
    }
    let next = if more {
        page.last().map(|l| l.id.clone())
    } else {
        None
    };
    Ok(DeadPage {
        dead_letters: page,
        next,
        total,
    })
}

async fn empty_page(conn: &mut MultiplexedConnection, dead: &str) -> Result<DeadPage, AdminError> {
    let total: u64 = ::redis::cmd("XLEN").arg(dead).query_async(conn).await?;
    Ok(DeadPage {
        dead_letters: Vec::new(),
        next: None,
        total,
    })
}

fn dead_letter(id: String, fields: Vec<(String, Vec<u8>)>) -> DeadLetter {
    let mut letter = DeadLetter {
        id,
        envelope: None,
        error: None,
        group: None,
        consumer: None,
        source_id: None,
        deliveries: None,
        failed_at: None,
    };
    for (name, value) in fields {
        let value = String::from_utf8_lossy(&value).into_owned();
        match name.as_str() {
            "envelope" => letter.envelope = Some(value),
            "error" => letter.error = Some(value),
            "group" => letter.group = Some(value),
            "consumer" => letter.consumer = Some(value),
            "source_id" => letter.source_id = Some(value),
            "deliveries" => letter.deliveries = value.parse().ok(),
            "failed_at" => letter.failed_at = value.parse().ok(),
            _ => {}
        }
    }
    letter
}

/// Which dead letters to requeue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    One(StreamId),
    /// The oldest [`MAX_REQUEUE`].
    All,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Requeued {
    /// Its id in the dead-letter stream (now deleted there).
    pub dead_id: String,
    /// Its new id in the stream (also in the envelope, and published).
    pub new_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unrequeued {
    pub dead_id: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RequeueReport {
    pub requeued: Vec<Requeued>,
    /// Dead letters left in place: no envelope, or one that is not an envelope of this
    /// channel (appending it would only fail again).
    pub failed: Vec<Unrequeued>,
    /// Entries left in the dead-letter stream.
    pub remaining: u64,
}

/// Puts dead letters back: each envelope, its old `"id":"…",` removed, is appended with
/// the append script (a new id, written into the envelope and published like any append)
/// and only then `XDEL`ed from the dead-letter stream. A failure between the two leaves it
/// in both (requeued again later: at least once, never lost).
pub async fn requeue(
    conn: &mut MultiplexedConnection,
    script: &AppendScript,
    prefix: &str,
    channel: &Channel,
    cap: StreamCap,
    which: Which,
) -> Result<RequeueReport, AdminError> {
    let key = stream_key(prefix, channel.as_str());
    let dead = dead_key(&key);
    let pubsub = super::channel_key(prefix, channel);
    let mut report = RequeueReport::default();
    let mut start = "-".to_string();
    loop {
        let entries: Entries = match which {
            Which::One(id) => {
                let entries: Entries = ::redis::cmd("XRANGE")
                    .arg(&dead)
                    .arg(id.to_string())
                    .arg(id.to_string())
                    .query_async(conn)
                    .await?;
                if entries.is_empty() {
                    return Err(AdminError::NoDeadLetter(id.to_string()));
                }
                entries
            }
            Which::All => {
                let room = MAX_REQUEUE - report.requeued.len() - report.failed.len();
                ::redis::cmd("XRANGE")
                    .arg(&dead)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(room.min(MAX_PAGE))
                    .query_async(conn)
                    .await?
            }
        };
        let got = entries.len();
        for (dead_id, fields) in entries {
            if let Some(next) = dead_id.parse::<StreamId>().ok().and_then(StreamId::next) {
                start = next.to_string();
            }
            let envelope = fields
                .into_iter()
                .find(|(name, _)| name == "envelope")
                .map(|(_, v)| v);
            let Some(envelope) = envelope else {
                report.failed.push(Unrequeued {
                    dead_id,
                    error: "the dead letter has no envelope field".into(),
                });
                continue;
            };
            let (head, tail) = match split(channel, envelope) {
                Ok(parts) => parts,
                Err(error) => {
                    report.failed.push(Unrequeued { dead_id, error });
                    continue;
                }
            };
            let new_id = script
                .append(conn, &key, &pubsub, cap, &head, &tail)
                .await?;
            let _: u64 = ::redis::cmd("XDEL")
                .arg(&dead)
                .arg(&dead_id)
                .query_async(conn)
                .await?;
            report.requeued.push(Requeued { dead_id, new_id });
        }
        let done = report.requeued.len() + report.failed.len();
        if which != Which::All || got == 0 || done >= MAX_REQUEUE {
            break;
        }
    }
    report.remaining = ::redis::cmd("XLEN").arg(&dead).query_async(conn).await?;
    Ok(report)
}

/// The envelope without its old id, cut where the append script puts the new one; checked
/// to be an envelope of `channel` first.
fn split(channel: &Channel, envelope: Vec<u8>) -> Result<(Bytes, Bytes), String> {
    let stripped = match id_field(&envelope) {
        Some(r) => {
            let mut out = Vec::with_capacity(envelope.len());
            out.extend_from_slice(&envelope[..r.start]);
            out.extend_from_slice(&envelope[r.end..]);
            out
        }
        None => envelope,
    };
    let message = BusMessage::decode(channel.clone(), Bytes::from(stripped))
        .map_err(|e| format!("not an envelope of {channel}: {e}"))?;
    message
        .id_split()
        .ok_or_else(|| "the envelope's id is not where the protocol puts it".to_string())
}

#[cfg(test)]
#[path = "dead_letters_tests.rs"]
mod tests;
