//! The bots' interest as Redis subscriptions: what to `SUBSCRIBE`/`PSUBSCRIBE`, bounded,
//! and the exact per-message filter that makes any wider subscription safe.
//!
//! - [`Plan`] turns an [`Interest`] into Redis channel names and patterns. Up to
//!   `max_patterns` wildcards are subscribed as they are. Beyond that budget, wildcards
//!   are replaced by *covering* prefix patterns: first per type and exchange
//!   (`{p}trade:binance:*`), then per type (`{p}trade:*`), and at the very last `{p}*`,
//!   so one executor never holds more than `max_patterns` patterns, however many bots
//!   ask for however many wildcards, and bots asking for overlapping patterns share one.
//!   Exact channels a cover already delivers are not subscribed separately (Redis would
//!   send each of their messages twice).
//! - [`Filter`] is the exact check every received message goes through (the current
//!   interest, with our one-segment `*`): a cover, Redis's wider glob and stragglers after
//!   an unsubscribe are all made exact here. Results are cached per channel name, so the
//!   cost per message does not grow with the number of bots' patterns.
//! - [`reconcile`] brings a live pub/sub connection in line with a plan: one pipelined
//!   round trip for the whole change.
//!
//! It owns no connection and no task.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use ::redis::aio::PubSubSink;
use futures_util::future::join_all;

use crate::bus::Interest;
use crate::event::{Channel, Pattern};

/// What one connection should be subscribed to, as Redis channel names / patterns.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub exact: BTreeSet<String>,
    pub wild: BTreeSet<String>,
}

impl Plan {
    /// The subscriptions for `interest` under `prefix`, with at most `max_patterns`
    /// patterns (at least one when there is any wildcard).
    ///
    /// `max_patterns = 0` means covers only, one per type (`{p}trade:*`, or `{p}*` for a
    /// typeless wildcard): a small fixed set of patterns that an ACL confining channels
    /// can list literally (Redis checks a `PSUBSCRIBE` pattern literally against `&…`).
    pub fn new(interest: &Interest, prefix: &str, max_patterns: usize) -> Plan {
        let mut exact = BTreeSet::new();
        let mut wild: Vec<&Pattern> = Vec::new();
        for p in interest.iter() {
            if p.is_wildcard() {
                wild.push(p);
            } else {
                exact.insert(format!("{prefix}{p}"));
            }
        }
        if wild.is_empty() || (max_patterns > 0 && wild.len() <= max_patterns) {
            let wild = wild.iter().map(|p| format!("{prefix}{p}")).collect();
            return Plan { exact, wild };
        }
        // Too many (or covers only): cover them, coarser and coarser until the budget holds.
        let depths: &[usize] = if max_patterns == 0 { &[1] } else { &[2, 1, 0] };
        let mut covers = BTreeSet::new();
        for &depth in depths {
            covers = wild.iter().map(|p| cover(p.as_str(), depth)).collect();
            remove_subsumed(&mut covers);
            if covers.len() <= max_patterns {
                break;
            }
        }
        let wild: BTreeSet<String> = covers.iter().map(|c| format!("{prefix}{c}*")).collect();
        // Every cover is a prefix glob (`…*`): an exact channel under one is delivered by it.
        let heads: Vec<String> = covers.iter().map(|c| format!("{prefix}{c}")).collect();
        exact.retain(|e| !heads.iter().any(|h| e.starts_with(h.as_str())));
        Plan { exact, wild }
    }
}

/// The literal head of `pattern` kept by a cover of `depth` literal segments, ending in
/// `:` (or empty: everything). `trade:binance:*` at depth 2 is `trade:binance:`; at depth 1
/// `trade:`. The head stops at the first `*` segment.
fn cover(pattern: &str, depth: usize) -> String {
    let mut head = String::new();
    for seg in pattern.split(':').take(depth) {
        if seg == "*" {
            break;
        }
        head.push_str(seg);
        head.push(':');
    }
    head
}

/// Drops covers that a shorter one in the set already includes (`trade:` includes
/// `trade:binance:`; the empty head includes all).
fn remove_subsumed(covers: &mut BTreeSet<String>) {
    let all: Vec<String> = covers.iter().cloned().collect();
    covers.retain(|c| {
        !all.iter()
            .any(|other| other.len() < c.len() && c.starts_with(other.as_str()))
    });
}

/// Channel names cached by [`Filter`] before the cache is emptied: channel names come from
/// Redis, so whatever is published there must not grow this without bound.
const FILTER_CACHE_MAX: usize = 65_536;

/// The current interest, split for a cheap per-message check.
#[derive(Default)]
pub struct Filter {
    exact: HashSet<String>,
    wild: Vec<Pattern>,
    /// Wildcard verdict per channel name; built lazily, reset with the interest.
    cache: RefCell<HashMap<String, bool>>,
}

impl Filter {
    pub fn new(interest: &Interest) -> Filter {
        let mut f = Filter::default();
        for p in interest.iter() {
            if p.is_wildcard() {
                f.wild.push(p.clone());
            } else {
                f.exact.insert(p.as_str().to_string());
            }
        }
        f
    }

    pub fn matches(&self, channel: &Channel) -> bool {
        if self.exact.contains(channel.as_str()) {
            return true;
        }
        if self.wild.is_empty() {
            return false;
        }
        let mut cache = self.cache.borrow_mut();
        if let Some(&hit) = cache.get(channel.as_str()) {
            return hit;
        }
        let hit = self.wild.iter().any(|p| p.matches(channel));
        if cache.len() >= FILTER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(channel.as_str().to_string(), hit);
        hit
    }
}

