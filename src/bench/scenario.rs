//! The scenario runner behind `mdbridge bench --scenario …`: it starts a private
//! `redis-server` on a free port, measures the machine's Redis ceiling
//! ([`super::procs::redis_baseline`]), starts `mdbridge simulate`, a publisher and an
//! executor as separate processes of this binary with configs written to a temp dir,
//! measures with bots in this process ([`super::bots`]), reads each process's CPU and
//! peak RSS from `/proc`, and tears everything down (children die with their handles).
//!
//! Scenarios: `ingest` (flat out, one bot), `latency` (fixed rate, N bots), `fanout`
//! (1 000 bots), `slow` (N bots, then N bots beside one that reads nothing), `idle`
//! (executor RSS per connection), `durable` (the latency run with pub/sub, then with
//! `[durable] channels = ["trade:*:*"]` on both roles).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::bots::{self, BotStats};
use super::hist::Histogram;
use super::procs::{self, Proc};
use super::report::{Drops, IdleFigures, Params, Report, RoleUsage, RunReport};
use crate::envelope::BusMessage;
use crate::event::{now_micros, Event, Exchange, Side, Trade};

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("unknown scenario `{0}` (ingest, latency, fanout, slow, idle, durable, simulate)")]
    Unknown(String),
    #[error("cannot start: {0}")]
    Spawn(String),
    #[error("{0}")]
    Io(String),
    #[error("measuring bot: {0}")]
    Bot(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Ingest,
    Latency,
    Fanout,
    Slow,
    Idle,
    Durable,
    /// The simulator alone, flat out, one socket: what the ingest runs can be fed.
    Simulate,
}

