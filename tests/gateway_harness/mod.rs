//! The in-process bot server and bot-side helpers shared by `gateway.rs`,
//! `gateway_limits.rs` and `gateway_auth.rs`: a real listener on 127.0.0.1, real `tokio_tungstenite` clients, a
//! bus fed with `BusMessage::encode` messages, and waits bounded by a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;

use mdbridge::bus::{Interest, SnapshotStore};
use mdbridge::config::BotsConfig;
use mdbridge::envelope::BusMessage;
use mdbridge::event::{Book, BookAction, Event, Exchange, Level, Side, Trade};
use mdbridge::gateway::{Gateway, GatewayStats};
use mdbridge::health::HealthHandle;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const DEADLINE: Duration = Duration::from_secs(10);

pub struct Harness {
    pub addr: SocketAddr,
    pub bus: mpsc::Sender<BusMessage>,
    pub stats: GatewayStats,
    pub shutdown: CancellationToken,
    pub server: JoinHandle<std::io::Result<()>>,
    pub interest: watch::Receiver<Interest>,
    src: Uuid,
    seq: u64,
}

pub fn config() -> BotsConfig {
    BotsConfig {
        listen: "127.0.0.1:0".into(),
        ping_interval_ms: 60_000,
        ..BotsConfig::default()
    }
}

pub async fn start(config: BotsConfig) -> Harness {
    start_with_store(config, None).await
}

/// The server with a latest-value store (what an executor has).
pub async fn start_with_store(
    config: BotsConfig,
    store: Option<Arc<dyn SnapshotStore>>,
) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (bus, messages) = mpsc::channel(1024);
    let (interest_tx, interest) = watch::channel(Interest::default());
    let gateway = Gateway::new(
        config,
        messages,
        interest_tx,
        store,
        HealthHandle::detached("bots"),
    );
    let stats = gateway.stats();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway.serve(listener, shutdown.clone()));
    Harness {
        addr,
        bus,
        stats,
        shutdown,
        server,
        interest,
        src: Uuid::new_v4(),
        seq: 0,
    }
}

impl Harness {
    /// Publishes `event` on the bus; returns the exact text a bot must receive.
    pub async fn publish(&mut self, event: Event) -> String {
        let msg = self.encode(event);
        let text = String::from_utf8(msg.event_json().to_vec()).unwrap();
        self.bus.send(msg).await.unwrap();
        text
    }

    /// The next message of this harness's publisher (`seq` + 1), not yet sent.
    pub fn encode(&mut self, event: Event) -> BusMessage {
        self.seq += 1;
        BusMessage::encode(self.src, self.seq, 1, event)
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub async fn connect(&self) -> Ws {
        let (ws, _) = within("connect", tokio_tungstenite::connect_async(self.url()))
            .await
            .unwrap();
        ws
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

pub async fn next_json(ws: &mut Ws) -> Value {
    within("a text frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

pub async fn ping_pong(ws: &mut Ws, req: &str) {
    send(ws, json!({"op":"ping","req":req})).await;
    assert_eq!(next_json(ws).await, json!({"type":"pong","req":req}));
}

/// Reads until the server's Close frame (text frames are not expected before it).
pub async fn close_frame(ws: &mut Ws) -> Option<CloseFrame> {
    within("a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a Close frame, got {other:?}"),
            }
        }
    })
    .await
}

/// A raw data frame (the client library masks it); lets a test send what a correct
/// client never would: fragments, invalid UTF-8.
pub fn raw(data: &[u8], opcode: Data, fin: bool) -> Message {
    Message::Frame(Frame::message(data.to_vec(), OpCode::Data(opcode), fin))
}

pub fn trade(symbol: &str, id: &str) -> Event {
    Event::Trade(Trade {
        exchange: Exchange::Binance,
        symbol: symbol.into(),
        ts: Some(1),
        ts_recv: mdbridge::event::now_micros(),
        trade_id: id.into(),
        price: "100.10".into(),
        size: "0.5".into(),
        side: Some(Side::Buy),
    })
}

pub fn book_snapshot() -> Event {
    Event::Book(Book {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: 7,
        action: BookAction::Snapshot,
        bids: vec![Level("100".into(), "1".into())],
        asks: vec![Level("101".into(), "1".into())],
        seq: Some(1),
        prev_seq: None,
    })
}

pub fn http_status<T>(r: Result<T, WsError>) -> u16 {
    match r {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    }
}
