//! One simulated Binance WebSocket connection: the subscribe protocol (`SUBSCRIBE`,
//! `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY` and their error
//! codes), the raw and combined stream URLs, routing the shared frames to the connection's
//! subscriptions, pings every 20 s, and the faults that act on a connection.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::rest::{api_error, ApiError};
use super::{
    AppState, Counters, FrameInner, Shared, Sub, Topic, GARBAGE_FRAME, MAX_STREAMS_PER_CONNECTION,
    PING_INTERVAL, PONG_TIMEOUT,
};
use crate::simulator::lock;

/// Decrements the open-connection gauge however the connection ends.
pub(super) struct OpenGuard<'a>(&'a Counters);

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(super) fn ws_reply(result: Value, id: &Value) -> Message {
    Message::Text(json!({ "result": result, "id": id }).to_string().into())
}

pub(super) fn ws_error(code: i64, msg: &str, id: &Value) -> Message {
    Message::Text(
        json!({ "error": { "code": code, "msg": msg }, "id": id })
            .to_string()
            .into(),
    )
}

/// Handle one client request (SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS,
/// SET_PROPERTY, GET_PROPERTY) and build the reply.
pub(super) fn handle_request(
    shared: &Shared,
    text: &str,
    subs: &mut Vec<Sub>,
    combined: &mut bool,
) -> Message {
    let v: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return ws_error(3, &format!("Invalid JSON: {e}"), &Value::Null),
    };
    let Some(obj) = v.as_object() else {
        return ws_error(2, "Invalid request", &Value::Null);
    };
    // id: 64-bit integer, alphanumeric string of at most 36 chars, or null.
    let id = obj.get("id").cloned().unwrap_or(Value::Null);
    let id_ok = match &id {
        Value::Null => true,
        Value::Number(n) => n.is_i64() || n.is_u64(),
        Value::String(s) => s.len() <= 36 && s.chars().all(|c| c.is_ascii_alphanumeric()),
        _ => false,
    };
    if !id_ok {
        return ws_error(
            2,
            "Invalid request: request ID must be an unsigned integer",
            &Value::Null,
        );
    }
    let method = match obj.get("method") {
        Some(Value::String(m)) => m.as_str(),
        Some(_) => return ws_error(2, "Invalid request: method must be a string", &id),
        None => return ws_error(2, "Invalid request: missing field `method`", &id),
    };
    let params = obj.get("params");
    match method {
        "SUBSCRIBE" | "UNSUBSCRIBE" => {
            let Some(list) = params.and_then(Value::as_array) else {
                return ws_error(
                    2,
                    "Invalid request: params must be an array of streams",
                    &id,
                );
            };
            let mut parsed = Vec::with_capacity(list.len());
            for p in list {
                let Some(name) = p.as_str() else {
                    return ws_error(2, "Invalid request: stream name must be a string", &id);
                };
                match shared.parse_stream(name) {
                    Some(s) => parsed.push(s),
                    None => {
                        return ws_error(
                            2,
                            &format!("Invalid request: invalid stream `{name}`"),
                            &id,
                        )
                    }
                }
            }
            if method == "SUBSCRIBE" {
                for s in parsed {
                    if !subs.iter().any(|x| x.name == s.name) {
                        if subs.len() >= MAX_STREAMS_PER_CONNECTION {
                            return ws_error(2, "Invalid request: too many streams", &id);
                        }
                        subs.push(s);
                    }
                }
            } else {
                subs.retain(|x| !parsed.iter().any(|s| s.name == x.name));
            }
            ws_reply(Value::Null, &id)
        }
        "LIST_SUBSCRIPTIONS" => ws_reply(
            Value::Array(subs.iter().map(|s| Value::String(s.name.clone())).collect()),
            &id,
        ),
        "SET_PROPERTY" => match params.and_then(Value::as_array).map(Vec::as_slice) {
            Some([Value::String(p), Value::Bool(b)]) if p == "combined" => {
                *combined = *b;
                ws_reply(Value::Null, &id)
            }
            Some([Value::String(p), _]) if p == "combined" => {
                ws_error(1, "Invalid value type: expected Boolean", &id)
            }
            Some([Value::String(_), _]) => ws_error(0, "Unknown property", &id),
            _ => ws_error(2, "Invalid request: property name must be a string", &id),
        },
        "GET_PROPERTY" => match params.and_then(Value::as_array).map(Vec::as_slice) {
            Some([Value::String(p)]) if p == "combined" => ws_reply(Value::Bool(*combined), &id),
            Some([Value::String(_)]) => ws_error(0, "Unknown property", &id),
            _ => ws_error(2, "Invalid request: property name must be a string", &id),
        },
        other => ws_error(
            2,
            &format!(
                "Invalid request: unknown variant `{other}`, expected one of `SUBSCRIBE`, \
                 `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, `SET_PROPERTY`, `GET_PROPERTY`"
            ),
            &id,
        ),
    }
}

/// Messages a frame turns into for this connection (one per matching stream).
pub(super) fn route_frame(f: &FrameInner, subs: &[Sub], combined: bool, out: &mut Vec<Message>) {
    if f.topic == Topic::Garbage {
        out.push(Message::Text(f.raw.clone()));
        return;
    }
    for s in subs
        .iter()
        .filter(|s| s.sym == f.sym && s.kind.topic() == f.topic)
    {
        let text = if combined {
            match f.wrapped.iter().find(|(k, _)| *k == s.kind) {
                Some((_, w)) => w.clone(),
                None => continue,
            }
        } else {
            f.raw.clone()
        };
        out.push(Message::Text(text));
    }
}

