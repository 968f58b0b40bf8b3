//! One bot connection from accepted socket to goodbye: the handshake (`handshake.rs`),
//! then a reader and a writer task.
//!
//! - The handshake runs under `HANDSHAKE_TIMEOUT` while holding a handshake permit
//!   (see `listener.rs`); the permit goes back as soon as it is over.
//! - The reader rate-limits requests (`limits.rs`; one token per channel named), parses them, refuses subscriptions
//!   outside the token's `allow` list, and hands everything to the router; refusals go
//!   through the router too, so replies keep the order of requests. Protocol violations
//!   end it with a close code per RFC 6455: 1009 too big, 1007 invalid UTF-8, 1002
//!   protocol error, 1008 for an overdue message or a request flood.
//! - The writer drains the client's queue in batches (`feed` each frame, one `flush`),
//!   pings every `ping_interval_ms` and records delivery latency; it sends the Close
//!   frame the reader's ending asks for. A bot silent (no frame, not even a pong) for
//!   three ping intervals is closed.
//!
//! Owns no subscription state: that is the router's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_util::sync::CancellationToken;

use super::auth::{AuthThrottle, Permissions, Tokens};
use super::client::{ClientId, ClientQueue, CloseReason, Outbound};
use super::handshake::{handshake, Admitted, HandshakeFailure, Ws};
use super::limits::{RateLimiter, Verdict};
use super::protocol::{self, ErrorCode, Op, Request as BotRequest, RequestError};
use super::router::Command;
use super::stream::MessageTimeout;
use super::StatsInner;
use crate::config::BotsConfig;
use crate::event::now_micros;

/// Most frames written per flush.
const WRITE_BATCH: usize = 256;
/// A client that has not finished the TLS and WebSocket handshakes by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shutdown: time to flush one client's queue, then to wait for its Close reply.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// tungstenite reads into a buffer of this size (default 128 KiB, allocated eagerly per
/// connection); bot requests are small, and a larger message just takes more reads.
const READ_BUFFER: usize = 8 * 1024;
/// tungstenite writes to the socket once this much is buffered (and on every flush); our
/// writer flushes after each batch anyway, so this only caps one batch's coalescing.
const WRITE_BUFFER: usize = 32 * 1024;

/// What every connection task needs.
pub struct Shared {
    pub config: BotsConfig,
    pub stats: Arc<StatsInner>,
    pub commands: mpsc::Sender<Command>,
    pub shutdown: CancellationToken,
    pub next_id: AtomicU64,
    pub tokens: Tokens,
    pub throttle: AuthThrottle,
    /// `max_connections` after the file-descriptor budget.
    pub max_connections: usize,
    /// Upgrades accepted and not yet ended (a [`Slot`] each).
    pub connections: Arc<AtomicUsize>,
    pub tls: Option<TlsAcceptor>,
    pub ws_config: WebSocketConfig,
}

impl Shared {
    pub fn ws_config(config: &BotsConfig) -> WebSocketConfig {
        // The limit is the configured one exactly: tungstenite refuses a frame whose header
        // announces more before reading its payload, and a fragmented message as soon as
        // its parts add up to more, so no connection ever buffers more than this.
        let max = config.max_message_bytes.max(1);
        WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max))
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(WRITE_BUFFER)
    }
}

/// Why a connection ended (the `reason` label of the disconnect metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The bot closed the connection.
    Closed,
    /// No frame from the bot for three ping intervals.
    Timeout,
    /// The queue overflowed under the `disconnect` policy (or control replies piled up).
    Slow,
    /// The server is shutting down.
    Shutdown,
    /// A socket error.
    Error,
    /// A message or frame over `max_message_bytes` (1009).
    TooBig,
    /// A text message that is not UTF-8 (1007).
    BadUtf8,
    /// A message still incomplete after `message_timeout_ms` (1008).
    MessageTimeout,
    /// Requests far past the rate limit (1008).
    Flood,
    /// Any other WebSocket protocol violation (1002).
    Protocol,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Timeout => "timeout",
            End::Slow => "slow",
            End::Shutdown => "shutdown",
            End::Error => "error",
            End::TooBig => "too_big",
            End::BadUtf8 => "bad_utf8",
            End::MessageTimeout => "message_timeout",
            End::Flood => "flood",
            End::Protocol => "protocol",
        }
    }

    /// The Close frame this ending sends, when it has its own code.
    fn close_frame(self, config: &BotsConfig) -> Option<CloseFrame> {
        let (code, reason) = match self {
            End::TooBig => (
                CloseCode::Size,
                format!("message larger than {} bytes", config.max_message_bytes),
            ),
            End::BadUtf8 => (CloseCode::Invalid, "text message is not valid UTF-8".into()),
            End::MessageTimeout => (
                CloseCode::Policy,
                format!(
                    "message not completed within {} ms",
                    config.message_timeout_ms
                ),
            ),
            End::Flood => (CloseCode::Policy, "too many requests".into()),
            End::Protocol => (CloseCode::Protocol, "protocol error".into()),
            _ => return None,
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }
}

