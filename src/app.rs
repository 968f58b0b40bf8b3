//! Wires the parts together for each role — publisher, executor, hybrid, demo — and owns
//! the shutdown order.
//!
//! Every entry point takes already-bound listeners and a [`CancellationToken`]; signals are
//! caught only in `main`, so tests, `demo` and the roles run exactly the same code.
//!
//! Shutdown order, each step bounded by `instance.shutdown_timeout_ms` in total:
//! 1. stop reading exchange sockets (feeds return);
//! 2. the publisher pipeline drains what the feeds queued, then the Redis publisher flushes;
//! 3. the bot server stops accepting, flushes each client's queue, sends a Close frame;
//! 4. the admin listener stops; the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use uuid::Uuid;

use crate::bus::delivery::{merge_states, SkipDurable};
use crate::bus::memory::MemoryBus;
use crate::bus::redis::streams::{ConsumerLinks, ConsumerSetup};
use crate::bus::redis::{
    check_connection, RedisPublisher, RedisStore, RedisSubscriber, StreamConsumer, StreamSetup,
};
use crate::bus::signing::Keyring;
use crate::bus::{run_publisher, Bus, BusState, Interest, SnapshotStore, Tee};
use crate::config::{Config, FeedChannel, FeedConfig, Role};
use crate::durable::DurablePolicy;
use crate::envelope::BusMessage;
use crate::event::{Event, Exchange};
use crate::exchange::registry::Simulator;
use crate::gateway::Gateway;
use crate::health::Health;
use crate::http::AdminState;

/// Capacity of the queue between exchange feeds and the publisher pipeline.
const EVENT_QUEUE: usize = 65_536;
/// Capacity of the queue between the bus (local or Redis) and the bot router.
const DELIVERY_QUEUE: usize = 65_536;
/// Capacity of the queue of stream notices (gaps, claimed entries) to the router.
const NOTICE_QUEUE: usize = 1_024;

/// Errors that stop an instance from starting.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Redis did not answer at start (the message names the URL, password hidden).
    /// Transparent: `{0}` with `#[from]` would print the cause twice in an error chain.
    #[error(transparent)]
    Redis(#[from] crate::bus::BusError),
    #[error("cannot listen on {addr} ({what}): {cause}")]
    Bind {
        what: &'static str,
        addr: String,
        cause: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The sockets an instance serves on, bound by the caller (tests bind port 0).
pub struct Listeners {
    pub http: TcpListener,
    /// The bot server; unused by a pure publisher.
    pub bots: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses from `config` (the bot port only for roles that serve bots).
    pub async fn bind(config: &Config, role: Role) -> Result<Listeners, AppError> {
        let http = bind("admin HTTP (http.listen)", &config.http.listen).await?;
        let bots = if role == Role::Publisher {
            None
        } else {
            Some(bind("bot WebSocket (bots.listen)", &config.bots.listen).await?)
        };
        Ok(Listeners { http, bots })
    }
}

pub async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|cause| AppError::Bind {
            what,
            addr: addr.to_string(),
            cause,
        })
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Publisher => "publisher",
        Role::Executor => "executor",
        Role::Hybrid => "hybrid",
    }
}

