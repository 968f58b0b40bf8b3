//! How the router follows the bus state: when the Redis subscriber reports the bus down,
//! every client of a channel that comes through it hears `status` `disconnected` once per
//! exchange, live books end their chain with `resync` and latest values (`ticker`,
//! `candle`, `status`) are forgotten (they would go stale); when it is back, the same
//! clients hear `connected`, the books sync again and the watched latest values are read
//! again from the store.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{book_cache, status_text, Cache, Router};
use crate::bus::BusState;
use crate::event::{Exchange, StatusState};

impl Router {
    pub(super) fn on_bus_state(&mut self, state: BusState) {
        match state {
            BusState::Down(cause) => {
                if self.bus_down.is_none() {
                    self.on_bus_down(&cause);
                    self.bus_down = Some(cause);
                }
            }
            BusState::Up => {
                if self.bus_down.take().is_some() {
                    self.on_bus_up();
                }
            }
        }
    }

    /// Tells each client of each channel that comes through the bus, once per exchange,
    /// that the bus is down; live books end their chain (`resync`).
    pub(super) fn on_bus_down(&mut self, cause: &str) {
        crate::metrics::bus_down_notice();
        tracing::warn!(cause, "bus down: telling the bots of affected channels");
        let detail = format!("redis bus down: {cause}");
        let mut statuses: HashMap<Exchange, (Utf8Bytes, u64)> = HashMap::new();
        for (channel, state) in self.channels.iter_mut() {
            if !state.local {
                // Whatever is published meanwhile is lost: the value would go stale, and a
                // new subscriber would be served it as current. It is read again when the
                // bus is back.
                if let Cache::Latest { value, .. } = &mut state.cache {
                    *value = None;
                }
            }
            if state.local || state.subscribers.is_empty() {
                continue;
            }
            let exchange = channel.exchange();
            for q in &state.subscribers {
                if self.told_down.insert((q.id(), exchange)) {
                    let (text, ts) = statuses.entry(exchange).or_insert_with(|| {
                        status_text(exchange, StatusState::Disconnected, detail.clone())
                    });
                    q.push_market(text.clone(), *ts, None);
                }
            }
            if let Cache::Book(cache) = &mut state.cache {
                cache.bus_down(channel, &state.subscribers);
                // Reads would fail now; they start again when the bus is back.
                state.fetch = None;
            }
        }
    }

    /// The bus is back: the clients told it was down hear `connected`; books sync again and
    /// watched latest values are read from the store.
    pub(super) fn on_bus_up(&mut self) {
        tracing::info!("bus back: books sync again");
        let settle = Instant::now() + book_cache::SETTLE;
        let mut statuses: HashMap<Exchange, (Utf8Bytes, u64)> = HashMap::new();
        let mut sync = Vec::new();
        for (channel, state) in self.channels.iter_mut() {
            if state.local || state.subscribers.is_empty() {
                continue;
            }
            let exchange = channel.exchange();
            for q in &state.subscribers {
                if self.told_down.remove(&(q.id(), exchange)) {
                    let (text, ts) = statuses.entry(exchange).or_insert_with(|| {
                        status_text(
                            exchange,
                            StatusState::Connected,
                            "redis bus back".to_string(),
                        )
                    });
                    q.push_market(text.clone(), *ts, None);
                }
            }
            match &mut state.cache {
                Cache::Book(cache) => {
                    cache.bus_up(settle);
                    if !cache.is_live() {
                        sync.push(channel.clone());
                    }
                }
                // Cleared when the bus went down: read the current value.
                Cache::Latest { value, failed } => {
                    *failed = 0;
                    if value.is_none() {
                        sync.push(channel.clone());
                    }
                }
                Cache::Nothing => {}
            }
        }
        self.told_down.clear();
        for channel in sync {
            self.fetch(&channel, Duration::ZERO);
        }
    }
}

/// The next bus state; pending forever without a bus state; `None` once its sender is gone.
pub(super) async fn next_bus_state(
    state: &mut Option<watch::Receiver<BusState>>,
) -> Option<BusState> {
    let Some(rx) = state.as_mut() else {
        return std::future::pending().await;
    };
    match rx.changed().await {
        Ok(()) => Some(rx.borrow_and_update().clone()),
        Err(_) => None,
    }
}
