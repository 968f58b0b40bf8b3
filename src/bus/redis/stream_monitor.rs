//! The stream monitor: every `[durable] monitor_interval_ms` it reads the durable streams
//! this instance publishes or consumes (the registry `{p}streams` matched against
//! `[durable] channels`, at most [`MAX_STREAMS`]) and
//! - publishes their length, dead letters, and each group's pending entries and lag as
//!   the per-stream gauges ([`crate::metrics::streams`]; streams that disappeared lose
//!   their series);
//! - reports `degraded` in `/health` (component `streams`) while this instance's group
//!   (`DurableConfig::group_name`) has a lag over `lag_threshold` or more pending entries
//!   than `pending_threshold` on any of them, naming the streams and figures;
//! - destroys other groups none of whose consumers was seen (`XINFO CONSUMERS` `idle`:
//!   since its last read or claim attempt) for `group_idle_gc_ms`
//!   (`mdbridge_stream_groups_removed_total`). A group without any consumer has no
//!   "last seen" in Redis (nor a creation time): it goes once this monitor has seen it
//!   without consumers for `group_idle_gc_ms` in a row (a restart starts the count again).
//!   The instance's own group is never destroyed.
//!
//! It owns its own Redis connection (reconnected on the next round after a failure) and
//! decides nothing about delivery; the queries are in [`super::stream_admin`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use futures_util::stream::{self, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::stream_admin::{self, AdminError};
use super::Target;
use crate::config::Config;
use crate::durable::{registry_key, DurablePolicy};
use crate::event::Channel;
use crate::health::HealthHandle;
use crate::metrics::streams::{self as gauges, StreamFigures, MAX_GROUP_SERIES, MAX_STREAMS};

/// Streams read at once on the (multiplexed) connection.
const CONCURRENCY: usize = 16;
/// Streams named in a `degraded` detail; the rest are counted.
const DETAIL_STREAMS: usize = 5;
/// Failed rounds between two warnings while Redis stays unreachable.
const WARN_EVERY: u64 = 60;

/// What the monitor needs from the config.
#[derive(Debug, Clone)]
pub struct MonitorSettings {
    pub prefix: String,
    pub policy: DurablePolicy,
    /// This instance's consumer group: checked for health, never destroyed.
    pub own_group: String,
    pub lag_threshold: u64,
    pub pending_threshold: u64,
    pub interval: Duration,
    /// `None`: groups are never destroyed.
    pub group_idle_gc: Option<Duration>,
}

impl MonitorSettings {
    /// `None` when no channel is durable (nothing to watch).
    pub fn from_config(config: &Config) -> Option<MonitorSettings> {
        let policy = DurablePolicy::from_config(&config.durable);
        if policy.is_empty() {
            return None;
        }
        let d = &config.durable;
        Some(MonitorSettings {
            prefix: config.redis.key_prefix.clone(),
            policy,
            own_group: d.group_name(&config.instance).to_string(),
            lag_threshold: d.lag_threshold,
            pending_threshold: d.pending_threshold,
            interval: Duration::from_millis(d.monitor_interval_ms.max(10)),
            group_idle_gc: (d.group_idle_gc_ms > 0)
                .then(|| Duration::from_millis(d.group_idle_gc_ms)),
        })
    }
}

/// Runs the monitor until `stop`. `health` (roles that consume, with a group) gets
/// `degraded` while this instance's group falls behind.
pub fn spawn(
    target: Target,
    settings: MonitorSettings,
    health: Option<HealthHandle>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    if let Some(h) = &health {
        h.up(Some("no stream read yet".into()));
    }
    let monitor = Monitor {
        target,
        settings,
        health,
        conn: None,
        empty_since: HashMap::new(),
        failures: 0,
        skipped: 0,
        capped: false,
    };
    tokio::spawn(monitor.run(stop))
}

struct Monitor {
    target: Target,
    settings: MonitorSettings,
    health: Option<HealthHandle>,
    conn: Option<MultiplexedConnection>,
    /// Foreign groups seen without consumers, since when (only those of the last round).
    empty_since: HashMap<(String, String), Instant>,
    failures: u64,
    /// Streams or groups skipped since start (see [`Monitor::tolerate`]).
    skipped: u64,
    /// Whether the registry held more matching streams than watched (logged once).
    capped: bool,
}

