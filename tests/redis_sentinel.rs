//! Redis Sentinel end to end, with real processes: a master, a replica and three
//! sentinels; a simulator feeding a publisher; an executor with bots. Both roles are
//! configured with `sentinels` + `master_name` only (their `url` points nowhere), so every
//! connection they make goes where the sentinels say.

mod common;

use std::time::Instant;

use common::book_chain::BookChain;
use common::sentinel::{SentinelSet, MASTER};
use common::*;
use serde_json::Value;

/// Publisher + executor on the sentinels, both healthy.
async fn roles(set: &SentinelSet, feed: &str) -> (Proc, Proc) {
    roles_with(set, feed, |c| c).await
}

/// [`roles`] with each config passed through `edit` first.
async fn roles_with(
    set: &SentinelSet,
    feed: &str,
    edit: impl Fn(String) -> String,
) -> (Proc, Proc) {
    let redis = format!(
        "[redis]\nsentinels = {}\nmaster_name = \"{MASTER}\"\n",
        set.toml_list()
    );
    // Nothing listens on port 1: the data connections must come from the sentinels.
    let config = |h, b, extra| {
        edit(role_config("redis://127.0.0.1:1/0", h, b, extra).replacen("[redis]\n", &redis, 1))
    };
    let (ph, pb, eh, eb) = (free_port(), free_port(), free_port(), free_port());
    let mut publisher = Proc::role("publisher", &config(ph, pb, feed), ph, None);
    let mut executor = Proc::role("executor", &config(eh, eb, ""), eh, Some(eb));
    publisher.wait_healthy().await;
    executor.wait_healthy().await;
    (publisher, executor)
}

