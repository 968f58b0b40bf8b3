//! Which streams the consumer reads: the durable channels the local bots hold. Exact
//! patterns name their channel; wildcards are expanded against the registry SET
//! `{p}streams` (channels that have a stream, written by publishers). No task, no state:
//! the consumer calls these on every interest change and registry re-read.

use std::collections::{BTreeMap, HashMap};

use ::redis::aio::MultiplexedConnection;
use ::redis::RedisResult;

use super::{Start, MAX_STREAMS};
use crate::bus::Interest;
use crate::durable::{registry_key, DurablePolicy};
use crate::event::{Channel, Pattern};

/// Registry members read at most (names from Redis must not grow memory without bound).
const MAX_REGISTRY: usize = 100_000;

/// The streams to read, with where a group created now starts: the (earliest) Redis time
/// a pattern reaching the channel was first held (`held_since`), else `$`.
pub(super) fn wanted(
    interest: &Interest,
    policy: &DurablePolicy,
    registry: &[Channel],
    held_since: &HashMap<Pattern, u64>,
) -> BTreeMap<Channel, Start> {
    let mut out = BTreeMap::new();
    if policy.is_empty() {
        return out;
    }
    for p in interest.iter().filter(|p| !p.is_wildcard()) {
        if let Ok(c) = Channel::parse(p.as_str()) {
            if policy.is_durable(&c) && out.len() < MAX_STREAMS {
                let start = held_since.get(p).map_or(Start::Latest, |&ms| Start::At(ms));
                out.insert(c, start);
            }
        }
    }
    for c in registry {
        if out.len() >= MAX_STREAMS {
            break;
        }
        if out.contains_key(c) || !policy.is_durable(c) {
            continue;
        }
        let since = interest
            .iter()
            .filter(|p| p.is_wildcard() && p.matches(c))
            .filter_map(|p| held_since.get(p).copied())
            .min();
        if let Some(ms) = since {
            out.insert(c.clone(), Start::At(ms));
        }
    }
    out
}

/// `SMEMBERS {p}streams`, valid channel names only.
pub(super) async fn read_registry(
    conn: &mut MultiplexedConnection,
    prefix: &str,
) -> RedisResult<Vec<Channel>> {
    let names: Vec<String> = ::redis::cmd("SMEMBERS")
        .arg(registry_key(prefix))
        .query_async(conn)
        .await?;
    let mut channels: Vec<Channel> = names
        .iter()
        .take(MAX_REGISTRY)
        .filter_map(|n| Channel::parse(n).ok())
        .collect();
    channels.sort();
    Ok(channels)
}

/// Redis's clock in ms (`TIME`): stream ids come from it, not from ours.
pub(super) async fn redis_time_ms(conn: &mut MultiplexedConnection) -> RedisResult<u64> {
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME").query_async(conn).await?;
    Ok(secs.saturating_mul(1000) + micros / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DurableConfig;
    use std::sync::Arc;

    #[test]
    fn exact_durable_patterns_and_registry_channels_under_held_wildcards() {
        let policy = DurablePolicy::from_config(&DurableConfig {
            channels: vec!["trade:*:*".into()],
            ..DurableConfig::default()
        });
        let p = |s: &str| Pattern::parse(s).unwrap();
        let c = |s: &str| Channel::parse(s).unwrap();
        let interest: Interest = Arc::new(
            [
                p("trade:binance:BTC-USDT"),
                p("ticker:binance:BTC-USDT"),
                p("trade:kraken:*"),
            ]
            .into_iter()
            .collect(),
        );
        let registry = vec![
            c("trade:kraken:BTC-USD"),
            c("trade:binance:ETH-USDT"),
            c("trade:binance:BTC-USDT"),
        ];
        let since = HashMap::from([(p("trade:kraken:*"), 42), (p("trade:binance:BTC-USDT"), 7)]);
        let w = wanted(&interest, &policy, &registry, &since);
        assert_eq!(
            w.into_iter().collect::<Vec<_>>(),
            vec![
                (c("trade:binance:BTC-USDT"), Start::At(7)),
                (c("trade:kraken:BTC-USD"), Start::At(42)),
            ]
        );
        let w = wanted(&interest, &policy, &registry, &HashMap::new());
        assert_eq!(w.get(&c("trade:binance:BTC-USDT")), Some(&Start::Latest));
        assert_eq!(w.get(&c("trade:kraken:BTC-USD")), None, "no time: not yet");
        let none = DurablePolicy::default();
        assert!(wanted(&interest, &none, &registry, &since).is_empty());
    }
}