impl Monitor {
    async fn run(mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.round() => r,
            };
            match result {
                Ok(()) => self.failures = 0,
                Err(e) => {
                    self.conn = None;
                    self.failures += 1;
                    // Figures that cannot be read cannot say "degraded" either; the Redis
                    // components of /health tell about the outage.
                    if let Some(h) = &self.health {
                        h.up(Some(format!("streams not read: {e}")));
                    }
                    if self.failures == 1 || self.failures % WARN_EVERY == 0 {
                        warn!(cause = %e, failures = self.failures, "stream monitor: cannot read the durable streams");
                    }
                }
            }
        }
    }

    async fn round(&mut self) -> Result<(), AdminError> {
        let mut conn = match self.conn.clone() {
            Some(c) => c,
            None => {
                let (c, _) = self
                    .target
                    .connect()
                    .await
                    .map_err(|e| AdminError::Unavailable(e.to_string()))?;
                self.conn = Some(c.clone());
                c
            }
        };
        let channels = self.watched(&mut conn).await?;
        let prefix = self.settings.prefix.clone();
        let read: Vec<Result<Option<StreamFigures>, AdminError>> = stream::iter(channels)
            .map(|channel| {
                let (mut conn, prefix) = (conn.clone(), prefix.clone());
                async move { stream_admin::figures(&mut conn, &prefix, &channel).await }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut figures = Vec::with_capacity(read.len());
        for r in read {
            if let Some(Some(f)) = self.tolerate(r)? {
                figures.push(f);
            }
        }
        figures.sort_by(|a, b| a.channel.cmp(&b.channel));
        self.collect_garbage(&mut conn, &mut figures).await?;
        let own = self.settings.own_group.clone();
        for s in &mut figures {
            // The own group first, so it always keeps its series under the cap.
            s.groups
                .sort_by(|a, b| (a.name != own, &a.name).cmp(&(b.name != own, &b.name)));
            s.groups.truncate(MAX_GROUP_SERIES);
        }
        self.report_health(&figures);
        gauges::publish(figures);
        Ok(())
    }

    /// Registry members that are durable here, at most [`MAX_STREAMS`], sorted.
    async fn watched(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Vec<String>, AdminError> {
        let registry = registry_key(&self.settings.prefix);
        let mut out = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, members): (u64, Vec<Vec<u8>>) = ::redis::cmd("SSCAN")
                .arg(&registry)
                .arg(cursor)
                .arg("COUNT")
                .arg(500)
                .query_async(conn)
                .await?;
            for m in members {
                let Ok(name) = String::from_utf8(m) else {
                    continue;
                };
                if Channel::parse(&name).is_ok_and(|c| self.settings.policy.is_durable(&c)) {
                    out.push(name);
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
            if out.len() >= MAX_STREAMS {
                if !self.capped {
                    warn!(max = MAX_STREAMS, "stream monitor: more durable streams than it watches; the others have no gauges");
                    self.capped = true;
                }
                break;
            }
        }
        out.sort();
        out.dedup();
        out.truncate(MAX_STREAMS);
        Ok(out)
    }

    /// Destroys idle foreign groups (see the module doc) and drops them from `figures`.
    async fn collect_garbage(
        &mut self,
        conn: &mut MultiplexedConnection,
        figures: &mut [StreamFigures],
    ) -> Result<(), AdminError> {
        let Some(gc) = self.settings.group_idle_gc else {
            return Ok(());
        };
        let gc_ms = u64::try_from(gc.as_millis()).unwrap_or(u64::MAX);
        let now = Instant::now();
        let mut seen_empty = HashMap::new();
        for s in figures.iter_mut() {
            let mut destroyed = Vec::new();
            for g in &s.groups {
                if g.name == self.settings.own_group {
                    continue;
                }
                let idle = if g.consumers == 0 {
                    let key = (s.channel.clone(), g.name.clone());
                    let since = self.empty_since.get(&key).copied().unwrap_or(now);
                    seen_empty.insert(key, since);
                    now.duration_since(since) >= gc
                } else {
                    // The group may be gone meanwhile (NOGROUP): skipped, not a failed round.
                    let consumers = self.tolerate(
                        stream_admin::consumers(conn, &self.settings.prefix, &s.channel, &g.name)
                            .await,
                    )?;
                    consumers.is_some_and(|c| !c.is_empty() && c.iter().all(|c| c.idle_ms >= gc_ms))
                };
                if idle
                    && self
                        .tolerate(
                            stream_admin::destroy_group(
                                conn,
                                &self.settings.prefix,
                                &s.channel,
                                &g.name,
                            )
                            .await,
                        )?
                        .unwrap_or(false)
                {
                    info!(channel = %s.channel, group = %g.name, idle_ms = gc_ms, "stream monitor: destroyed an idle consumer group");
                    crate::metrics::stream_group_removed();
                    destroyed.push(g.name.clone());
                }
            }
            s.groups.retain(|g| !destroyed.contains(&g.name));
        }
        seen_empty.retain(|k, _| {
            figures
                .iter()
                .any(|s| s.channel == k.0 && s.groups.iter().any(|g| g.name == k.1))
        });
        self.empty_since = seen_empty;
        Ok(())
    }

    /// A failure of one stream or group (a key of another type, a group destroyed
    /// meanwhile, an ACL refusal) skips it; only an unreachable Redis fails the round.
    fn tolerate<T>(&mut self, r: Result<T, AdminError>) -> Result<Option<T>, AdminError> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e @ AdminError::Unavailable(_)) => Err(e),
            Err(e) => {
                self.skipped += 1;
                if self.skipped == 1 || self.skipped % WARN_EVERY == 0 {
                    warn!(cause = %e, skipped = self.skipped, "stream monitor: a stream or group could not be read; skipped");
                }
                Ok(None)
            }
        }
    }

    fn report_health(&self, figures: &[StreamFigures]) {
        let Some(health) = &self.health else { return };
        let s = &self.settings;
        let over: Vec<String> = figures
            .iter()
            .filter_map(|f| {
                let g = f.groups.iter().find(|g| g.name == s.own_group)?;
                let mut figures = Vec::new();
                if let Some(lag) = g.lag.filter(|&l| l > s.lag_threshold) {
                    figures.push(format!("lag {lag} > {}", s.lag_threshold));
                }
                if g.pending > s.pending_threshold {
                    figures.push(format!("pending {} > {}", g.pending, s.pending_threshold));
                }
                (!figures.is_empty()).then(|| {
                    format!(
                        "stream {} (group {}): {}",
                        f.channel,
                        g.name,
                        figures.join(", ")
                    )
                })
            })
            .collect();
        if over.is_empty() {
            health.up(Some(format!("{} streams watched", figures.len())));
            return;
        }
        let mut detail = over[..over.len().min(DETAIL_STREAMS)].join("; ");
        if over.len() > DETAIL_STREAMS {
            detail.push_str(&format!(
                "; and {} more streams",
                over.len() - DETAIL_STREAMS
            ));
        }
        health.degraded(detail);
    }
}
