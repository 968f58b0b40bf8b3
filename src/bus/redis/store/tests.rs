//! The book catch-up log and the bounded reads, against a real private `redis-server`:
//! what the publisher writes (snapshot, log, expiry) is what the store reads back, in one
//! consistent view; garbage under our keys is refused.

use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::RedisStore;
use crate::bus::redis::RedisPublisher;
use crate::bus::redis_test_server::RedisTestServer;
use crate::bus::{Bus, Sequencer, SnapshotStore, StoredBook};
use crate::config::RedisConfig;
use crate::event::{Book, BookAction, Channel, Event, Exchange, Level};
use crate::health::Health;

const WAIT: Duration = Duration::from_secs(10);

fn config(url: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_string(),
        reconnect_min_ms: 20,
        reconnect_max_ms: 300,
        // No periodic refresh within the test: only the half-full log triggers one.
        snapshot_interval_ms: 60_000,
        latest_ttl_ms: 600_000,
        booklog_max: 8,
        max_snapshot_bytes: 1_000,
        ..RedisConfig::default()
    }
}

fn book(action: BookAction, price: &str, seq: u64) -> Event {
    Event::Book(Book {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: seq,
        action,
        bids: vec![Level(price.into(), "1".into())],
        asks: vec![],
        seq: Some(seq),
        prev_seq: (action == BookAction::Delta).then(|| seq - 1),
    })
}

