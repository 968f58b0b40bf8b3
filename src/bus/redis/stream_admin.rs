//! Reading and repairing durable streams for operators (PROTOCOL §3; docs/protocol.md §6):
//! the Redis side of `/api/streams…` and of the stream monitor.
//!
//! - [`list`]: the streams in the registry SET `{p}streams`, one `SSCAN` page at a time,
//!   with their length and dead-letter count.
//! - [`info`]: one stream's `XINFO STREAM` / `XINFO GROUPS` / `XINFO CONSUMERS` and its
//!   dead-letter count.
//! - [`figures`]: what the monitor needs of one stream, in one round trip; [`consumers`]
//!   and [`destroy_group`] for its garbage collection.
//!
//! Dead letters are [`super::dead_letters`]'.
//!
//! Every reply is bounded: pages, groups and consumers are capped here. This module owns
//! the commands and the parsing of their replies (RESP2 arrays or RESP3 maps); it does not
//! speak HTTP (`http::streams`) nor decide what is healthy (`stream_monitor`).

use ::redis::aio::MultiplexedConnection;
use ::redis::{RedisError, Value};
use serde::Serialize;

use super::error::{Recovery, RedisFailure};
use crate::durable::{dead_key, registry_key, stream_key};
use crate::event::Channel;
use crate::metrics::streams::{GroupFigures, StreamFigures};

/// Most entries of one page (streams, dead letters).
pub const MAX_PAGE: usize = 100;
/// Most groups [`info`] lists.
pub const MAX_GROUPS: usize = 100;
/// Most consumers [`info`] lists per group; a group with more than
/// [`MAX_CONSUMERS_READ`] is not asked for them at all (the reply would be unbounded).
pub const MAX_CONSUMERS: usize = 100;
pub const MAX_CONSUMERS_READ: u64 = 1_000;
/// `SSCAN` calls of one [`list`] page at most.
const MAX_SCANS: usize = 16;

/// Why an admin query failed, by what the caller should answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no stream for channel `{0}`")]
    NotFound(String),
    #[error("no dead letter `{0}`")]
    NoDeadLetter(String),
    #[error("`{0}` is a {1}, not a stream")]
    WrongType(String, String),
    /// Connection failures, `LOADING`, `READONLY`: try again later.
    #[error("Redis is unavailable: {0}")]
    Unavailable(String),
    /// Any other error reply (`NOPERM`, `OOM`, …).
    #[error("{0}")]
    Redis(RedisFailure),
}

impl From<RedisError> for AdminError {
    fn from(e: RedisError) -> Self {
        let failure = RedisFailure::classify(&e);
        match failure.recovery() {
            Recovery::Reconnect | Recovery::WaitAndRetry(_) => {
                AdminError::Unavailable(failure.to_string())
            }
            _ => AdminError::Redis(failure),
        }
    }
}

/// One stream of a [`list`] page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamSummary {
    pub channel: String,
    /// `None`: the registry names it but Redis holds no stream there.
    pub length: Option<u64>,
    pub dead_letters: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamPage {
    pub streams: Vec<StreamSummary>,
    /// Channels in the registry (`SCARD`).
    pub total: u64,
    /// Pass as `cursor` for the next page; `None` at the end. An `SSCAN` page may repeat
    /// a name seen on an earlier page when the set was resized in between.
    pub next_cursor: Option<String>,
}

/// A page of the registry, from `cursor` (`0`: the start), about `count` names.
pub async fn list(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    cursor: u64,
    count: usize,
) -> Result<StreamPage, AdminError> {
    let registry = registry_key(prefix);
    let count = count.clamp(1, MAX_PAGE);
    let total: u64 = ::redis::cmd("SCARD")
        .arg(&registry)
        .query_async(conn)
        .await?;
    let mut names = Vec::new();
    let mut cursor = cursor;
    for _ in 0..MAX_SCANS {
        let (next, members): (u64, Vec<Vec<u8>>) = ::redis::cmd("SSCAN")
            .arg(&registry)
            .arg(cursor)
            .arg("COUNT")
            .arg(count)
            .query_async(conn)
            .await?;
        // Only channel names: anything else in the set is not ours to show.
        names.extend(
            members
                .iter()
                .filter_map(|m| std::str::from_utf8(m).ok())
                .filter(|m| Channel::parse(m).is_ok())
                .map(str::to_string),
        );
        cursor = next;
        if cursor == 0 || names.len() >= count {
            break;
        }
    }
    names.sort();
    names.dedup();
    let mut streams = Vec::with_capacity(names.len());
    for channel in names {
        let key = stream_key(prefix, &channel);
        // TYPE first: a key of another type would fail the XLEN (and the whole page).
        let (kind, dead_kind): (String, String) = ::redis::pipe()
            .cmd("TYPE")
            .arg(&key)
            .cmd("TYPE")
            .arg(dead_key(&key))
            .query_async(conn)
            .await?;
        let length = match kind.as_str() {
            "stream" => Some(::redis::cmd("XLEN").arg(&key).query_async(conn).await?),
            _ => None,
        };
        let dead_letters = match dead_kind.as_str() {
            "stream" => Some(
                ::redis::cmd("XLEN")
                    .arg(dead_key(&key))
                    .query_async(conn)
                    .await?,
            ),
            "none" => Some(0),
            _ => None,
        };
        streams.push(StreamSummary {
            channel,
            length,
            dead_letters,
        });
    }
    Ok(StreamPage {
        streams,
        total,
        next_cursor: (cursor != 0).then(|| cursor.to_string()),
    })
}

