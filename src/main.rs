//! The `mdbridge` command line: parses arguments, loads config, catches signals, and hands
//! over to the library (`app`, `simulator`, `exchange::normalize`). Nothing else lives here.

use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::error;

use mdbridge::app::{self, DemoOptions, Listeners};
use mdbridge::config::{Config, LogConfig, LogFormat, Role};
use mdbridge::event::{valid_symbol, Exchange};
use mdbridge::exchange::registry::Simulator;
use mdbridge::simulator::{Faults, SimConfig};

// Every event allocates a few small strings; glibc's malloc was a quarter of the
// publisher's profile at full rate, mimalloc's thread-local free lists avoid most of it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_DEMO_HTTP: &str = "127.0.0.1:9100";

/// Exit status for a configuration that was refused.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "mdbridge",
    version,
    about = "Market-data fan-out bridge: exchange WebSockets -> normalized events -> Redis pub/sub -> bot WebSockets",
    long_about = "mdbridge holds exchange WebSocket connections, normalizes trades, tickers, order books and candles \
into one JSON format, publishes each event once to Redis pub/sub, and fans events out to many local bots over its \
own WebSocket server.\n\nStart with `mdbridge demo`: it needs nothing but this binary."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Host role: connect to exchanges, normalize, publish to Redis.
    Publisher(RoleArgs),
    /// Bot role: subscribe to Redis for what local bots want, serve them over WebSocket.
    Executor(RoleArgs),
    /// Both in one process: own events are delivered in-process, own echoes from Redis dropped.
    Hybrid(RoleArgs),
    /// Zero-dependency demo: simulated exchange, publisher and bot server on an in-process bus.
    Demo(DemoArgs),
    /// Serve an exchange-compatible feed (WebSocket + REST) with deterministic simulated data.
    Simulate(SimulateArgs),
    /// Normalize raw exchange frames (one per line on stdin) into events (one per line on stdout).
    Normalize(NormalizeArgs),
    /// Measure a running bot server: events per second and ts_recv-to-bot latency.
    Bench(BenchArgs),
    /// Subscribe like a bot and print every frame, one JSON object per line.
    Watch(WatchArgs),
}

#[derive(clap::Args)]
struct WatchArgs {
    /// Channel patterns, e.g. 'trade:sim:BTC-USDT' 'book:sim:*'.
    #[arg(required = true)]
    channels: Vec<String>,
    /// Bot server to connect to.
    #[arg(long, default_value = "ws://127.0.0.1:8765")]
    url: String,
    /// Stop after this many events (trade, ticker, book, candle, status; the server's
    /// replies such as `subscribed` are printed but not counted).
    #[arg(long, short = 'n')]
    count: Option<u64>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Bot server to measure (measuring mode, without --scenario).
    #[arg(long, default_value = "ws://127.0.0.1:8765")]
    url: String,
    /// Run a scenario instead: start a private redis-server, the simulator, a publisher
    /// and an executor, measure, tear down.
    /// ingest | latency | fanout | slow | idle | durable | simulate
    #[arg(long)]
    scenario: Option<String>,
    /// Scenario: write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Scenario: measuring bots (default: ingest 1, latency/slow/durable 100, fanout/idle 1000).
    #[arg(long)]
    bots: Option<usize>,
    /// Scenario: trades per second offered over all symbols, 0 = flat out
    /// (default: ingest 0, others 1000).
    #[arg(long)]
    rate: Option<u32>,
    /// Scenario: seconds of warm-up before measuring.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Scenario: simulated symbols.
    #[arg(
        long,
        default_value = "BTC-USDT,ETH-USDT,SOL-USDT,BNB-USDT",
        value_delimiter = ','
    )]
    symbols: Vec<String>,
    /// Scenario: PUBLISH requests of the same-run redis-benchmark baseline.
    #[arg(long, default_value_t = 300_000)]
    baseline_requests: u64,
    /// Comma-separated channel patterns to subscribe to.
    #[arg(
        long,
        default_value = "trade:*:*,book:*:*,ticker:*:*",
        value_delimiter = ','
    )]
    channels: Vec<String>,
    /// Seconds to measure.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Parallel bot connections.
    #[arg(long, default_value_t = 1)]
    clients: usize,
}

