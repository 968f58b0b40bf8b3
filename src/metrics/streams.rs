//! The per-stream gauges of durable channels: `mdbridge_stream_length{channel}`,
//! `mdbridge_stream_dead_letter_length{channel}`, `mdbridge_stream_pending{channel,group}`
//! and `mdbridge_stream_lag{channel,group}`.
//!
//! Unlike every other series (see [`super`]), these cannot exist from start: their label
//! values are the streams Redis holds, and a stream that disappears (deleted, its channel
//! no longer durable) or a group that is destroyed must lose its series, which the
//! `metrics` recorder cannot do. So the stream monitor (`bus::redis::stream_monitor`)
//! replaces the whole table after each round ([`publish`]) and `/metrics` appends its
//! rendering ([`render_into`]) to the recorder's. The table is bounded by the monitor
//! (at most `MAX_STREAMS` streams and `MAX_GROUP_SERIES` groups each), so is the label
//! cardinality. This module does no I/O; it owns the names, the table and the text.

use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, PoisonError, RwLock};

use serde::Serialize;

pub const STREAM_LENGTH: &str = "mdbridge_stream_length";
pub const STREAM_PENDING: &str = "mdbridge_stream_pending";
pub const STREAM_LAG: &str = "mdbridge_stream_lag";
pub const STREAM_DEAD_LETTER_LENGTH: &str = "mdbridge_stream_dead_letter_length";

/// The series that exist only once the monitor has seen a stream (not at start, unlike
/// every other series): `tests/deploy.rs` and `tests/ops_signals.rs` know them by this.
pub const PER_STREAM_SERIES: [&str; 4] = [
    STREAM_LENGTH,
    STREAM_PENDING,
    STREAM_LAG,
    STREAM_DEAD_LETTER_LENGTH,
];

/// Most streams the monitor watches (and so the most `channel` label values).
pub const MAX_STREAMS: usize = 1_000;
/// Most groups per stream with a series (the instance's own group always among them).
pub const MAX_GROUP_SERIES: usize = 32;

/// What the monitor read about one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamFigures {
    pub channel: String,
    pub length: u64,
    pub dead_letters: u64,
    pub groups: Vec<GroupFigures>,
}

/// One consumer group of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupFigures {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (before 7.0,
    /// or after deletions it cannot account for): no `lag` series then.
    pub lag: Option<u64>,
}

static TABLE: LazyLock<RwLock<Arc<Vec<StreamFigures>>>> = LazyLock::new(RwLock::default);

/// Replaces the table: streams and groups not in `figures` lose their series.
pub fn publish(figures: Vec<StreamFigures>) {
    let table = Arc::new(figures);
    *TABLE.write().unwrap_or_else(PoisonError::into_inner) = table;
}

/// The table as the monitor last published it (empty before its first round).
pub fn current() -> Arc<Vec<StreamFigures>> {
    TABLE.read().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Appends the Prometheus text of the table to `out` (nothing when it is empty).
pub fn render_into(out: &mut String) {
    render_table(&current(), out);
}

fn render_table(table: &[StreamFigures], out: &mut String) {
    if table.is_empty() {
        return;
    }
    let header = |out: &mut String, name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    header(
        out,
        STREAM_LENGTH,
        "Entries in each durable stream this instance publishes or consumes.",
    );
    for s in table {
        let _ = writeln!(
            out,
            "{STREAM_LENGTH}{{channel=\"{}\"}} {}",
            esc(&s.channel),
            s.length
        );
    }
    header(
        out,
        STREAM_DEAD_LETTER_LENGTH,
        "Entries in each durable stream's dead-letter stream.",
    );
    for s in table {
        let _ = writeln!(
            out,
            "{STREAM_DEAD_LETTER_LENGTH}{{channel=\"{}\"}} {}",
            esc(&s.channel),
            s.dead_letters
        );
    }
    header(
        out,
        STREAM_PENDING,
        "Entries delivered to a consumer group and not acknowledged yet.",
    );
    for s in table {
        for g in &s.groups {
            let _ = writeln!(
                out,
                "{STREAM_PENDING}{{channel=\"{}\",group=\"{}\"}} {}",
                esc(&s.channel),
                esc(&g.name),
                g.pending
            );
        }
    }
    header(
        out,
        STREAM_LAG,
        "Entries of a stream not yet delivered to a consumer group (absent when Redis cannot tell).",
    );
    for s in table {
        for g in &s.groups {
            if let Some(lag) = g.lag {
                let _ = writeln!(
                    out,
                    "{STREAM_LAG}{{channel=\"{}\",group=\"{}\"}} {lag}",
                    esc(&s.channel),
                    esc(&g.name)
                );
            }
        }
    }
    out.push('\n');
}

/// A label value as the text format wants it: `\`, `"` and newlines escaped.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_each_stream_and_group_and_skips_unknown_lag() {
        let table = vec![StreamFigures {
            channel: "trade:binance:BTC-USDT".into(),
            length: 5,
            dead_letters: 2,
            groups: vec![
                GroupFigures {
                    name: "exec\"1".into(),
                    consumers: 1,
                    pending: 3,
                    lag: Some(1),
                },
                GroupFigures {
                    name: "old".into(),
                    consumers: 0,
                    pending: 0,
                    lag: None,
                },
            ],
        }];
        let mut out = String::new();
        render_table(&table, &mut out);
        let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "mdbridge_stream_length{channel=\"trade:binance:BTC-USDT\"} 5",
                "mdbridge_stream_dead_letter_length{channel=\"trade:binance:BTC-USDT\"} 2",
                "mdbridge_stream_pending{channel=\"trade:binance:BTC-USDT\",group=\"exec\\\"1\"} 3",
                "mdbridge_stream_pending{channel=\"trade:binance:BTC-USDT\",group=\"old\"} 0",
                "mdbridge_stream_lag{channel=\"trade:binance:BTC-USDT\",group=\"exec\\\"1\"} 1",
                "",
            ]
        );
        let mut empty = String::new();
        render_table(&[], &mut empty);
        assert!(empty.is_empty());
    }
}
