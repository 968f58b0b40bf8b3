//! The writer's glue for durable channels ([`stream_writer`](super::super::stream_writer)):
//! what was buffered during an outage goes out first, in order, and a batch waits behind
//! a buffer that cannot go yet. A child of `publisher` so it can drive the writer's
//! connection and failure handling; the durable logic itself is in `stream_writer`.

use super::{metrics, BusMessage, Instant, Writer};

impl Writer {
    /// Sends `batch`, after the durable envelopes buffered during an outage (which go
    /// first, in order); while those cannot go, the batch's durable envelopes queue
    /// behind them.
    pub(super) async fn send_batch(&mut self, batch: &mut Vec<BusMessage>) {
        if self.streams.has_backlog() {
            self.send_backlog().await;
            if self.streams.has_backlog() {
                let reason = if self.conn.is_some() {
                    "redis_loading"
                } else {
                    "redis_down"
                };
                let dropped = self.streams.stash(batch);
                metrics::envelopes_publish_failed(dropped, reason);
                return;
            }
        }
        self.send_one(batch).await;
    }

    /// Appends the buffered durable envelopes, oldest first, while the connection takes
    /// them; then announces what the buffer had to drop.
    pub(super) async fn send_backlog(&mut self) {
        let batch_max = self.config.publish_batch_max.max(1);
        while self.streams.has_backlog() && !self.paused() {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            // Before taking a chunk: it may skip envelopes a lost reply already appended.
            if let Err(failure) = self.streams.prepare(conn).await {
                return self.failed(failure);
            }
            let mut chunk = self.streams.take_chunk(batch_max);
            self.send_one(&mut chunk).await;
        }
        // Once the buffer is through: the count of what it dropped is final.
        if self.conn.is_some() && !self.streams.has_backlog() {
            self.streams.announce_gaps();
        }
    }

    /// `LOADING`: nothing is sent until the pause is over.
    fn paused(&self) -> bool {
        self.paused_until
            .is_some_and(|until| Instant::now() < until)
    }
}
