//! The measuring bots of the scenario runner: lean WebSocket clients in the runner's own
//! process. Per frame they find `ts_recv` and the trade id with a byte search (no JSON
//! tree), record the latency in a [`Histogram`] and count trade ids skipped per symbol,
//! so one core can measure a million frames a second.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::hist::Histogram;
use super::scenario::ScenarioError;
use crate::event::now_micros;

pub type Ws = WebSocketStream<TcpStream>;

/// What one bot saw inside the measuring window.
#[derive(Default, Clone)]
pub struct BotStats {
    /// Market frames (anything with a `ts_recv`).
    pub frames: u64,
    pub hist: Histogram,
    /// Trade ids skipped (per symbol, ids rise by one on the simulator).
    pub trade_gaps: u64,
}

/// Opens a WebSocket to the bot server; `recv_buffer` sets SO_RCVBUF first (a slow bot
/// with a small buffer makes the server's queue fill quickly).
pub async fn connect(port: u16, recv_buffer: Option<u32>) -> Result<Ws, ScenarioError> {
    connect_path(port, "/", recv_buffer).await
}

/// [`connect`] to `path` (e.g. the simulator's `/stream?streams=…`).
pub async fn connect_path(
    port: u16,
    path: &str,
    recv_buffer: Option<u32>,
) -> Result<Ws, ScenarioError> {
    let err = |e: std::io::Error| ScenarioError::Bot(format!("connect :{port}: {e}"));
    let socket = TcpSocket::new_v4().map_err(err)?;
    if let Some(n) = recv_buffer {
        socket.set_recv_buffer_size(n).map_err(err)?;
    }
    let stream = socket
        .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}{path}"), stream)
        .await
        .map_err(|e| ScenarioError::Bot(format!("upgrade :{port}: {e}")))?;
    Ok(ws)
}

/// Subscribes and waits for the `subscribed` reply (10 s at most).
pub async fn subscribe(ws: &mut Ws, channels: &[String]) -> Result<(), ScenarioError> {
    let req = serde_json::json!({"op":"subscribe","channels":channels,"req":1});
    ws.send(Message::text(req.to_string()))
        .await
        .map_err(|e| ScenarioError::Bot(format!("subscribe: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                if t.contains(r#""type":"subscribed""#) {
                    return Ok(());
                }
                if t.contains(r#""type":"error""#) {
                    return Err(ScenarioError::Bot(format!("subscribe refused: {t}")));
                }
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(e))) => return Err(ScenarioError::Bot(format!("subscribe: {e}"))),
            Ok(None) | Err(_) => {
                return Err(ScenarioError::Bot("no `subscribed` reply in 10 s".into()))
            }
        }
    }
}

/// `n` subscribed bots, connected a few at a time.
pub async fn connect_many(
    port: u16,
    n: usize,
    channels: &[String],
) -> Result<Vec<Ws>, ScenarioError> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(32) {
        let batch = chunk.iter().map(|_| async {
            let mut ws = connect(port, None).await?;
            if !channels.is_empty() {
                subscribe(&mut ws, channels).await?;
            }
            Ok::<Ws, ScenarioError>(ws)
        });
        for r in futures_util::future::join_all(batch).await {
            out.push(r?);
        }
    }
    Ok(out)
}

/// The unsigned integer after `key` (e.g. `"ts_recv":`), quoted or not.
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = text.get(at..)?;
    let rest = rest.strip_prefix(b"\"").unwrap_or(rest);
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(rest.get(..digits)?).ok()?.parse().ok()
}

fn symbol(text: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"symbol\":\"";
    let at = text.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = text.get(at..)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    rest.get(..end)
}

/// Reads until `end`; records frames that arrive after `start`.
pub async fn read_until(mut ws: Ws, start: Instant, end: Instant) -> BotStats {
    let mut stats = BotStats::default();
    let mut last_trade: HashMap<Vec<u8>, u64> = HashMap::new();
    loop {
        let msg = match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(m))) => m,
            _ => break,
        };
        let Message::Text(text) = msg else { continue };
        let bytes = text.as_bytes();
        let Some(ts_recv) = number_after(bytes, b"\"ts_recv\":") else {
            continue;
        };
        let now = now_micros();
        if bytes.starts_with(br#"{"type":"trade""#) {
            if let (Some(sym), Some(id)) = (symbol(bytes), number_after(bytes, b"\"trade_id\":")) {
                match last_trade.get_mut(sym) {
                    Some(last) => {
                        if Instant::now() >= start && id > *last + 1 {
                            stats.trade_gaps += id - *last - 1;
                        }
                        *last = id;
                    }
                    None => {
                        last_trade.insert(sym.to_vec(), id);
                    }
                }
            }
        }
        if Instant::now() < start {
            continue;
        }
        stats.frames += 1;
        stats.hist.record(now.saturating_sub(ts_recv));
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    stats
}

/// Counts text frames that arrive inside [`start`, `end`] (the simulator's raw feed).
pub async fn count_until(mut ws: Ws, start: Instant, end: Instant) -> u64 {
    let mut n = 0;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end, ws.next()).await {
        if msg.is_text() && Instant::now() >= start {
            n += 1;
        }
    }
    n
}

/// Reads and discards until `end` (idle connections must still drain what they get).
pub async fn drain_until(mut ws: Ws, end: Instant) {
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(end, ws.next()).await {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers_and_symbols() {
        let t = br#"{"type":"trade","exchange":"binance","symbol":"BTC-USDT","ts":1,"ts_recv":1672515782140000,"trade_id":"12345","price":"1"}"#;
        assert_eq!(
            number_after(t, b"\"ts_recv\":"),
            Some(1_672_515_782_140_000)
        );
        assert_eq!(number_after(t, b"\"trade_id\":"), Some(12_345));
        assert_eq!(symbol(t), Some(&b"BTC-USDT"[..]));
        assert_eq!(number_after(b"{}", b"\"ts_recv\":"), None);
    }
}