fn trade_id(v: &Value) -> u64 {
    v["trade_id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("numeric trade id")
}

/// Reads trades until `n` more have arrived, asserting ids only ever increase (no trade
/// twice); returns the last id and whether a gap (lost while no master) was seen, and
/// when the first trade after that gap arrived.
async fn increasing_trades(bot: &mut Bot, last: &mut u64, n: usize) -> Option<Instant> {
    let mut after_gap = None;
    for _ in 0..n {
        let (t, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
        let id = trade_id(&t);
        assert!(
            id > *last,
            "trade {id} after {last}: duplicated or reordered"
        );
        if id != *last + 1 && after_gap.is_none() {
            after_gap = Some(Instant::now());
        }
        *last = id;
    }
    after_gap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_master_both_roles_follow_the_promoted_replica() {
    let mut set = SentinelSet::start();
    let old_master = set.master.port;
    let sim = Proc::simulator(&["--rate", "200", "--symbols", "BTC-USDT"]).await;
    let feed = sim_feed(
        sim.http.expect("port"),
        "binance",
        &["BTC-USDT"],
        &["trade", "book"],
    );
    let (publisher, executor) = roles(&set, &feed).await;
    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    let mut books = Bot::connect(&executor.bots_url()).await;
    books.subscribe(&["book:binance:BTC-USDT"]).await;
    let mut chain = BookChain::default();
    for _ in 0..20 {
        chain.read_one(&mut books).await;
    }
    let (first, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
    let mut last = trade_id(&first);
    increasing_trades(&mut bot, &mut last, 20).await;

    set.master.kill();
    let killed = Instant::now();

    // Delivery resumes by itself once the sentinels promote the replica: the first trade
    // after the gap came through the new master.
    let resumed = loop {
        if let Some(at) = increasing_trades(&mut bot, &mut last, 1).await {
            break at;
        }
    };
    eprintln!(
        "FAILOVER: kill -> first trade after it: {} ms",
        resumed.duration_since(killed).as_millis()
    );
    increasing_trades(&mut bot, &mut last, 50).await;
    assert_ne!(set.named_master_port(), Some(old_master), "a new master");
    assert_eq!(set.named_master_port(), Some(set.replica.port));

    // The book bot lost deltas during the failover: told (`resync`), a fresh snapshot,
    // then deltas that chain again.
    while chain.resyncs == 0 || chain.deltas_since_snapshot < 20 {
        chain.read_one(&mut books).await;
    }

    for (proc, role) in [(&publisher, "publish"), (&executor, "subscribe")] {
        let sample = format!(r#"mdbridge_redis_failovers_total{{role="{role}"}}"#);
        wait_until(
            &format!("{} counts its failover", proc.name),
            WAIT,
            || async { proc.metric(&sample).await >= 1.0 },
        )
        .await;
    }
    assert!(
        executor
            .metric(r#"mdbridge_redis_failovers_total{role="store"}"#)
            .await
            >= 1.0,
        "the latest-value store followed too (it served the resync snapshot)"
    );
    let mut publisher = publisher;
    let mut executor = executor;
    assert!(publisher.child.try_wait().expect("status").is_none());
    assert!(executor.child.try_wait().expect("status").is_none());
    publisher.wait_healthy().await;
    executor.wait_healthy().await;
    let health = executor.get_json("/health/redis").await;
    assert_eq!(health["connected"], true, "{health}");
    // The first sentinel in the list is gone: the next one is asked.
    set.sentinels[0].kill();
    let health = executor.get_json("/health/redis").await;
    assert_eq!(health["connected"], true, "{health}");
}

/// The failure mode a PING probe cannot see: the old master is cut off from the sentinels
/// but not from the executor. Its subscription stays up, its probe keeps answering, and it
/// hears nothing, because the publisher moved to the promoted replica. Only the sentinel
/// watch notices; the executor must move to the new master by itself.
///
/// The cut: the master starts requiring a password nobody has (`requirepass`), and every
/// normal connection is killed. Sentinels reconnect, get `NOAUTH`, declare it down and
/// promote the replica, and cannot demote it; the publisher's connection (normal) is gone
/// and resolves to the new master; the executor's pub/sub connection survives, authenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_left_on_a_cut_off_master_moves_to_the_new_one() {
    let set = SentinelSet::start();
    let sim = Proc::simulator(&["--rate", "200", "--symbols", "BTC-USDT"]).await;
    let feed = sim_feed(
        sim.http.expect("port"),
        "binance",
        &["BTC-USDT"],
        &["trade"],
    );
    let (publisher, executor) = roles(&set, &feed).await;
    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    let (first, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
    let mut last = trade_id(&first);
    increasing_trades(&mut bot, &mut last, 20).await;

    // One connection for both: after the first, a new one would need the password.
    let mut admin = set.master.conn().expect("master connection");
    let ok: String = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("nobody-knows")
        .query(&mut admin)
        .expect("CONFIG SET");
    assert_eq!(ok, "OK");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .query(&mut admin)
        .expect("CLIENT KILL");
    assert!(killed >= 1, "{killed}");
    wait_until("the replica is promoted", WAIT * 2, || async {
        set.named_master_port() == Some(set.replica.port)
    })
    .await;
    // The old master still answers its subscriber's probes and still believes it is the
    // master: nothing but the sentinels says the session is stale.
    // Trades keep coming (only through the new master now), and none twice. Without the
    // watch the bot waits here until it times out.
    increasing_trades(&mut bot, &mut last, 200).await;
    for (proc, role) in [(&publisher, "publish"), (&executor, "subscribe")] {
        let sample = format!(r#"mdbridge_redis_failovers_total{{role="{role}"}}"#);
        wait_until(
            &format!("{} counts its failover", proc.name),
            WAIT,
            || async { proc.metric(&sample).await >= 1.0 },
        )
        .await;
    }
    assert_eq!(
        executor.metric("mdbridge_redis_probe_timeouts_total").await,
        0.0,
        "the probe never saw a problem: only the watch did"
    );
}

/// A reconnect backoff grown long during the outage does not delay the switch: the
/// backoff is cut short as soon as the sentinels name the promoted replica. With a one
/// minute backoff, delivery resumes within the bounded wait only because of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reconnect_backoff_is_cut_short_by_the_new_master() {
    let mut set = SentinelSet::start();
    let sim = Proc::simulator(&["--rate", "200", "--symbols", "BTC-USDT"]).await;
    let feed = sim_feed(
        sim.http.expect("port"),
        "binance",
        &["BTC-USDT"],
        &["trade"],
    );
    let (publisher, executor) = roles_with(&set, &feed, |c| {
        c.replacen("reconnect_min_ms = 50\n", "reconnect_min_ms = 60000\n", 1)
            .replacen("reconnect_max_ms = 500\n", "reconnect_max_ms = 60000\n", 1)
    })
    .await;
    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    let (first, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
    let mut last = trade_id(&first);
    increasing_trades(&mut bot, &mut last, 20).await;

    set.master.kill();
    // Each read is bounded by WAIT (20 s), a third of one backoff step.
    loop {
        if increasing_trades(&mut bot, &mut last, 1).await.is_some() {
            break;
        }
    }
    increasing_trades(&mut bot, &mut last, 50).await;
    for (proc, role) in [(&publisher, "publish"), (&executor, "subscribe")] {
        let sample = format!(r#"mdbridge_redis_failovers_total{{role="{role}"}}"#);
        assert!(proc.metric(&sample).await >= 1.0, "{} {role}", proc.name);
    }
}