#[derive(clap::Args)]
struct RoleArgs {
    /// Config file (TOML). Default: ./config.toml when present, else built-in defaults.
    /// Every key can be overridden with MDBRIDGE_<SECTION>_<KEY>.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Where bots connect.
    #[arg(long, default_value = "127.0.0.1:8765")]
    listen: String,
    /// Admin HTTP (/metrics, /health).
    #[arg(long, default_value = DEFAULT_DEMO_HTTP)]
    http: String,
    /// Simulated market events (trades + depth updates) per second, over all symbols.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// A venue to simulate, with its comma-separated symbols (default: the venue's demo
    /// symbols); repeat for several. Without it, every simulated venue runs
    /// (binance=BTC-USDT,ETH-USDT and coinbase=BTC-USD,ETH-USD).
    #[arg(long = "venue", value_name = "NAME[=SYMBOLS]")]
    venues: Vec<String>,
    /// Seconds between summary lines.
    #[arg(long, default_value_t = 5)]
    summary_secs: u64,
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// Exchange protocol to simulate.
    #[arg(long, default_value = "binance")]
    exchange: String,
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: String,
    /// Market events per second over all symbols: trades and depth updates, half each
    /// (tickers and klines come on top, once a second per symbol); 0 = flat out.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Comma-separated symbols.
    #[arg(long, default_value = "BTC-USDT,ETH-USDT", value_delimiter = ',')]
    symbols: Vec<String>,
    /// Seed of the deterministic market.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Fault: drop every WebSocket connection every N seconds.
    #[arg(long)]
    fault_drop_every_secs: Option<u64>,
    /// Fault: skip a book sequence number every N book updates (Binance: a depth update
    /// id; Coinbase: a connection `sequence_num`).
    #[arg(long)]
    fault_gap_every: Option<u64>,
    /// Fault: send a malformed frame every N frames.
    #[arg(long)]
    fault_malformed_every: Option<u64>,
}

#[derive(clap::Args)]
struct NormalizeArgs {
    #[arg(long)]
    exchange: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The roles log as their config says; everything else logs as the defaults say.
    if !matches!(
        cli.command,
        Command::Publisher(_) | Command::Executor(_) | Command::Hybrid(_)
    ) {
        init_tracing(&LogConfig::default());
    }
    match cli.command {
        Command::Normalize(args) => normalize(args),
        Command::Publisher(args) => run_role(Role::Publisher, args),
        Command::Executor(args) => run_role(Role::Executor, args),
        Command::Hybrid(args) => run_role(Role::Hybrid, args),
        Command::Demo(args) => report(runtime().and_then(|rt| rt.block_on(demo(args)))),
        Command::Simulate(args) => simulate(args),
        Command::Bench(args) => report(runtime().and_then(|rt| rt.block_on(bench(args)))),
        Command::Watch(args) => report(runtime().and_then(|rt| {
            rt.block_on(async move {
                let stdout = std::io::stdout();
                mdbridge::bench::watch(&args.url, &args.channels, args.count, stdout.lock())
                    .await?;
                Ok(())
            })
        })),
    }
}

/// Logs to stderr: `RUST_LOG` when set, else `[log] level`; colours only when stderr is
/// a terminal (a file or a pipe gets plain text); `[log] format = "json"` writes one JSON
/// object per line.
fn init_tracing(log: &LogConfig) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().with_ansi(false).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mdbridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Like [`report`], but with `[log] format = "json"` the last word is a JSON log record
/// too, so a log shipper reading stderr never meets a line it cannot parse.
fn report_as(format: LogFormat, result: anyhow::Result<()>) -> ExitCode {
    match (format, result) {
        (LogFormat::Json, Err(e)) => {
            error!(error = %format!("{e:#}"), "mdbridge stopped");
            ExitCode::FAILURE
        }
        (_, result) => report(result),
    }
}

fn run_role(role: Role, args: RoleArgs) -> ExitCode {
    let path = args.config.or_else(Config::default_path);
    let config = match Config::load(path.as_deref(), role) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mdbridge: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(&config.log);
    let format = config.log.format;
    report_as(
        format,
        runtime().and_then(|rt| {
            rt.block_on(async move {
                let listeners = Listeners::bind(&config, role).await?;
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                app::run(role, config, listeners, shutdown).await?;
                Ok(())
            })
        }),
    )
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let venues = mdbridge::exchange::registry::demo_venues(&args.venues)
        .map_err(|e| anyhow::anyhow!(e))?
        .into_iter()
        .map(|(v, symbols)| (v.exchange, symbols))
        .collect();
    let mut config = Config::default();
    config.bots.listen = args.listen.clone();
    config.http.listen = args.http.clone();
    let bots = app::bind("bot WebSocket (--listen)", &args.listen).await?;
    // 9100 is also node_exporter's port: when the default is taken, the demo still runs,
    // on a free port that it prints.
    let http = match app::bind("admin HTTP (--http)", &args.http).await {
        Ok(l) => l,
        Err(e) if args.http == DEFAULT_DEMO_HTTP => {
            eprintln!("mdbridge demo: {e}; using a free port instead");
            app::bind("admin HTTP", "127.0.0.1:0").await?
        }
        Err(e) => return Err(e.into()),
    };
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let options = DemoOptions {
        venues,
        rate: args.rate,
        summary_every: Duration::from_secs(args.summary_secs.max(1)),
        watch_command: watch_command(),
    };
    app::run_demo(options, config, bots, http, shutdown).await?;
    Ok(())
}

