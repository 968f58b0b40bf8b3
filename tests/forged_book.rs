//! A forged book snapshot on the bus cannot pin a book, end to end through real processes
//! (simulated Binance → publisher → private redis-server → executor → bot WebSocket) while
//! the test PUBLISHes a forged envelope into Redis as an attacker with write access would.

mod common;

use common::*;
use serde_json::Value;

const BOOK: &str = "book:binance:BTC-USDT";

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn exists(redis: &RedisServer, key: &str) -> bool {
    let mut c = redis.conn();
    redis::cmd("EXISTS")
        .arg(key)
        .query::<i64>(&mut c)
        .unwrap_or(0)
        == 1
}

/// Reads `n` deltas that chain onto `seq`; returns the last seq.
async fn chained_deltas(bot: &mut Bot, mut seq: u64, n: usize, what: &str) -> u64 {
    for i in 0..n {
        let v = bot.next(WAIT).await.expect("a frame");
        assert_eq!(v["type"], "book", "{what}, frame {i}: {v}");
        assert_eq!(v["action"], "delta", "{what}, frame {i}: {v}");
        assert_eq!(
            v["prev_seq"].as_u64(),
            Some(seq),
            "{what}, frame {i}: chains onto the previous message: {v}"
        );
        seq = v["seq"].as_u64().expect("delta seq");
        assert!(seq < 1 << 63, "{what}: a genuine seq: {v}");
    }
    seq
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_snapshot_far_ahead_is_followed_by_a_resync_to_the_genuine_book() {
    let SimBridge {
        executor,
        publisher: _publisher,
        sim: _sim,
        redis,
    } = sim_bridge("400", &["BTC-USDT"], &["book"]).await;
    wait_until("the publisher wrote the snapshot key", WAIT, || async {
        exists(&redis, "md:snapshot:book:binance:BTC-USDT")
    })
    .await;
    let mut bot = Bot::connect(&executor.bots_url()).await;
    bot.subscribe(&[BOOK]).await;
    let first = bot.next(WAIT).await.expect("a frame");
    assert_eq!(first["action"], "snapshot", "{first}");
    let seq = first["seq"].as_u64().expect("snapshot seq");
    chained_deltas(&mut bot, seq, 20, "before the forgery").await;

    // Any src, a valid envelope seq; the book seq is 2^64-1.
    let forged = format!(
        r#"{{"src":"{}","seq":1,"ts_pub":{now},"event":{{"type":"book","exchange":"binance","symbol":"BTC-USDT","ts":null,"ts_recv":{now},"action":"snapshot","bids":[["1","1"]],"asks":[["2","1"]],"seq":{},"prev_seq":null}}}}"#,
        uuid::Uuid::new_v4(),
        u64::MAX,
        now = now_micros(),
    );
    {
        let mut c = redis.conn();
        let _: i64 = redis::cmd("PUBLISH")
            .arg("md:book:binance:BTC-USDT")
            .arg(&forged)
            .query(&mut c)
            .expect("PUBLISH");
    }
    // The forged book reaches the bot (it is a valid snapshot)...
    let (fake, _) = bot
        .until(WAIT, |v| {
            v["type"] == "book" && v["action"] == "snapshot" && v["seq"].as_u64() == Some(u64::MAX)
        })
        .await;
    assert_eq!(fake["bids"][0][0], "1", "{fake}");
    // ...but the genuine deltas, all "behind" it, break its chain: resync, then the
    // publisher's book from the store, then its deltas again.
    let next = bot
        .next(WAIT)
        .await
        .expect("a frame after the forged snapshot");
    assert_eq!(next["type"], "status", "resync comes first: {next}");
    assert_eq!(next["state"], "resync", "{next}");
    let (snap, skipped) = bot.until(WAIT, |v| v["type"] == "book").await;
    assert!(
        skipped.iter().all(|v| v["type"] == "status"),
        "only statuses before the snapshot: {skipped:?}"
    );
    assert_eq!(snap["action"], "snapshot", "{snap}");
    let seq = snap["seq"].as_u64().expect("snapshot seq");
    assert!(seq < 1 << 63, "the genuine book: {snap}");
    assert_ne!(
        snap["bids"][0][0],
        Value::from("1"),
        "not the forged book: {snap}"
    );
    chained_deltas(&mut bot, seq, 100, "after the resync").await;
    assert!(
        executor
            .metric(r#"mdbridge_book_resyncs_total{exchange="binance",side="bus"}"#)
            .await
            >= 1.0
    );
}
