//! The latest-value store: what a late-joining bot gets before live events.
//!
//! Reads `{p}snapshot:{channel}` for `book` channels and `{p}last:{channel}` for `ticker`,
//! `candle` and `status` channels (written by the publisher); trades have no latest value.
//! For books it also reads `{p}booklog:{channel}`, the publisher's short log of the book
//! messages published since (or shortly before) that snapshot, **in the same MULTI/EXEC**:
//! the snapshot and the log are one consistent view, so the gateway can replay the log's
//! deltas after the snapshot's `seq` and meet the live pub/sub deltas exactly.
//! It owns no background task and no retry policy (the router backs off).
//!
//! Bounds: a value's length is checked first (`STRLEN`), so a value over
//! `max_snapshot_bytes` is refused *without being transferred*; then `STRLEN` + `GETRANGE
//! 0 max-1` (+ the log) in one transaction, so a value that grew meanwhile still costs at
//! most the bound. The log's total size is checked in that first step too (`MEMORY USAGE
//! <log> SAMPLES 0`, exact for a list): a log over `max_booklog_bytes` is refused without
//! being transferred and the book is read without it ("no log": the router then waits for
//! a fresh snapshot key), as when `MEMORY USAGE` itself is refused (an ACL without
//! `+memory|usage`) or unknown. Otherwise the log is read as its newest `booklog_max`
//! entries and an entry over `max_snapshot_bytes` is dropped. A log that grows past the
//! budget between the two steps is transferred once (the next read refuses it): one RTT
//! of window, not one full log per subscribe. Refusals
//! (oversize, not an envelope of that channel, wrong key type) are counted in
//! `mdbridge_store_values_refused_total`, logged rate-limited, and answered as "nothing
//! stored".
//!
//! Reconnect behaviour (every connect asks the [`Target`]: with Sentinel, the current
//! master; a connection whose master the sentinels no longer name is dropped before use):
//!
//! - [`RedisStore::connect`] connects once and fails with a clear error if Redis is
//!   unreachable.
//! - Any error is returned to the caller. A connection failure (or a reply slower than
//!   `probe_timeout_ms`, or `READONLY`) also drops the connection and the next call
//!   connects afresh; an error reply on a live connection keeps it. There is no backoff
//!   here: calls are driven by bot subscriptions, each waits at most the timeout, and the
//!   router spaces its retries out.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;

use super::target::{MasterWatch, Target};
use super::{last_key, snapshot_key, Recovery, RedisFailure};
use crate::bus::{BookFuture, BusError, SnapshotStore, StoreFuture, StoredBook};
use crate::config::RedisConfig;
use crate::envelope::{BusMessage, DecodePolicy};
use crate::event::{Channel, EventType};
use crate::metrics;

/// The catch-up log of a book channel: `{p}booklog:{channel}`, a list of envelopes.
pub fn booklog_key(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}booklog:{channel}")
}

/// Reads the latest-value keys; implements [`SnapshotStore`].
pub struct RedisStore {
    /// Asked on every (re)connect: with Sentinel, the current master.
    target: Target,
    pub(super) prefix: String,
    max_bytes: u64,
    max_log: usize,
    /// Largest booklog (whole list, `MEMORY USAGE`) read.
    max_log_bytes: u64,
    /// The connection and (Sentinel) the watch on its master; a watch that fired drops
    /// the connection before the next `GET`.
    conn: Mutex<Option<(MultiplexedConnection, Arc<MasterWatch>)>>,
    /// When the last refusal was logged (one line per 10 s).
    refused_log: Mutex<Option<Instant>>,
    /// Values are checked like pub/sub envelopes: size, signature, event vs channel.
    pub(super) policy: DecodePolicy,
}

/// `STRLEN`, bounded `GETRANGE`, and the log entries when asked for.
type RawRead = (u64, Vec<u8>, Option<Vec<Vec<u8>>>);

const REFUSED_LOG_EVERY: Duration = Duration::from_secs(10);

impl RedisStore {
    /// Connects to `config.url` (with Sentinel: to the master the sentinels name).
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, BusError> {
        let target = Target::new(config, "store")?;
        let (conn, resolved) = target.connect().await.map_err(|e| BusError::Unreachable {
            url: target.describe(),
            reason: e.to_string(),
        })?;
        let watch = Arc::new(target.watch(&resolved));
        Ok(RedisStore {
            target,
            prefix: config.key_prefix.clone(),
            max_bytes: config.max_snapshot_bytes.max(1) as u64,
            max_log: config.booklog_max.max(1),
            max_log_bytes: config.max_booklog_bytes.max(1) as u64,
            conn: Mutex::new(Some((conn, watch))),
            refused_log: Mutex::new(None),
            policy: DecodePolicy::from_config(config),
        })
    }