/// Runs `role` until `shutdown` is cancelled, then shuts down in order.
pub async fn run(
    role: Role,
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let metrics = crate::metrics::install();
    let timeout = Duration::from_millis(config.redis.probe_timeout_ms.max(2_000));
    check_connection(&config.redis, timeout).await?;
    let src = Uuid::new_v4();
    let health = Health::new();
    info!(
        role = role_name(role),
        instance = %config.instance.name,
        src = %src,
        "starting"
    );
    log_fd_limit(&config);

    let stops = Stops::new();
    let admin = AdminState {
        instance: config.instance.name.clone(),
        role: role_name(role),
        health: health.clone(),
        metrics,
        redis: crate::bus::redis::Target::new(&config.redis, "health").ok(),
        limits: crate::http::AdminLimits::from_config(&config.http),
        streams: crate::http::streams::StreamsAdmin::new(&config).map(Arc::new),
    };
    let http_task = spawn_http(listeners.http, admin, stops.http.clone());
    // Durable streams: gauges, `degraded` health of this instance's group, group GC.
    let monitor_task = crate::bus::redis::stream_monitor::MonitorSettings::from_config(&config)
        .and_then(|settings| {
            let target = crate::bus::redis::Target::new(&config.redis, "health").ok()?;
            let health = (role != Role::Publisher).then(|| health.register("streams"));
            Some(crate::bus::redis::stream_monitor::spawn(
                target,
                settings,
                health,
                stops.http.clone(),
            ))
        });

    // Bot side: executor and hybrid.
    let mut gateway_task = None;
    let mut local_delivery = None;
    let mut subscriber_task = None;
    let mut consumer_task = None;
    let durable = DurablePolicy::from_config(&config.durable);
    if role != Role::Publisher {
        let (tx, rx) = mpsc::channel::<BusMessage>(DELIVERY_QUEUE);
        let (interest_tx, interest_rx) = watch::channel::<Interest>(Interest::default());
        let (bus_state_tx, mut bus_state_rx) = watch::channel(BusState::Up);
        subscriber_task = Some(RedisSubscriber::spawn_durable(
            config.redis.clone(),
            src,
            durable.clone(),
            interest_rx.clone(),
            tx.clone(),
            health.register("redis_subscriber"),
            bus_state_tx,
            stops.gateway.clone(),
        ));
        // Durable channels: read from their streams with the consumer group, acked by the
        // router after fan-out (bus::redis::streams).
        let mut durable_links = None;
        if !durable.is_empty() {
            // Acks never outnumber the messages the router can hold: none is lost.
            let (ack_tx, ack_rx) = mpsc::channel(DELIVERY_QUEUE);
            let (notice_tx, notice_rx) = mpsc::channel(NOTICE_QUEUE);
            let (streams_state_tx, streams_state_rx) = watch::channel(BusState::Up);
            consumer_task = Some(StreamConsumer::spawn(
                ConsumerSetup {
                    redis: config.redis.clone(),
                    durable: config.durable.clone(),
                    group: config.durable.group_name(&config.instance).to_string(),
                    consumer: config.instance.name.clone(),
                },
                ConsumerLinks {
                    interest: interest_rx,
                    out: tx.clone(),
                    acks: ack_rx,
                    notices: notice_tx,
                    health: health.register("redis_streams"),
                    bus_state: streams_state_tx,
                },
                stops.gateway.clone(),
            ));
            bus_state_rx = merge_states(bus_state_rx, streams_state_rx);
            durable_links = Some((ack_tx, notice_rx));
        }
        let store = Arc::new(RedisStore::connect(&config.redis).await?);
        let snapshots: Arc<dyn SnapshotStore> = store.clone();
        let gateway = Gateway::new(
            config.bots.clone(),
            rx,
            interest_tx,
            Some(snapshots),
            health.register("bot_server"),
        )
        .with_bus_state(bus_state_rx)
        .with_streams(
            store,
            crate::durable::DurablePolicy::from_config(&config.durable),
            config.durable.max_replay,
        );
        let gateway = match durable_links {
            Some((acks, notices)) => gateway.with_durable(acks, notices),
            None => gateway,
        };
        let gateway = if role == Role::Hybrid {
            let (local_tx, local_rx) = mpsc::channel::<BusMessage>(DELIVERY_QUEUE);
            local_delivery = Some(local_tx);
            gateway.with_local(local_rx)
        } else {
            gateway
        };
        drop(tx);
        if let Some(listener) = listeners.bots {
            log_listen("bots", &listener);
            gateway_task = Some(tokio::spawn(gateway.serve(listener, stops.gateway.clone())));
        }
    }

    // Exchange side: publisher and hybrid.
    let mut feeds = Vec::new();
    let mut pipeline = None;
    let mut redis_pub_task = None;
    if role != Role::Executor {
        let (events_tx, events_rx) = mpsc::channel::<Event>(EVENT_QUEUE);
        feeds = spawn_feeds(&config.feeds, &events_tx, &health, &stops.feeds);
        // Durable channels; the buffer's overflow notices join the feeds' events (weakly).
        let streams = StreamSetup::from_config(&config.durable).with_notices(&events_tx);
        drop(events_tx);
        let (publisher, task) = RedisPublisher::spawn_with_streams(
            config.redis.clone(),
            src,
            streams,
            health.register("redis_publisher"),
            stops.publisher.clone(),
        );
        redis_pub_task = Some(task);
        let keys = Keyring::from_config(&config.redis);
        pipeline = Some(match local_delivery.take() {
            // Durable channels are not delivered in-process: they come back through the
            // stream consumer with their ids, like on an executor.
            Some(tx) => {
                let local = SkipDurable {
                    inner: MemoryBus::new(tx),
                    policy: durable.clone(),
                };
                spawn_pipeline(events_rx, src, keys, Tee(publisher, local))
            }
            None => spawn_pipeline(events_rx, src, keys, publisher),
        });
    }
    drop(local_delivery);

    shutdown.cancelled().await;
    info!("shutting down");
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(config.instance.shutdown_timeout_ms);
    stops.feeds.cancel();
    join_all_by(feeds, deadline, "exchange feeds").await;
    join_by(pipeline, deadline, "publisher pipeline").await;
    stops.publisher.cancel();
    join_by(redis_pub_task, deadline, "redis publisher").await;
    stops.gateway.cancel();
    if let Some(task) = gateway_task {
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Err(e))) => warn!(cause = %e, "bot server ended with an error"),
            Ok(_) => {}
            Err(_) => warn!("bot server did not finish in time"),
        }
    }
    join_by(subscriber_task, deadline, "redis subscriber").await;
    join_by(consumer_task, deadline, "redis stream consumer").await;
    stops.http.cancel();
    join_by(monitor_task, deadline, "stream monitor").await;
    join_by(Some(http_task), deadline, "admin HTTP").await;
    info!("stopped");
    Ok(())
}