/// Everything `GET /api/streams/{channel}` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    pub channel: String,
    pub key: String,
    pub length: u64,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub last_generated_id: Option<String>,
    /// Redis ≥ 7.0.
    pub max_deleted_id: Option<String>,
    /// Redis ≥ 7.0: entries ever appended.
    pub entries_added: Option<u64>,
    /// Groups on the stream; at most [`MAX_GROUPS`] are listed in `groups`.
    pub group_count: u64,
    pub groups: Vec<GroupInfo>,
    pub dead_letters: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    pub name: String,
    pub consumer_count: u64,
    /// At most [`MAX_CONSUMERS`]; empty when the group has over [`MAX_CONSUMERS_READ`].
    pub consumers: Vec<ConsumerInfo>,
    pub pending: u64,
    pub last_delivered_id: Option<String>,
    /// Redis ≥ 7.0.
    pub entries_read: Option<u64>,
    /// Entries not yet delivered to the group. Redis ≥ 7.0 reports it (null when it cannot
    /// tell, e.g. after deletions); before 7.0 it is 0 when the group has read up to the
    /// last id, otherwise null.
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerInfo {
    pub name: String,
    pub pending: u64,
    /// Since its last attempted read or claim.
    pub idle_ms: u64,
    /// Redis ≥ 7.2: since its last successful one.
    pub inactive_ms: Option<i64>,
}

/// One stream's state; [`AdminError::NotFound`] when no stream exists for `channel`.
pub async fn info(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &Channel,
) -> Result<StreamInfo, AdminError> {
    let key = stream_key(prefix, channel.as_str());
    let kind: String = ::redis::cmd("TYPE").arg(&key).query_async(conn).await?;
    match kind.as_str() {
        "stream" => {}
        "none" => return Err(AdminError::NotFound(channel.to_string())),
        other => return Err(AdminError::WrongType(key, other.to_string())),
    }
    let (stream, groups, dead_letters): (Value, Value, u64) = ::redis::pipe()
        .cmd("XINFO")
        .arg("STREAM")
        .arg(&key)
        .cmd("XINFO")
        .arg("GROUPS")
        .arg(&key)
        .cmd("XLEN")
        .arg(dead_key(&key))
        .query_async(conn)
        .await?;
    let mut info = StreamInfo {
        channel: channel.to_string(),
        key: key.clone(),
        length: 0,
        first_id: None,
        last_id: None,
        last_generated_id: None,
        max_deleted_id: None,
        entries_added: None,
        group_count: 0,
        groups: Vec::new(),
        dead_letters,
    };
    for (name, value) in pairs(stream) {
        match name.as_str() {
            "length" => info.length = number(&value).unwrap_or(0),
            "first-entry" => info.first_id = entry_id(&value),
            "last-entry" => info.last_id = entry_id(&value),
            "last-generated-id" => info.last_generated_id = text(&value),
            "max-deleted-entry-id" => info.max_deleted_id = text(&value),
            "entries-added" => info.entries_added = number(&value),
            "groups" => info.group_count = number(&value).unwrap_or(0),
            _ => {}
        }
    }
    for group in list_of(groups).into_iter().take(MAX_GROUPS) {
        let mut g = group_info(pairs(group));
        if g.lag.is_none() && g.entries_read.is_none() {
            // Before Redis 7.0: only "read up to the end" can be told.
            let at_end = info.length == 0
                || (g.last_delivered_id.is_some() && g.last_delivered_id == info.last_generated_id);
            g.lag = at_end.then_some(0);
        }
        if g.consumer_count > 0 && g.consumer_count <= MAX_CONSUMERS_READ {
            let consumers: Value = ::redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&key)
                .arg(&g.name)
                .query_async(conn)
                .await?;
            g.consumers = list_of(consumers)
                .into_iter()
                .take(MAX_CONSUMERS)
                .map(|c| consumer_info(pairs(c)))
                .collect();
        }
        info.groups.push(g);
    }
    Ok(info)
}