impl FromStr for Scenario {
    type Err = ScenarioError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "ingest" => Scenario::Ingest,
            "latency" => Scenario::Latency,
            "fanout" => Scenario::Fanout,
            "slow" => Scenario::Slow,
            "idle" => Scenario::Idle,
            "durable" => Scenario::Durable,
            "simulate" => Scenario::Simulate,
            other => return Err(ScenarioError::Unknown(other.to_string())),
        })
    }
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Ingest => "ingest",
            Scenario::Latency => "latency",
            Scenario::Fanout => "fanout",
            Scenario::Slow => "slow",
            Scenario::Idle => "idle",
            Scenario::Durable => "durable",
            Scenario::Simulate => "simulate",
        }
    }

    /// (bots, trades per second; 0 = flat out) when not given.
    fn defaults(self) -> (usize, u32) {
        match self {
            Scenario::Ingest | Scenario::Simulate => (1, 0),
            Scenario::Latency | Scenario::Slow | Scenario::Durable => (100, 1_000),
            Scenario::Fanout | Scenario::Idle => (1_000, 1_000),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ScenarioOptions {
    pub scenario: Scenario,
    /// The mdbridge binary started for each role (normally this one).
    pub binary: PathBuf,
    pub secs: u64,
    pub warmup_secs: u64,
    pub bots: Option<usize>,
    pub trades_per_sec: Option<u32>,
    pub symbols: Vec<String>,
    /// PUBLISH requests of the Redis baseline.
    pub baseline_requests: u64,
}

/// The processes of one run. Dropping it kills them all.
struct Stack {
    binary: PathBuf,
    redis_port: u16,
    sim_port: u16,
    symbols: Vec<String>,
    // Field order is drop order: roles before the simulator before Redis.
    executor: Option<Proc>,
    publisher: Option<Proc>,
    sim: Option<Proc>,
    redis: Proc,
    bots_port: u16,
    exe_http: u16,
    /// Last: removed after every process is gone.
    dir: procs::TempDir,
}

impl Stack {
    fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn start_sim(&mut self, trades_per_sec: u32) -> Result<(), ScenarioError> {
        self.sim = None;
        self.sim_port = procs::free_port()?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(["simulate", "--exchange", "binance", "--listen"])
            .arg(format!("127.0.0.1:{}", self.sim_port))
            .args(["--rate", &(trades_per_sec.saturating_mul(2)).to_string()])
            .args(["--symbols", &self.symbols.join(",")]);
        self.sim = Some(Proc::spawn("simulate", cmd, self.dir())?);
        procs::wait_port(self.sim_port, "mdbridge simulate").await
    }

    /// (Re)starts publisher and executor; `durable` adds `[durable]` to both configs.
    async fn start_roles(&mut self, durable: bool) -> Result<(), ScenarioError> {
        self.executor = None;
        self.publisher = None;
        let redis = format!("redis://127.0.0.1:{}/0", self.redis_port);
        let durable_toml = if durable {
            "[durable]\nchannels = [\"trade:*:*\"]\n"
        } else {
            ""
        };
        let symbols: Vec<String> = self.symbols.iter().map(|s| format!("\"{s}\"")).collect();
        let pub_http = procs::free_port()?;
        let publisher = format!(
            "[redis]\nurl = \"{redis}\"\n[http]\nlisten = \"127.0.0.1:{pub_http}\"\n[log]\nlevel = \"warn\"\n{durable_toml}\
             [[feeds]]\nexchange = \"binance\"\nurl = \"ws://127.0.0.1:{sim}/stream\"\n\
             rest_url = \"http://127.0.0.1:{sim}\"\nsymbols = [{symbols}]\nchannels = [\"trade\"]\n",
            sim = self.sim_port,
            symbols = symbols.join(", ")
        );
        self.bots_port = procs::free_port()?;
        self.exe_http = procs::free_port()?;
        let executor = format!(
            "[redis]\nurl = \"{redis}\"\n[http]\nlisten = \"127.0.0.1:{}\"\n[log]\nlevel = \"warn\"\n{durable_toml}\
             [bots]\nlisten = \"127.0.0.1:{}\"\nmax_connections = 20000\n\
             max_requests_per_sec = 1000000.0\nrequest_burst = 1000000\n",
            self.exe_http, self.bots_port
        );
        let write = |name: &str, text: &str| {
            let path = self.dir().join(name);
            std::fs::write(&path, text)
                .map_err(|e| ScenarioError::Io(format!("{}: {e}", path.display())))?;
            Ok::<PathBuf, ScenarioError>(path)
        };
        let p_cfg = write("publisher.toml", &publisher)?;
        let e_cfg = write("executor.toml", &executor)?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("executor").arg("--config").arg(&e_cfg);
        self.executor = Some(Proc::spawn("executor", cmd, self.dir())?);
        procs::wait_port(self.bots_port, "mdbridge executor").await?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("publisher").arg("--config").arg(&p_cfg);
        self.publisher = Some(Proc::spawn("publisher", cmd, self.dir())?);
        procs::wait_port(pub_http, "mdbridge publisher").await?;
        let dir = self.dir.path().to_path_buf();
        for p in [&mut self.executor, &mut self.publisher]
            .into_iter()
            .flatten()
        {
            p.check_alive(&dir)?;
        }
        Ok(())
    }

    /// The processes whose cost is reported, in a fixed order.
    fn procs(&self) -> Vec<&Proc> {
        [&self.sim, &self.publisher, &self.executor]
            .into_iter()
            .flatten()
            .chain(std::iter::once(&self.redis))
            .collect()
    }

    fn executor_pid(&self) -> u32 {
        self.executor.as_ref().map(Proc::pid).unwrap_or(0)
    }

    /// Sum of the executor's counter `name` (all label sets); 0 when unreadable.
    async fn executor_counter(&self, name: &str) -> u64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.exe_http);
        let fetch = async { reqwest::get(&url).await.ok()?.text().await.ok() };
        let Ok(Some(text)) = tokio::time::timeout(Duration::from_secs(3), fetch).await else {
            return 0;
        };
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

/// The size of a typical trade envelope: the Redis baseline publishes payloads this big.
fn trade_envelope_bytes() -> usize {
    let event = Event::Trade(Trade {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: Some(now_micros()),
        ts_recv: now_micros(),
        trade_id: "1000012345".into(),
        price: "60012.34".into(),
        size: "0.01234000".into(),
        side: Some(Side::Buy),
    });
    BusMessage::encode(Uuid::new_v4(), 1_000_000, now_micros(), event)
        .envelope
        .len()
}

/// Runs one scenario end to end.
pub async fn run_scenario(opts: ScenarioOptions) -> Result<Report, ScenarioError> {
    let _ = crate::fd_limit::raise();
    let load_avg_before = procs::load_avg();
    let (default_bots, default_rate) = opts.scenario.defaults();
    let bots = opts.bots.unwrap_or(default_bots).max(1);
    let rate = opts.trades_per_sec.unwrap_or(default_rate);
    let channels = vec!["trade:*:*".to_string()];
    let dir = procs::TempDir::new()?;
    let (redis, redis_port) = procs::start_redis(dir.path()).await?;
    let baseline = procs::redis_baseline(
        dir.path(),
        redis_port,
        trade_envelope_bytes(),
        opts.baseline_requests,
    )
    .await?;
    let mut stack = Stack {
        dir,
        binary: opts.binary.clone(),
        redis_port,
        sim_port: 0,
        symbols: opts.symbols.clone(),
        executor: None,
        publisher: None,
        sim: None,
        redis,
        bots_port: 0,
        exe_http: 0,
    };
    // Idle connections need no traffic: a trickle keeps the subscribed ones honest.
    let sim_rate = if opts.scenario == Scenario::Idle {
        10
    } else {
        rate
    };
    stack.start_sim(sim_rate).await?;
    if opts.scenario != Scenario::Simulate {
        stack.start_roles(false).await?;
    }
    let window = Window {
        warmup: Duration::from_secs(opts.warmup_secs),
        secs: Duration::from_secs(opts.secs.max(1)),
    };
    let mut runs = Vec::new();
    match opts.scenario {
        Scenario::Ingest | Scenario::Latency | Scenario::Fanout => {
            runs.push(measure(&stack, "pubsub", bots, &channels, false, window).await?);
        }
        Scenario::Slow => {
            runs.push(measure(&stack, "all reading", bots, &channels, false, window).await?);
            runs.push(measure(&stack, "one bot not reading", bots, &channels, true, window).await?);
        }
        Scenario::Durable => {
            runs.push(measure(&stack, "pubsub", bots, &channels, false, window).await?);
            stack.start_roles(true).await?;
            runs.push(measure(&stack, "durable", bots, &channels, false, window).await?);
        }
        Scenario::Idle => runs.push(idle(&stack, bots).await?),
        Scenario::Simulate => runs.push(simulate(&stack, window).await?),
    }
    for r in &mut runs {
        r.ratio_to_redis = r.events_per_sec / baseline.publish_per_sec.max(1.0);
    }
    let report = Report {
        scenario: opts.scenario.name().to_string(),
        mdbridge_version: env!("CARGO_PKG_VERSION").to_string(),
        unix_time: now_micros() / 1_000_000,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_avg_before,
        load_avg_after: procs::load_avg(),
        params: Params {
            secs: opts.secs,
            warmup_secs: opts.warmup_secs,
            bots,
            trades_per_sec: rate,
            symbols: opts.symbols,
            channels,
        },
        redis_baseline: baseline,
        runs,
    };
    drop(stack);
    Ok(report)
}

#[derive(Clone, Copy)]
struct Window {
    warmup: Duration,
    secs: Duration,
}

/// `bots` measuring bots (and, with `slow`, one more that reads nothing) over the window.
async fn measure(
    stack: &Stack,
    label: &str,
    bots: usize,
    channels: &[String],
    slow: bool,
    window: Window,
) -> Result<RunReport, ScenarioError> {
    let conns = bots::connect_many(stack.bots_port, bots, channels).await?;
    // Never read: its small receive buffer fills, then the executor's queue for it.
    let _slow = if slow {
        let mut ws = bots::connect(stack.bots_port, Some(4_096)).await?;
        bots::subscribe(&mut ws, channels).await?;
        Some(ws)
    } else {
        None
    };
    let start = Instant::now() + window.warmup;
    let end = start + window.secs;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(bots::read_until(ws, start, end)))
        .collect();
    tokio::time::sleep_until(start).await;
    // CPU first: reading the executor's /metrics can take a while when it is saturated.
    let procs = stack.procs();
    let before: Vec<u64> = procs.iter().map(|p| p.cpu_ticks()).collect();
    let cpu_t0 = Instant::now();
    let dropped_before = stack
        .executor_counter(crate::metrics::BOT_FRAMES_DROPPED)
        .await;
    let lost_before = stack.executor_counter(crate::metrics::ENVELOPES_LOST).await;
    let redis_before = procs::redis_command_calls(stack.redis_port).await;
    let mut all = BotStats::default();
    let mut hist = Histogram::default();
    let mut events = 0;
    for t in tasks {
        let Ok(s) = t.await else { continue };
        events = events.max(s.frames);
        all.frames += s.frames;
        all.trade_gaps += s.trade_gaps;
        hist.merge(&s.hist);
    }
    // The bots count what arrives inside [start, end]: that is the rate's denominator.
    let seconds = window.secs.as_secs_f64();
    let cpu_elapsed = cpu_t0.elapsed().as_secs_f64().max(1e-3);
    let after: Vec<u64> = procs.iter().map(|p| p.cpu_ticks()).collect();
    let redis_commands = procs::redis_command_calls(stack.redis_port)
        .await
        .into_iter()
        .map(|(c, n)| {
            let before = redis_before.get(&c).copied().unwrap_or(0);
            (c, n.saturating_sub(before))
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let drops = Drops {
        executor_frames_dropped: stack
            .executor_counter(crate::metrics::BOT_FRAMES_DROPPED)
            .await
            .saturating_sub(dropped_before),
        envelopes_lost: stack
            .executor_counter(crate::metrics::ENVELOPES_LOST)
            .await
            .saturating_sub(lost_before),
        trade_ids_skipped: all.trade_gaps,
    };
    let roles = procs
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(p, (b, a))| {
            let cpu = procs::ticks_to_secs(a.saturating_sub(*b));
            RoleUsage {
                role: p.name.clone(),
                pid: p.pid(),
                cpu_secs: cpu,
                cpu_share: cpu / cpu_elapsed,
                cpu_secs_per_million_events: cpu / (events.max(1) as f64 / 1e6),
                cpu_us_per_frame: cpu * 1e6 / all.frames.max(1) as f64,
                peak_rss_kib: procs::status_kib(p.pid(), "VmHWM"),
                rss_kib: procs::status_kib(p.pid(), "VmRSS"),
            }
        })
        .collect();
    Ok(RunReport {
        label: label.to_string(),
        bots,
        seconds,
        events,
        events_per_sec: events as f64 / seconds,
        frames: all.frames,
        frames_per_sec: all.frames as f64 / seconds,
        ratio_to_redis: 0.0,
        latency: hist.quantiles(),
        drops,
        roles,
        redis_commands,
        idle: None,
    })
}

/// Executor RSS with no bots, `n` bare upgraded connections, then each subscribed.
async fn idle(stack: &Stack, n: usize) -> Result<RunReport, ScenarioError> {
    let pid = stack.executor_pid();
    let settle = Duration::from_millis(1_500);
    tokio::time::sleep(settle).await;
    let rss_before = procs::status_kib(pid, "VmRSS");
    let mut conns = bots::connect_many(stack.bots_port, n, &[]).await?;
    tokio::time::sleep(settle).await;
    let rss_connected = procs::status_kib(pid, "VmRSS");
    let channels = ["trade:binance:BTC-USDT".to_string()];
    for ws in &mut conns {
        bots::subscribe(ws, &channels).await?;
    }
    let end = Instant::now() + settle * 2;
    let drains: Vec<_> = conns
        .into_iter()
        .map(|ws| tokio::spawn(bots::drain_until(ws, end)))
        .collect();
    tokio::time::sleep(settle).await;
    let rss_subscribed = procs::status_kib(pid, "VmRSS");
    for d in drains {
        let _ = d.await;
    }
    let per = |kib: u64| kib.saturating_sub(rss_before) as f64 / n.max(1) as f64;
    Ok(RunReport {
        label: "idle connections".into(),
        bots: n,
        idle: Some(IdleFigures {
            connections: n,
            rss_before_kib: rss_before,
            rss_connected_kib: rss_connected,
            rss_subscribed_kib: rss_subscribed,
            kib_per_connection: per(rss_connected),
            kib_per_subscribed_connection: per(rss_subscribed),
        }),
        ..RunReport::default()
    })
}

/// One socket straight to the simulator (trades and depth updates of every symbol),
/// flat out: frames per second and the simulator's CPU per frame.
async fn simulate(stack: &Stack, window: Window) -> Result<RunReport, ScenarioError> {
    let streams: Vec<String> = stack
        .symbols
        .iter()
        .flat_map(|s| {
            let s = s.replace('-', "").to_lowercase();
            [format!("{s}@trade"), format!("{s}@depth@100ms")]
        })
        .collect();
    let path = format!("/stream?streams={}", streams.join("/"));
    let ws = bots::connect_path(stack.sim_port, &path, None).await?;
    let start = Instant::now() + window.warmup;
    let end = start + window.secs;
    let task = tokio::spawn(bots::count_until(ws, start, end));
    tokio::time::sleep_until(start).await;
    let procs = stack.procs();
    let before: Vec<u64> = procs.iter().map(|p| p.cpu_ticks()).collect();
    let t0 = Instant::now();
    let frames = task.await.unwrap_or(0);
    let elapsed = t0.elapsed().as_secs_f64().max(1e-3);
    let seconds = window.secs.as_secs_f64();
    let roles = procs
        .iter()
        .zip(&before)
        .filter(|(p, _)| p.name == "simulate")
        .map(|(p, b)| {
            let cpu = procs::ticks_to_secs(p.cpu_ticks().saturating_sub(*b));
            RoleUsage {
                role: p.name.clone(),
                pid: p.pid(),
                cpu_secs: cpu,
                cpu_share: cpu / elapsed,
                cpu_secs_per_million_events: cpu / (frames.max(1) as f64 / 1e6),
                cpu_us_per_frame: cpu * 1e6 / frames.max(1) as f64,
                peak_rss_kib: procs::status_kib(p.pid(), "VmHWM"),
                rss_kib: procs::status_kib(p.pid(), "VmRSS"),
            }
        })
        .collect();
    Ok(RunReport {
        label: "simulator, one socket".into(),
        bots: 1,
        seconds,
        events: frames,
        events_per_sec: frames as f64 / seconds,
        frames,
        frames_per_sec: frames as f64 / seconds,
        roles,
        ..RunReport::default()
    })
}