/// Brings the connection's subscriptions from `current` to `target`, in one pipelined
/// round trip: new subscriptions first (so nothing is missed across the change), then the
/// unsubscriptions. On success `current` becomes `target`.
///
/// Each command carries one name: redis-rs matches replies to commands one to one, and
/// Redis answers a multi-name (P)SUBSCRIBE with one reply per name, so a multi-name
/// command would hand later replies (and a probe's pong) to the wrong waiter. The
/// commands go out together on clones of the sink, so they still cost one round trip.
pub async fn reconcile(
    sink: &PubSubSink,
    current: &mut Plan,
    target: &Plan,
    timeout: Duration,
) -> ::redis::RedisResult<()> {
    #[derive(Clone, Copy)]
    enum Op {
        Sub,
        PSub,
        Unsub,
        PUnsub,
    }
    let mut ops: Vec<(Op, &String)> = Vec::new();
    ops.extend(
        target
            .exact
            .difference(&current.exact)
            .map(|k| (Op::Sub, k)),
    );
    ops.extend(target.wild.difference(&current.wild).map(|k| (Op::PSub, k)));
    ops.extend(
        current
            .exact
            .difference(&target.exact)
            .map(|k| (Op::Unsub, k)),
    );
    ops.extend(
        current
            .wild
            .difference(&target.wild)
            .map(|k| (Op::PUnsub, k)),
    );
    if ops.is_empty() {
        return Ok(());
    }
    // join_all polls in order and each call queues its command on its first poll: the
    // commands reach Redis in this order, in one write.
    let sends = ops.into_iter().map(|(op, key)| {
        let mut sink = sink.clone();
        let key = key.clone();
        async move {
            match op {
                Op::Sub => sink.subscribe(key).await,
                Op::PSub => sink.psubscribe(key).await,
                Op::Unsub => sink.unsubscribe(key).await,
                Op::PUnsub => sink.punsubscribe(key).await,
            }
        }
    });
    match tokio::time::timeout(timeout, join_all(sends)).await {
        Ok(results) => results
            .into_iter()
            .collect::<::redis::RedisResult<Vec<()>>>()?,
        Err(_) => {
            return Err(::redis::RedisError::from((
                ::redis::ErrorKind::IoError,
                "subscription commands timed out",
            )))
        }
    };
    *current = target.clone();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn interest(patterns: &[String]) -> Interest {
        Arc::new(
            patterns
                .iter()
                .map(|p| Pattern::parse(p).unwrap())
                .collect(),
        )
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn within_budget_patterns_are_kept_as_they_are() {
        let i = interest(&["trade:*:BTC-USDT".into(), "book:binance:BTC-USDT".into()]);
        let plan = Plan::new(&i, "md:", 64);
        assert_eq!(plan.wild, set(&["md:trade:*:BTC-USDT"]));
        assert_eq!(plan.exact, set(&["md:book:binance:BTC-USDT"]));
    }

    #[test]
    fn beyond_budget_wildcards_become_covers_and_covered_exacts_go() {
        let mut p: Vec<String> = Vec::new();
        for i in 0..500 {
            p.push(format!("trade:*:S{i}-USDT"));
            p.push(format!("book:binance:S{i}-USDT"));
        }
        p.push("ticker:binance:*".into());
        p.push("ticker:kraken:*".into());
        p.push("candle:binance:S1-USDT:*".into());
        p.push("trade:binance:X-USDT".into());
        p.push("status:binance".into());
        let plan = Plan::new(&interest(&p), "md:", 4);
        assert_eq!(
            plan.wild,
            set(&[
                "md:candle:binance:*",
                "md:ticker:binance:*",
                "md:ticker:kraken:*",
                "md:trade:*"
            ])
        );
        assert!(!plan.exact.contains("md:trade:binance:X-USDT"), "covered");
        assert!(plan.exact.contains("md:book:binance:S1-USDT"));
        assert!(plan.exact.contains("md:status:binance"));
        // A tighter budget coarsens further.
        let plan = Plan::new(&interest(&p), "md:", 3);
        assert_eq!(
            plan.wild,
            set(&["md:candle:*", "md:ticker:*", "md:trade:*"])
        );
        let plan = Plan::new(&interest(&p), "md:", 1);
        assert_eq!(plan.wild, set(&["md:*"]));
        assert!(plan.exact.is_empty(), "everything is covered");
    }

    #[test]
    fn zero_budget_means_one_cover_per_type() {
        let p = vec![
            "trade:binance:*".to_string(),
            "ticker:*:A-B".to_string(),
            "book:binance:A-B".to_string(),
        ];
        let plan = Plan::new(&interest(&p), "md:", 0);
        assert_eq!(plan.wild, set(&["md:ticker:*", "md:trade:*"]));
        assert_eq!(plan.exact, set(&["md:book:binance:A-B"]));
        let exact_only = Plan::new(&interest(&["book:binance:A-B".into()]), "md:", 0);
        assert!(exact_only.wild.is_empty());
    }

    #[test]
    fn a_typeless_wildcard_is_covered_by_everything() {
        let p = vec!["*:binance:A-B".to_string(), "trade:*:C-D".to_string()];
        let plan = Plan::new(&interest(&p), "md:", 1);
        assert_eq!(plan.wild, set(&["md:*"]));
    }

    #[test]
    fn filter_is_exact_and_cached() {
        let f = Filter::new(&interest(&["trade:*:BTC-USDT".into()]));
        let yes = Channel::parse("trade:binance:BTC-USDT").unwrap();
        let no = Channel::parse("trade:binance:ETH-USDT").unwrap();
        assert!(f.matches(&yes));
        assert!(f.matches(&yes), "cached answer is the same");
        assert!(!f.matches(&no));
        assert!(!f.matches(&no));
    }
}