async fn admin(url: &str) -> MultiplexedConnection {
    ::redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn int(conn: &MultiplexedConnection, cmd: &str, key: &str) -> i64 {
    let mut c = conn.clone();
    ::redis::cmd(cmd)
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

/// The store's view of the book once `cond` holds for it.
async fn book_when(
    store: &RedisStore,
    channel: &Channel,
    cond: impl Fn(&StoredBook) -> bool,
) -> StoredBook {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(b) = store.book(channel).await.unwrap() {
            if cond(&b) {
                return b;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "store never showed the book"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn seqs(b: &StoredBook) -> Vec<u64> {
    b.log
        .iter()
        .map(|m| m.book.as_ref().and_then(|b| b.seq).unwrap())
        .collect()
}

fn snap_seq(b: &StoredBook) -> Option<u64> {
    b.snapshot.book.as_ref().and_then(|b| b.seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_follows_the_snapshot_and_restarts_with_each_new_one() {
    let server = RedisTestServer::start();
    let url = server.url();
    let conn = admin(&url).await;
    let shutdown = CancellationToken::new();
    let src = Uuid::new_v4();
    let health = Health::new();
    let (bus, _task) =
        RedisPublisher::spawn(config(&url), src, health.register("pub"), shutdown.clone());
    let store = RedisStore::connect(&config(&url)).await.unwrap();
    let channel = Channel::parse("book:binance:BTC-USDT").unwrap();
    let mut seq = Sequencer::new(src);

    // The exchange's snapshot is the key; the deltas after it are the log, in order.
    bus.publish(seq.wrap(book(BookAction::Snapshot, "100", 10)))
        .await;
    book_when(&store, &channel, |b| snap_seq(b) == Some(10)).await;
    assert!(health.all_healthy());
    for s in 11..=13 {
        bus.publish(seq.wrap(book(BookAction::Delta, "99", s)))
            .await;
    }
    let b = book_when(&store, &channel, |b| b.log.len() == 3).await;
    assert_eq!(snap_seq(&b), Some(10));
    assert_eq!(seqs(&b), [11, 12, 13]);
    // Both keys live on an expiry.
    for key in [
        "md:snapshot:book:binance:BTC-USDT",
        "md:booklog:book:binance:BTC-USDT",
    ] {
        assert!(int(&conn, "PTTL", key).await > 0, "{key}");
    }

    // The 4th logged message (half of booklog_max = 8) makes the publisher write a fresh
    // snapshot and empty the log: the log always reaches back to the key.
    bus.publish(seq.wrap(book(BookAction::Delta, "98", 14)))
        .await;
    let b = book_when(&store, &channel, |b| snap_seq(b) == Some(14)).await;
    assert!(seqs(&b).is_empty(), "{:?}", seqs(&b));
    let bids: Vec<&str> = b
        .snapshot
        .book
        .as_ref()
        .unwrap()
        .bids
        .iter()
        .map(|l| l.0.as_str())
        .collect();
    assert_eq!(bids, ["100", "99", "98"]);
    bus.publish(seq.wrap(book(BookAction::Delta, "97", 15)))
        .await;
    let b = book_when(&store, &channel, |b| !b.log.is_empty()).await;
    assert_eq!((snap_seq(&b), seqs(&b)), (Some(14), vec![15]));
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_our_keys_is_refused_not_served() {
    let server = RedisTestServer::start();
    let url = server.url();
    let conn = admin(&url).await;
    let store = RedisStore::connect(&config(&url)).await.unwrap();
    let mut c = conn.clone();
    let channel = |s: &str| Channel::parse(s).unwrap();
    // Over max_snapshot_bytes (1000), not an envelope, the wrong Redis type.
    let _: () = ::redis::cmd("SET")
        .arg("md:snapshot:book:binance:BIG-USDT")
        .arg("x".repeat(2_000))
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = ::redis::cmd("SET")
        .arg("md:last:ticker:binance:BAD-USDT")
        .arg("{not an envelope")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: i64 = ::redis::cmd("RPUSH")
        .arg("md:snapshot:book:binance:LIST-USDT")
        .arg("x")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(store
        .book(&channel("book:binance:BIG-USDT"))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .latest(&channel("ticker:binance:BAD-USDT"))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .book(&channel("book:binance:LIST-USDT"))
        .await
        .unwrap()
        .is_none());
    assert!(store
        .book(&channel("book:binance:NONE-USDT"))
        .await
        .unwrap()
        .is_none());
    // The wrong type did not cost the connection: a good value is served right after.
    let src = Uuid::new_v4();
    let good = Sequencer::new(src).wrap(book(BookAction::Snapshot, "1", 1));
    let _: () = ::redis::cmd("SET")
        .arg("md:snapshot:book:binance:BTC-USDT")
        .arg(&good.envelope[..])
        .query_async(&mut c)
        .await
        .unwrap();
    let b = store
        .book(&channel("book:binance:BTC-USDT"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.snapshot.envelope, good.envelope);
    assert!(b.log.is_empty());
}

/// Bytes Redis has sent to clients since the last `CONFIG RESETSTAT`.
async fn sent_bytes(conn: &MultiplexedConnection) -> u64 {
    let mut c = conn.clone();
    let info: String = ::redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_net_output_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booklog_over_its_budget_is_refused_without_being_transferred() {
    let server = RedisTestServer::start();
    let url = server.url();
    let conn = admin(&url).await;
    let cfg = RedisConfig {
        // Each garbage entry fits the per-entry bound; the log as a whole does not fit.
        max_snapshot_bytes: 400_000,
        max_booklog_bytes: 1024 * 1024,
        ..config(&url)
    };
    let store = RedisStore::connect(&cfg).await.unwrap();
    let channel = Channel::parse("book:binance:BTC-USDT").unwrap();
    let mut seq = Sequencer::new(Uuid::new_v4());
    let snapshot = seq.wrap(book(BookAction::Snapshot, "1", 1));
    let delta = seq.wrap(book(BookAction::Delta, "2", 2));
    let mut c = conn.clone();
    let _: () = ::redis::cmd("SET")
        .arg("md:snapshot:book:binance:BTC-USDT")
        .arg(&snapshot.envelope[..])
        .query_async(&mut c)
        .await
        .unwrap();
    let log = "md:booklog:book:binance:BTC-USDT";
    let _: i64 = ::redis::cmd("RPUSH")
        .arg(log)
        .arg(&delta.envelope[..])
        .query_async(&mut c)
        .await
        .unwrap();
    // Within the budget the log is read as before.
    let b = store.book(&channel).await.unwrap().unwrap();
    assert_eq!(seqs(&b), [2]);

    // 20 entries of 300 KB: 6 MB under the log key.
    let garbage = "x".repeat(300 * 1024);
    for _ in 0..20 {
        let _: i64 = ::redis::cmd("RPUSH")
            .arg(log)
            .arg(&garbage)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let _: () = ::redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut c)
        .await
        .unwrap();
    for _ in 0..3 {
        let b = store.book(&channel).await.unwrap().unwrap();
        assert_eq!(
            b.snapshot.envelope, snapshot.envelope,
            "the snapshot is served"
        );
        assert!(b.log.is_empty(), "a refused log is no log");
    }
    let sent = sent_bytes(&conn).await;
    assert!(
        sent < 64 * 1024,
        "three reads of a 6 MB log transferred {sent} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_memory_usage_in_the_acl_the_book_is_read_without_its_log() {
    let server = RedisTestServer::start();
    let url = server.url();
    let conn = admin(&url).await;
    let mut c = conn.clone();
    let _: () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("reader")
        .arg("on")
        .arg(">pw")
        .arg("~md:*")
        .arg("-@all")
        .arg("+get")
        .arg("+strlen")
        .arg("+getrange")
        .arg("+lrange")
        .arg("+multi")
        .arg("+exec")
        .arg("+ping")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut seq = Sequencer::new(Uuid::new_v4());
    let snapshot = seq.wrap(book(BookAction::Snapshot, "1", 1));
    let delta = seq.wrap(book(BookAction::Delta, "2", 2));
    let _: () = ::redis::cmd("SET")
        .arg("md:snapshot:book:binance:BTC-USDT")
        .arg(&snapshot.envelope[..])
        .query_async(&mut c)
        .await
        .unwrap();
    let _: i64 = ::redis::cmd("RPUSH")
        .arg("md:booklog:book:binance:BTC-USDT")
        .arg(&delta.envelope[..])
        .query_async(&mut c)
        .await
        .unwrap();
    let limited = url.replacen("redis://", "redis://reader:pw@", 1);
    let store = RedisStore::connect(&config(&limited)).await.unwrap();
    let channel = Channel::parse("book:binance:BTC-USDT").unwrap();
    let b = store.book(&channel).await.unwrap().unwrap();
    assert_eq!(b.snapshot.envelope, snapshot.envelope);
    assert!(b.log.is_empty(), "a log of unknown size is not read");
}
