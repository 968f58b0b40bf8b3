//! Follows one book as a bot sees it and checks PROTOCOL §2 on every message: deltas chain
//! exactly (`prev_seq` = the previous message's `seq`), and after a `resync` the next book
//! message is a snapshot. Shared by the tests that break the bus under a book.

use serde_json::Value;

use super::{Bot, WAIT};

#[derive(Default)]
pub struct BookChain {
    pub seq: Option<u64>,
    pub awaiting_snapshot: bool,
    pub resyncs: u64,
    pub deltas_since_snapshot: u64,
}

impl BookChain {
    /// Reads frames until `book_messages` book messages (snapshots or deltas) passed.
    pub async fn read(&mut self, bot: &mut Bot, book_messages: usize) {
        for _ in 0..book_messages {
            self.read_one(bot).await;
        }
    }

    /// Reads frames until one book message passed; returns it.
    pub async fn read_one(&mut self, bot: &mut Bot) -> Value {
        loop {
            let v = bot.next(WAIT).await.expect("frame");
            match (v["type"].as_str(), v["action"].as_str()) {
                // The bus going down and coming back is told (PROTOCOL §4); the chain
                // rule is about book messages only.
                (Some("status"), _)
                    if v["state"] == "disconnected" || v["state"] == "connected" => {}
                (Some("status"), _) => {
                    assert_eq!(v["state"], "resync", "{v}");
                    self.resyncs += 1;
                    self.awaiting_snapshot = true;
                }
                (Some("book"), Some("snapshot")) => {
                    self.seq = v["seq"].as_u64();
                    self.awaiting_snapshot = false;
                    self.deltas_since_snapshot = 0;
                    return v;
                }
                (Some("book"), Some("delta")) => {
                    assert!(!self.awaiting_snapshot, "a delta right after resync: {v}");
                    assert!(self.seq.is_some(), "a delta before any snapshot: {v}");
                    assert_eq!(v["prev_seq"].as_u64(), self.seq, "chain broken: {v}");
                    self.seq = v["seq"].as_u64();
                    self.deltas_since_snapshot += 1;
                    return v;
                }
                _ => panic!("unexpected frame {v}"),
            }
        }
    }
}
