//! A scripted Binance-format exchange for tests that need exact frames: the test decides
//! every frame, written from Binance's documentation, and the server sends it verbatim.
//!
//! Deliberately independent of `src/simulator` and of the adapter: a shared misreading of
//! the exchange format cannot agree with itself here.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::broadcast;

#[derive(Clone)]
struct Script {
    frames: broadcast::Sender<String>,
    /// JSON body answered on /api/v3/depth.
    depth: Arc<Mutex<String>>,
    /// Every text frame a client sent (SUBSCRIBE requests).
    received: Arc<Mutex<Vec<String>>>,
    connections: Arc<Mutex<u64>>,
}

/// Handle to a running scripted exchange.
pub struct ScriptedExchange {
    pub addr: SocketAddr,
    script: Script,
}

impl ScriptedExchange {
    pub async fn start() -> ScriptedExchange {
        let (frames, _) = broadcast::channel(1024);
        let script = Script {
            frames,
            depth: Arc::new(Mutex::new(
                r#"{"lastUpdateId":1,"bids":[],"asks":[]}"#.to_string(),
            )),
            received: Arc::default(),
            connections: Arc::default(),
        };
        let app = Router::new()
            .route("/stream", get(ws))
            .route("/ws", get(ws))
            .route("/api/v3/depth", get(depth))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        ScriptedExchange { addr, script }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sends `frame` verbatim to every connected client that has subscribed.
    pub fn send(&self, frame: &str) {
        let _ = self.script.frames.send(frame.to_string());
    }

    pub fn set_depth(&self, body: &str) {
        *self.script.depth.lock().expect("lock") = body.to_string();
    }

    pub fn received(&self) -> Vec<String> {
        self.script.received.lock().expect("lock").clone()
    }

    /// Clients that have sent at least one SUBSCRIBE.
    pub fn subscribed_clients(&self) -> usize {
        self.script.frames.receiver_count()
    }
}

async fn depth(
    State(s): State<Script>,
    Query(_q): Query<std::collections::HashMap<String, String>>,
) -> impl IntoResponse {
    let body = s.depth.lock().expect("lock").clone();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
}

async fn ws(State(s): State<Script>, upgrade: WebSocketUpgrade) -> impl IntoResponse {
    upgrade.on_upgrade(move |socket| client(socket, s))
}

async fn client(mut socket: WebSocket, s: Script) {
    *s.connections.lock().expect("lock") += 1;
    let mut rx: Option<broadcast::Receiver<String>> = None;
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let Some(Ok(msg)) = msg else { return };
                if let Message::Text(t) = msg {
                    s.received.lock().expect("lock").push(t.to_string());
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
                    let reply = serde_json::json!({"result": null, "id": id}).to_string();
                    if socket.send(Message::text(reply)).await.is_err() {
                        return;
                    }
                    if rx.is_none() {
                        rx = Some(s.frames.subscribe());
                    }
                }
            }
            frame = async {
                match rx.as_mut() {
                    Some(r) => r.recv().await.ok(),
                    None => std::future::pending().await,
                }
            } => {
                let Some(frame) = frame else { return };
                if socket.send(Message::text(frame)).await.is_err() {
                    return;
                }
            }
        }
    }
}
