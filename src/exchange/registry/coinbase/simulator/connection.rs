//! One simulated Coinbase WebSocket connection: its subscriptions, its `sequence_num`
//! (from 0, one per message, across channels), heartbeats and the per-connection faults.
//! Rendering and the market live in the parent module.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::{
    l2_snapshot, lock, now_ms, render_subscriptions, render_ticker, rfc3339, AppState, Item,
    CHANNELS, HEARTBEAT_EVERY, SUBSCRIBE_DEADLINE,
};

/// What one connection has asked for and how far it got.
struct Conn {
    shared: AppState,
    subs: BTreeMap<&'static str, Vec<usize>>,
    /// Per product, the update id of the `level2` snapshot it was sent.
    snapshot_at: HashMap<usize, u64>,
    next_seq: u64,
    gap_seen: u64,
    l2_sent: u64,
    sent: u64,
    heartbeats: u64,
    out: Vec<Message>,
}

impl Conn {
    /// Appends one numbered message.
    fn send(&mut self, channel: &str, timestamp: &str, events: &str) {
        let epoch = self.shared.gap_epoch.load(Ordering::Relaxed);
        let faults = &self.shared.config.faults;
        let periodic = channel == "l2_data"
            && faults.gap_every_updates.is_some_and(|n| {
                n > 0 && {
                    self.l2_sent += 1;
                    self.l2_sent % n == 0
                }
            });
        if epoch != self.gap_seen || periodic {
            // This number is never sent: the client sees `sequence_num` jump.
            self.gap_seen = epoch;
            self.next_seq += 1;
            self.shared.counters.gaps.fetch_add(1, Ordering::Relaxed);
        }
        let text = format!(
            r#"{{"channel":"{channel}","client_id":"","timestamp":"{timestamp}","sequence_num":{},"events":{events}}}"#,
            self.next_seq
        );
        self.next_seq += 1;
        self.out.push(Message::text(text));
        self.sent += 1;
        if let Some(every) = faults.malformed_every_frames.filter(|n| *n > 0) {
            if self.sent % every == 0 {
                self.shared
                    .counters
                    .malformed_sent
                    .fetch_add(1, Ordering::Relaxed);
                self.out.push(Message::text(super::GARBAGE));
            }
        }
    }

    fn error(&mut self, message: &str) {
        self.out.push(Message::text(
            json!({"type": "error", "message": message}).to_string(),
        ));
    }

