//! The reads of a `since` replay: one spawned task per read, paced by the client's queue,
//! bounded in time, its answer sent back as [`Command::Replayed`]; and the first read's
//! verdict (bounds, truncation, where to start). No router state here.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::bus::{BusError, SnapshotStore, StreamBounds, StreamPage, StreamStore};
use crate::durable::StreamId;
use crate::envelope::BusMessage;
use crate::event::Channel;
use crate::gateway::client::ClientQueue;
use crate::gateway::router::Command;

/// One stream read that does not answer within this fails the replay.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a paused replay looks at its client's queue again.
const PACE_EVERY: Duration = Duration::from_millis(10);

/// What a replay read brought back (errors as text: they go to the bot and the log).
pub enum Replayed {
    /// The first read: the truncation verdict and the first page.
    Start {
        truncated: Option<String>,
        page: Option<StreamPage>,
        /// The newest id the stream ever had (`MIN`: no stream): a `since` past it is
        /// brought back to it, so live events after it are not taken for duplicates.
        last: StreamId,
    },
    Page(StreamPage),
    Failed(String),
}

/// Spawns one replay read: it waits until `queue` is at most half full (backpressure),
/// runs `read` bounded by [`READ_TIMEOUT`] and sends the answer as [`Command::Replayed`].
pub(super) fn spawn_read<F>(
    commands: &mpsc::Sender<Command>,
    queue: &Arc<ClientQueue>,
    channel: &Channel,
    fetch: u64,
    read: impl FnOnce(Channel) -> F + Send + 'static,
) -> AbortHandle
where
    F: std::future::Future<Output = Replayed> + Send,
{
    let commands = commands.clone();
    let queue = queue.clone();
    let channel = channel.clone();
    let task = tokio::spawn(async move {
        while queue.market_len() > queue.capacity() / 2 {
            if queue.is_closing() {
                return;
            }
            tokio::time::sleep(PACE_EVERY).await;
        }
        let client = queue.id();
        drop(queue);
        let result = match tokio::time::timeout(READ_TIMEOUT, read(channel.clone())).await {
            Ok(r) => r,
            Err(_) => Replayed::Failed(format!("no answer within {} s", READ_TIMEOUT.as_secs())),
        };
        // The router is gone only during shutdown; nobody needs the answer then.
        let _ = commands
            .send(Command::Replayed {
                client,
                channel,
                fetch,
                result,
            })
            .await;
    });
    task.abort_handle()
}

/// The first read of a replay: bounds, the truncation verdict, where to start, and the
/// first page.
pub(super) async fn start(
    streams: &dyn StreamStore,
    channel: &Channel,
    since: StreamId,
    max_replay: u64,
    asked: usize,
) -> Replayed {
    match start_inner(streams, channel, since, max_replay, asked).await {
        Ok(r) => r,
        Err(e) => Replayed::Failed(e.to_string()),
    }
}

async fn start_inner(
    streams: &dyn StreamStore,
    channel: &Channel,
    since: StreamId,
    max_replay: u64,
    asked: usize,
) -> Result<Replayed, BusError> {
    let Some(bounds) = streams.bounds(channel).await? else {
        // No stream: nothing to replay; lost history unless the bot had nothing yet.
        let truncated = (since > StreamId::MIN).then(|| {
            format!("no stream holds {channel} any more: entries after {since} may be lost")
        });
        return Ok(Replayed::Start {
            truncated,
            page: None,
            last: StreamId::MIN,
        });
    };
    let mut truncated =
        lost_after(&bounds, since).then(|| {
            format!(
            "entries after {since} were trimmed from the stream; replaying what it still holds{}",
            bounds.first.map(|f| format!(" (from {f})")).unwrap_or_default()
        )
        });
    let Some(mut from) = since.next().filter(|_| since < bounds.last) else {
        return Ok(Replayed::Start {
            truncated,
            page: None,
            last: bounds.last,
        });
    };
    if bounds.len > max_replay {
        // More entries than the budget may follow `since`: start at the newest ones.
        let (walked, oldest) = streams
            .count_back(channel, since, max_replay.saturating_add(1))
            .await?;
        if walked > max_replay {
            if let Some(next) = oldest.and_then(StreamId::next) {
                from = next;
                truncated = Some(format!(
                    "more than {max_replay} entries follow {since} (durable.max_replay): replaying the newest {max_replay}"
                ));
            }
        }
    }
    let page = streams.range(channel, from, asked).await?;
    Ok(Replayed::Start {
        truncated,
        page: Some(page),
        last: bounds.last,
    })
}

/// Whether entries after `since` may have been deleted: an `XDEL` past it, or `since`
/// older than the oldest entry held while the stream has lost entries. Redis does not
/// record which ids trimming removed, so a `since` just before the oldest held entry counts
/// too (the replay then still delivers everything held: nothing is lost by the caution).
fn lost_after(bounds: &StreamBounds, since: StreamId) -> bool {
    if bounds.added == Some(bounds.len) {
        // Nothing was ever trimmed or deleted from this stream, yet `since` (not the
        // stream's start) is older than all of it: the stream is younger than the bot's
        // history (Redis restarted without persistence, or the key was recreated).
        return since != StreamId::MIN && bounds.first.is_some_and(|first| since < first);
    }
    if bounds.max_deleted.is_some_and(|d| d > since) {
        return true;
    }
    match bounds.first {
        Some(first) => since < first,
        None => since < bounds.last,
    }
}

/// A durable channel's latest value: the stream's newest entry (it carries its id), else
/// the `last:` key.
pub(in crate::gateway::router) async fn durable_latest(
    streams: Arc<dyn StreamStore>,
    store: Arc<dyn SnapshotStore>,
    channel: Channel,
) -> Result<Option<BusMessage>, BusError> {
    match streams.newest(&channel).await? {
        Some(msg) => Ok(Some(msg)),
        None => store.latest(&channel).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(len: u64, first: u64, last: u64, added: u64) -> StreamBounds {
        StreamBounds {
            len,
            first: Some(StreamId::new(first, 0)),
            last: StreamId::new(last, 0),
            max_deleted: Some(StreamId::MIN),
            added: Some(added),
        }
    }

    #[test]
    fn history_is_lost_when_trimmed_past_since_or_when_the_stream_is_younger_than_it() {
        let id = |ms| StreamId::new(ms, 0);
        // Trimmed: 10 added, 5 held from 6.
        assert!(lost_after(&bounds(5, 6, 10, 10), id(3)));
        assert!(!lost_after(&bounds(5, 6, 10, 10), id(7)));
        // Never trimmed, and since is inside what is held: nothing lost.
        assert!(!lost_after(&bounds(5, 1, 5, 5), id(2)));
        // Never trimmed but older than all of it: a recreated stream (Redis restarted
        // without persistence) does not hold the bot's history.
        assert!(lost_after(&bounds(5, 100, 104, 5), id(50)));
        // From the very start is never "lost".
        assert!(!lost_after(&bounds(5, 100, 104, 5), StreamId::MIN));
    }
}
