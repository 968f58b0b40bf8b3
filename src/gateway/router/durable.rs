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

    /// Every current subscriber of `channel` was just sent entry `id` (a durable latest
    /// value read from the stream): live entries up to it are redeliveries for them.
    pub fn advance(&mut self, channel: &Channel, id: StreamId) {
        match self.last.get_mut(channel) {
            Some(last) => *last = (*last).max(id),
            None => {
                if self.last.len() >= MAX_TRACKED {
                    self.last.clear();
                }
                self.last.insert(channel.clone(), id);
            }
        }
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::{mpsc, watch};
    use uuid::Uuid;

    use super::super::{Command, Router};
    use crate::bus::delivery::{Acked, StreamNotice};
    use crate::bus::Interest;
    use crate::config::SlowClientPolicy;
    use crate::durable::StreamId;
    use crate::envelope::BusMessage;
    use crate::event::{Event, Exchange, Pattern, Side, Trade};
    use crate::gateway::client::{ClientQueue, Outbound};
    use crate::gateway::protocol::{Op, Request};
    use crate::gateway::StatsInner;

    fn durable_trade(n: u64) -> BusMessage {
        BusMessage::encode(
            Uuid::nil(),
            n,
            1,
            Event::Trade(Trade {
                exchange: Exchange::Binance,
                symbol: "BTC-USDT".into(),
                ts: None,
                ts_recv: 1,
                trade_id: n.to_string(),
                price: "1".into(),
                size: "1".into(),
                side: Some(Side::Buy),
            }),
        )
        .with_id(StreamId::new(n, 0))
    }

    /// (trade ids, other frames) the queue holds.
    fn frames(queue: &ClientQueue) -> (Vec<String>, Vec<serde_json::Value>) {
        let mut out = Vec::new();
        queue.take_batch(&mut out, usize::MAX);
        let mut trades = Vec::new();
        let mut other = Vec::new();
        for f in out {
            let text = match f {
                Outbound::Market { text, .. } => text,
                Outbound::Control(text) => text,
            };
            let v: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
            match v["type"].as_str() {
                Some("trade") => trades.push(v["trade_id"].as_str().unwrap().to_string()),
                _ => other.push(v),
            }
        }
        (trades, other)
    }

    #[tokio::test]
    async fn redeliveries_are_dropped_every_message_is_acked_and_claims_pass() {
        let (interest, _rx) = watch::channel(Interest::default());
        let (commands, _) = mpsc::channel(16);
        let (acks, mut acked) = mpsc::channel(64);
        let stats = Arc::new(StatsInner::default());
        let mut router = Router::new(interest, None, commands, stats.clone(), 100).with_acks(acks);
        let queue = Arc::new(ClientQueue::new(
            1,
            1_000_000,
            SlowClientPolicy::DropOldest,
            stats,
        ));
        router.on_command(Command::Connect {
            id: 1,
            queue: queue.clone(),
        });
        router.on_command(Command::Request {
            id: 1,
            request: Request {
                op: Op::Subscribe {
                    patterns: vec![Pattern::parse("trade:binance:BTC-USDT").unwrap()],
                    since: Vec::new(),
                },
                req: None,
            },
        });
        let _ = frames(&queue);
        for n in [1, 2, 3, 2, 3, 4] {
            router.on_message(durable_trade(n), false);
        }
        // An entry claimed from another consumer is older than what was delivered.
        router.on_notice(StreamNotice::Claimed(durable_trade(0)));
        router.on_notice(StreamNotice::Gap {
            channel: durable_trade(0).channel,
            lost: 7,
        });
        let (trades, other) = frames(&queue);
        assert_eq!(trades, ["1", "2", "3", "4", "0"]);
        assert_eq!(
            other,
            vec![serde_json::json!({
                "type": "error",
                "code": "gap",
                "channel": "trade:binance:BTC-USDT",
                "message": "7 entries of trade:binance:BTC-USDT were trimmed from the stream before delivery"
            })]
        );
        let mut ids = Vec::new();
        while let Ok(Acked { id, .. }) = acked.try_recv() {
            ids.push(id.ms);
        }
        // Every one acked once routed; the redeliveries (2 and 3 again) too.
        assert_eq!(ids, [1, 2, 3, 2, 3, 4, 0]);
        assert_eq!(
            router.durable.last.get(&durable_trade(0).channel),
            Some(&StreamId::new(4, 0))
        );
    }
}