pub(super) enum Exit {
    /// Drop the TCP stream without a close frame.
    Abrupt,
    /// Send a close frame first.
    Graceful,
}

pub(super) async fn run_connection(
    shared: AppState,
    socket: WebSocket,
    mut subs: Vec<Sub>,
    mut combined: bool,
) {
    // Keeps `serve_binance` from returning while this connection is open.
    let _tracked = shared.tracker.token();
    let c = &shared.counters;
    c.connections_total.fetch_add(1, Ordering::Relaxed);
    c.connections_open.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(c);
    let kill = lock(&shared.drop_token).clone();
    let mut rx = shared.tx.subscribe();
    let (mut sink, mut stream) = socket.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    let mut awaiting_pong: Option<Instant> = None;
    let malformed_every = shared
        .config
        .faults
        .malformed_every_frames
        .filter(|n| *n > 0);
    let mut since_malformed = 0u64;
    let mut out: Vec<Message> = Vec::with_capacity(4);

    let exit = 'conn: loop {
        tokio::select! {
            biased;
            _ = kill.cancelled() => {
                c.dropped_connections.fetch_add(1, Ordering::Relaxed);
                break Exit::Abrupt;
            }
            _ = shared.shutdown.cancelled() => break Exit::Graceful,
            _ = ping.tick() => {
                if awaiting_pong.is_some_and(|t| t.elapsed() >= PONG_TIMEOUT) {
                    break Exit::Graceful;
                }
                awaiting_pong.get_or_insert_with(Instant::now);
                out.push(Message::Ping(Bytes::from_static(b"sim")));
            }
            msg = stream.next() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break Exit::Abrupt,
                Some(Ok(Message::Text(t))) => {
                    out.push(handle_request(&shared, t.as_str(), &mut subs, &mut combined));
                }
                Some(Ok(Message::Pong(_))) => awaiting_pong = None,
                // Pings are answered by the WebSocket layer; binary is ignored.
                Some(Ok(_)) => {}
            },
            f = rx.recv() => match f {
                Ok(f) => {
                    let before = out.len();
                    route_frame(&f.0, &subs, combined, &mut out);
                    if f.0.topic != Topic::Garbage {
                        if let Some(every) = malformed_every {
                            since_malformed += (out.len() - before) as u64;
                            if since_malformed >= every {
                                since_malformed = 0;
                                out.push(Message::Text(Utf8Bytes::from_static(GARBAGE_FRAME)));
                                c.malformed_sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Too slow to keep up: disconnect like a real exchange.
                    c.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                    break Exit::Graceful;
                }
                Err(broadcast::error::RecvError::Closed) => break Exit::Graceful,
            },
        }
        for m in out.drain(..) {
            let is_data = matches!(m, Message::Text(_));
            tokio::select! {
                biased;
                _ = kill.cancelled() => {
                    c.dropped_connections.fetch_add(1, Ordering::Relaxed);
                    break 'conn Exit::Abrupt;
                }
                _ = shared.shutdown.cancelled() => break 'conn Exit::Graceful,
                r = sink.send(m) => {
                    if r.is_err() {
                        break 'conn Exit::Abrupt;
                    }
                    if is_data {
                        c.frames_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    if let Exit::Graceful = exit {
        // Bounded, so a client that stopped reading cannot hold shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
    }
    // Dropping sink + stream drops the TCP stream.
}

pub(super) fn parse_stream_list(shared: &Shared, list: &str) -> Result<Vec<Sub>, ApiError> {
    let mut subs: Vec<Sub> = Vec::new();
    for name in list.split('/').filter(|s| !s.is_empty()) {
        match shared.parse_stream(name) {
            Some(s) => {
                if !subs.iter().any(|x| x.name == s.name) {
                    subs.push(s);
                }
            }
            None => {
                return Err(api_error(2, &format!("Invalid stream name `{name}`")));
            }
        }
    }
    if subs.len() > MAX_STREAMS_PER_CONNECTION {
        return Err(api_error(2, "Too many streams"));
    }
    Ok(subs)
}

pub(super) fn upgrade(
    ws: WebSocketUpgrade,
    shared: AppState,
    subs: Vec<Sub>,
    combined: bool,
) -> Response {
    ws.on_upgrade(move |socket| run_connection(shared, socket, subs, combined))
}

pub(super) async fn ws_combined(
    ws: WebSocketUpgrade,
    State(shared): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match parse_stream_list(&shared, q.get("streams").map_or("", String::as_str)) {
        Ok(subs) => upgrade(ws, shared, subs, true),
        Err(r) => r.into_response(),
    }
}

pub(super) async fn ws_raw_root(ws: WebSocketUpgrade, State(shared): State<AppState>) -> Response {
    upgrade(ws, shared, Vec::new(), false)
}

pub(super) async fn ws_raw(
    ws: WebSocketUpgrade,
    State(shared): State<AppState>,
    Path(streams): Path<String>,
) -> Response {
    match parse_stream_list(&shared, &streams) {
        Ok(subs) => upgrade(ws, shared, subs, false),
        Err(r) => r.into_response(),
    }
}
