//! Durable channels: which channels are kept in Redis Streams, their caps, the stream
//! entry id type and the Redis key names (PROTOCOL §3, docs/protocol.md §3).
//!
//! This module owns the *policy* and the *names*; it does no I/O. The publisher side
//! (`bus::redis::stream_writer`) appends and publishes, the executor side reads with
//! consumer groups, the router replays `since`, the admin API inspects — all of them ask
//! this module which channel is durable and what its keys are called, so the names exist
//! in one place.
//!
//! Keys, with `{p}` the configured prefix:
//! - `{p}stream:{channel}`: the capped stream; each entry has one field `envelope`.
//! - `{p}stream:{channel}:dead`: dead letters (fields `envelope`, `error`, `group`,
//!   `consumer`, `source_id`, `deliveries`, `failed_at`).
//! - `{p}streams`: a SET of the channel names that have a stream (written by publishers),
//!   so wildcards and the admin API find streams without `SCAN`.

use std::fmt;
use std::str::FromStr;

use crate::config::DurableConfig;
use crate::event::{Channel, Pattern};

/// A Redis Stream entry id, `<ms>-<seq>`. Ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    pub const MIN: StreamId = StreamId { ms: 0, seq: 0 };

    pub fn new(ms: u64, seq: u64) -> StreamId {
        StreamId { ms, seq }
    }

    /// The smallest id after this one (`None` at the very end of the id space).
    pub fn next(self) -> Option<StreamId> {
        match self.seq.checked_add(1) {
            Some(seq) => Some(StreamId { ms: self.ms, seq }),
            None => self.ms.checked_add(1).map(|ms| StreamId { ms, seq: 0 }),
        }
    }
}

/// A text that is not `<ms>-<seq>` with both parts decimal u64 (a bare `<ms>` is accepted
/// as `<ms>-0`, as Redis does for range arguments).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a stream id (expected <ms>-<seq>, e.g. 1732300000000-0)")]
pub struct BadStreamId(pub String);

impl FromStr for StreamId {
    type Err = BadStreamId;

    fn from_str(s: &str) -> Result<StreamId, BadStreamId> {
        let bad = || BadStreamId(s.chars().take(64).collect());
        let digits = |t: &str| -> Result<u64, BadStreamId> {
            if t.is_empty() || t.len() > 20 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        match s.split_once('-') {
            Some((ms, seq)) => Ok(StreamId {
                ms: digits(ms)?,
                seq: digits(seq)?,
            }),
            None => Ok(StreamId {
                ms: digits(s)?,
                seq: 0,
            }),
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// How one stream is capped: `XADD … MAXLEN ~ N` (approximate: Redis trims whole radix
/// tree nodes, cheaper, may keep somewhat more than N) or `MAXLEN = N` (exact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCap {
    pub maxlen: u64,
    pub approximate: bool,
}

impl StreamCap {
    /// The `MAXLEN` operator argument.
    pub fn operator(self) -> &'static str {
        if self.approximate {
            "~"
        } else {
            "="
        }
    }
}

/// Which channels are durable and how each stream is capped, compiled from `[durable]`.
#[derive(Debug, Clone, Default)]
pub struct DurablePolicy {
    /// `[durable] channels`.
    channels: Vec<Pattern>,
    /// `[[durable.limits]]`, first match wins.
    limits: Vec<(Pattern, StreamCap)>,
    default_cap: StreamCap,
}

impl Default for StreamCap {
    fn default() -> Self {
        StreamCap {
            maxlen: crate::config::DEFAULT_STREAM_MAXLEN,
            approximate: true,
        }
    }
}

impl DurablePolicy {
    /// From a validated config (patterns that do not parse are skipped: validation has
    /// refused them already).
    pub fn from_config(config: &DurableConfig) -> DurablePolicy {
        let default_cap = StreamCap {
            maxlen: config.maxlen,
            approximate: config.approximate,
        };
        DurablePolicy {
            channels: config
                .channels
                .iter()
                .filter_map(|p| Pattern::parse(p).ok())
                .collect(),
            limits: config
                .limits
                .iter()
                .filter_map(|l| {
                    let pattern = Pattern::parse(&l.pattern).ok()?;
                    Some((
                        pattern,
                        StreamCap {
                            maxlen: l.maxlen,
                            approximate: l.approximate.unwrap_or(config.approximate),
                        },
                    ))
                })
                .collect(),
            default_cap,
        }
    }

    /// No channel is durable.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// The durable patterns (`[durable] channels`).
    pub fn patterns(&self) -> &[Pattern] {
        &self.channels
    }

    /// Whether `channel` is kept in a stream.
    pub fn is_durable(&self, channel: &Channel) -> bool {
        self.channels.iter().any(|p| p.matches(channel))
    }

    /// The cap of `channel`'s stream, `None` when the channel is not durable.
    pub fn cap(&self, channel: &Channel) -> Option<StreamCap> {
        if !self.is_durable(channel) {
            return None;
        }
        Some(
            self.limits
                .iter()
                .find(|(p, _)| p.matches(channel))
                .map_or(self.default_cap, |(_, cap)| *cap),
        )
    }
}

/// `{p}stream:{channel}`.
pub fn stream_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}stream:{channel}")
}

