//! Tests against a real, private `redis-server` (see `bus::redis_test_server`).
//!
//! They assert what is delivered (bytes, order, absence) rather than counters: the metrics
//! recorder is global to the test binary. Absence is proven with a marker message sent
//! after the one that must not arrive, on the same ordered path.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::publisher::FLUSH_DEADLINE;
use super::*;
use crate::bus::redis_test_server::RedisTestServer;
use crate::bus::{Bus, Interest, Sequencer, SnapshotStore};
use crate::envelope::BusMessage;
use crate::event::{
    Book, BookAction, Candle, Channel, Event, Exchange, Level, Pattern, Ticker, Trade,
};
use crate::health::{Health, HealthHandle};

const WAIT: Duration = Duration::from_secs(10);

fn config(url: &str) -> RedisConfig {
    RedisConfig {
        url: url.to_string(),
        probe_interval_ms: 100,
        probe_timeout_ms: 1_000,
        reconnect_min_ms: 20,
        reconnect_max_ms: 300,
        snapshot_interval_ms: 50,
        ..RedisConfig::default()
    }
}

async fn raw(url: &str) -> MultiplexedConnection {
    let client = ::redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Polls `cond` until it holds; panics after [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn recv(rx: &mut mpsc::Receiver<BusMessage>) -> BusMessage {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(m)) => m,
        Ok(None) => panic!("subscriber output closed"),
        Err(_) => panic!("no message within {WAIT:?}"),
    }
}

async fn numsub(conn: &MultiplexedConnection, key: &str) -> i64 {
    let mut c = conn.clone();
    let (_, n): (String, i64) = ::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    n
}

async fn numpat(conn: &MultiplexedConnection) -> i64 {
    let mut c = conn.clone();
    ::redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut c)
        .await
        .unwrap_or(-1)
}

async fn publish_raw(conn: &MultiplexedConnection, channel: &str, payload: &[u8]) {
    let mut c = conn.clone();
    let _: i64 = ::redis::cmd("PUBLISH")
        .arg(format!("md:{channel}"))
        .arg(payload)
        .query_async(&mut c)
        .await
        .unwrap();
}

async fn get(conn: &MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    let mut c = conn.clone();
    ::redis::cmd("GET")
        .arg(key)
        .query_async(&mut c)
        .await
        .unwrap()
}

fn interest(patterns: &[&str]) -> Interest {
    Arc::new(
        patterns
            .iter()
            .map(|p| Pattern::parse(p).unwrap())
            .collect::<BTreeSet<_>>(),
    )
}

fn trade(exchange: Exchange, symbol: &str, id: u64) -> Event {
    Event::Trade(Trade {
        exchange,
        symbol: symbol.into(),
        ts: Some(id),
        ts_recv: id,
        trade_id: id.to_string(),
        price: "100.10".into(),
        size: "0.5".into(),
        side: None,
    })
}

fn lv(p: &str, s: &str) -> Level {
    Level(p.into(), s.into())
}

fn book(
    symbol: &str,
    action: BookAction,
    bids: Vec<Level>,
    asks: Vec<Level>,
    seq: u64,
    prev: Option<u64>,
) -> Event {
    Event::Book(Book {
        exchange: Exchange::Binance,
        symbol: symbol.into(),
        ts: Some(seq),
        ts_recv: seq,
        action,
        bids,
        asks,
        seq: Some(seq),
        prev_seq: prev,
    })
}

/// A subscriber on `url` with its interest sender and output.
struct Sub {
    interest: watch::Sender<Interest>,
    rx: mpsc::Receiver<BusMessage>,
    task: JoinHandle<()>,
    shutdown: CancellationToken,
}

