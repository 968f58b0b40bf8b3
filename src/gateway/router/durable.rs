//! The router's side of durable channels (entries read by `bus::redis::streams`):
//! acknowledgement after fan-out, redelivery dedup, and the bots' `gap` error.
//!
//! - Every message with a stream id is acked to the consumer once the router is done with
//!   it — fanned out, or dropped because nobody holds its channel — by an [`AckOnDrop`]
//!   guard taken at the top of `on_message` (so every return path acks). `try_send`: the
//!   router never waits; a lost ack only means a redelivery later, dropped here.
//! - Per durable channel the last id delivered: a message whose id is not above it is a
//!   redelivery (the consumer re-reads its pending entries after a reconnect) and is
//!   dropped, acked and counted. Entries claimed from another consumer arrive as
//!   [`StreamNotice::Claimed`] and skip this check: they are older than what this router
//!   delivered by nature. At most [`MAX_TRACKED`] channels are remembered (then the table
//!   starts over: a redelivery may then pass once).
//! - [`StreamNotice::Gap`]: the bots holding the channel get
//!   `{"type":"error","code":"gap","channel":…,"message":…}`.
//!
//! `since` replay is not here (h/dreplay).

use std::collections::HashMap;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::bus::delivery::{Acked, StreamNotice};
use crate::durable::StreamId;
use crate::envelope::BusMessage;
use crate::event::Channel;
use crate::gateway::protocol::ErrorCode;

/// Durable channels whose last delivered id is remembered.
pub const MAX_TRACKED: usize = 65_536;

#[derive(Default)]
pub(super) struct Durable {
    pub acks: Option<mpsc::Sender<Acked>>,
    pub notices: Option<mpsc::Receiver<StreamNotice>>,
    last: HashMap<Channel, StreamId>,
    /// Set while a claimed entry is routed.
    claimed: bool,
}

/// Sends its ack when dropped (when `on_message` returns, whichever way).
pub(super) struct AckOnDrop(Option<(mpsc::Sender<Acked>, Acked)>);

impl Drop for AckOnDrop {
    fn drop(&mut self) {
        if let Some((tx, acked)) = self.0.take() {
            let _ = tx.try_send(acked);
        }
    }
}

impl Durable {
    /// `None`: `msg` is a redelivery, already acked and counted: drop it. Otherwise the
    /// guard that acks it once routed (empty for a message without an id).
    pub fn admit(&mut self, msg: &BusMessage) -> Option<AckOnDrop> {
        let Some(id) = msg.id else {
            return Some(AckOnDrop(None));
        };
        let guard = AckOnDrop(self.acks.clone().map(|tx| {
            (
                tx,
                Acked {
                    channel: msg.channel.clone(),
                    id,
                },
            )
        }));
        if self.claimed {
            return Some(guard);
        }
        match self.last.get_mut(&msg.channel) {
            Some(last) if id <= *last => {
                crate::metrics::stream_redelivery_dropped();
                return None;
            }
            Some(last) => *last = id,
            None => {
                if self.last.len() >= MAX_TRACKED {
                    self.last.clear();
                }
                self.last.insert(msg.channel.clone(), id);
            }
        }
        Some(guard)
    }

    /// While on, messages skip the redelivery check (a claimed entry is being routed).
    pub fn set_claimed(&mut self, on: bool) {
        self.claimed = on;
    }
}

#[derive(Serialize)]
struct GapError<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: ErrorCode,
    channel: &'a str,
    message: String,
}

/// The `gap` error frame for `lost` entries of `channel`.
pub(super) fn gap_frame(channel: &Channel, lost: u64) -> Utf8Bytes {
    let frame = GapError {
        kind: "error",
        code: ErrorCode::Gap,
        channel: channel.as_str(),
        message: format!(
            "{lost} entries of {channel} were trimmed from the stream before delivery"
        ),
    };
    Utf8Bytes::from(serde_json::to_string(&frame).unwrap_or_default())
}

/// The next notice; pending forever without a notice input.
pub(super) async fn recv_notice(
    notices: &mut Option<mpsc::Receiver<StreamNotice>>,
) -> Option<StreamNotice> {
    match notices.as_mut() {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
