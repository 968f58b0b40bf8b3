//! In-process bus: a bounded channel from the publisher pipeline straight to the gateway's
//! router (demo, and local delivery in hybrid). Lossless: a full channel applies
//! backpressure to the publisher rather than dropping.

use tokio::sync::mpsc;

use super::Bus;
use crate::envelope::BusMessage;

/// Delivers published messages to an in-process receiver (the gateway).
#[derive(Clone)]
pub struct MemoryBus {
    tx: mpsc::Sender<BusMessage>,
}

impl MemoryBus {
    pub fn new(tx: mpsc::Sender<BusMessage>) -> MemoryBus {
        MemoryBus { tx }
    }
}

impl Bus for MemoryBus {
    async fn publish(&self, msg: BusMessage) {
        // The receiver is gone only during shutdown; nothing is left to deliver to then.
        let _ = self.tx.send(msg).await;
    }
}
