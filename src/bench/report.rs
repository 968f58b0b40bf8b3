//! The JSON report of a scenario run (`mdbridge bench --scenario … --json out.json`) and
//! its one-screen text form. Every run carries the same-run Redis ceiling and the load
//! average, so a figure can be read on any machine.

use serde::Serialize;

use super::hist::Quantiles;
use super::procs::RedisBaseline;

/// One scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub mdbridge_version: String,
    pub unix_time: u64,
    pub cpus: usize,
    pub load_avg_before: [f64; 3],
    pub load_avg_after: [f64; 3],
    pub params: Params,
    pub redis_baseline: RedisBaseline,
    pub runs: Vec<RunReport>,
}

/// What the scenario was asked to do.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    pub secs: u64,
    pub warmup_secs: u64,
    pub bots: usize,
    /// Trades per second offered by the simulator over all symbols; 0 = flat out.
    pub trades_per_sec: u32,
    pub symbols: Vec<String>,
    pub channels: Vec<String>,
}

/// One measured phase (a scenario may have several: `slow` and `durable` have two).
#[derive(Debug, Clone, Serialize, Default)]
pub struct RunReport {
    pub label: String,
    pub bots: usize,
    pub seconds: f64,
    /// Distinct market events delivered (the most any one measuring bot received).
    pub events: u64,
    pub events_per_sec: f64,
    /// Frames delivered to all measuring bots.
    pub frames: u64,
    pub frames_per_sec: f64,
    /// `events_per_sec` / the same-run `redis-benchmark` PUBLISH rate.
    pub ratio_to_redis: f64,
    /// `ts_recv` → the measuring bot read the frame, over every frame of every bot.
    pub latency: Quantiles,
    pub drops: Drops,
    pub roles: Vec<RoleUsage>,
    /// Redis commands run during the window (`INFO commandstats` calls, deltas): shows
    /// e.g. `publish` against `xadd` for pub/sub against durable channels.
    pub redis_commands: std::collections::BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleFigures>,
}

/// Loss, as the executor counts it and as the bots see it.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Drops {
    /// `mdbridge_bot_frames_dropped_total` over the window (slow-client policy).
    pub executor_frames_dropped: u64,
    /// `mdbridge_envelopes_lost_total` over the window (sequence gaps from Redis).
    pub envelopes_lost: u64,
    /// Trade ids the measuring bots found skipped.
    pub trade_ids_skipped: u64,
}

/// One process's cost over the measuring window.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RoleUsage {
    pub role: String,
    pub pid: u32,
    pub cpu_secs: f64,
    /// Share of one core.
    pub cpu_share: f64,
    /// CPU seconds per million events delivered (= µs per event).
    pub cpu_secs_per_million_events: f64,
    /// CPU µs per frame delivered to a bot (the executor's figure).
    pub cpu_us_per_frame: f64,
    /// VmHWM at the end.
    pub peak_rss_kib: u64,
    /// VmRSS at the end.
    pub rss_kib: u64,
}

/// The `idle` scenario: the executor's resident memory per connection.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct IdleFigures {
    pub connections: usize,
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_subscribed_kib: u64,
    pub kib_per_connection: f64,
    pub kib_per_subscribed_connection: f64,
}

impl Report {
    /// A few lines per run, for the terminal.
    pub fn text(&self) -> String {
        let mut s = format!(
            "scenario {} | load avg {:.2} -> {:.2} | redis-benchmark PUBLISH -c 1 -P 16 ({} B, 1 subscriber): {:.0}/s\n",
            self.scenario,
            self.load_avg_before[0],
            self.load_avg_after[0],
            self.redis_baseline.payload_bytes,
            self.redis_baseline.publish_per_sec
        );
        for r in &self.runs {
            let q = r.latency;
            s += &format!(
                "[{}] {} bots, {:.1} s: {:.0} events/s ({:.2} of redis), {:.0} frames/s | latency p50 {} us p99 {} us p99.9 {} us max {} us | dropped {} lost {} skipped {}\n",
                r.label, r.bots, r.seconds, r.events_per_sec, r.ratio_to_redis, r.frames_per_sec,
                q.p50_us, q.p99_us, q.p999_us, q.max_us,
                r.drops.executor_frames_dropped, r.drops.envelopes_lost, r.drops.trade_ids_skipped
            );
            let cmds: Vec<String> = r
                .redis_commands
                .iter()
                .filter(|(_, n)| **n >= 100)
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            if !cmds.is_empty() {
                s += &format!("    redis commands: {}\n", cmds.join(", "));
            }
            for u in &r.roles {
                s += &format!(
                    "    {:<10} cpu {:.2} s ({:.0} %), {:.2} s per M events, {:.3} us per frame, peak RSS {} KiB\n",
                    u.role,
                    u.cpu_secs,
                    u.cpu_share * 100.0,
                    u.cpu_secs_per_million_events,
                    u.cpu_us_per_frame,
                    u.peak_rss_kib
                );
            }
            if let Some(i) = r.idle {
                s += &format!(
                    "    idle: {} connections: executor RSS {} -> {} KiB bare ({:.1} KiB each) -> {} KiB subscribed ({:.1} KiB each)\n",
                    i.connections, i.rss_before_kib, i.rss_connected_kib, i.kib_per_connection,
                    i.rss_subscribed_kib, i.kib_per_subscribed_connection
                );
            }
        }
        s
    }
}
