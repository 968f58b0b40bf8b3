//! The bot WebSocket server (PROTOCOL §4): wiring and shutdown.
//!
//! - `listener`: the accept loop, the handshake cap, TLS, the file-descriptor budget.
//! - `handshake`: TLS and the WebSocket upgrade with admission (throttle, token, cap).
//! - `connection`: one bot from handshake to goodbye: reader and writer tasks.
//! - `auth`: tokens, `allow` lists, the failed-authentication throttle.
//! - `limits`: the per-connection request rate limit.
//! - `stream`: plain/TLS transport and the watch on incomplete incoming messages.
//! - [`router`]: the single task that owns subscriptions, caches and fan-out.
//! - [`client`]: each bot's bounded outbound queue and the slow-client policy.
//! - [`protocol`]: the request and reply types and error codes.
//!
//! On shutdown the server stops accepting, each writer flushes what is queued, sends a
//! Close frame and waits briefly for the bot's reply; then the router stops.
//!
//! This module never imports `exchange`: it sees only [`BusMessage`]s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::delivery::{Acked, StreamNotice};
use crate::bus::{BusState, Interest, SnapshotStore, StreamStore};
use crate::config::BotsConfig;
use crate::durable::DurablePolicy;
use crate::envelope::BusMessage;
use crate::health::HealthHandle;

mod auth;
pub mod client;
mod connection;
mod handshake;
mod limits;
mod listener;
pub mod protocol;
pub mod router;
mod stream;

use connection::Shared;
use router::Router;

/// Commands waiting for the router (requests, connects, store answers).
const COMMAND_QUEUE: usize = 1_024;
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
    /// Durable channels' streams, which are durable, and `max_replay` (`since`).
    streams: Option<(Arc<dyn StreamStore>, DurablePolicy, usize)>,
    durable: Option<(mpsc::Sender<Acked>, mpsc::Receiver<StreamNotice>)>,
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
            streams: None,
            durable: None,
        }
    }

    /// Durable channels (executor, hybrid): `since` replays read `streams` for the channels
    /// `policy` names, at most `max_replay` entries each; their latest values come from
    /// the streams too (with ids).
    pub fn with_streams(
        mut self,
        streams: Arc<dyn StreamStore>,
        policy: DurablePolicy,
        max_replay: usize,
    ) -> Gateway {
        self.streams = Some((streams, policy, max_replay));
        self
    }

    /// Durable channels (executor, hybrid): the router acks stream entries on `acks` and
    /// reads gaps and claimed entries from `notices` (see `bus::redis::streams`).
    pub fn with_durable(
        mut self,
        acks: mpsc::Sender<Acked>,
        notices: mpsc::Receiver<StreamNotice>,
    ) -> Gateway {
        self.durable = Some((acks, notices));
        self
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
            streams,
            durable,
        } = self;
        // Everything that can fail at start comes before the router and the listener.
        let tls = match listener::tls_acceptor(&config) {
            Ok(tls) => tls,
            Err(e) => {
                // The caller only sees this at shutdown: say it now, and in /health.
                tracing::error!(cause = %e, "bot server cannot start");
                health.down(e.to_string());
                return Err(e);
            }
        };
        let max_connections = listener::connection_budget(&config);
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
        let router = match streams {
            Some((streams, policy, max_replay)) => router.with_streams(streams, policy, max_replay),
            None => router,
        };
        let router = match durable {
            Some((acks, notices)) => router.with_acks(acks).with_notices(notices),
            None => router,
        };
        let router_stop = CancellationToken::new();
        let router_task =
            tokio::spawn(router.run(command_rx, local, messages, router_stop.clone()));

        let shared = Arc::new(Shared {
            tokens: auth::Tokens::new(&config.tokens),
            throttle: auth::AuthThrottle::new(&config),
            ws_config: Shared::ws_config(&config),
            max_connections,
            connections: Arc::new(AtomicUsize::new(0)),
            tls,
            config,
            stats,
            commands,
            shutdown: shutdown.clone(),
            next_id: AtomicU64::new(1),
        });
        let local = listener.local_addr()?;
        let scheme = if shared.tls.is_some() { "wss" } else { "ws" };
        health.up(Some(format!("listening on {scheme}://{local}")));
        tracing::info!(addr = %local, scheme, max_connections, "bot server listening");

        let tracker = TaskTracker::new();
        listener::accept_loop(&listener, &shared, &tracker).await;
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
