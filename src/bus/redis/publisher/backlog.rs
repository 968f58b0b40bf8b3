//! The writer's glue for durable channels ([`stream_writer`](super::super::stream_writer)):
//! what was buffered during an outage goes out first, in order, one chunk at a time, so
//! the writer's loop keeps draining its queue (and hears shutdown) while a large buffer
//! is appended. A child of `publisher` so it can drive the writer's connection and
//! failure handling; the durable logic itself is in `stream_writer`.

use super::{BusMessage, Instant, Writer};

impl Writer {
    /// Sends `batch`. While buffered durable envelopes wait, the batch's durable ones join
    /// the back of the buffer (so each channel stays in order), the others go out now, and
    /// one chunk of the buffer follows: it drains even under a constant inflow.
    pub(super) async fn send_batch(&mut self, batch: &mut Vec<BusMessage>) {
        if !self.streams.has_backlog() {
            return self.send_one(batch).await;
        }
        self.streams.defer(batch);
        self.send_one(batch).await;
        self.send_backlog_chunk().await;
    }

    /// The buffer can go now: connected, not pausing, not empty.
    pub(super) fn backlog_ready(&self) -> bool {
        self.streams.has_backlog() && self.conn.is_some() && !self.paused()
    }

    /// Appends the oldest chunk of the buffer; once it is empty, announces what it had to
    /// drop (the count is final then).
    pub(super) async fn send_backlog_chunk(&mut self) {
        if !self.backlog_ready() {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        // Before taking the chunk: it may skip envelopes a lost reply already appended.
        if let Err(failure) = self.streams.prepare(conn).await {
            return self.failed(failure);
        }
        let mut chunk = self
            .streams
            .take_chunk(self.config.publish_batch_max.max(1));
        self.send_one(&mut chunk).await;
        if self.conn.is_some() && !self.streams.has_backlog() {
            self.streams.announce_gaps();
        }
    }

    /// The whole buffer, while the connection takes it (shutdown; the caller bounds it).
    /// Each chunk either goes, or ends the connection or pauses: the loop ends.
    pub(super) async fn send_backlog(&mut self) {
        while self.backlog_ready() {
            self.send_backlog_chunk().await;
        }
    }

    /// `LOADING`: nothing is sent until the pause is over.
    fn paused(&self) -> bool {
        self.paused_until
            .is_some_and(|until| Instant::now() < until)
    }
}