/// Options of `mdbridge demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The simulated venues and their symbols (`exchange::registry::demo_venues`).
    pub venues: Vec<(Exchange, Vec<String>)>,
    pub rate: u32,
    pub summary_every: Duration,
    /// How to run `mdbridge watch` from here, for the banner (`cargo run -- watch`, a
    /// path, or `mdbridge watch`).
    pub watch_command: String,
}

/// The zero-dependency demo: simulator + publisher + bot server on the in-process bus.
pub async fn run_demo(
    options: DemoOptions,
    config: Config,
    bots: TcpListener,
    http: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let metrics = crate::metrics::install();
    let health = Health::new();
    let stops = Stops::new();
    let src = Uuid::new_v4();

    // One simulator per venue, each feed labelled `sim`; where a feed finds it and which
    // candles it asks for are said by the venue's registry entry.
    let sim_stop = CancellationToken::new();
    let mut sim_tasks = Vec::new();
    let mut feeds = Vec::new();
    let mut banner = Vec::new();
    let mut candles = Vec::new();
    for (venue, symbols) in &options.venues {
        let Some(sim) = crate::exchange::registry::venue(*venue).and_then(|v| v.simulator.as_ref())
        else {
            continue;
        };
        if symbols.is_empty() {
            continue;
        }
        let listener = bind("simulator", "127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let sim_config = crate::simulator::SimConfig {
            symbols: symbols.clone(),
            rate: options.rate,
            ..crate::simulator::SimConfig::default()
        };
        sim_tasks.push(tokio::spawn((sim.serve)(
            listener,
            sim_config,
            sim_stop.clone(),
        )));
        let mut feed = FeedConfig::new(
            *venue,
            symbols.clone(),
            vec![
                FeedChannel::Trade,
                FeedChannel::Ticker,
                FeedChannel::Book,
                FeedChannel::Candle(sim.demo_candle.to_string()),
            ],
        );
        feed.label = Some(Exchange::Sim);
        feed.url = Some(Simulator::at(sim.ws_url, &addr));
        feed.rest_url = sim.rest_url.map(|r| Simulator::at(r, &addr));
        banner.push(format!("{venue}-format on {addr} ({})", symbols.join(", ")));
        candles.push(format!("{venue}-format :{}", sim.demo_candle));
        feeds.push(feed);
    }

    let admin = AdminState {
        instance: config.instance.name.clone(),
        role: "demo",
        health: health.clone(),
        metrics,
        redis: None,
        limits: crate::http::AdminLimits::from_config(&config.http),
        streams: None,
    };
    let bots_addr = bots.local_addr()?;
    let http_addr = http.local_addr()?;
    let http_task = spawn_http(http, admin, stops.http.clone());

    let (tx, rx) = mpsc::channel::<BusMessage>(DELIVERY_QUEUE);
    let (interest_tx, _interest_rx) = watch::channel::<Interest>(Interest::default());
    let gateway = Gateway::new(
        config.bots.clone(),
        rx,
        interest_tx,
        None,
        health.register("bot_server"),
    );
    let stats = gateway.stats();
    let gateway_task = tokio::spawn(gateway.serve(bots, stops.gateway.clone()));

    let (events_tx, events_rx) = mpsc::channel::<Event>(EVENT_QUEUE);
    let feeds = spawn_feeds(&feeds, &events_tx, &health, &stops.feeds);
    drop(events_tx);
    let pipeline = spawn_pipeline(events_rx, src, None, MemoryBus::new(tx));

    println!(
        "mdbridge demo: simulated exchanges {} (events are labelled `sim`)",
        banner.join("; ")
    );
    println!("  bots:    ws://{bots_addr}   e.g. {{\"op\":\"subscribe\",\"channels\":[\"trade:sim:*\",\"book:sim:BTC-USDT\"]}}");
    println!("  status:  http://{http_addr}/ (live page)   metrics: http://{http_addr}/metrics   health: http://{http_addr}/health");
    println!(
        "  channels: trade|ticker|book:sim:<SYMBOL>, candle:sim:<SYMBOL>:<interval> ({}), status:sim",
        candles.join(", ")
    );
    println!(
        "  watch:   {} --url ws://{bots_addr} 'trade:sim:BTC-USDT' 'book:sim:*'",
        options.watch_command
    );
    println!("  Ctrl-C to stop");

    let mut ticker = tokio::time::interval(options.summary_every);
    ticker.tick().await;
    let mut last = stats.snapshot();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                let now = stats.snapshot();
                let secs = options.summary_every.as_secs_f64().max(0.001);
                println!(
                    "[demo] clients {} | subscriptions {} | frames sent {} ({:.0}/s) | dropped {} | health {}",
                    now.clients,
                    now.subscriptions,
                    now.frames_sent,
                    (now.frames_sent.saturating_sub(last.frames_sent)) as f64 / secs,
                    now.frames_dropped,
                    if health.all_healthy() { "ok" } else { "degraded" },
                );
                last = now;
            }
        }
    }
    println!("mdbridge demo: stopping");
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(config.instance.shutdown_timeout_ms);
    stops.feeds.cancel();
    join_all_by(feeds, deadline, "exchange feeds").await;
    join_by(Some(pipeline), deadline, "publisher pipeline").await;
    stops.gateway.cancel();
    if tokio::time::timeout_at(deadline, gateway_task)
        .await
        .is_err()
    {
        warn!("bot server did not finish in time");
    }
    sim_stop.cancel();
    for task in sim_tasks {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            warn!("simulator did not finish in time");
        }
    }
    stops.http.cancel();
    join_by(Some(http_task), deadline, "admin HTTP").await;
    Ok(())
}

