//! `[durable]`: which channels are kept in Redis Streams and how executors consume them
//! (the settings and their validation; the policy compiled from them is
//! [`crate::durable::DurablePolicy`]).

use serde::{Deserialize, Serialize};

use super::{Config, InstanceConfig};
use crate::event::Pattern;

/// Default `[durable] maxlen`.
pub const DEFAULT_STREAM_MAXLEN: u64 = 100_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DurableConfig {
    /// Channel patterns kept in capped Redis Streams (`{p}stream:{channel}`), with
    /// acknowledged delivery to executors and `since` replay for bots. Publishers and
    /// executors must list the same patterns.
    pub channels: Vec<String>,
    /// Cap of each stream, in entries, unless a `limits` entry matches.
    pub maxlen: u64,
    /// `MAXLEN ~ N` (true: Redis trims whole nodes, cheaper, keeps somewhat more than N)
    /// or exact `MAXLEN = N`, unless a `limits` entry says otherwise.
    pub approximate: bool,
    /// Per-pattern caps; the first entry whose pattern matches the channel wins.
    pub limits: Vec<StreamLimit>,
    /// Consumer group of this executor; default: `instance.name`. Executors in different
    /// groups each receive every entry (broadcast); executors sharing a group split the
    /// entries between them (work sharing).
    pub group: Option<String>,
    /// Deliveries of one entry before it is moved to the dead-letter stream.
    pub max_deliveries: u32,
    /// First retry delay of an entry that could not be handled...
    pub retry_backoff_ms: u64,
    /// ...multiplied by this for each further delivery (1 s, 4 s, 16 s, …).
    pub retry_backoff_factor: u32,
    /// An entry pending this long on another consumer of the group is claimed.
    pub claim_idle_ms: u64,
    /// A consumer group none of whose consumers was seen for this long is destroyed
    /// (0: never).
    pub group_idle_gc_ms: u64,
    /// Publisher: durable envelopes kept, in bytes, while Redis is unreachable; appended in
    /// order on reconnect. What overflows is counted and announced as a gap.
    pub buffer_bytes: u64,
    /// Executor: most entries one `XREADGROUP` returns.
    pub read_count: usize,
    /// Executor: how long one `XREADGROUP` blocks waiting for entries.
    pub block_ms: u64,
    /// Most entries one bot `since` replays; an older `since` is answered with
    /// `history_truncated` and the newest `max_replay` entries.
    pub max_replay: usize,
    /// `/health` reports `degraded` when a consumed stream's group lag exceeds this...
    pub lag_threshold: u64,
    /// ...or its pending entries exceed this.
    pub pending_threshold: u64,
    /// How often stream length, lag, pending and dead letters are read for metrics and
    /// health.
    pub monitor_interval_ms: u64,
}

/// One `[[durable.limits]]` entry: the cap of the streams whose channel matches `pattern`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamLimit {
    pub pattern: String,
    pub maxlen: u64,
    /// Default: `[durable] approximate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approximate: Option<bool>,
}

impl Default for DurableConfig {
    fn default() -> Self {
        DurableConfig {
            channels: Vec::new(),
            maxlen: DEFAULT_STREAM_MAXLEN,
            approximate: true,
            limits: Vec::new(),
            group: None,
            max_deliveries: 5,
            retry_backoff_ms: 1_000,
            retry_backoff_factor: 4,
            claim_idle_ms: 30_000,
            group_idle_gc_ms: 7 * 24 * 3600 * 1000,
            buffer_bytes: 64 * 1024 * 1024,
            read_count: 512,
            block_ms: 1_000,
            max_replay: 100_000,
            lag_threshold: 100,
            pending_threshold: 50,
            monitor_interval_ms: 5_000,
        }
    }
}

impl DurableConfig {
    /// The consumer group: `group`, else the instance name.
    pub fn group_name<'a>(&'a self, instance: &'a InstanceConfig) -> &'a str {
        self.group.as_deref().unwrap_or(&instance.name)
    }
}

impl Config {
    pub(super) fn validate_durable(&self, bad: &mut impl FnMut(&str, String)) {
        let d = &self.durable;
        for (i, pat) in d.channels.iter().enumerate() {
            if let Err(e) = Pattern::parse(pat) {
                bad(&format!("durable.channels[{i}]"), e.to_string());
            }
        }
        for (i, limit) in d.limits.iter().enumerate() {
            if let Err(e) = Pattern::parse(&limit.pattern) {
                bad(&format!("durable.limits[{i}].pattern"), e.to_string());
            }
            if limit.maxlen == 0 {
                bad(
                    &format!("durable.limits[{i}].maxlen"),
                    "must be at least 1".into(),
                );
            }
        }
        if d.maxlen == 0 {
            bad("durable.maxlen", "must be at least 1".into());
        }
        if d.group.as_ref().is_some_and(|g| g.trim().is_empty()) {
            bad(
                "durable.group",
                "must not be empty (leave it out for the instance name)".into(),
            );
        }
        for (key, value) in [
            ("durable.max_deliveries", u64::from(d.max_deliveries)),
            ("durable.retry_backoff_ms", d.retry_backoff_ms),
            (
                "durable.retry_backoff_factor",
                u64::from(d.retry_backoff_factor),
            ),
            ("durable.claim_idle_ms", d.claim_idle_ms),
            ("durable.read_count", d.read_count as u64),
            ("durable.block_ms", d.block_ms),
            ("durable.max_replay", d.max_replay as u64),
            ("durable.monitor_interval_ms", d.monitor_interval_ms),
        ] {
            if value == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        if !d.channels.is_empty() && d.buffer_bytes < 64 * 1024 {
            bad(
                "durable.buffer_bytes",
                "must be at least 65536 (one large envelope must fit)".into(),
            );
        }
    }
}