type Sink = SplitSink<Ws, Message>;
type Source = SplitStream<Ws>;

pub async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    // Small frames must leave at once; batching happens in the writer.
    let _ = tcp.set_nodelay(true);
    let sndbuf = shared.config.send_buffer_bytes;
    if sndbuf > 0 {
        if let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(sndbuf) {
            tracing::debug!(peer = %peer, cause = %e, "cannot set SO_SNDBUF on a bot socket");
        }
    }
    let result = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&shared, tcp, peer)) => r,
    };
    drop(permit);
    let (ws, admitted) = match result {
        Ok(Ok(done)) => done,
        Ok(Err(HandshakeFailure::Refused)) => return,
        Ok(Err(HandshakeFailure::Tls(e))) => {
            crate::metrics::bot_handshake_failed("tls");
            tracing::debug!(peer = %peer, cause = %e, "bot TLS handshake failed");
            return;
        }
        Ok(Err(HandshakeFailure::WebSocket(e))) => {
            crate::metrics::bot_handshake_failed("websocket");
            tracing::debug!(peer = %peer, cause = %e, "bot handshake failed");
            return;
        }
        Err(_) => {
            crate::metrics::bot_handshake_failed("timeout");
            tracing::debug!(peer = %peer, "bot handshake timed out");
            return;
        }
    };
    serve_client(&shared, ws, admitted, peer).await;
}