    fn slot(&self) -> MutexGuard<'_, Option<(MultiplexedConnection, Arc<MasterWatch>)>> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The key holding `channel`'s latest value, if its type has one.
    fn key(&self, channel: &Channel) -> Option<String> {
        match channel.kind() {
            EventType::Book => Some(snapshot_key(&self.prefix, channel)),
            EventType::Ticker | EventType::Candle | EventType::Status => {
                Some(last_key(&self.prefix, channel))
            }
            EventType::Trade => None,
        }
    }

    pub(super) async fn conn(&self) -> Result<MultiplexedConnection, BusError> {
        // The multiplexed connection is shared by cloning. The lock only guards the slot and
        // is never held across an await: while Redis is down each caller tries (and times
        // out) on its own instead of queueing behind one another's connect attempts.
        let current = {
            let mut slot = self.slot();
            if slot.as_ref().is_some_and(|(_, watch)| watch.has_moved()) {
                // The sentinels name another master: this connection is to the old one.
                *slot = None;
            }
            slot.as_ref().map(|(c, _)| c.clone())
        };
        match current {
            Some(c) => Ok(c),
            None => {
                let (c, resolved) =
                    self.target
                        .connect()
                        .await
                        .map_err(|e| BusError::Unreachable {
                            url: self.target.describe(),
                            reason: e.to_string(),
                        })?;
                let watch = Arc::new(self.target.watch(&resolved));
                Ok(self.slot().get_or_insert((c, watch)).0.clone())
            }
        }
    }

    /// The value of `key` (and the entries of `log`), bounded: a `STRLEN` (and the log's
    /// `MEMORY USAGE`) first, so an oversize value (or log) is refused without being
    /// transferred; then `STRLEN` + `GETRANGE 0
    /// max-1` (+ `LRANGE`) as one transaction, so even a value that grew in between costs
    /// at most the bound. `None` when the key is absent or its value was refused.
    async fn read(
        &self,
        key: &str,
        log: Option<&str>,
    ) -> Result<Option<(Vec<u8>, Vec<Vec<u8>>)>, BusError> {
        let mut conn = self.conn().await?;
        let (len, log) = self.first_step(&mut conn, key, log).await?;
        let len = match len {
            None | Some(0) => return Ok(None),
            Some(len) => len,
        };
        if self.oversize(key, len) {
            return Ok(None);
        }
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("STRLEN")
            .arg(key)
            .cmd("GETRANGE")
            .arg(key)
            .arg(0)
            .arg(self.max_bytes.saturating_sub(1));
        if let Some(log) = log {
            pipe.cmd("LRANGE")
                .arg(log)
                .arg(-(self.max_log as i64))
                .arg(-1);
        }
        let reply: ::redis::RedisResult<RawRead> = if log.is_some() {
            pipe.query_async(&mut conn).await
        } else {
            pipe.query_async::<(u64, Vec<u8>)>(&mut conn)
                .await
                .map(|(n, v)| (n, v, None))
        };
        let Some((len, value, entries)) = self.check(key, reply)? else {
            return Ok(None);
        };
        if len == 0 || self.oversize(key, len) {
            return Ok(None);
        }
        let mut log_entries = entries.unwrap_or_default();
        let before = log_entries.len();
        log_entries.retain(|e| e.len() as u64 <= self.max_bytes);
        if log_entries.len() != before {
            self.refused(
                log.unwrap_or_default(),
                "oversize",
                "log entries over redis.max_snapshot_bytes",
            );
        }
        Ok(Some((value, log_entries)))
    }