fn subscriber(url: &str, src: Uuid, patterns: &[&str], health: HealthHandle) -> Sub {
    let (itx, irx) = watch::channel(interest(patterns));
    let (otx, rx) = mpsc::channel(4096);
    let shutdown = CancellationToken::new();
    let task = RedisSubscriber::spawn(config(url), src, irx, otx, health, shutdown.clone());
    Sub {
        interest: itx,
        rx,
        task,
        shutdown,
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_envelopes_arrive_in_order_with_exact_bytes() {
    let server = RedisTestServer::start();
    let url = server.url();
    let admin = raw(&url).await;
    let mut sub = subscriber(
        &url,
        Uuid::new_v4(),
        &["trade:binance:BTC-USDT"],
        HealthHandle::detached("sub"),
    );
    wait_until("subscription", || async {
        numsub(&admin, "md:trade:binance:BTC-USDT").await == 1
    })
    .await;

    let src = Uuid::new_v4();
    let shutdown = CancellationToken::new();
    let (bus, task) = RedisPublisher::spawn(
        config(&url),
        src,
        HealthHandle::detached("pub"),
        shutdown.clone(),
    );
    let mut seq = Sequencer::new(src);
    let mut sent = Vec::new();
    for i in 1..=300 {
        let msg = seq.wrap(trade(Exchange::Binance, "BTC-USDT", i));
        sent.push(msg.envelope.clone());
        bus.publish(msg).await;
    }
    for (i, want) in sent.iter().enumerate() {
        let got = recv(&mut sub.rx).await;
        assert_eq!(got.seq, i as u64 + 1);
        assert_eq!(got.src, src);
        assert_eq!(&got.envelope, want, "envelope bytes pass through untouched");
    }
    // Nothing extra: the next message is the marker published after them.
    let marker = seq.wrap(trade(Exchange::Binance, "BTC-USDT", 999));
    bus.publish(marker).await;
    assert_eq!(recv(&mut sub.rx).await.seq, 301);

    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_what_is_queued() {
    let server = RedisTestServer::start();
    let url = server.url();
    let admin = raw(&url).await;
    let mut sub = subscriber(
        &url,
        Uuid::new_v4(),
        &["trade:*:BTC-USDT"],
        HealthHandle::detached("sub"),
    );
    wait_until("subscription", || async { numpat(&admin).await == 1 }).await;

    let src = Uuid::new_v4();
    let shutdown = CancellationToken::new();
    let health = Health::new();
    let (bus, task) =
        RedisPublisher::spawn(config(&url), src, health.register("pub"), shutdown.clone());
    wait_until("publisher connected", || async { health.all_healthy() }).await;
    let mut seq = Sequencer::new(src);
    for i in 1..=1000 {
        bus.publish(seq.wrap(trade(Exchange::Kraken, "BTC-USDT", i)))
            .await;
    }
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    for i in 1..=1000 {
        assert_eq!(recv(&mut sub.rx).await.seq, i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_value_and_snapshot_keys_are_written_and_refreshed() {
    let server = RedisTestServer::start();
    let url = server.url();
    let admin = raw(&url).await;
    let src = Uuid::new_v4();
    let shutdown = CancellationToken::new();
    let (bus, _task) = RedisPublisher::spawn(
        config(&url),
        src,
        HealthHandle::detached("pub"),
        shutdown.clone(),
    );
    let mut seq = Sequencer::new(src);

    let ticker = seq.wrap(Event::Ticker(Ticker {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: 1,
        bid: Some("1.0".into()),
        bid_size: None,
        ask: Some("1.1".into()),
        ask_size: None,
        last: None,
        volume_24h: None,
    }));
    let candle = seq.wrap(Event::Candle(Candle {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: 1,
        interval: "1m".into(),
        start: 0,
        open: "1".into(),
        high: "2".into(),
        low: "0.5".into(),
        close: "1.5".into(),
        volume: "10".into(),
        closed: false,
    }));
    // ETH: a snapshot only, so the key keeps the exchange's snapshot envelope as sent.
    let eth = seq.wrap(book(
        "ETH-USDT",
        BookAction::Snapshot,
        vec![lv("10", "1")],
        vec![lv("11", "1")],
        5,
        None,
    ));
    // BTC: snapshot then two chained deltas; the refresh must rebuild the book.
    let btc = [
        book(
            "BTC-USDT",
            BookAction::Snapshot,
            vec![lv("100.00", "1"), lv("99.00", "2")],
            vec![lv("101.00", "3")],
            10,
            None,
        ),
        book(
            "BTC-USDT",
            BookAction::Delta,
            vec![lv("99.00", "0")],
            vec![lv("102.00", "4")],
            11,
            Some(10),
        ),
        book(
            "BTC-USDT",
            BookAction::Delta,
            vec![lv("100.00", "5")],
            vec![],
            12,
            Some(11),
        ),
    ]
    .map(|e| seq.wrap(e));
    let last_btc_seq = btc[2].seq;
    for m in [ticker.clone(), candle.clone(), eth.clone()]
        .into_iter()
        .chain(btc)
    {
        bus.publish(m).await;
    }

    wait_until("latest-value keys", || async {
        get(&admin, "md:last:ticker:binance:BTC-USDT")
            .await
            .as_deref()
            == Some(&ticker.envelope[..])
            && get(&admin, "md:last:candle:binance:BTC-USDT:1m")
                .await
                .as_deref()
                == Some(&candle.envelope[..])
            && get(&admin, "md:snapshot:book:binance:ETH-USDT")
                .await
                .as_deref()
                == Some(&eth.envelope[..])
    })
    .await;

    let btc_channel = Channel::parse("book:binance:BTC-USDT").unwrap();
    let decode =
        |bytes: Vec<u8>| BusMessage::decode(btc_channel.clone(), Bytes::from(bytes)).unwrap();
    wait_until("refreshed BTC snapshot", || async {
        get(&admin, "md:snapshot:book:binance:BTC-USDT")
            .await
            .is_some_and(|b| decode(b).book.is_some_and(|b| b.seq == Some(12)))
    })
    .await;
    let snap = decode(
        get(&admin, "md:snapshot:book:binance:BTC-USDT")
            .await
            .unwrap(),
    );
    assert_eq!(snap.src, src);
    assert_eq!(
        snap.seq, last_btc_seq,
        "envelope seq is the last published on the channel"
    );
    let b = snap.book.as_deref().unwrap();
    assert_eq!(b.action, BookAction::Snapshot);
    assert_eq!(b.bids, vec![lv("100.00", "5")]);
    assert_eq!(b.asks, vec![lv("101.00", "3"), lv("102.00", "4")]);

    // The store reads the same keys.
    let store = RedisStore::connect(&config(&url)).await.unwrap();
    let got = store.latest(&ticker.channel).await.unwrap().unwrap();
    assert_eq!(got.envelope, ticker.envelope);
    let got = store.latest(&candle.channel).await.unwrap().unwrap();
    assert_eq!(got.envelope, candle.envelope);
    let got = store.latest(&btc_channel).await.unwrap().unwrap();
    assert_eq!(got.book.as_deref().and_then(|b| b.seq), Some(12));
    let trade_channel = Channel::parse("trade:binance:BTC-USDT").unwrap();
    assert!(store.latest(&trade_channel).await.unwrap().is_none());
    let unknown = Channel::parse("ticker:okx:BTC-USDT").unwrap();
    assert!(store.latest(&unknown).await.unwrap().is_none());
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_envelopes_are_filtered() {
    let server = RedisTestServer::start();
    let url = server.url();
    let admin = raw(&url).await;
    let me = Uuid::new_v4();
    let other = Uuid::new_v4();
    let mut sub = subscriber(
        &url,
        me,
        &["trade:binance:BTC-USDT"],
        HealthHandle::detached("sub"),
    );
    wait_until("subscription", || async {
        numsub(&admin, "md:trade:binance:BTC-USDT").await == 1
    })
    .await;

    let mine = BusMessage::encode(me, 1, 1, trade(Exchange::Binance, "BTC-USDT", 1));
    let theirs = BusMessage::encode(other, 1, 1, trade(Exchange::Binance, "BTC-USDT", 2));
    publish_raw(&admin, "trade:binance:BTC-USDT", &mine.envelope).await;
    publish_raw(&admin, "trade:binance:BTC-USDT", &theirs.envelope).await;
    let got = recv(&mut sub.rx).await;
    assert_eq!(got.src, other);
    assert_eq!(got.envelope, theirs.envelope);
}

/// A private server, an admin connection and a subscriber that holds one wildcard
/// `pattern`, returned once Redis shows the pattern subscription.
async fn wildcard_subscriber(pattern: &str) -> (RedisTestServer, MultiplexedConnection, Sub) {
    let server = RedisTestServer::start();
    let admin = raw(&server.url()).await;
    let sub = subscriber(
        &server.url(),
        Uuid::new_v4(),
        &[pattern],
        HealthHandle::detached("sub"),
    );
    wait_until("psubscribe", || async { numpat(&admin).await == 1 }).await;
    (server, admin, sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_follow_our_segment_rule_and_interest_changes_apply_live() {
    let (_server, admin, mut sub) = wildcard_subscriber("*:binance:*").await;
    let other = Uuid::new_v4();

    let t = BusMessage::encode(other, 1, 1, trade(Exchange::Binance, "BTC-USDT", 1));
    // Redis's `md:*:binance:*` also matches this 4-segment candle channel; ours does not.
    let c = BusMessage::encode(
        other,
        1,
        1,
        Event::Candle(Candle {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv: 1,
            interval: "1m".into(),
            start: 0,
            open: "1".into(),
            high: "1".into(),
            low: "1".into(),
            close: "1".into(),
            volume: "1".into(),
            closed: true,
        }),
    );
    let marker = BusMessage::encode(other, 1, 1, trade(Exchange::Binance, "ETH-USDT", 2));
    publish_raw(&admin, "trade:binance:BTC-USDT", &t.envelope).await;
    publish_raw(&admin, "candle:binance:BTC-USDT:1m", &c.envelope).await;
    publish_raw(&admin, "trade:kraken:BTC-USDT", &t.envelope).await;
    publish_raw(&admin, "trade:binance:ETH-USDT", &marker.envelope).await;
    assert_eq!(
        recv(&mut sub.rx).await.channel.as_str(),
        "trade:binance:BTC-USDT"
    );
    assert_eq!(
        recv(&mut sub.rx).await.channel.as_str(),
        "trade:binance:ETH-USDT"
    );

    // Switch to one exact channel: the pattern goes, the channel comes, no reconnect.
    sub.interest
        .send_replace(interest(&["trade:kraken:BTC-USDT"]));
    wait_until("reconciled", || async {
        numpat(&admin).await == 0 && numsub(&admin, "md:trade:kraken:BTC-USDT").await == 1
    })
    .await;
    let k = BusMessage::encode(other, 1, 1, trade(Exchange::Kraken, "BTC-USDT", 3));
    let b = BusMessage::encode(other, 2, 1, trade(Exchange::Binance, "BTC-USDT", 4));
    publish_raw(&admin, "trade:binance:BTC-USDT", &b.envelope).await;
    publish_raw(&admin, "trade:kraken:BTC-USDT", &k.envelope).await;
    let got = recv(&mut sub.rx).await;
    assert_eq!(got.channel.as_str(), "trade:kraken:BTC-USDT");
    assert_eq!(got.envelope, k.envelope);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_exact_and_wildcard_deliver_once() {
    let server = RedisTestServer::start();
    let url = server.url();
    let admin = raw(&url).await;
    let other = Uuid::new_v4();
    let mut sub = subscriber(
        &url,
        Uuid::new_v4(),
        &["trade:binance:BTC-USDT", "trade:*:BTC-USDT"],
        HealthHandle::detached("sub"),
    );
    wait_until("both subscriptions", || async {
        numpat(&admin).await == 1 && numsub(&admin, "md:trade:binance:BTC-USDT").await == 1
    })
    .await;
    for s in 1..=3 {
        let m = BusMessage::encode(other, s, 1, trade(Exchange::Binance, "BTC-USDT", s));
        publish_raw(&admin, "trade:binance:BTC-USDT", &m.envelope).await;
    }
    let marker = BusMessage::encode(other, 1, 1, trade(Exchange::Kraken, "BTC-USDT", 9));
    publish_raw(&admin, "trade:kraken:BTC-USDT", &marker.envelope).await;
    for s in 1..=3 {
        let got = recv(&mut sub.rx).await;
        assert_eq!(
            (got.channel.as_str(), got.seq),
            ("trade:binance:BTC-USDT", s)
        );
    }
    assert_eq!(
        recv(&mut sub.rx).await.channel.as_str(),
        "trade:kraken:BTC-USDT"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_are_delivered_and_malformed_payloads_skipped() {
    let (_server, admin, mut sub) = wildcard_subscriber("trade:binance:*").await;
    let other = Uuid::new_v4();

    let m = |s: u64| BusMessage::encode(other, s, 1, trade(Exchange::Binance, "BTC-USDT", s));
    publish_raw(&admin, "trade:binance:BTC-USDT", &m(1).envelope).await;
    publish_raw(&admin, "trade:binance:BTC-USDT", &m(2).envelope).await;
    publish_raw(&admin, "trade:binance:BTC-USDT", b"not json").await;
    publish_raw(&admin, "trade:binance:BTC-USDT", br#"{"src":"x","seq":3}"#).await;
    // Matches Redis's pattern but is no valid channel name.
    publish_raw(&admin, "trade:binance:btcusdt", &m(3).envelope).await;
    publish_raw(&admin, "trade:binance:BTC-USDT", &m(5).envelope).await;
    let seqs = [
        recv(&mut sub.rx).await.seq,
        recv(&mut sub.rx).await.seq,
        recv(&mut sub.rx).await.seq,
    ];
    assert_eq!(seqs, [1, 2, 5], "a gap is counted, not held back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_and_subscriber_reconnect_after_a_redis_restart() {
    let mut server = RedisTestServer::start();
    let url = server.url();
    let health = Health::new();
    let mut sub = subscriber(
        &url,
        Uuid::new_v4(),
        &["trade:binance:BTC-USDT"],
        health.register("sub"),
    );
    let src = Uuid::new_v4();
    let shutdown = CancellationToken::new();
    let (bus, task) =
        RedisPublisher::spawn(config(&url), src, health.register("pub"), shutdown.clone());
    let mut seq = Sequencer::new(src);
    wait_until("both connected", || async { health.all_healthy() }).await;
    {
        let admin = raw(&url).await;
        wait_until("subscription", || async {
            numsub(&admin, "md:trade:binance:BTC-USDT").await == 1
        })
        .await;
    }
    bus.publish(seq.wrap(trade(Exchange::Binance, "BTC-USDT", 1)))
        .await;
    assert_eq!(recv(&mut sub.rx).await.seq, 1);

    server.kill();
    wait_until("both notice", || async {
        health.report().values().all(|c| !c.healthy)
    })
    .await;
    server.restart();

    // Keep publishing until one gets through: both sides must have come back by themselves.
    let deadline = tokio::time::Instant::now() + WAIT;
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after the restart"
        );
        bus.publish(seq.wrap(trade(Exchange::Binance, "BTC-USDT", 2)))
            .await;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), sub.rx.recv()).await {
            break m;
        }
    };
    assert!(got.seq > 1, "a later envelope, never a replay");
    wait_until("healthy again", || async { health.all_healthy() }).await;
    shutdown.cancel();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
}

/// A TCP proxy to Redis that can silently black-hole its existing connections: the
/// sockets stay open but no byte passes, like a half-open connection after a network cut.
struct FreezingProxy {
    port: u16,
    /// Connections numbered below this are black-holed.
    frozen_below: Arc<std::sync::atomic::AtomicU64>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    task: JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(upstream_port: u16) -> FreezingProxy {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let frozen = frozen_below.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            let mut next_id = 0u64;
            while let Ok((client, _)) = listener.accept().await {
                let id = next_id;
                next_id += 1;
                counter.store(next_id, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut r, mut w) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(sr), Box::new(cw)),
                ] {
                    let frozen = frozen.clone();
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            // Black-holed: swallow the bytes, keep both sockets open.
                            if id < frozen.load(Ordering::SeqCst) {
                                continue;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        FreezingProxy {
            port,
            frozen_below,
            accepted,
            task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn freeze_existing(&self, connections_so_far: u64) {
        self.frozen_below
            .store(connections_so_far, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_subscription_is_found_by_the_probe_and_rebuilt() {
    let server = RedisTestServer::start();
    let admin = raw(&server.url()).await;
    let proxy = FreezingProxy::start(server.port()).await;
    let via_proxy = format!("redis://127.0.0.1:{}/0", proxy.port);
    let health = Health::new();
    let mut sub = subscriber(
        &via_proxy,
        Uuid::new_v4(),
        &["trade:binance:BTC-USDT"],
        health.register("sub"),
    );
    wait_until("subscription", || async {
        numsub(&admin, "md:trade:binance:BTC-USDT").await == 1
    })
    .await;
    let other = Uuid::new_v4();
    let m = |s: u64| BusMessage::encode(other, s, 1, trade(Exchange::Binance, "BTC-USDT", s));
    publish_raw(&admin, "trade:binance:BTC-USDT", &m(1).envelope).await;
    assert_eq!(recv(&mut sub.rx).await.seq, 1);

    // The session uses one connection (pub/sub, which also carries the probe's PING):
    // freeze it, silently.
    proxy.freeze_existing(1);
    // Without the probe nothing would ever notice: no error, no EOF. Keep publishing
    // until one arrives through a rebuilt session.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut s = 1;
    let got = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent subscription was never rebuilt"
        );
        s += 1;
        publish_raw(&admin, "trade:binance:BTC-USDT", &m(s).envelope).await;
        if let Ok(Some(got)) = tokio::time::timeout(Duration::from_millis(50), sub.rx.recv()).await
        {
            break got;
        }
    };
    assert!(got.seq >= 2);
    assert!(
        proxy.accepted() >= 2,
        "a new session was built through the proxy"
    );
    wait_until("healthy again", || async { health.all_healthy() }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_never_blocks_when_redis_is_unreachable() {
    // Nothing listens on this port: the queue fills and the rest is dropped, not awaited.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = RedisConfig {
        publish_queue_size: 8,
        ..config(&format!("redis://127.0.0.1:{port}/0"))
    };
    let src = Uuid::new_v4();
    let shutdown = CancellationToken::new();
    let (bus, task) =
        RedisPublisher::spawn(cfg, src, HealthHandle::detached("pub"), shutdown.clone());
    let mut seq = Sequencer::new(src);
    let all = async {
        for i in 0..10_000 {
            bus.publish(seq.wrap(trade(Exchange::Binance, "BTC-USDT", i)))
                .await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), all)
        .await
        .expect("publish blocked");
    shutdown.cancel();
    // The flush gives up after its deadline when Redis never comes.
    tokio::time::timeout(FLUSH_DEADLINE + WAIT, task)
        .await
        .unwrap()
        .unwrap();
}

/// Envelopes dropped on a full queue must not leave the `snapshot:` key behind: readers who
/// saw the `seq` gap recover from that key, so it has to include every delta.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_key_includes_deltas_dropped_on_a_full_queue() {
    let mut server = RedisTestServer::start();
    let url = server.url();
    // Redis is down while we publish: the queue (2 slots) fills and the rest is dropped.
    server.kill();
    let src = Uuid::new_v4();
    let cfg = RedisConfig {
        publish_queue_size: 2,
        ..config(&url)
    };
    let shutdown = CancellationToken::new();
    let (publisher, task) =
        RedisPublisher::spawn(cfg, src, HealthHandle::detached("pub"), shutdown.clone());
    let mut seq = Sequencer::new(src);
    let sym = "DROP-USDT";
    publisher
        .publish(seq.wrap(book(
            sym,
            BookAction::Snapshot,
            vec![lv("10", "1")],
            vec![lv("11", "1")],
            100,
            None,
        )))
        .await;
    for i in 0..50u64 {
        let price = format!("{}", 20 + i);
        publisher
            .publish(seq.wrap(book(
                sym,
                BookAction::Delta,
                vec![],
                vec![lv(&price, "2")],
                101 + i,
                Some(100 + i),
            )))
            .await;
    }
    server.restart();
    let conn = raw(&url).await;
    let key = snapshot_key(
        "md:",
        &Channel::parse(&format!("book:binance:{sym}")).unwrap(),
    );
    let channel = Channel::parse(&format!("book:binance:{sym}")).unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let msg = loop {
        if let Some(bytes) = get(&conn, &key).await {
            let msg = BusMessage::decode(channel.clone(), Bytes::from(bytes)).unwrap();
            if msg.book.as_ref().and_then(|b| b.seq) == Some(150) {
                break msg;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no snapshot key with every delta"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        msg.seq, 51,
        "envelope seq of the last message on the channel"
    );
    let book = msg.book.unwrap();
    assert_eq!(book.action, BookAction::Snapshot);
    assert_eq!(
        book.asks.len(),
        51,
        "the snapshot ask plus one level per delta"
    );
    assert_eq!(book.asks[0], lv("11", "1"));
    assert_eq!(book.asks[50], lv("69", "2"));
    shutdown.cancel();
    let _ = task.await;
}

/// A router that does not keep up must cost dropped (counted) envelopes, never a stalled
/// subscription whose backlog piles up in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_router_queue_drops_instead_of_stalling() {
    let server = RedisTestServer::start();
    let url = server.url();
    let admin = raw(&url).await;
    let (_itx, irx) = watch::channel(interest(&["trade:binance:*"]));
    // Room for two messages, and nobody reads yet.
    let (otx, mut rx) = mpsc::channel(2);
    let shutdown = CancellationToken::new();
    let task = RedisSubscriber::spawn(
        config(&url),
        Uuid::new_v4(),
        irx,
        otx,
        HealthHandle::detached("sub"),
        shutdown.clone(),
    );
    wait_until("psubscribe", || async { numpat(&admin).await == 1 }).await;
    let other = Uuid::new_v4();
    let m = |s: u64| BusMessage::encode(other, s, 1, trade(Exchange::Binance, "BTC-USDT", s));
    for s in 1..=50 {
        publish_raw(&admin, "trade:binance:BTC-USDT", &m(s).envelope).await;
    }
    // A marker after the burst: once it is through, the burst has been handled.
    let mut seqs = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut marker = 1_000;
    loop {
        publish_raw(&admin, "trade:binance:BTC-USDT", &m(marker).envelope).await;
        match tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
            Ok(Some(msg)) => {
                seqs.push(msg.seq);
                if msg.seq >= 1_000 {
                    break;
                }
            }
            Ok(None) => panic!("subscriber stopped"),
            Err(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no marker: the subscription stalled"
        );
        marker += 1;
    }
    assert_eq!(&seqs[..2], &[1, 2], "the queue held the first two");
    assert!(
        seqs.len() < 50,
        "most of the burst was dropped, not queued: {seqs:?}"
    );
    shutdown.cancel();
    let _ = task.await;
}

/// The `id=` of every client logged in as `user`.
async fn client_ids(admin: &MultiplexedConnection, user: &str) -> Vec<String> {
    let mut c = admin.clone();
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap_or_default();
    list.lines()
        .filter(|l| l.contains(&format!(" user={user} ")))
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_refused_by_an_acl_keeps_its_connection_and_says_why() {
    let server = RedisTestServer::start();
    let admin = raw(&server.url()).await;
    let acl = |rules: &'static [&'static str]| {
        let mut c = admin.clone();
        async move {
            let _: () = ::redis::cmd("ACL")
                .arg("SETUSER")
                .arg("pub")
                .arg(rules)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    };
    // May publish, may not SET: every pipeline with a ticker gets NOPERM for its SET.
    acl(&[
        "on",
        ">pw",
        "resetchannels",
        "&md:*",
        "resetkeys",
        "~md:*",
        "-@all",
        "+publish",
        "+ping",
    ])
    .await;
    let url = format!("redis://pub:pw@127.0.0.1:{}/0", server.port());
    let mut sub = subscriber(
        &server.url(),
        Uuid::new_v4(),
        &["ticker:binance:BTC-USDT"],
        HealthHandle::detached("sub"),
    );
    wait_until("subscribed", || async {
        numsub(&admin, "md:ticker:binance:BTC-USDT").await == 1
    })
    .await;
    let health = Health::new();
    let shutdown = CancellationToken::new();
    let src = Uuid::new_v4();
    let (bus, task) =
        RedisPublisher::spawn(config(&url), src, health.register("pub"), shutdown.clone());
    let mut seq = Sequencer::new(src);
    let ticker = |bid: &str| {
        Event::Ticker(Ticker {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: None,
            ts_recv: 1,
            bid: Some(bid.into()),
            bid_size: None,
            ask: None,
            ask_size: None,
            last: None,
            volume_24h: None,
        })
    };
    wait_until("publisher connected", || async {
        client_ids(&admin, "pub").await.len() == 1
    })
    .await;
    let first = client_ids(&admin, "pub").await;
    bus.publish(seq.wrap(ticker("1.0"))).await;
    // The PUBLISH in the pipeline went through; the SET was refused.
    assert_eq!(recv(&mut sub.rx).await.seq, 1);
    wait_until("health down with the reason", || async {
        health
            .report()
            .get("pub")
            .is_some_and(|c| !c.healthy && c.detail.as_deref().unwrap_or("").contains("NOPERM"))
    })
    .await;
    bus.publish(seq.wrap(ticker("2.0"))).await;
    assert_eq!(recv(&mut sub.rx).await.seq, 2);
    assert_eq!(get(&admin, "md:last:ticker:binance:BTC-USDT").await, None);
    assert_eq!(client_ids(&admin, "pub").await, first, "no reconnect");

    // The operator fixes the ACL: the next pipeline succeeds, health is back.
    acl(&["+set"]).await;
    bus.publish(seq.wrap(ticker("3.0"))).await;
    assert_eq!(recv(&mut sub.rx).await.seq, 3);
    wait_until("healthy again", || async { health.all_healthy() }).await;
    let stored = get(&admin, "md:last:ticker:binance:BTC-USDT")
        .await
        .expect("latest value");
    assert!(String::from_utf8_lossy(&stored).contains("3.0"));
    assert_eq!(client_ids(&admin, "pub").await, first, "still no reconnect");
    shutdown.cancel();
    let _ = task.await;
}