/// `{stream key}:dead`.
pub fn dead_key(stream_key: &str) -> String {
    format!("{stream_key}:dead")
}

/// `{p}streams`: the SET of channel names that have a stream.
pub fn registry_key(prefix: &str) -> String {
    format!("{prefix}streams")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StreamLimit;

    #[test]
    fn stream_ids_parse_print_and_order_like_redis() {
        let a: StreamId = "1732300000000-0".parse().unwrap();
        let b: StreamId = "1732300000000-12".parse().unwrap();
        let c: StreamId = "1732300000001".parse().unwrap();
        assert_eq!(a.to_string(), "1732300000000-0");
        assert_eq!(c, StreamId::new(1732300000001, 0));
        assert!(a < b && b < c);
        assert_eq!(a.next(), Some(StreamId::new(1732300000000, 1)));
        assert_eq!(StreamId::new(5, u64::MAX).next(), Some(StreamId::new(6, 0)));
        assert_eq!(StreamId::new(u64::MAX, u64::MAX).next(), None);
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "a-1",
            "1-2-3",
            "+1-0",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<StreamId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_names_durable_channels_and_their_caps() {
        let config = DurableConfig {
            channels: vec!["trade:*:*".into(), "book:binance:BTC-USDT".into()],
            maxlen: 1000,
            approximate: true,
            limits: vec![StreamLimit {
                pattern: "trade:binance:*".into(),
                maxlen: 50,
                approximate: Some(false),
            }],
            ..DurableConfig::default()
        };
        let policy = DurablePolicy::from_config(&config);
        let ch = |s: &str| Channel::parse(s).unwrap();
        assert!(policy.is_durable(&ch("trade:kraken:BTC-USD")));
        assert!(!policy.is_durable(&ch("ticker:binance:BTC-USDT")));
        assert_eq!(
            policy.cap(&ch("trade:binance:ETH-USDT")),
            Some(StreamCap {
                maxlen: 50,
                approximate: false
            })
        );
        assert_eq!(
            policy.cap(&ch("book:binance:BTC-USDT")),
            Some(StreamCap {
                maxlen: 1000,
                approximate: true
            })
        );
        assert_eq!(policy.cap(&ch("book:binance:ETH-USDT")), None);
        assert_eq!(
            stream_key("md:", "trade:binance:BTC-USDT"),
            "md:stream:trade:binance:BTC-USDT"
        );
        assert_eq!(
            dead_key("md:stream:trade:binance:BTC-USDT"),
            "md:stream:trade:binance:BTC-USDT:dead"
        );
    }
}