async fn serve_client(shared: &Arc<Shared>, ws: Ws, admitted: Admitted, peer: SocketAddr) {
    let config = &shared.config;
    let Admitted { perms, slot } = admitted;
    let id: ClientId = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let queue = Arc::new(ClientQueue::new(
        id,
        config.queue_size,
        config.slow_client,
        shared.stats.clone(),
    ));
    if shared
        .commands
        .send(Command::Connect {
            id,
            queue: queue.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    crate::metrics::bot_connected();
    shared.stats.clients.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(peer = %peer, client = id, "bot connected");

    let (sink, stream) = ws.split();
    let writer_stop = CancellationToken::new();
    let reader_stop = CancellationToken::new();
    let close: Arc<OnceLock<CloseFrame>> = Arc::new(OnceLock::new());
    let mut writer = tokio::spawn(write_loop(
        sink,
        queue.clone(),
        shared.clone(),
        writer_stop.clone(),
        close.clone(),
    ));
    let mut reader = tokio::spawn(read_loop(
        stream,
        id,
        shared.clone(),
        reader_stop.clone(),
        perms,
    ));

    let end = tokio::select! {
        w = &mut writer => {
            let end = w.unwrap_or(End::Error);
            if end == End::Shutdown {
                // The Close frame is out: let the reader see the bot's reply, briefly.
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
            }
            reader_stop.cancel();
            let _ = reader.await;
            end
        }
        r = &mut reader => {
            let end = r.unwrap_or(End::Error);
            if let Some(frame) = end.close_frame(config) {
                let _ = close.set(frame);
            }
            writer_stop.cancel();
            let _ = writer.await;
            end
        }
    };

    // The router forgets the client before the queue goes away; sent even during shutdown
    // (the router outlives every connection task).
    let _ = shared.commands.send(Command::Disconnect { id }).await;
    drop(slot);
    crate::metrics::bot_disconnected(end.as_str());
    shared.stats.clients.fetch_sub(1, Ordering::Relaxed);
    match end {
        End::Slow => {
            shared
                .stats
                .slow_disconnects
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %peer, client = id, "bot disconnected: too slow");
        }
        End::TooBig | End::BadUtf8 | End::MessageTimeout | End::Flood | End::Protocol => {
            tracing::debug!(peer = %peer, client = id, reason = end.as_str(), "bot closed for a protocol violation");
        }
        _ => {
            tracing::debug!(peer = %peer, client = id, reason = end.as_str(), "bot disconnected")
        }
    }
}

/// Drains the client's queue onto the socket until the client goes or the server stops.
async fn write_loop(
    mut sink: Sink,
    queue: Arc<ClientQueue>,
    shared: Arc<Shared>,
    stop: CancellationToken,
    close: Arc<OnceLock<CloseFrame>>,
) -> End {
    let every = Duration::from_millis(shared.config.ping_interval_ms.max(1));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let kill = queue.kill_token().clone();
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        if queue.take_batch(&mut batch, WRITE_BATCH) == Some(CloseReason::Slow) {
            return close_slow(&mut sink).await;
        }
        if !batch.is_empty() {
            let written = tokio::select! {
                // A bot that stopped reading leaves us stuck in the write: the kill frees us.
                _ = kill.cancelled() => return close_slow(&mut sink).await,
                r = write_batch(&mut sink, &mut batch, &shared.stats) => r,
            };
            if let Err(e) = written {
                tracing::debug!(client = queue.id(), cause = %e, "write to bot failed");
                return End::Error;
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = kill.cancelled() => {}
            _ = stop.cancelled() => {
                // The reader ended: say why when it has a close code, else close plainly.
                let _ = match close.get() {
                    Some(frame) => {
                        let goodbye = Message::Close(Some(frame.clone()));
                        tokio::time::timeout(CLOSE_GRACE, sink.send(goodbye)).await
                    }
                    None => tokio::time::timeout(CLOSE_GRACE, sink.close()).await,
                };
                return End::Closed;
            }
            _ = shared.shutdown.cancelled() => return flush_and_close(&mut sink, &queue, &shared.stats).await,
            _ = queue.notified() => {}
            _ = ping.tick() => {
                let sent = tokio::select! {
                    _ = kill.cancelled() => continue,
                    r = sink.send(Message::Ping(bytes::Bytes::new())) => r,
                };
                if sent.is_err() {
                    return End::Error;
                }
            }
        }
    }
}

async fn write_batch(
    sink: &mut Sink,
    batch: &mut Vec<Outbound>,
    stats: &StatsInner,
) -> Result<(), WsError> {
    let mut market_ts = Vec::with_capacity(batch.len());
    let n = batch.len() as u64;
    for frame in batch.drain(..) {
        let text = match frame {
            Outbound::Market { text, ts_recv, .. } => {
                market_ts.push(ts_recv);
                text
            }
            Outbound::Control(text) => text,
        };
        sink.feed(Message::Text(text)).await?;
    }
    sink.flush().await?;
    crate::metrics::bot_frames_sent(n);
    stats.frames_sent.fetch_add(n, Ordering::Relaxed);
    let now = now_micros();
    for ts in market_ts {
        crate::metrics::delivery_latency(Duration::from_micros(now.saturating_sub(ts)));
    }
    Ok(())
}

/// Shutdown: write what is queued, then a Close frame, each within a deadline so one slow
/// bot cannot hold the process.
async fn flush_and_close(sink: &mut Sink, queue: &ClientQueue, stats: &StatsInner) -> End {
    let flush = async {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        loop {
            if queue.take_batch(&mut batch, WRITE_BATCH).is_some() || batch.is_empty() {
                return Ok(());
            }
            write_batch(sink, &mut batch, stats).await?;
        }
    };
    let flushed: Result<Result<(), WsError>, _> = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
    // Flushed, or still busy at the deadline (a slow reader): either way say goodbye. Only
    // a broken socket gets no Close frame.
    if !matches!(flushed, Ok(Err(_))) {
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "server shutting down".into(),
        }));
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(close)).await;
    }
    End::Shutdown
}

async fn close_slow(sink: &mut Sink) -> End {
    let close = Message::Close(Some(CloseFrame {
        code: CloseCode::Policy,
        reason: "too slow: outbound queue full".into(),
    }));
    // The socket is likely full; do not wait for long.
    let _ = tokio::time::timeout(Duration::from_millis(100), sink.send(close)).await;
    End::Slow
}