    fn request(&mut self, text: &str) {
        let Ok(v) = serde_json::from_str::<Value>(text) else {
            return self.error("malformed JSON");
        };
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
        let channel = v.get("channel").and_then(Value::as_str).unwrap_or_default();
        let Some(channel) = CHANNELS.iter().copied().find(|c| *c == channel) else {
            return self.error(&format!("Failed to subscribe: unknown channel `{channel}`"));
        };
        let mut products = Vec::new();
        for id in v
            .get("product_ids")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let id = id.as_str().unwrap_or_default();
            match self.shared.products.iter().position(|p| p.id == id) {
                Some(i) => products.push(i),
                None => return self.error(&format!("Failed to subscribe: unknown product `{id}`")),
            }
        }
        match kind {
            "subscribe" => self.subscribe(channel, products),
            "unsubscribe" => {
                let list = self.subs.entry(channel).or_default();
                if products.is_empty() {
                    list.clear();
                } else {
                    list.retain(|p| !products.contains(p));
                }
                if list.is_empty() {
                    self.subs.remove(channel);
                }
            }
            other => return self.error(&format!("unknown type `{other}`")),
        }
        let subs = render_subscriptions(&self.subs, &self.shared);
        self.send("subscriptions", &rfc3339(now_ms()), &subs);
    }

    fn subscribe(&mut self, channel: &'static str, products: Vec<usize>) {
        for &sym in &products {
            let list = self.subs.entry(channel).or_default();
            if !list.contains(&sym) {
                list.push(sym);
            }
            let p = &self.shared.products[sym];
            let time = rfc3339(now_ms());
            match channel {
                "level2" => {
                    let (events, id, time) = l2_snapshot(&self.shared, sym);
                    self.snapshot_at.insert(sym, id);
                    self.send("l2_data", &time, &events);
                }
                "market_trades" => {
                    let recent: Vec<String> = lock(&p.recent).iter().rev().cloned().collect();
                    let events =
                        format!(r#"[{{"type":"snapshot","trades":[{}]}}]"#, recent.join(","));
                    self.send("market_trades", &time, &events);
                }
                "ticker" => {
                    let events = render_ticker("snapshot", &p.id, &lock(&p.market));
                    self.send("ticker", &time, &events);
                }
                "status" => {
                    let events = json!([{"type": "snapshot", "products": [{
                        "product_type": "SPOT", "id": p.id, "status": "online", "status_message": ""
                    }]}]);
                    self.send("status", &time, &events.to_string());
                }
                _ => {}
            }
        }
        if products.is_empty() {
            self.subs.entry(channel).or_default();
        }
    }

    fn market(&mut self, item: &Item) {
        if item.sym == usize::MAX {
            self.out.push(Message::text(item.events.clone()));
            return;
        }
        let key = if item.channel == "l2_data" {
            "level2"
        } else {
            item.channel
        };
        if !self.subs.get(key).is_some_and(|l| l.contains(&item.sym)) {
            return;
        }
        if key == "level2"
            && self
                .snapshot_at
                .get(&item.sym)
                .is_some_and(|&at| item.update_id <= at)
        {
            return; // already in the snapshot this connection got
        }
        self.send(item.channel, &item.timestamp, &item.events);
    }

    fn heartbeat(&mut self) {
        if self.subs.contains_key("heartbeats") {
            self.heartbeats += 1;
            let now = rfc3339(now_ms());
            let events = json!([{"current_time": now, "heartbeat_counter": self.heartbeats}]);
            self.send("heartbeats", &now, &events.to_string());
        }
    }
}

/// Serves one connection until it closes, is dropped by a fault, or the simulator stops.
pub(super) async fn run(shared: AppState, socket: WebSocket) {
    let _tracked = shared.tracker.token();
    shared
        .counters
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let kill = lock(&shared.drop_token).clone();
    let mut rx = shared.tx.subscribe();
    let (mut sink, mut stream) = socket.split();
    let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
    let deadline = tokio::time::sleep(SUBSCRIBE_DEADLINE);
    tokio::pin!(deadline);
    let gap_seen = shared.gap_epoch.load(Ordering::Relaxed);
    let mut c = Conn {
        shared: shared.clone(),
        subs: BTreeMap::new(),
        snapshot_at: HashMap::new(),
        next_seq: 0,
        gap_seen,
        l2_sent: 0,
        sent: 0,
        heartbeats: 0,
        out: Vec::new(),
    };
    'conn: loop {
        tokio::select! {
            biased;
            _ = kill.cancelled() => {
                shared.counters.dropped_connections.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ = shared.shutdown.cancelled() => break,
            _ = &mut deadline, if c.subs.is_empty() => break,
            msg = stream.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(t))) => c.request(t.as_str()),
                Some(Ok(_)) => {}
            },
            _ = beat.tick() => c.heartbeat(),
            item = rx.recv() => match item {
                Ok(item) => c.market(&item),
                // Too slow to keep up: closed, like a real venue would.
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
        for m in c.out.drain(..) {
            tokio::select! {
                biased;
                _ = kill.cancelled() => {
                    shared.counters.dropped_connections.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                r = sink.send(m) => if r.is_err() { return },
            }
            shared
                .counters
                .messages_sent
                .fetch_add(1, Ordering::Relaxed);
        }
        if shared.shutdown.is_cancelled() {
            break 'conn;
        }
    }
    let close = sink.send(Message::Close(None));
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), close).await;
}
