//! The bot WebSocket server (PROTOCOL §4): accept, authenticate, one task pair per client,
//! shutdown.
//!
//! - [`router`]: the single task that owns subscriptions, caches and fan-out.
//! - [`client`]: each bot's bounded outbound queue and the slow-client policy.
//! - [`protocol`]: the request and reply types and error codes.
//!
//! Per connection: a reader task parses requests (refusals are answered through the router
//! too, so replies keep the order of requests) and a writer task drains the client's queue
//! in batches (`feed` each frame, one `flush`), pings every `ping_interval_ms` and records
//! delivery latency. A bot silent (no frame, not even a pong) for three ping intervals is
//! closed. On shutdown the server stops accepting, each writer flushes what is queued,
//! sends a Close frame and waits briefly for the bot's reply; then the router stops.
//!
//! This module never imports `exchange`: it sees only [`BusMessage`]s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::{BusState, Interest, SnapshotStore};
use crate::config::BotsConfig;
use crate::envelope::BusMessage;
use crate::event::now_micros;
use crate::health::HealthHandle;

pub mod client;
pub mod protocol;
pub mod router;

use client::{ClientId, ClientQueue, CloseReason, Outbound};
use protocol::{ErrorCode, RequestError};
use router::{Command, Router};

/// Commands waiting for the router (requests, connects, store answers).
const COMMAND_QUEUE: usize = 1_024;
/// Most frames written per flush.
const WRITE_BATCH: usize = 256;
/// A client that has not finished the WebSocket handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Shutdown: time to flush one client's queue, then to wait for its Close reply.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Upper bound for all connections to finish after shutdown began.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);

/// Counters shared by the server, the router and the client queues.
#[derive(Debug, Default)]
pub struct StatsInner {
    pub(crate) clients: AtomicU64,
    pub(crate) subscriptions: AtomicU64,
    pub(crate) frames_sent: AtomicU64,
    pub(crate) frames_dropped: AtomicU64,
    pub(crate) slow_disconnects: AtomicU64,
}

/// A cheap, cloneable view of the gateway's counters (demo summary line, `/health`).
#[derive(Debug, Clone, Default)]
pub struct GatewayStats(Arc<StatsInner>);

/// The counters at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct GatewayStatsSnapshot {
    /// Connected bots.
    pub clients: u64,
    /// Patterns held, over all bots.
    pub subscriptions: u64,
    /// Frames written to bot sockets.
    pub frames_sent: u64,
    /// Market frames dropped for slow bots (`drop_oldest`).
    pub frames_dropped: u64,
    /// Bots closed for being too slow (`disconnect`).
    pub slow_disconnects: u64,
}

impl GatewayStats {
    pub fn snapshot(&self) -> GatewayStatsSnapshot {
        let s = &self.0;
        GatewayStatsSnapshot {
            clients: s.clients.load(Ordering::Relaxed),
            subscriptions: s.subscriptions.load(Ordering::Relaxed),
            frames_sent: s.frames_sent.load(Ordering::Relaxed),
            frames_dropped: s.frames_dropped.load(Ordering::Relaxed),
            slow_disconnects: s.slow_disconnects.load(Ordering::Relaxed),
        }
    }
}

/// The bot server. Build with [`Gateway::new`], take [`Gateway::stats`], then [`Gateway::serve`].
pub struct Gateway {
    config: BotsConfig,
    messages: mpsc::Receiver<BusMessage>,
    local: Option<mpsc::Receiver<BusMessage>>,
    interest: watch::Sender<Interest>,
    store: Option<Arc<dyn SnapshotStore>>,
    health: HealthHandle,
    stats: Arc<StatsInner>,
    bus_state: Option<watch::Receiver<BusState>>,
}

/// What every connection task needs.
struct Shared {
    config: BotsConfig,
    stats: Arc<StatsInner>,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
    next_id: AtomicU64,
}