    /// `STRLEN key`, and with a log `MEMORY USAGE log SAMPLES 0` in the same round trip:
    /// the value's length (`None`: refused), and the log still worth reading (`None` when
    /// it is over `max_booklog_bytes` or its size could not be learnt).
    async fn first_step<'a>(
        &self,
        conn: &mut MultiplexedConnection,
        key: &str,
        log: Option<&'a str>,
    ) -> Result<(Option<u64>, Option<&'a str>), BusError> {
        let Some(log_key) = log else {
            let len: ::redis::RedisResult<u64> =
                ::redis::cmd("STRLEN").arg(key).query_async(conn).await;
            return Ok((self.check(key, len)?, None));
        };
        let mut pipe = ::redis::pipe();
        pipe.cmd("STRLEN")
            .arg(key)
            .cmd("MEMORY")
            .arg("USAGE")
            .arg(log_key)
            .arg("SAMPLES")
            .arg(0);
        // Item by item, so a refused `MEMORY USAGE` (NOPERM) does not fail the `STRLEN`.
        let replies = ::redis::aio::ConnectionLike::req_packed_commands(conn, &pipe, 0, 2).await;
        let (strlen, usage) = match replies {
            Ok(mut r) if r.len() == 2 => {
                let usage = r.pop().unwrap_or(::redis::Value::Nil);
                let strlen = r.pop().unwrap_or(::redis::Value::Nil);
                (strlen, usage)
            }
            Ok(r) => {
                let e = ::redis::RedisError::from((
                    ::redis::ErrorKind::ResponseError,
                    "unexpected pipeline reply",
                    format!("{} replies to 2 commands", r.len()),
                ));
                return self.check(key, Err::<u64, _>(e)).map(|l| (l, None));
            }
            Err(e) => return self.check(key, Err::<u64, _>(e)).map(|l| (l, None)),
        };
        let len = self.check(
            key,
            strlen
                .extract_error()
                .and_then(::redis::from_owned_redis_value::<u64>),
        )?;
        let log = match usage
            .extract_error()
            .and_then(::redis::from_owned_redis_value::<Option<u64>>)
        {
            // An absent log is read anyway: it may be written by now, and then belongs to
            // the snapshot read with it.
            Ok(None) => Some(log_key),
            Ok(Some(bytes)) if bytes <= self.max_log_bytes => Some(log_key),
            Ok(Some(bytes)) => {
                let e = BusError::TooLarge {
                    key: log_key.to_string(),
                    bytes,
                    limit: self.max_log_bytes,
                };
                self.refused(log_key, "oversize", &e.to_string());
                None
            }
            Err(e) => {
                // Without its size the log is not read (it could be any size): the book
                // syncs from the snapshot key alone. Grant `+memory|usage` to avoid this.
                self.refused(log_key, "unchecked", &e.to_string());
                None
            }
        };
        Ok((len, log))
    }

    /// A reply, or `None` (refused, counted) when something that is not ours sits under
    /// our key, or the error (the connection is dropped: a fresh one next time is the
    /// cheap safe choice).
    pub(super) fn check<T>(
        &self,
        key: &str,
        reply: ::redis::RedisResult<T>,
    ) -> Result<Option<T>, BusError> {
        match reply {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.code() == Some("WRONGTYPE") => {
                self.refused(key, "invalid", "the key holds the wrong Redis type");
                Ok(None)
            }
            Err(e) => {
                // A dead connection (or a replica after a failover) is replaced next time;
                // an error reply on a live one (NOPERM, LOADING...) keeps it.
                if RedisFailure::classify(&e).recovery() == Recovery::Reconnect {
                    *self.slot() = None;
                }
                Err(e.into())
            }
        }
    }

    fn oversize(&self, key: &str, len: u64) -> bool {
        if len <= self.max_bytes {
            return false;
        }
        let e = BusError::TooLarge {
            key: key.to_string(),
            bytes: len,
            limit: self.max_bytes,
        };
        self.refused(key, "oversize", &e.to_string());
        true
    }

    /// Decodes `bytes` as an envelope of `channel`, or counts and logs the refusal.
    fn decode(&self, key: &str, channel: &Channel, bytes: Vec<u8>) -> Option<BusMessage> {
        match BusMessage::decode_with(channel.clone(), Bytes::from(bytes), &self.policy) {
            Ok(m) => Some(m),
            Err(e) => {
                // Counted twice on purpose: as a refused stored value, and by the trust
                // boundary's reason (signature, wrong symbol...) like pub/sub envelopes.
                metrics::envelope_invalid(e.reason());
                self.refused(key, "invalid", &e.to_string());
                None
            }
        }
    }

    fn refused(&self, key: &str, reason: &'static str, detail: &str) {
        metrics::store_value_refused(reason);
        let mut last = self
            .refused_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= REFUSED_LOG_EVERY) {
            *last = Some(now);
            tracing::warn!(key, reason, detail, "stored value refused");
        }
    }
}

impl SnapshotStore for RedisStore {
    fn latest(&self, channel: &Channel) -> StoreFuture<'_> {
        let channel = channel.clone();
        Box::pin(async move {
            let Some(key) = self.key(&channel) else {
                return Ok(None);
            };
            Ok(self
                .read(&key, None)
                .await?
                .and_then(|(value, _)| self.decode(&key, &channel, value)))
        })
    }

    fn book(&self, channel: &Channel) -> BookFuture<'_> {
        let channel = channel.clone();
        Box::pin(async move {
            if channel.kind() != EventType::Book {
                return Ok(None);
            }
            let key = snapshot_key(&self.prefix, &channel);
            let log_key = booklog_key(&self.prefix, &channel);
            let Some((value, entries)) = self.read(&key, Some(&log_key)).await? else {
                return Ok(None);
            };
            let Some(snapshot) = self.decode(&key, &channel, value) else {
                return Ok(None);
            };
            // An entry that is not a book envelope of this channel is dropped here; if it
            // mattered, the chain check of the reader notices the hole.
            let log = entries
                .into_iter()
                .filter_map(|e| self.decode(&log_key, &channel, e))
                .filter(|m| m.book.is_some())
                .collect();
            Ok(Some(StoredBook { snapshot, log }))
        })
    }
}

#[cfg(test)]
mod tests;