/// Lengths and groups of one stream, for the monitor, in one round trip; `None` when the
/// stream does not exist (any more).
pub async fn figures(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &str,
) -> Result<Option<StreamFigures>, AdminError> {
    let key = stream_key(prefix, channel);
    let reply: Result<(u64, u64, Value), RedisError> = ::redis::pipe()
        .cmd("XLEN")
        .arg(&key)
        .cmd("XLEN")
        .arg(dead_key(&key))
        .cmd("XINFO")
        .arg("GROUPS")
        .arg(&key)
        .query_async(conn)
        .await;
    let (length, dead_letters, groups) = match reply {
        Ok(r) => r,
        // `XINFO GROUPS` of a missing key: the stream is gone.
        Err(e) if e.to_string().contains("no such key") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let groups = list_of(groups)
        .into_iter()
        .map(|g| {
            let g = group_info(pairs(g));
            GroupFigures {
                name: g.name,
                consumers: g.consumer_count,
                pending: g.pending,
                lag: g.lag,
            }
        })
        .collect();
    Ok(Some(StreamFigures {
        channel: channel.to_string(),
        length,
        dead_letters,
        groups,
    }))
}

/// The consumers of a group (for garbage collection): (name, idle ms), at most
/// [`MAX_CONSUMERS_READ`] asked for.
pub async fn consumers(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &str,
    group: &str,
) -> Result<Vec<ConsumerInfo>, AdminError> {
    let consumers: Value = ::redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream_key(prefix, channel))
        .arg(group)
        .query_async(conn)
        .await?;
    Ok(list_of(consumers)
        .into_iter()
        .map(|c| consumer_info(pairs(c)))
        .collect())
}

/// `XGROUP DESTROY`; true when the group existed.
pub async fn destroy_group(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    channel: &str,
    group: &str,
) -> Result<bool, AdminError> {
    let n: u64 = ::redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(stream_key(prefix, channel))
        .arg(group)
        .query_async(conn)
        .await?;
    Ok(n > 0)
}

fn group_info(fields: Vec<(String, Value)>) -> GroupInfo {
    let mut g = GroupInfo {
        name: String::new(),
        consumer_count: 0,
        consumers: Vec::new(),
        pending: 0,
        last_delivered_id: None,
        entries_read: None,
        lag: None,
    };
    for (name, value) in fields {
        match name.as_str() {
            "name" => g.name = text(&value).unwrap_or_default(),
            "consumers" => g.consumer_count = number(&value).unwrap_or(0),
            "pending" => g.pending = number(&value).unwrap_or(0),
            "last-delivered-id" => g.last_delivered_id = text(&value),
            "entries-read" => g.entries_read = number(&value),
            "lag" => g.lag = number(&value),
            _ => {}
        }
    }
    g
}

fn consumer_info(fields: Vec<(String, Value)>) -> ConsumerInfo {
    let mut c = ConsumerInfo {
        name: String::new(),
        pending: 0,
        idle_ms: 0,
        inactive_ms: None,
    };
    for (name, value) in fields {
        match name.as_str() {
            "name" => c.name = text(&value).unwrap_or_default(),
            "pending" => c.pending = number(&value).unwrap_or(0),
            "idle" => c.idle_ms = number(&value).unwrap_or(0),
            "inactive" => c.inactive_ms = signed(&value),
            _ => {}
        }
    }
    c
}

/// The (name, value) pairs of an `XINFO` reply: a RESP2 flat array or a RESP3 map.
fn pairs(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, v)| Some((text(&k)?, v)))
            .collect(),
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len() / 2);
            let mut it = a.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = text(&k) {
                    out.push((k, v));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

fn list_of(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        _ => Vec::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn signed(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn number(v: &Value) -> Option<u64> {
    signed(v).and_then(|i| u64::try_from(i).ok())
}

/// The id of an entry reply `[id, [field, value, …]]` (nil: no entry).
fn entry_id(v: &Value) -> Option<String> {
    match v {
        Value::Array(a) => a.first().and_then(text),
        _ => None,
    }
}

#[cfg(test)]
#[path = "stream_admin_tests.rs"]
mod tests;
