//! The latest-value store: what a late-joining bot gets before live events.
//!
//! Reads `{p}snapshot:{channel}` for `book` channels and `{p}last:{channel}` for `ticker`
//! and `candle` channels (written by the publisher); other types have no latest value.
//! It owns no background task.
//!
//! Reconnect behaviour (every connect asks the [`Target`]: with Sentinel, the current
//! master; a connection whose master the sentinels no longer name is dropped before use):
//!
//! - [`RedisStore::connect`] connects once and fails with a clear error if Redis is
//!   unreachable.
//! - Any error on a `GET` is returned to the caller. A connection failure (or a reply
//!   slower than `probe_timeout_ms`, or `READONLY`) also drops the connection and the next
//!   call connects afresh; an error reply on a live connection keeps it. There is no backoff:
//!   calls are driven by bot subscriptions, and each one waits at most the timeout.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;

use super::target::{MasterWatch, Target};
use super::{last_key, snapshot_key, Recovery, RedisFailure};
use crate::bus::{BusError, SnapshotStore, StoreFuture};
use crate::config::RedisConfig;
use crate::envelope::BusMessage;
use crate::event::{Channel, EventType};

/// Reads the latest-value keys; implements [`SnapshotStore`].
pub struct RedisStore {
    /// Asked on every (re)connect: with Sentinel, the current master.
    target: Target,
    prefix: String,
    /// The connection and (Sentinel) the watch on its master; a watch that fired drops
    /// the connection before the next `GET`.
    conn: Mutex<Option<(MultiplexedConnection, Arc<MasterWatch>)>>,
}

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
            conn: Mutex::new(Some((conn, watch))),
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

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, BusError> {
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
        let mut conn = match current {
            Some(c) => c,
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
                self.slot().get_or_insert((c, watch)).0.clone()
            }
        };
        let reply: ::redis::RedisResult<Option<Vec<u8>>> =
            ::redis::cmd("GET").arg(key).query_async(&mut conn).await;
        match reply {
            Ok(v) => Ok(v),
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
}

impl SnapshotStore for RedisStore {
    fn latest(&self, channel: &Channel) -> StoreFuture<'_> {
        let channel = channel.clone();
        Box::pin(async move {
            let Some(key) = self.key(&channel) else {
                return Ok(None);
            };
            match self.get(&key).await? {
                Some(bytes) => Ok(Some(BusMessage::decode(channel, Bytes::from(bytes))?)),
                None => Ok(None),
            }
        })
    }
}
