//! One exchange WebSocket: connect (bounded by a timeout, failures described in words an
//! operator acts on: DNS, refused, TLS, HTTP status), the paced SUBSCRIBE requests and
//! their answers, and a clean close.
//!
//! It knows nothing about events, books, reconnects or rotation: [`super::connection`]
//! owns those and holds one or two `Socket`s at a time.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::connection::ConnError;
use super::AckId;

pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest time spent sending unsubscribe requests on a socket being let go.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How to open a socket: the venue's pacing and the feed's message size limit.
#[derive(Debug, Clone)]
pub(super) struct OpenOptions {
    /// Gap between two subscribe requests (the venue's inbound rate limit).
    pub(super) pacing: Duration,
    /// Largest message (and frame) accepted; buffers grow to it only while such a message
    /// is read.
    pub(super) max_message_bytes: usize,
    /// No frame until then means a dead connection.
    pub(super) stale_after: Duration,
}

/// One open exchange socket and how far its subscription got.
pub(super) struct Socket {
    pub(super) ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pending_acks: HashSet<AckId>,
    /// Every SUBSCRIBE request has been answered.
    pub(super) subscribed: bool,
    /// The exchange's reason for the first SUBSCRIBE it refused on this socket: the feed
    /// stays unhealthy (never a silent green) while this socket serves it.
    pub(super) refused: Option<String>,
    /// No frame until then means a dead connection.
    pub(super) stale_at: Instant,
    /// The venue's number of the last message on this connection (Coinbase
    /// `sequence_num`), where it numbers them.
    pub(super) last_sequence: Option<u64>,
}

