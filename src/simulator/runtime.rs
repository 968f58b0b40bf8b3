//! What every simulated venue runs the same way: the market loop that ticks each symbol's
//! [`super::Market`] at the configured rate (or flat out, paced by the readers), the
//! `drop_every_secs` fault, and serving until shutdown. A front-end supplies only
//! [`Ticking`]: what one tick and one second publish on its wire.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Faults, SimConfig};

/// Flat-out mode (`rate == 0`): ticks produced per batch before yielding.
const FLAT_OUT_BATCH: usize = 32;
/// Flat-out mode: a stall on a full channel lasts at most this long, so one stuck client
/// cannot stall everyone (it will lag and be disconnected instead).
const FLAT_OUT_MAX_STALL: Duration = Duration::from_millis(100);

/// Lock a mutex, recovering from poisoning (a panicked tick must not take
/// the whole simulator down).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wall-clock milliseconds since the epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// What the market loop reads of a front-end's state.
pub(crate) struct Pace<'a> {
    pub config: &'a SimConfig,
    pub shutdown: &'a CancellationToken,
    /// `true` while `/_sim/pause` holds the market.
    pub paused: &'a watch::Sender<bool>,
    /// Readers of the fan-out channel, frames queued in it, its capacity: flat out, ticks
    /// wait while more than half of it is queued.
    pub backlog: (usize, usize, usize),
}

/// What a front-end publishes as its market moves.
pub(crate) trait Ticking: Send + Sync + 'static {
    fn pace(&self) -> Pace<'_>;
    /// `n` ticks of symbol `sym` (each one trade and one book update), published.
    fn tick(&self, sym: usize, n: usize);
    /// Once a second for symbol `sym`: tickers, candles.
    fn second(&self, sym: usize);
}

/// Waits until the next batch of ticks is due; returns how many to run.
async fn next_ticks<T: Ticking>(
    venue: &T,
    ticker: &mut Option<tokio::time::Interval>,
    stall_since: &mut Option<Instant>,
) -> usize {
    if let Some(t) = ticker {
        t.tick().await;
        return 1;
    }
    // Flat out: as fast as the readers drain the channel.
    let (readers, queued, capacity) = venue.pace().backlog;
    if readers == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        return 0;
    }
    if queued > capacity / 2 {
        let since = *stall_since.get_or_insert_with(Instant::now);
        if since.elapsed() < FLAT_OUT_MAX_STALL {
            tokio::time::sleep(Duration::from_millis(1)).await;
            return 0;
        }
    }
    *stall_since = None;
    tokio::task::yield_now().await;
    FLAT_OUT_BATCH
}

/// Ticks symbol `sym` until shutdown.
pub(crate) async fn market_task<T: Ticking>(venue: std::sync::Arc<T>, sym: usize) {
    let pace = venue.pace();
    let (config, shutdown) = (pace.config, pace.shutdown);
    let mut paused = pace.paused.subscribe();
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticker = (config.rate > 0).then(|| {
        // `rate` counts the trades and book updates of all symbols; each tick makes one
        // of each for this symbol. Burst (the default) keeps the average rate even above
        // timer resolution.
        let symbols = config.symbols.len().max(1) as f64;
        let ticks_per_second = f64::from(config.rate) / (2.0 * symbols);
        tokio::time::interval(Duration::from_secs_f64(1.0 / ticks_per_second))
    });
    let mut stall_since = None;
    loop {
        if *paused.borrow_and_update() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = paused.changed() => if r.is_err() { return },
            }
            if let Some(t) = ticker.as_mut() {
                t.reset();
            }
            continue;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = paused.changed() => if r.is_err() { return },
            _ = second.tick() => venue.second(sym),
            n = next_ticks(&*venue, &mut ticker, &mut stall_since) => {
                if n > 0 {
                    venue.tick(sym, n);
                }
            }
        }
    }
}

/// The `drop_every_secs` fault: calls `drop_all` every `secs` seconds until `shutdown`.
pub(crate) fn spawn_drop_fault(
    tracker: &TaskTracker,
    faults: &Faults,
    shutdown: CancellationToken,
    drop_all: impl Fn() + Send + 'static,
) {
    let Some(secs) = faults.drop_every_secs.filter(|s| *s > 0) else {
        return;
    };
    tracker.spawn(async move {
        let period = Duration::from_secs(secs);
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = t.tick() => drop_all(),
            }
        }
    });
}

/// Serves a front-end's `app` until `shutdown`; then stops its market tasks and waits for
/// every connection `tracker` follows. Returns when all are gone.
pub(crate) async fn serve_until(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> std::io::Result<()> {
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    // If serving failed, still stop the market tasks and connections.
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    result
}
