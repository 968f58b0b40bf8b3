//! The latest-value store: what a late-joining bot gets before live events.
//!
//! Reads `{p}snapshot:{channel}` for `book` channels and `{p}last:{channel}` for `ticker`
//! and `candle` channels (written by the publisher); other types have no latest value.
//! It owns no background task.
//!
//! Reconnect behaviour:
//!
//! - [`RedisStore::connect`] connects once and fails with a clear error if Redis is
//!   unreachable.
//! - Any error on a `GET` (or a reply slower than `probe_timeout_ms`) is returned to the
//!   caller and drops the connection; the next call connects afresh. There is no backoff:
//!   calls are driven by bot subscriptions, and each one waits at most the timeout.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::Client;
use bytes::Bytes;

use super::{connect, io_timeout, last_key, redact, snapshot_key};
use crate::bus::{BusError, SnapshotStore, StoreFuture};
use crate::config::RedisConfig;
use crate::envelope::{BusMessage, DecodePolicy};
use crate::event::{Channel, EventType};

/// Reads the latest-value keys; implements [`SnapshotStore`].
pub struct RedisStore {
    client: Client,
    prefix: String,
    timeout: Duration,
    conn: Mutex<Option<MultiplexedConnection>>,
    /// Values are checked like pub/sub envelopes: size, signature, event vs channel; a
    /// refused one counts as no value (counted, logged at most every 10 s).
    policy: DecodePolicy,
    invalid_log: crate::bus::throttle::Throttle,
}

impl RedisStore {
    /// Connects to `config.url`.
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, BusError> {
        let unreachable = |reason: String| BusError::Unreachable {
            url: redact(&config.url),
            reason,
        };
        let client = Client::open(config.url.as_str()).map_err(|e| unreachable(e.to_string()))?;
        let timeout = io_timeout(config);
        let conn = connect(&client, timeout)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(RedisStore {
            client,
            prefix: config.key_prefix.clone(),
            timeout,
            conn: Mutex::new(Some(conn)),
            policy: DecodePolicy::from_config(config),
            invalid_log: crate::bus::throttle::Throttle::new(Duration::from_secs(10)),
        })
    }

    fn slot(&self) -> MutexGuard<'_, Option<MultiplexedConnection>> {
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
        let current = self.slot().clone();
        let mut conn = match current {
            Some(c) => c,
            None => {
                let c = connect(&self.client, self.timeout).await?;
                self.slot().get_or_insert(c).clone()
            }
        };
        let reply: ::redis::RedisResult<Option<Vec<u8>>> =
            ::redis::cmd("GET").arg(key).query_async(&mut conn).await;
        match reply {
            Ok(v) => Ok(v),
            Err(e) => {
                // Whatever failed, a fresh connection next time is the cheap safe choice.
                *self.slot() = None;
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
                Some(bytes) => {
                    match BusMessage::decode_with(channel, Bytes::from(bytes), &self.policy) {
                        Ok(m) => Ok(Some(m)),
                        Err(e) => {
                            crate::metrics::envelope_invalid(e.reason());
                            if let Some(suppressed) = self.invalid_log.allow() {
                                let cause: String =
                                    e.to_string().escape_debug().take(300).collect();
                                tracing::warn!(%key, reason = e.reason(), %cause, suppressed, "latest-value key from redis refused");
                            }
                            Ok(None)
                        }
                    }
                }
                None => Ok(None),
            }
        })
    }
}
