//! Durable channels on the executor side, through real processes: a real redis-server,
//! the real `mdbridge executor` (its stream consumer and router) and real WebSocket bots:
//! exactly-once delivery in order, restarts, groups, wildcards.

mod common;
mod durable_support;

use std::collections::BTreeSet;

use common::*;
use durable_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_reaches_the_bots_once_in_order_with_its_id() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "");
    exec.wait_healthy().await;
    let mut exact = Bot::connect(&exec.bots_url()).await;
    exact.subscribe(&[CHANNEL]).await;
    // A wildcard PSUBSCRIBEs on pub/sub too: the durable envelopes it receives there are
    // dropped; the stream delivers them.
    let mut wild = Bot::connect(&exec.bots_url()).await;
    wild.subscribe(&["trade:binance:*"]).await;
    wait_group(&redis, &key(), "e1").await;
    // On pub/sub only the wildcard: the exact durable channel is not subscribed there.
    wait_until("the wildcard on pub/sub", WAIT, || async {
        let mut c = redis.conn();
        redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query::<u64>(&mut c)
            .unwrap_or(0)
            == 1
    })
    .await;
    let mut c = redis.conn();
    let numsub: Vec<(String, u64)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(format!("md:{CHANNEL}"))
        .query(&mut c)
        .expect("NUMSUB");
    assert_eq!(
        numsub[0].1, 0,
        "exact durable channel subscribed on pub/sub"
    );

    let mut app = Appender::new(&redis, 10_000).await;
    let mut appended = Vec::new();
    for _ in 0..50 {
        appended.push(app.append().await);
    }
    for bot in [&mut exact, &mut wild] {
        let (got, other) = trades(bot, 50).await;
        assert!(other.is_empty(), "{other:?}");
        assert_eq!(trade_ids(&got), (1..=50).collect::<Vec<_>>());
        assert_eq!(ids(&got), appended, "each event carries its entry id");
        nothing_more(bot).await;
    }
    wait_until("every entry acked", WAIT, || async {
        pending(&redis, &key(), "e1") == 0
            && exec.metric("mdbridge_stream_acked_total").await == 50.0
    })
    .await;
    assert_eq!(exec.metric("mdbridge_stream_delivered_total").await, 50.0);
    // The wildcard's pub/sub copies were dropped unread (durable: they carry an id).
    assert_eq!(exec.metric("mdbridge_envelopes_received_total").await, 0.0);
    assert_eq!(
        exec.metric("mdbridge_stream_redeliveries_dropped_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_consumer_reads_its_pending_entries_first_then_new_ones() {
    let redis = RedisServer::start();
    let mut app = Appender::new(&redis, 10_000).await;
    {
        let mut first = executor(&redis, "e1", Some("g"), "");
        first.wait_healthy().await;
        let mut bot = Bot::connect(&first.bots_url()).await;
        bot.subscribe(&[CHANNEL]).await;
        wait_group(&redis, &key(), "g").await;
        for _ in 0..10 {
            app.append().await;
        }
        let (got, _) = trades(&mut bot, 10).await;
        assert_eq!(trade_ids(&got), (1..=10).collect::<Vec<_>>());
        wait_until("the first ten acked", WAIT, || async {
            pending(&redis, &key(), "g") == 0
        })
        .await;
        // SIGKILL on drop.
    }
    // While it is dead: 10 more, of which its consumer had read 5 without acking them
    // (what a kill between read and ack leaves), and 5 after.
    for _ in 0..10 {
        app.append().await;
    }
    let mut c = redis.conn();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("e1")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(key())
        .arg(">")
        .query(&mut c)
        .expect("XREADGROUP");
    assert_eq!(pending(&redis, &key(), "g"), 5);
    for _ in 0..5 {
        app.append().await;
    }

    let mut second = executor(&redis, "e1", Some("g"), "");
    second.wait_healthy().await;
    let mut bot = Bot::connect(&second.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    let (got, other) = trades(&mut bot, 15).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(trade_ids(&got), (11..=25).collect::<Vec<_>>());
    nothing_more(&mut bot).await;
    wait_until("all acked", WAIT, || async {
        pending(&redis, &key(), "g") == 0
    })
    .await;
}

/// Reads trades from `bot` into `sink` until the task is aborted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_splits_the_entries_and_each_group_gets_all() {
    let redis = RedisServer::start();
    let mut a = executor(&redis, "a", Some("shared"), "");
    let mut b = executor(&redis, "b", Some("shared"), "");
    let mut c = executor(&redis, "c", None, "");
    for e in [&mut a, &mut b, &mut c] {
        e.wait_healthy().await;
    }
    let mut sinks = Vec::new();
    let mut tasks = Vec::new();
    for e in [&a, &b, &c] {
        let mut bot = Bot::connect(&e.bots_url()).await;
        bot.subscribe(&[CHANNEL]).await;
        let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        tasks.push(collect(bot, sink.clone()));
        sinks.push(sink);
    }
    wait_group(&redis, &key(), "shared").await;
    wait_group(&redis, &key(), "\"c\"").await;
    // Both consumers of the shared group have read once (they exist in the group).
    wait_until("two consumers in the shared group", WAIT, || async {
        let mut conn = redis.conn();
        let consumers: Vec<redis::Value> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(key())
            .arg("shared")
            .query(&mut conn)
            .unwrap_or_default();
        consumers.len() == 2
    })
    .await;

    let mut app = Appender::new(&redis, 10_000).await;
    for _ in 0..300 {
        app.append().await;
    }
    let len = |i: usize| sinks[i].lock().expect("lock").len();
    wait_until(
        "all 300 delivered by the shared group and by c",
        WAIT,
        || async { len(0) + len(1) >= 300 && len(2) >= 300 },
    )
    .await;
    wait_until("everything acked", WAIT, || async {
        pending(&redis, &key(), "shared") == 0 && pending(&redis, &key(), "c") == 0
    })
    .await;
    for t in &tasks {
        t.abort();
    }
    let (sa, sb, sc) = (
        sinks[0].lock().expect("lock").clone(),
        sinks[1].lock().expect("lock").clone(),
        sinks[2].lock().expect("lock").clone(),
    );
    let all: BTreeSet<u64> = (1..=300).collect();
    let (set_a, set_b): (BTreeSet<u64>, BTreeSet<u64>) =
        (sa.iter().copied().collect(), sb.iter().copied().collect());
    assert_eq!(
        sa.len() + sb.len(),
        300,
        "no entry delivered twice in the group"
    );
    assert!(set_a.is_disjoint(&set_b));
    assert_eq!(&set_a | &set_b, all);
    assert!(
        !sa.is_empty() && !sb.is_empty(),
        "both consumers got a share"
    );
    assert!(sa.windows(2).all(|w| w[0] < w[1]), "each share in order");
    assert_eq!(
        sc,
        (1..=300).collect::<Vec<_>>(),
        "another group gets everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_reaches_a_stream_created_after_it() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "");
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&["trade:binance:*"]).await;
    let mut app = Appender::new(&redis, 10_000).await;
    // The stream (and its registry entry) appear only now.
    for _ in 0..3 {
        app.append_on("NEW-USDT").await;
    }
    let (got, other) = trades(&mut bot, 3).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(trade_ids(&got), vec![1, 2, 3]);
    assert!(got.iter().all(|e| e["symbol"] == "NEW-USDT"));
    app.append_on("NEW-USDT").await;
    let (got, _) = trades(&mut bot, 1).await;
    assert_eq!(trade_ids(&got), vec![4]);
    nothing_more(&mut bot).await;
}