/// How a read error ends the connection.
fn read_error(id: ClientId, e: WsError) -> End {
    match e {
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::Closed,
        WsError::Capacity(_) => End::TooBig,
        WsError::Utf8 => End::BadUtf8,
        WsError::Io(e) if MessageTimeout::is(&e) => End::MessageTimeout,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) | WsError::Io(_) => {
            tracing::debug!(client = id, cause = %e, "bot connection lost");
            End::Closed
        }
        WsError::Protocol(p) => {
            tracing::debug!(client = id, cause = %p, "bot protocol error");
            End::Protocol
        }
        other => {
            tracing::debug!(client = id, cause = %other, "bot connection error");
            End::Error
        }
    }
}

/// Reads the bot's requests and hands them to the router until the bot goes.
async fn read_loop(
    mut stream: Source,
    id: ClientId,
    shared: Arc<Shared>,
    stop: CancellationToken,
    perms: Permissions,
) -> End {
    let config = &shared.config;
    let silence = Duration::from_millis(config.ping_interval_ms.max(1)).saturating_mul(3);
    let mut limiter = RateLimiter::new(
        config.max_requests_per_sec,
        config.request_burst,
        Instant::now(),
    );
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return End::Closed,
            r = tokio::time::timeout(silence, stream.next()) => r,
        };
        let message = match next {
            Err(_) => return End::Timeout,
            Ok(None) => return End::Closed,
            Ok(Some(Err(e))) => return read_error(id, e),
            Ok(Some(Ok(m))) => m,
        };
        let text = match message {
            Message::Text(text) => Some(text),
            Message::Binary(_) => None,
            // Pings are answered by tungstenite; pongs only prove the bot is alive; after a
            // Close the stream ends by itself.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => continue,
        };
        // Not parsed when not even one token is left: a limited request costs as little as
        // possible. Otherwise parsed, then charged one token per channel it names.
        let command = match limiter.ready(Instant::now()) {
            None => {
                let parsed = match text {
                    Some(text) => protocol::parse_request(&text),
                    None => Err(RequestError::new(
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send JSON text frames",
                        None,
                    )),
                };
                let cost = parsed.as_ref().map_or(1, request_cost);
                match limiter.charge(cost) {
                    Verdict::Allow => match parsed {
                        Ok(request) => match forbidden(&perms, &request) {
                            Some(error) => Command::Refused { id, error },
                            None => Command::Request { id, request },
                        },
                        Err(error) => Command::Refused { id, error },
                    },
                    Verdict::Limited => Command::Refused {
                        id,
                        error: rate_limited(config, cost, parsed.ok().and_then(|r| r.req)),
                    },
                    Verdict::Flood => return End::Flood,
                }
            }
            Some(Verdict::Flood) => return End::Flood,
            Some(_) => Command::Refused {
                id,
                error: rate_limited(config, 1, None),
            },
        };
        if shared.commands.send(command).await.is_err() {
            return End::Shutdown;
        }
    }
}

/// Tokens a request costs: one per distinct channel pattern it names, at least one.
fn request_cost(request: &BotRequest) -> usize {
    match &request.op {
        Op::Subscribe { patterns, .. } | Op::Unsubscribe { patterns } => patterns.len().max(1),
        Op::Ping => 1,
    }
}

/// The `rate_limited` answer; `req` is known only when the request was parsed.
fn rate_limited(config: &BotsConfig, cost: usize, req: protocol::ReqId) -> RequestError {
    RequestError::new(
        ErrorCode::RateLimited,
        format!(
            "request costs {cost} (one per channel); more than {} per second (burst {}) \
             allowed; request not processed",
            config.max_requests_per_sec, config.request_burst
        ),
        req,
    )
}

/// The refusal of a subscription outside the token's `allow` list (all or nothing).
fn forbidden(perms: &Permissions, request: &BotRequest) -> Option<RequestError> {
    let Op::Subscribe { patterns, .. } = &request.op else {
        return None;
    };
    let denied = perms.first_forbidden(patterns)?;
    Some(RequestError::new(
        ErrorCode::Forbidden,
        format!("`{denied}` is outside what this token may subscribe to"),
        request.req.clone(),
    ))
}