/// One token per stage, cancelled in shutdown order.
struct Stops {
    feeds: CancellationToken,
    publisher: CancellationToken,
    gateway: CancellationToken,
    http: CancellationToken,
}

impl Stops {
    fn new() -> Stops {
        Stops {
            feeds: CancellationToken::new(),
            publisher: CancellationToken::new(),
            gateway: CancellationToken::new(),
            http: CancellationToken::new(),
        }
    }
}

fn spawn_feeds(
    feeds: &[FeedConfig],
    events: &mpsc::Sender<Event>,
    health: &Health,
    stop: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    feeds
        .iter()
        .enumerate()
        .map(|(i, feed)| {
            let handle = health.register(format!("feed:{}:{i}", feed.exchange));
            tokio::spawn(crate::exchange::run_feed(
                feed.clone(),
                events.clone(),
                handle,
                stop.clone(),
            ))
        })
        .collect()
}

fn spawn_pipeline(
    events: mpsc::Receiver<Event>,
    src: Uuid,
    keys: Option<Arc<Keyring>>,
    bus: impl Bus,
) -> JoinHandle<()> {
    tokio::spawn(run_publisher(events, src, keys, bus))
}

fn spawn_http(listener: TcpListener, state: AdminState, stop: CancellationToken) -> JoinHandle<()> {
    log_listen("admin http", &listener);
    tokio::spawn(async move {
        if let Err(e) = crate::http::serve(listener, state, stop).await {
            warn!(cause = %e, "admin HTTP listener failed");
        }
    })
}

/// Raises the descriptor limit (see `fd_limit`) and says what the admin port may take.
fn log_fd_limit(config: &Config) {
    let limit = crate::fd_limit::raise();
    let soft = limit
        .soft
        .map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    match limit.raised_from {
        Some(from) => {
            info!(fd_limit = %soft, raised_from = from, admin_max_connections = config.http.max_connections, "file descriptor limit raised")
        }
        None => {
            info!(fd_limit = %soft, admin_max_connections = config.http.max_connections, "file descriptor limit")
        }
    }
}

fn log_listen(what: &str, listener: &TcpListener) {
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "{what} listening");
    }
}

async fn join_by(task: Option<JoinHandle<()>>, deadline: tokio::time::Instant, what: &str) {
    if let Some(task) = task {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            warn!("{what} did not finish before the shutdown deadline");
        }
    }
}

async fn join_all_by(tasks: Vec<JoinHandle<()>>, deadline: tokio::time::Instant, what: &str) {
    for task in tasks {
        join_by(Some(task), deadline, what).await;
    }
}

/// The address a listener actually bound (port 0 resolved).
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