impl Socket {
    /// Connects (bounded by [`CONNECT_TIMEOUT`]) and sends the SUBSCRIBE requests, paced.
    pub(super) async fn open(
        url: String,
        requests: Vec<(AckId, String)>,
        options: OpenOptions,
    ) -> Result<Socket, ConnError> {
        let stale_after = options.stale_after;
        let config = WebSocketConfig::default()
            .max_message_size(Some(options.max_message_bytes))
            .max_frame_size(Some(options.max_message_bytes));
        let ws = match timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), false),
        )
        .await
        {
            Err(_) => return Err(ConnError::ConnectTimeout(CONNECT_TIMEOUT)),
            Ok(Err(e)) => return Err(ConnError::Connect(connect_cause(&e))),
            Ok(Ok((ws, _response))) => ws,
        };
        let mut sock = Socket {
            ws,
            pending_acks: requests.iter().map(|(id, _)| id.clone()).collect(),
            subscribed: requests.is_empty(),
            refused: None,
            stale_at: Instant::now() + stale_after,
            last_sequence: None,
        };
        for (i, (_, text)) in requests.into_iter().enumerate() {
            if i > 0 && !options.pacing.is_zero() {
                sleep(options.pacing).await;
            }
            sock.ws
                .send(Message::text(text))
                .await
                .map_err(|e| ConnError::Socket(e.to_string()))?;
        }
        sock.stale_at = Instant::now() + stale_after;
        Ok(sock)
    }

    /// Counts an answer to a request; true when it was the last one missing.
    pub(super) fn on_answer(&mut self, id: Option<AckId>) -> bool {
        if self.subscribed {
            return false;
        }
        match id {
            Some(id) => {
                self.pending_acks.remove(&id);
            }
            // An answer that names no request (Binance's older error shape) cannot be
            // matched: count every request answered rather than wait forever for acks.
            None => self.pending_acks.clear(),
        }
        self.subscribed = self.pending_acks.is_empty();
        self.subscribed
    }

    /// Checks the venue's connection-wide message number: `Err((expected, got))` when
    /// messages went missing since the last one. A number at or below the last one is let
    /// be ("Sequence numbers that are less than the previous number can be ignored or
    /// represent a message that has arrived out of order", Coinbase's WebSocket overview).
    pub(super) fn check_sequence(&mut self, seq: u64) -> Result<(), (u64, u64)> {
        next_sequence(&mut self.last_sequence, seq)
    }

    /// Sends the venue's unsubscribe `requests` (paced like the subscriptions, not awaited,
    /// all within [`LEAVE_TIMEOUT`]), then [`Self::close`]s: the venue stops sending on a
    /// socket the feed lets go before the socket is gone.
    pub(super) async fn leave(mut self, requests: Vec<(AckId, String)>, pacing: Duration) {
        let _ = timeout(LEAVE_TIMEOUT, async {
            for (i, (_, text)) in requests.into_iter().enumerate() {
                if i > 0 && !pacing.is_zero() {
                    sleep(pacing).await;
                }
                if self.ws.send(Message::text(text)).await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.close().await;
    }

    /// Closes with a Close frame and reads on (discarding) until the exchange answers it,
    /// all within [`CLOSE_TIMEOUT`]: dropping a socket with unread data would reset it
    /// instead of closing it.
    pub(super) async fn close(mut self) {
        let _ = timeout(CLOSE_TIMEOUT, async {
            if self.ws.close(None).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }
}

/// Why a connect failed, in words an operator acts on: DNS, refused, TLS, HTTP status.
fn connect_cause(e: &WsError) -> String {
    match e {
        WsError::Io(io) => {
            let text = io.to_string();
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                format!("connection refused ({text})")
            } else if text.contains("lookup address") || text.contains("resolve") {
                format!("DNS lookup failed ({text})")
            } else {
                format!("network error ({text})")
            }
        }
        WsError::Tls(tls) => format!("TLS handshake failed ({tls})"),
        WsError::Http(response) => {
            let status = response.status();
            format!(
                "the server answered the WebSocket upgrade with HTTP {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            )
        }
        WsError::Url(u) => format!("bad url ({u})"),
        other => other.to_string(),
    }
}

/// [`Socket::check_sequence`] on its own: moves `last` on to `seq` unless `seq` is at or
/// below it; `Err((expected, got))` when numbers were skipped.
fn next_sequence(last: &mut Option<u64>, seq: u64) -> Result<(), (u64, u64)> {
    match *last {
        Some(prev) if seq <= prev => Ok(()),
        Some(prev) if seq != prev.saturating_add(1) => {
            *last = Some(seq);
            Err((prev.saturating_add(1), seq))
        }
        _ => {
            *last = Some(seq);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_numbers_gap_only_forward_and_late_ones_are_let_be() {
        let mut last = None;
        assert_eq!(next_sequence(&mut last, 5), Ok(()));
        assert_eq!(next_sequence(&mut last, 6), Ok(()));
        // Repeated or late: ignored, the count stays at 6.
        assert_eq!(next_sequence(&mut last, 6), Ok(()));
        assert_eq!(next_sequence(&mut last, 3), Ok(()));
        assert_eq!(next_sequence(&mut last, 7), Ok(()));
        // Skipped 8 and 9.
        assert_eq!(next_sequence(&mut last, 10), Err((8, 10)));
        assert_eq!(next_sequence(&mut last, 11), Ok(()));
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn open_err(url: String) -> String {
        let options = OpenOptions {
            pacing: Duration::ZERO,
            max_message_bytes: 1 << 20,
            stale_after: Duration::from_secs(5),
        };
        match Socket::open(url, Vec::new(), options).await {
            Err(ConnError::Connect(cause)) => cause,
            Err(other) => panic!("expected a connect error, got {other}"),
            Ok(_) => panic!("connected"),
        }
    }

    #[tokio::test]
    async fn connect_failures_say_why() {
        // Nothing listens: refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let cause = open_err(format!("ws://127.0.0.1:{port}/stream")).await;
        assert!(cause.starts_with("connection refused"), "{cause}");

        // Something answers the upgrade with an HTTP error: its status.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 2048];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let cause = open_err(format!("ws://{addr}/stream")).await;
        assert!(cause.contains("HTTP 503 Service Unavailable"), "{cause}");
    }
}
