//! The router's reads of the [`SnapshotStore`](crate::bus::SnapshotStore): one spawned task
//! per read (after an optional delay), its answer sent back as [`Command::Stored`]. A newer
//! read replaces (cancels) an older one of the same channel, and an answer is used only if
//! it belongs to the channel's current read, so a late answer never undoes a newer state.

use std::time::{Duration, Instant};

use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{book_cache, replay, Cache, ChannelState, Command, Next, Router};
use crate::bus::StoredBook;
use crate::envelope::BusMessage;
use crate::event::Channel;
use replay::fan_out_except;

/// A store that does not answer within this is treated as failed (and read again later).
const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one log line about failed store reads per this period.
const STORE_WARN_EVERY: Duration = Duration::from_secs(10);

/// What a store read brought back (errors as text: they are only logged).
pub enum Fetched {
    Latest(Result<Option<BusMessage>, String>),
    Book(Result<Option<StoredBook>, String>),
}

/// A store read under way (or waiting for its delay). Dropping it cancels the read.
pub(super) struct Fetch {
    id: u64,
    task: AbortHandle,
}

impl Drop for Fetch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Router {
    /// Reads the store for `channel` after `delay` (replacing any read under way); the
    /// answer comes back as [`Command::Stored`].
    pub(super) fn fetch(&mut self, channel: &Channel, delay: Duration) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let Some(state) = self.channels.get_mut(channel) else {
            return;
        };
        let book = match state.cache {
            Cache::Nothing => return,
            Cache::Latest { .. } => false,
            Cache::Book(_) => true,
        };
        self.next_fetch += 1;
        let id = self.next_fetch;
        let commands = self.commands.clone();
        // A durable channel's latest value comes from its stream (it carries its id).
        let streams = self.replay.durable_streams(channel);
        let channel = channel.clone();
        let key = channel.clone();
        let task = tokio::spawn(async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let result = if book {
                Fetched::Book(bounded(&channel, store.book(&channel)).await)
            } else if let Some(streams) = streams {
                let read = replay::durable_latest(streams, store, channel.clone());
                Fetched::Latest(bounded(&channel, read).await)
            } else {
                Fetched::Latest(bounded(&channel, store.latest(&channel)).await)
            };
            // The router is gone only during shutdown; nobody needs the answer then.
            let _ = commands
                .send(Command::Stored {
                    channel,
                    fetch: id,
                    result,
                })
                .await;
        });
        if let Some(state) = self.channels.get_mut(&key) {
            // Replacing a read cancels it.
            state.fetch = Some(Fetch {
                id,
                task: task.abort_handle(),
            });
        }
    }

    pub(super) fn on_stored(&mut self, channel: Channel, fetch: u64, result: Fetched) {
        // Clients replaying it (`since`) have that history already, or get it live.
        let skip = self.replay.skip_stored(&channel);
        let Some(state) = self.channels.get_mut(&channel) else {
            return;
        };
        if state.fetch.as_ref().map(|f| f.id) != Some(fetch) {
            // Superseded by a newer read.
            return;
        }
        // The task has finished: forget it without aborting anything that matters.
        state.fetch = None;
        let ChannelState {
            subscribers, cache, ..
        } = state;
        let watched = !subscribers.is_empty();
        let next = match (cache, result) {
            (Cache::Latest { value, failed }, Fetched::Latest(result)) => {
                count_fetch(result.as_ref().map(Option::is_some));
                match result {
                    // A live event that arrived meanwhile is newer than the stored one; and
                    // with nobody watching, no live event will replace a stored value: keep
                    // none.
                    Ok(Some(msg)) => {
                        *failed = 0;
                        if value.is_none() && watched && msg.channel == channel {
                            if let Ok(text) = Utf8Bytes::try_from(msg.event_json()) {
                                *value = Some((text.clone(), msg.ts_recv));
                                fan_out_except(subscribers, &skip, &text, msg.ts_recv);
                                // A durable value (with its id) from the stream: the
                                // consumer may still be behind it; what it brings up to
                                // that id would reach these bots twice, or out of order.
                                if let Some(id) = msg.id {
                                    self.durable.advance(&channel, id);
                                }
                            }
                        }
                        Next::Idle
                    }
                    Ok(None) => {
                        *failed = 0;
                        Next::Idle
                    }
                    // A `status` changes only on transitions: without another read, a bot
                    // that joined during the failure would never learn the current state.
                    Err(e) if watched && value.is_none() => {
                        let now = Instant::now();
                        if self
                            .store_warned
                            .is_none_or(|t| now.duration_since(t) >= STORE_WARN_EVERY)
                        {
                            self.store_warned = Some(now);
                            tracing::warn!(channel = %channel, cause = %e, "latest-value store lookup failed; retrying (further failures for 10 s not logged)");
                        }
                        let delay = book_cache::backoff(*failed);
                        *failed = failed.saturating_add(1);
                        Next::Fetch {
                            delay,
                            replace: true,
                        }
                    }
                    Err(_) => Next::Idle,
                }
            }
            (Cache::Book(cache), Fetched::Book(result)) => {
                count_fetch(result.as_ref().map(Option::is_some));
                if !watched {
                    return;
                }
                match result {
                    Ok(Some(stored)) => {
                        cache.on_stored(&channel, subscribers, stored, Instant::now())
                    }
                    Ok(None) => cache.on_missing(&channel, subscribers),
                    Err(e) => {
                        // One line per period: with Redis down, every book would say so.
                        let now = Instant::now();
                        if self
                            .store_warned
                            .is_none_or(|t| now.duration_since(t) >= STORE_WARN_EVERY)
                        {
                            self.store_warned = Some(now);
                            tracing::warn!(channel = %channel, cause = %e, "snapshot store lookup failed (further failures for 10 s not logged)");
                        }
                        cache.on_error()
                    }
                }
            }
            _ => Next::Idle,
        };
        self.apply(&channel, next);
    }
}

/// A store read bounded by [`STORE_TIMEOUT`]; errors become text.
async fn bounded<T>(
    channel: &Channel,
    read: impl std::future::Future<Output = Result<Option<T>, crate::bus::BusError>>,
) -> Result<Option<T>, String> {
    match tokio::time::timeout(STORE_TIMEOUT, read).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "{channel}: no answer within {} s",
            STORE_TIMEOUT.as_secs()
        )),
    }
}

fn count_fetch(result: Result<bool, &String>) {
    crate::metrics::store_fetch(match result {
        Ok(true) => "found",
        Ok(false) => "missing",
        Err(_) => "error",
    });
}