/// How the user runs `watch` from where they ran this binary: `cargo run` puts the binary
/// under `target/`, where `mdbridge` is not on the PATH, so the hint says
/// `cargo run --release -- watch`; otherwise the binary's own path (or plain `mdbridge`
/// when that is what the PATH finds).
fn watch_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "mdbridge watch".to_string();
    };
    let parent = exe.parent();
    let profile = parent.and_then(|d| d.file_name()).and_then(|n| n.to_str());
    let under_target = parent
        .and_then(|d| d.parent())
        .and_then(|d| d.file_name())
        .is_some_and(|n| n == "target");
    if std::env::var_os("CARGO").is_some() && under_target {
        return match profile {
            Some("release") => "cargo run --release -- watch".to_string(),
            _ => "cargo run -- watch".to_string(),
        };
    }
    let on_path = std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .any(|d| std::fs::canonicalize(d.join("mdbridge")).is_ok_and(|found| found == exe))
    });
    if on_path {
        "mdbridge watch".to_string()
    } else {
        format!("{} watch", exe.display())
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(name) = &args.scenario {
        return bench_scenario(name, &args).await;
    }
    let options = mdbridge::bench::BenchOptions {
        url: args.url,
        channels: args.channels,
        duration: Duration::from_secs(args.secs.max(1)),
        clients: args.clients,
    };
    let r = mdbridge::bench::run(options).await?;
    println!(
        "events {} in {:.1} s = {:.0} events/s | latency ts_recv->bot p50 {} us, p99 {} us, max {} us | errors {}",
        r.events,
        r.seconds,
        r.events_per_second(),
        r.latency_us_p50,
        r.latency_us_p99,
        r.latency_us_max,
        r.errors
    );
    let v = r.violations;
    println!(
        "checks: book chain breaks {} | trade ids out of order or repeated {} | trade ids skipped {}",
        v.book_chain, v.trade_order, v.trade_gaps
    );
    Ok(())
}

async fn bench_scenario(name: &str, args: &BenchArgs) -> anyhow::Result<()> {
    let scenario: mdbridge::bench::Scenario = name.parse()?;
    if let Some(bad) = args.symbols.iter().find(|s| !valid_symbol(s)) {
        anyhow::bail!("--symbols: `{bad}` is not BASE-QUOTE in upper case (e.g. BTC-USDT)");
    }
    let options = mdbridge::bench::ScenarioOptions {
        scenario,
        binary: std::env::current_exe().context("cannot find this binary")?,
        secs: args.secs.max(1),
        warmup_secs: args.warmup,
        bots: args.bots,
        trades_per_sec: args.rate,
        symbols: args.symbols.clone(),
        baseline_requests: args.baseline_requests.max(1_000),
    };
    let report = mdbridge::bench::run_scenario(options).await?;
    print!("{}", report.text());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn simulate(args: SimulateArgs) -> ExitCode {
    let venue = args
        .exchange
        .parse::<Exchange>()
        .ok()
        .and_then(mdbridge::exchange::registry::venue)
        .and_then(|v| v.simulator.as_ref().map(|sim| (v, sim)));
    let Some((venue, sim)) = venue else {
        eprintln!(
            "mdbridge: --exchange {}: not simulated yet (available: {})",
            args.exchange,
            mdbridge::exchange::registry::simulated().join(", ")
        );
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    if let Some(bad) = args.symbols.iter().find(|s| !valid_symbol(s)) {
        eprintln!("mdbridge: --symbols: `{bad}` is not BASE-QUOTE in upper case (e.g. BTC-USDT)");
        return ExitCode::from(EXIT_BAD_CONFIG);
    }
    report(runtime().and_then(|rt| {
        rt.block_on(async move {
            let listener = app::bind("simulator (--listen)", &args.listen).await?;
            let addr = listener.local_addr()?.to_string();
            println!(
                "mdbridge simulate: {} on {}",
                venue.exchange,
                Simulator::at(sim.paths, &addr)
            );
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            let config = SimConfig {
                symbols: args.symbols,
                rate: args.rate,
                seed: args.seed,
                faults: Faults {
                    drop_every_secs: args.fault_drop_every_secs,
                    gap_every_updates: args.fault_gap_every,
                    malformed_every_frames: args.fault_malformed_every,
                },
            };
            (sim.serve)(listener, config, shutdown).await?;
            Ok(())
        })
    }))
}

fn normalize(args: NormalizeArgs) -> ExitCode {
    let exchange: Exchange = match args.exchange.parse() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("mdbridge: --exchange: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let result = mdbridge::exchange::normalize(
        exchange,
        BufReader::new(stdin.lock()),
        BufWriter::new(stdout.lock()),
        std::io::stderr(),
    );
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mdbridge: normalize: {e}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM cancel `shutdown`; a second signal exits at once.
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    error!(cause = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        shutdown.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        error!("second signal: exiting without finishing shutdown");
        std::process::exit(130);
    });
}
