//! What the durable-stream consumer (`bus::redis::streams`) and the bot router tell each
//! other, and two small helpers the executor's wiring needs. No I/O here.
//!
//! - [`Acked`]: router → consumer, after a durable message was fanned out (or dropped as a
//!   redelivery or because nobody holds its channel): the consumer batches `XACK`s.
//! - [`StreamNotice`]: consumer → router, out of band of the ordinary bus input: a trim
//!   gap to announce to the bots of a channel, or an entry taken over from another
//!   consumer of the group (older than what the router delivered on that channel, so it
//!   must not be mistaken for a redelivery).
//! - [`SkipDurable`]: a [`Bus`] wrapper that passes only non-durable channels (hybrid:
//!   durable channels come back through the stream consumer, with their ids).
//! - [`merge_states`]: one [`BusState`] from two producers (pub/sub subscriber and stream
//!   consumer): down while either is down.

use tokio::sync::watch;

use super::{Bus, BusState};
use crate::durable::{DurablePolicy, StreamId};
use crate::envelope::BusMessage;
use crate::event::Channel;

/// The router delivered (or deliberately dropped) entry `id` of `channel`'s stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub channel: Channel,
    pub id: StreamId,
}

/// Consumer → router messages besides the ordinary bus input.
#[derive(Debug)]
pub enum StreamNotice {
    /// `lost` entries of `channel` were trimmed from the stream before this executor's
    /// group read them: the router tells the channel's bots (`gap` error).
    Gap { channel: Channel, lost: u64 },
    /// An entry claimed from another consumer of the group (or retried successfully):
    /// delivered even though its id is not above the last one the router delivered.
    Claimed(BusMessage),
}

/// Passes messages of non-durable channels to the inner bus and drops durable ones.
pub struct SkipDurable<B> {
    pub inner: B,
    pub policy: DurablePolicy,
}

impl<B: Bus> Bus for SkipDurable<B> {
    async fn publish(&self, msg: BusMessage) {
        if !self.policy.is_durable(&msg.channel) {
            self.inner.publish(msg).await;
        }
    }
}

/// A receiver that is `Down` while either input is down (the first cause seen), `Up`
/// when both are up. The merging task ends when both senders are gone.
pub fn merge_states(
    mut a: watch::Receiver<BusState>,
    mut b: watch::Receiver<BusState>,
) -> watch::Receiver<BusState> {
    let initial = combine(&a.borrow(), &b.borrow());
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let (mut a_open, mut b_open) = (true, true);
        while a_open || b_open {
            tokio::select! {
                r = a.changed(), if a_open => a_open = r.is_ok(),
                r = b.changed(), if b_open => b_open = r.is_ok(),
                _ = tx.closed() => return,
            }
            let next = combine(&a.borrow(), &b.borrow());
            tx.send_if_modified(|s| {
                let changed = *s != next;
                *s = next;
                changed
            });
        }
    });
    rx
}

fn combine(a: &BusState, b: &BusState) -> BusState {
    match (a, b) {
        (BusState::Down(cause), _) | (_, BusState::Down(cause)) => BusState::Down(cause.clone()),
        _ => BusState::Up,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::memory::MemoryBus;
    use crate::config::DurableConfig;
    use crate::event::{Event, Exchange, StatusState};
    use tokio::sync::mpsc;
    use uuid::Uuid;

    #[tokio::test]
    async fn skip_durable_passes_only_other_channels() {
        let (tx, mut rx) = mpsc::channel(4);
        let policy = DurablePolicy::from_config(&DurableConfig {
            channels: vec!["status:kraken".into()],
            ..DurableConfig::default()
        });
        let bus = SkipDurable {
            inner: MemoryBus::new(tx),
            policy,
        };
        let status = |ex| Event::status(ex, StatusState::Connected, None);
        bus.publish(BusMessage::encode(
            Uuid::new_v4(),
            1,
            1,
            status(Exchange::Kraken),
        ))
        .await;
        bus.publish(BusMessage::encode(
            Uuid::new_v4(),
            1,
            1,
            status(Exchange::Binance),
        ))
        .await;
        let got = rx.recv().await.map(|m| m.channel.to_string());
        assert_eq!(got.as_deref(), Some("status:binance"));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn merged_state_is_down_while_either_is_down() {
        let (a, arx) = watch::channel(BusState::Up);
        let (b, brx) = watch::channel(BusState::Up);
        let mut merged = merge_states(arx, brx);
        BusState::set_down(&b, "streams lost");
        merged.changed().await.unwrap();
        assert_eq!(*merged.borrow(), BusState::Down("streams lost".into()));
        BusState::set_down(&a, "pubsub lost");
        BusState::set_up(&b);
        merged.changed().await.unwrap();
        assert_eq!(*merged.borrow(), BusState::Down("pubsub lost".into()));
        BusState::set_up(&a);
        merged.changed().await.unwrap();
        assert_eq!(*merged.borrow_and_update(), BusState::Up);
    }
}