impl Gateway {
    /// `messages`: everything the bus delivers. `interest`: the gateway publishes the set of
    /// patterns some bot holds (the Redis subscriber follows it). `store`: where late
    /// joiners' latest values / book snapshots come from when not cached (None in demo).
    pub fn new(
        config: BotsConfig,
        messages: mpsc::Receiver<BusMessage>,
        interest: watch::Sender<Interest>,
        store: Option<Arc<dyn SnapshotStore>>,
        health: HealthHandle,
    ) -> Gateway {
        Gateway {
            config,
            messages,
            local: None,
            interest,
            store,
            health,
            stats: Arc::new(StatsInner::default()),
            bus_state: None,
        }
    }

    /// The bus state to follow (executor, hybrid): bots are told when it goes down or
    /// comes back, and books resync after it.
    pub fn with_bus_state(mut self, state: watch::Receiver<BusState>) -> Gateway {
        self.bus_state = Some(state);
        self
    }

    /// A second input for this instance's own events (hybrid). It is read before the bus
    /// input, so a burst from other publishers never holds up local delivery — and through
    /// it this instance's own publishing to Redis.
    pub fn with_local(mut self, local: mpsc::Receiver<BusMessage>) -> Gateway {
        self.local = Some(local);
        self
    }

    /// A handle on the counters; take it before [`Gateway::serve`] consumes the gateway.
    pub fn stats(&self) -> GatewayStats {
        GatewayStats(self.stats.clone())
    }

    /// Serves bots on `listener` until `shutdown`; then flushes each client's queue, sends
    /// a Close frame, and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let Gateway {
            config,
            messages,
            local,
            interest,
            store,
            health,
            stats,
            bus_state,
        } = self;
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let router = Router::new(
            interest,
            store,
            commands.clone(),
            stats.clone(),
            config.max_subscriptions,
        );
        let router = match bus_state {
            Some(state) => router.with_bus_state(state),
            None => router,
        };
        let router_stop = CancellationToken::new();
        let router_task =
            tokio::spawn(router.run(command_rx, local, messages, router_stop.clone()));

        let shared = Arc::new(Shared {
            config,
            stats,
            commands,
            shutdown: shutdown.clone(),
            next_id: AtomicU64::new(1),
        });
        let local = listener.local_addr()?;
        health.up(Some(format!("listening on {local}")));
        tracing::info!(addr = %local, "bot server listening");

        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tracker.spawn(connection(shared.clone(), stream, peer));
                    }
                    Err(e) => {
                        // Usually out of file descriptors: wait a little instead of spinning.
                        tracing::warn!(cause = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        health.down("shutting down");
        // Stop routing first: each client then flushes what is queued at this moment and
        // gets its Close frame, instead of chasing a queue the router keeps refilling.
        router_stop.cancel();
        if let Err(e) = router_task.await {
            tracing::error!(cause = %e, "router task failed");
        }
        tracker.close();
        if tokio::time::timeout(SHUTDOWN_DEADLINE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some bot connections did not close in time; abandoning them");
        }
        drop(shared);
        Ok(())
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
    /// A socket or protocol error.
    Error,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Timeout => "timeout",
            End::Slow => "slow",
            End::Shutdown => "shutdown",
            End::Error => "error",
        }
    }
}

