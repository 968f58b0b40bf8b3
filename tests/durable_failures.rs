//! Durable channels when things go wrong, through real processes: a dead consumer's
//! pending entries claimed, a poison entry retried then dead-lettered, a group starved
//! past MAXLEN told of the gap, a large backlog.

mod common;
mod durable_support;

use std::collections::BTreeSet;

use common::*;
use durable_support::*;
use mdbridge::envelope::BusMessage;
use mdbridge::event::{now_micros, Event, Exchange, Trade};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_pending_on_a_dead_consumer_are_claimed_by_its_peer() {
    let redis = RedisServer::start();
    let mut c = redis.conn();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key())
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query(&mut c)
        .expect("XGROUP CREATE");
    let mut app = Appender::new(&redis, 10_000).await;
    for _ in 0..5 {
        app.append().await;
    }
    // Consumer `dead` reads them and never acks (killed).
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("dead")
        .arg("STREAMS")
        .arg(key())
        .arg(">")
        .query(&mut c)
        .expect("XREADGROUP");
    for _ in 0..3 {
        app.append().await;
    }
    let mut peer = executor(&redis, "peer", Some("g"), "claim_idle_ms = 1500\n");
    peer.wait_healthy().await;
    let mut bot = Bot::connect(&peer.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    let (got, other) = trades(&mut bot, 8).await;
    assert!(other.is_empty(), "{other:?}");
    let got: BTreeSet<u64> = trade_ids(&got).into_iter().collect();
    assert_eq!(got, (1..=8).collect::<BTreeSet<_>>());
    nothing_more(&mut bot).await;
    wait_until("claimed entries acked", WAIT, || async {
        pending(&redis, &key(), "g") == 0
    })
    .await;
    assert_eq!(peer.metric("mdbridge_stream_claimed_total").await, 5.0);
    assert_eq!(
        peer.metric("mdbridge_stream_redeliveries_dropped_total")
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_entry_is_retried_then_dead_lettered_while_later_entries_flow() {
    let redis = RedisServer::start();
    let retry = "max_deliveries = 3\nretry_backoff_ms = 100\nretry_backoff_factor = 2\n";
    let mut exec = executor(&redis, "e1", None, retry);
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    wait_group(&redis, &key(), "e1").await;
    let mut app = Appender::new(&redis, 10_000).await;
    app.append().await;
    app.append().await;
    let mut c = redis.conn();
    let poison: String = redis::cmd("XADD")
        .arg(key())
        .arg("*")
        .arg("envelope")
        .arg("not an envelope")
        .query(&mut c)
        .expect("XADD");
    for _ in 0..3 {
        app.append().await;
    }
    let (got, other) = trades(&mut bot, 5).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(trade_ids(&got), (1..=5).collect::<Vec<_>>());

    let dead = format!("{}:dead", key());
    wait_until("the poison entry dead-lettered", WAIT, || async {
        let mut c = redis.conn();
        redis::cmd("XLEN")
            .arg(&dead)
            .query::<u64>(&mut c)
            .unwrap_or(0)
            == 1
    })
    .await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query(&mut c)
        .expect("XRANGE");
    let fields: std::collections::HashMap<String, String> = entries[0].1.iter().cloned().collect();
    assert_eq!(fields["envelope"], "not an envelope");
    assert!(fields["error"].contains("JSON"), "{fields:?}");
    assert_eq!(fields["group"], "e1");
    assert_eq!(fields["consumer"], "e1");
    assert_eq!(fields["source_id"], poison);
    assert_eq!(fields["deliveries"], "3");
    let failed_at: u64 = fields["failed_at"].parse().expect("µs");
    assert!(failed_at > 1_600_000_000_000_000 && failed_at <= now_micros());
    wait_until("nothing pending", WAIT, || async {
        pending(&redis, &key(), "e1") == 0
    })
    .await;
    assert_eq!(exec.metric("mdbridge_stream_dead_letters_total").await, 1.0);
    assert_eq!(exec.metric("mdbridge_stream_retries_total").await, 2.0);
    nothing_more(&mut bot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_starved_past_maxlen_reports_the_gap() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "");
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    wait_group(&redis, &key(), "e1").await;
    let mut app = Appender::new(&redis, 10).await;
    for _ in 0..5 {
        app.append().await;
    }
    let (first, _) = trades(&mut bot, 5).await;
    assert_eq!(trade_ids(&first), (1..=5).collect::<Vec<_>>());
    // Starve it: the stream moves 30 entries on (MAXLEN = 10 exact) while it is stopped.
    signal(&exec, "-STOP");
    for _ in 0..30 {
        app.append().await;
    }
    signal(&exec, "-CONT");
    // It gets what it had already been sent and what the stream still holds, the gap
    // announced before the first entry after it.
    let (gap, before) = bot.until(WAIT, |v| v["type"] == "error").await;
    assert_eq!(gap["code"], "gap", "{gap}");
    assert_eq!(gap["channel"], CHANNEL);
    let lost: u64 = gap["message"]
        .as_str()
        .and_then(|m| m.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("N entries …");
    let (after, _) = trades(&mut bot, 10).await;
    assert_eq!(trade_ids(&after), (26..=35).collect::<Vec<_>>());
    // (A stop longer than the reply timeout would add a reconnect's status events.)
    let before: Vec<Value> = before
        .into_iter()
        .filter(|v| v["type"] == "trade")
        .collect();
    let before = trade_ids(&before);
    assert!(before.iter().all(|&n| n == 6), "{before:?}");
    assert_eq!(
        5 + before.len() as u64 + lost + 10,
        35,
        "every entry delivered or counted"
    );
    nothing_more(&mut bot).await;
    assert_eq!(
        exec.metric("mdbridge_stream_trimmed_total").await,
        lost as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_arrives_complete_and_in_order() {
    let redis = RedisServer::start();
    let mut exec = executor(&redis, "e1", None, "read_count = 1000\n");
    exec.wait_healthy().await;
    let mut bot = Bot::connect(&exec.bots_url()).await;
    bot.subscribe(&[CHANNEL]).await;
    wait_group(&redis, &key(), "e1").await;
    let mut app = Appender::new(&redis, 100_000).await;
    app.script.load(&mut app.conn).await.expect("SCRIPT LOAD");
    // 10 000 entries appended while the executor is stopped: a backlog larger than what
    // the consumer may have in the router's queue at once.
    signal(&exec, "-STOP");
    for _ in 0..10 {
        let mut pipe = redis::pipe();
        for _ in 0..1_000 {
            app.seq += 1;
            let msg = BusMessage::encode(
                app.src,
                app.seq,
                now_micros(),
                Event::Trade(Trade {
                    exchange: Exchange::Binance,
                    symbol: "BTC-USDT".into(),
                    ts: Some(1),
                    ts_recv: now_micros(),
                    trade_id: app.seq.to_string(),
                    price: "1".into(),
                    size: "1".into(),
                    side: None,
                }),
            );
            let (head, tail) = msg.id_split().expect("no id yet");
            app.script.add_to(
                &mut pipe,
                &key(),
                &format!("md:{CHANNEL}"),
                app.cap,
                &head,
                &tail,
            );
        }
        let _: Vec<String> = pipe.query_async(&mut app.conn).await.expect("appends");
    }
    signal(&exec, "-CONT");
    let (got, other) = trades(&mut bot, 10_000).await;
    assert!(other.is_empty(), "{:?}", &other[..other.len().min(3)]);
    assert_eq!(trade_ids(&got), (1..=10_000).collect::<Vec<_>>());
    nothing_more(&mut bot).await;
    wait_until("all acked", WAIT, || async {
        pending(&redis, &key(), "e1") == 0
    })
    .await;
    assert_eq!(exec.metric("mdbridge_stream_trimmed_total").await, 0.0);
}