async fn connection(shared: Arc<Shared>, stream: TcpStream, peer: std::net::SocketAddr) {
    // Small frames must leave at once; batching happens in the writer.
    let _ = stream.set_nodelay(true);
    let config = &shared.config;
    // tungstenite's own limit closes the connection; ours (below) answers with an error,
    // so it is set well above `max_message_bytes`.
    let hard_limit = config.max_message_bytes.saturating_mul(16).max(1 << 20);
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(hard_limit))
        .max_frame_size(Some(hard_limit));
    let tokens = config.tokens.clone();
    // The callback's signature is tungstenite's; its large `Err` is built only on refusal.
    #[allow(clippy::result_large_err)]
    let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if authorized(&tokens, req) {
            Ok(resp)
        } else {
            crate::metrics::bot_request_refused("unauthorized");
            Err(unauthorized())
        }
    };
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config));
    let ws = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => match r {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, cause = %e, "bot handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(peer = %peer, "bot handshake timed out");
                return;
            }
        },
    };

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
    let mut writer = tokio::spawn(write_loop(
        sink,
        queue.clone(),
        shared.clone(),
        writer_stop.clone(),
    ));
    let mut reader = tokio::spawn(read_loop(stream, id, shared.clone(), reader_stop.clone()));

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
            writer_stop.cancel();
            let _ = writer.await;
            end
        }
    };

    // The router forgets the client before the queue goes away; sent even during shutdown
    // (the router outlives every connection task).
    let _ = shared.commands.send(Command::Disconnect { id }).await;
    crate::metrics::bot_disconnected(end.as_str());
    shared.stats.clients.fetch_sub(1, Ordering::Relaxed);
    if end == End::Slow {
        shared
            .stats
            .slow_disconnects
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %peer, client = id, "bot disconnected: too slow");
    } else {
        tracing::debug!(peer = %peer, client = id, reason = end.as_str(), "bot disconnected");
    }
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Source = SplitStream<WebSocketStream<TcpStream>>;

/// Drains the client's queue onto the socket until the client goes or the server stops.
async fn write_loop(
    mut sink: Sink,
    queue: Arc<ClientQueue>,
    shared: Arc<Shared>,
    stop: CancellationToken,
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
                // The reader ended (bot closed or went silent): close our side, best effort.
                let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
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

/// Reads the bot's requests and hands them to the router until the bot goes.
async fn read_loop(
    mut stream: Source,
    id: ClientId,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> End {
    let silence = Duration::from_millis(shared.config.ping_interval_ms.max(1)).saturating_mul(3);
    let max = shared.config.max_message_bytes;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return End::Closed,
            r = tokio::time::timeout(silence, stream.next()) => r,
        };
        let message = match next {
            Err(_) => return End::Timeout,
            Ok(None) => return End::Closed,
            Ok(Some(Err(e))) => {
                return match e {
                    WsError::ConnectionClosed | WsError::AlreadyClosed => End::Closed,
                    WsError::Protocol(_) | WsError::Io(_) => {
                        tracing::debug!(client = id, cause = %e, "bot connection lost");
                        End::Closed
                    }
                    other => {
                        tracing::debug!(client = id, cause = %other, "bot connection error");
                        End::Error
                    }
                };
            }
            Ok(Some(Ok(m))) => m,
        };
        let command = match message {
            Message::Text(text) if text.len() > max => Command::Refused {
                id,
                error: RequestError::new(
                    ErrorCode::MessageTooLarge,
                    format!("frame of {} bytes exceeds the limit of {max}", text.len()),
                    None,
                ),
            },
            Message::Text(text) => match protocol::parse_request(&text) {
                Ok(request) => Command::Request { id, request },
                Err(error) => Command::Refused { id, error },
            },
            Message::Binary(_) => Command::Refused {
                id,
                error: RequestError::new(
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames",
                    None,
                ),
            },
            // Pings are answered by tungstenite; pongs only prove the bot is alive; after a
            // Close the stream ends by itself.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => continue,
        };
        if shared.commands.send(command).await.is_err() {
            return End::Shutdown;
        }
    }
}

/// Accepts the handshake when no tokens are configured, or when the request carries one of
/// them as `Authorization: Bearer <token>` or `?token=<token>`.
fn authorized(tokens: &[String], req: &Request) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string());
    let query = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    header.iter().chain(query.iter()).any(|given| {
        tokens
            .iter()
            .any(|t| constant_time_eq(t.as_bytes(), given.as_bytes()))
    })
}

/// The HTTP 401 answer to a handshake without a valid token.
fn unauthorized() -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some("missing or invalid token".to_string()));
    *resp.status_mut() = StatusCode::UNAUTHORIZED;
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// Compares tokens without an early exit, so timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
