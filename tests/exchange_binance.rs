//! The Binance feed against a tiny Binance-like server written here (not `src/simulator`,
//! so the adapter and the simulator cannot share a misreading): a WebSocket endpoint that
//! checks the SUBSCRIBE request and plays scripted frames, and a plain-TCP HTTP endpoint for
//! `/api/v3/depth`. Shows subscribe → events → drop → disconnected/resync/reconnecting →
//! connected again → book resynced with an exact chain. Waits on conditions, never sleeps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mdbridge::config::{FeedChannel, FeedConfig};
use mdbridge::event::{BookAction, Event, Exchange, StatusState};
use mdbridge::exchange::run_feed;
use mdbridge::health::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// Serves `GET /api/v3/depth` with `lastUpdateId` = the current value of `next_id`,
/// records each request line, and says on `served` when a snapshot went out.
async fn http_server(
    listener: TcpListener,
    next_id: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<String>>>,
    served: mpsc::UnboundedSender<u64>,
) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let mut req = Vec::new();
        let mut chunk = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&req);
        let line = text.lines().next().unwrap_or_default().to_string();
        requests.lock().unwrap().push(line);
        let id = next_id.load(Ordering::SeqCst);
        let body = format!(
            r#"{{"lastUpdateId":{id},"bids":[["100.00","1.0"],["99.00","2.0"]],"asks":[["101.00","3.0"],["102.00","4.0"]]}}"#
        );
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = sock.write_all(resp.as_bytes()).await;
        let _ = sock.shutdown().await;
        let _ = served.send(id);
    }
}

fn depth(first: u64, last: u64) -> Message {
    Message::text(format!(
        r#"{{"stream":"btcusdt@depth@100ms","data":{{"e":"depthUpdate","E":1700000000{last:03},"s":"BTCUSDT","U":{first},"u":{last},"b":[["100.{last}","1.5"]],"a":[["101.00","0.00000000"]]}}}}"#
    ))
}

/// Accepts one WebSocket connection, returning it with the request path.
// The handshake callback's `Result<Response, ErrorResponse>` is tungstenite's signature.
#[allow(clippy::result_large_err)]
async fn accept(listener: &TcpListener) -> (WebSocketStream<TcpStream>, String) {
    let (sock, _) = timeout(WAIT, listener.accept())
        .await
        .expect("client connects")
        .unwrap();
    let path = Arc::new(Mutex::new(String::new()));
    let seen = path.clone();
    let ws = tokio_tungstenite::accept_hdr_async(sock, move |req: &Request, resp: Response| {
        *seen.lock().unwrap() = req.uri().to_string();
        Ok(resp)
    })
    .await
    .unwrap();
    let path = path.lock().unwrap().clone();
    (ws, path)
}

/// Reads the SUBSCRIBE request, checks it and acknowledges it.
async fn expect_subscribe(ws: &mut WebSocketStream<TcpStream>) {
    let msg = timeout(WAIT, ws.next())
        .await
        .expect("subscribe frame")
        .unwrap()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"method":"SUBSCRIBE","params":["btcusdt@trade","btcusdt@depth@100ms"],"id":1})
    );
    ws.send(Message::text(r#"{"result":null,"id":1}"#))
        .await
        .unwrap();
}

struct Events {
    rx: mpsc::Receiver<Event>,
    seen: Vec<Event>,
}

impl Events {
    /// Waits for the next event (fails after WAIT).
    async fn next(&mut self) -> Event {
        let e = timeout(WAIT, self.rx.recv())
            .await
            .expect("event in time")
            .expect("feed alive");
        self.seen.push(e.clone());
        e
    }

    async fn status(&mut self, state: StatusState) -> Option<String> {
        match self.next().await {
            Event::Status(s) if s.state == state => s.detail,
            other => panic!("expected status {state:?}, got {other:?}"),
        }
    }

    /// Expects a book event: (action, seq, prev_seq).
    async fn book(&mut self, action: BookAction, seq: u64, prev: Option<u64>) {
        match self.next().await {
            Event::Book(b) => {
                assert_eq!(
                    (b.action, b.seq, b.prev_seq),
                    (action, Some(seq), prev),
                    "{b:?}"
                );
                assert_eq!(b.symbol, "BTC-USDT");
            }
            other => panic!("expected book {action:?} {seq}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn feed_subscribes_streams_reconnects_and_resyncs_the_book() {
    let ws_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_port = ws_listener.local_addr().unwrap().port();
    let http_port = http_listener.local_addr().unwrap().port();
    let next_id = Arc::new(AtomicU64::new(103));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (served_tx, mut served) = mpsc::unbounded_channel();
    tokio::spawn(http_server(
        http_listener,
        next_id.clone(),
        requests.clone(),
        served_tx,
    ));

    let mut feed = FeedConfig::new(
        Exchange::Binance,
        vec!["BTC-USDT".into()],
        vec![FeedChannel::Trade, FeedChannel::Book],
    );
    feed.url = Some(format!("ws://127.0.0.1:{ws_port}/stream"));
    feed.rest_url = Some(format!("http://127.0.0.1:{http_port}"));
    feed.depth_limit = 50;
    feed.reconnect_min_ms = 10;
    feed.reconnect_max_ms = 50;
    let (tx, rx) = mpsc::channel(16);
    let health = Health::new();
    let handle = health.register("feed:binance");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_feed(feed, tx, handle, shutdown.clone()));
    let mut events = Events {
        rx,
        seen: Vec::new(),
    };

    // --- first connection ---
    let (mut ws, path) = accept(&ws_listener).await;
    assert_eq!(path, "/stream");
    expect_subscribe(&mut ws).await;
    events.status(StatusState::Connected).await;
    ws.send(Message::text(
        r#"{"stream":"btcusdt@trade","data":{"e":"trade","E":1700000000001,"s":"BTCUSDT","t":42,"p":"100.50","q":"0.25000000","b":1,"a":2,"T":1700000000000,"m":true,"M":true}}"#,
    ))
    .await
    .unwrap();
    match events.next().await {
        Event::Trade(t) => {
            assert_eq!(
                (
                    t.symbol.as_str(),
                    t.trade_id.as_str(),
                    t.price.as_str(),
                    t.size.as_str()
                ),
                ("BTC-USDT", "42", "100.50", "0.25000000")
            );
            assert_eq!(t.ts, Some(1_700_000_000_000_000));
        }
        other => panic!("expected the trade, got {other:?}"),
    }
    // A garbage frame is skipped, the feed carries on.
    ws.send(Message::text("{garbage")).await.unwrap();
    // The first diff makes the feed fetch a snapshot (lastUpdateId 103).
    ws.send(depth(101, 105)).await.unwrap();
    assert_eq!(timeout(WAIT, served.recv()).await.unwrap(), Some(103));
    ws.send(depth(106, 110)).await.unwrap();
    events.book(BookAction::Snapshot, 103, None).await;
    events.book(BookAction::Delta, 105, Some(103)).await;
    events.book(BookAction::Delta, 110, Some(105)).await;
    assert!(health.all_healthy(), "{:?}", health.report());
    {
        let reqs = requests.lock().unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(
            reqs[0],
            "GET /api/v3/depth?symbol=BTCUSDT&limit=50 HTTP/1.1"
        );
    }

    // --- the server drops the connection ---
    next_id.store(203, Ordering::SeqCst);
    drop(ws);
    let why = events
        .status(StatusState::Disconnected)
        .await
        .unwrap_or_default();
    assert!(!why.is_empty());
    let resync = events.status(StatusState::Resync).await.unwrap_or_default();
    assert!(
        resync.starts_with("book:binance:BTC-USDT: connection lost"),
        "{resync}"
    );
    let again = events
        .status(StatusState::Reconnecting)
        .await
        .unwrap_or_default();
    assert!(again.starts_with("attempt 1 in "), "{again}");
    assert!(!health.all_healthy());

    // --- second connection: pings are answered, the book starts over ---
    let (mut ws, _) = accept(&ws_listener).await;
    expect_subscribe(&mut ws).await;
    events.status(StatusState::Connected).await;
    ws.send(Message::Ping("hb-1".into())).await.unwrap();
    let pong = timeout(WAIT, ws.next())
        .await
        .expect("pong in time")
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong("hb-1".into()));
    ws.send(depth(201, 205)).await.unwrap();
    assert_eq!(timeout(WAIT, served.recv()).await.unwrap(), Some(203));
    ws.send(depth(206, 207)).await.unwrap();
    // A gap: 208 is missing. Resync, never the broken delta, then a new snapshot.
    next_id.store(209, Ordering::SeqCst);
    ws.send(depth(209, 209)).await.unwrap();
    events.book(BookAction::Snapshot, 203, None).await;
    events.book(BookAction::Delta, 205, Some(203)).await;
    events.book(BookAction::Delta, 207, Some(205)).await;
    let gap = events.status(StatusState::Resync).await.unwrap_or_default();
    assert!(gap.starts_with("book:binance:BTC-USDT: gap"), "{gap}");
    assert_eq!(timeout(WAIT, served.recv()).await.unwrap(), Some(209));
    ws.send(depth(210, 212)).await.unwrap();
    events.book(BookAction::Snapshot, 209, None).await;
    events.book(BookAction::Delta, 212, Some(209)).await;
    assert!(health.all_healthy(), "{:?}", health.report());

    shutdown.cancel();
    timeout(WAIT, task)
        .await
        .expect("feed stops on shutdown")
        .unwrap();
    assert!(!events.seen.iter().any(
        |e| matches!(e, Event::Book(b) if b.seq == Some(209) && b.action == BookAction::Delta)
    ));
}

#[tokio::test]
async fn silent_socket_is_dropped_and_server_shutdown_reconnects_at_once() {
    let ws_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_port = ws_listener.local_addr().unwrap().port();
    let mut feed = FeedConfig::new(
        Exchange::Sim,
        vec!["BTC-USDT".into()],
        vec![FeedChannel::Trade],
    );
    feed.url = Some(format!("ws://127.0.0.1:{ws_port}/stream"));
    feed.stale_after_ms = 300;
    feed.reconnect_min_ms = 10;
    feed.reconnect_max_ms = 20;
    let (tx, rx) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let handle = Health::new().register("feed:sim");
    let task = tokio::spawn(run_feed(feed, tx, handle, shutdown.clone()));
    let mut events = Events {
        rx,
        seen: Vec::new(),
    };

    // Connection 1 acknowledges, then says nothing at all (half-open from the client's view).
    let (mut ws1, _) = accept(&ws_listener).await;
    let sub = timeout(WAIT, ws1.next()).await.unwrap().unwrap().unwrap();
    assert!(sub.to_text().unwrap().contains("btcusdt@trade"));
    ws1.send(Message::text(r#"{"result":null,"id":1}"#))
        .await
        .unwrap();
    events.status(StatusState::Connected).await;
    let why = events
        .status(StatusState::Disconnected)
        .await
        .unwrap_or_default();
    assert!(why.starts_with("no frame for"), "{why}");
    events.status(StatusState::Reconnecting).await;

    // Connection 2 announces a shutdown: reconnect with no backoff delay.
    let (mut ws2, _) = accept(&ws_listener).await;
    timeout(WAIT, ws2.next()).await.unwrap().unwrap().unwrap();
    ws2.send(Message::text(r#"{"result":null,"id":1}"#))
        .await
        .unwrap();
    let Event::Status(connected) = events.next().await else {
        panic!("expected connected")
    };
    assert_eq!(
        (connected.state, connected.exchange),
        (StatusState::Connected, Exchange::Sim)
    );
    let shutdown_notice = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/binance/server_shutdown.json"
    ))
    .unwrap();
    ws2.send(Message::text(shutdown_notice.trim()))
        .await
        .unwrap();
    let why = events
        .status(StatusState::Disconnected)
        .await
        .unwrap_or_default();
    assert!(why.contains("server shutdown"), "{why}");
    let again = events
        .status(StatusState::Reconnecting)
        .await
        .unwrap_or_default();
    assert!(again.starts_with("attempt 1 in 0 ms"), "{again}");
    let (_ws3, _) = accept(&ws_listener).await;

    shutdown.cancel();
    timeout(WAIT, task)
        .await
        .expect("feed stops on shutdown")
        .unwrap();
    drop(ws1);
}

// --- rotation (make-before-break) ---

fn trade(id: u64) -> Message {
    Message::text(format!(
        r#"{{"stream":"btcusdt@trade","data":{{"e":"trade","E":1700000000001,"s":"BTCUSDT","t":{id},"p":"100.50","q":"0.25000000","b":1,"a":2,"T":1700000000000,"m":true,"M":true}}}}"#
    ))
}

/// What the streaming server saw of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ConnNews {
    /// Connection `n` was accepted.
    Accepted(usize),
    /// The client closed connection `n` with a Close frame while `open` connections were
    /// accepted in all.
    ClosedByClient { n: usize, accepted: usize },
    /// Connection `n` ended without a Close frame from the client.
    Dropped(usize),
}

/// A Binance-like streaming server: every update goes to every open, subscribed connection
/// (like Binance, whose update ids are global per symbol). Connection `n` gets its
/// subscription acknowledged (and data streamed) only if `ack(n)` is `Some(burst)`, and
/// then its updates in bursts of `burst` (a connection that lags behind the others);
/// `Some(0)` closes it at once; `None` leaves it silent. Updates: trade ids 1, 2, 3... and depth diffs `U..u` two ids wide; `last_u`
/// holds the last update id sent (the HTTP server answers snapshots with it).
async fn streaming_server(
    listener: TcpListener,
    ack: fn(usize) -> Option<usize>,
    last_u: Arc<AtomicU64>,
    last_trade: Arc<AtomicU64>,
    news: mpsc::UnboundedSender<ConnNews>,
    stop: CancellationToken,
) {
    let (updates, _) = tokio::sync::broadcast::channel::<Message>(8192);
    let producer = {
        let updates = updates.clone();
        let stop = stop.clone();
        async move {
            let mut u = last_u.load(Ordering::SeqCst);
            let mut t = 0;
            while !stop.is_cancelled() {
                t += 1;
                let _ = updates.send(trade(t));
                last_trade.store(t, Ordering::SeqCst);
                let _ = updates.send(depth(u + 1, u + 2));
                u += 2;
                last_u.store(u, Ordering::SeqCst);
                // Pacing only (a market that trades every few ms), no timing assertion.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    };
    tokio::spawn(producer);
    let accepted = Arc::new(AtomicU64::new(0));
    loop {
        let sock = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => return },
        };
        let n = accepted.fetch_add(1, Ordering::SeqCst) as usize;
        let _ = news.send(ConnNews::Accepted(n));
        let (updates, news, stop, accepted) = (
            updates.clone(),
            news.clone(),
            stop.clone(),
            accepted.clone(),
        );
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                return;
            };
            expect_subscribe_frame(&mut ws).await;
            let mut rx = None;
            let burst = ack(n);
            if burst == Some(0) {
                let _ = ws.close(None).await;
                return;
            }
            let mut held = Vec::new();
            if burst.is_some() {
                rx = Some(updates.subscribe());
                ws.send(Message::text(r#"{"result":null,"id":1}"#))
                    .await
                    .unwrap();
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    update = async { rx.as_mut().unwrap().recv().await }, if rx.is_some() => {
                        held.push(update.expect("the server keeps up"));
                        if held.len() < burst.unwrap_or(1) {
                            continue;
                        }
                        for update in held.drain(..) {
                            if ws.send(update).await.is_err() {
                                let _ = news.send(ConnNews::Dropped(n));
                                return;
                            }
                        }
                    }
                    incoming = ws.next() => {
                        let news_item = match incoming {
                            Some(Ok(Message::Close(_))) => ConnNews::ClosedByClient {
                                n,
                                accepted: accepted.load(Ordering::SeqCst) as usize,
                            },
                            Some(Ok(_)) => continue,
                            _ => ConnNews::Dropped(n),
                        };
                        let _ = news.send(news_item);
                        return;
                    }
                }
            }
        });
    }
}

async fn expect_subscribe_frame(ws: &mut WebSocketStream<TcpStream>) {
    let msg = timeout(WAIT, ws.next())
        .await
        .expect("subscribe frame")
        .unwrap()
        .unwrap();
    assert!(msg.to_text().unwrap().contains("SUBSCRIBE"), "{msg:?}");
}

struct RotationRig {
    events: Events,
    news: mpsc::UnboundedReceiver<ConnNews>,
    last_trade: Arc<AtomicU64>,
    shutdown: CancellationToken,
    stop_server: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn rotation_rig(ack: fn(usize) -> Option<usize>) -> RotationRig {
    let ws_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_port = ws_listener.local_addr().unwrap().port();
    let http_port = http_listener.local_addr().unwrap().port();
    let last_u = Arc::new(AtomicU64::new(1000));
    let last_trade = Arc::new(AtomicU64::new(0));
    let (served_tx, _served) = mpsc::unbounded_channel();
    tokio::spawn(http_server(
        http_listener,
        last_u.clone(),
        Arc::new(Mutex::new(Vec::new())),
        served_tx,
    ));
    let (news_tx, news) = mpsc::unbounded_channel();
    let stop_server = CancellationToken::new();
    tokio::spawn(streaming_server(
        ws_listener,
        ack,
        last_u,
        last_trade.clone(),
        news_tx,
        stop_server.clone(),
    ));
    let mut feed = FeedConfig::new(
        Exchange::Binance,
        vec!["BTC-USDT".into()],
        vec![FeedChannel::Trade, FeedChannel::Book],
    );
    feed.url = Some(format!("ws://127.0.0.1:{ws_port}/stream"));
    feed.rest_url = Some(format!("http://127.0.0.1:{http_port}"));
    feed.reconnect_min_ms = 10;
    feed.reconnect_max_ms = 50;
    // The shortest rotation; the switch must then also happen within 1 s of the new
    // socket opening.
    feed.rotate_after_secs = 1;
    let (tx, rx) = mpsc::channel(64);
    let shutdown = CancellationToken::new();
    let handle = Health::new().register("feed:binance");
    let task = tokio::spawn(run_feed(feed, tx, handle, shutdown.clone()));
    RotationRig {
        events: Events {
            rx,
            seen: Vec::new(),
        },
        news,
        last_trade,
        shutdown,
        stop_server,
        task,
    }
}

/// Checks the stream of events as it comes: one snapshot, then an exact chain of deltas;
/// trade ids strictly consecutive; no status but `connected` (once).
#[derive(Default)]
struct SeamlessCheck {
    snapshots: usize,
    last_seq: Option<u64>,
    last_trade: Option<u64>,
    trades: u64,
    connected: usize,
}

impl SeamlessCheck {
    fn check(&mut self, e: &Event) {
        match e {
            Event::Book(b) => match b.action {
                BookAction::Snapshot => {
                    self.snapshots += 1;
                    assert_eq!(self.snapshots, 1, "a second snapshot: {b:?}");
                    self.last_seq = b.seq;
                }
                BookAction::Delta => {
                    assert!(self.last_seq.is_some(), "delta before the snapshot: {b:?}");
                    assert_eq!(b.prev_seq, self.last_seq, "broken chain: {b:?}");
                    self.last_seq = b.seq;
                }
            },
            Event::Trade(t) => {
                let id: u64 = t.trade_id.parse().unwrap();
                if let Some(last) = self.last_trade {
                    assert_eq!(id, last + 1, "trade ids must be consecutive, once each");
                }
                self.last_trade = Some(id);
                self.trades += 1;
            }
            Event::Status(s) => {
                assert_eq!(s.state, StatusState::Connected, "unexpected status: {s:?}");
                self.connected += 1;
                assert_eq!(self.connected, 1, "connected twice: {s:?}");
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
}

/// Reads and checks events ([`SeamlessCheck`]) until the client has closed (with a Close
/// frame) the connections `expect_closed`, given as (connection, connections accepted by
/// then), then until every trade made by then has arrived.
async fn expect_seamless_rotations(mut rig: RotationRig, expect_closed: &[(usize, usize)]) {
    let mut check = SeamlessCheck::default();
    let mut closed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while closed.len() < expect_closed.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotations not done in time: {closed:?}"
        );
        let e = rig.events.next().await;
        check.check(&e);
        while let Ok(news) = rig.news.try_recv() {
            match news {
                ConnNews::Accepted(_) => {}
                ConnNews::ClosedByClient { n, accepted } => closed.push((n, accepted)),
                ConnNews::Dropped(n) => panic!("connection {n} dropped without a Close frame"),
            }
        }
    }
    assert_eq!(closed, expect_closed);
    // Everything traded up to now still arrives, exactly once, on the newest socket.
    let target = rig.last_trade.load(Ordering::SeqCst);
    while check.last_trade.is_none_or(|t| t < target) {
        let e = rig.events.next().await;
        check.check(&e);
    }
    assert_eq!(check.snapshots, 1);
    assert!(check.trades > 10, "{}", check.trades);
    assert!(check.last_seq.is_some());

    rig.shutdown.cancel();
    timeout(WAIT, rig.task)
        .await
        .expect("feed stops on shutdown")
        .unwrap();
    rig.stop_server.cancel();
}

#[tokio::test]
async fn rotation_switches_sockets_without_resync_loss_or_duplicates() {
    // Even connections lag (updates in bursts of 64), odd ones do not: at the first switch
    // the new socket is ahead of the old one, at the second one behind it.
    let rig = rotation_rig(|n| Some(if n % 2 == 0 { 64 } else { 1 })).await;
    // Two rotations: connections 0 and 1 are closed by the client, each once its
    // successor is in use.
    expect_seamless_rotations(rig, &[(0, 2), (1, 3)]).await;
}

#[tokio::test]
async fn rotation_keeps_the_old_socket_when_the_new_one_fails_and_retries() {
    // Connection 1 (the first rotation attempt) is closed by the server right after its
    // SUBSCRIBE; the old one is kept, and the retry (connection 2) takes over seamlessly.
    let rig = rotation_rig(|n| Some(if n == 1 { 0 } else { 1 })).await;
    expect_seamless_rotations(rig, &[(0, 3)]).await;
}

#[tokio::test]
async fn rotation_falls_back_to_reconnect_when_the_new_socket_stays_silent() {
    // Connection 1 (the first rotation attempt) never acknowledges nor streams.
    let mut rig = rotation_rig(|n| (n != 1).then_some(1)).await;
    let mut statuses = Vec::new();
    let mut snapshots_after_reconnect = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while snapshots_after_reconnect == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fallback in time: {statuses:?}"
        );
        match rig.events.next().await {
            Event::Status(s) => statuses.push((s.state, s.detail.unwrap_or_default())),
            Event::Book(b) if b.action == BookAction::Snapshot && statuses.len() > 1 => {
                snapshots_after_reconnect += 1;
            }
            _ => {}
        }
    }
    let states: Vec<StatusState> = statuses.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        states,
        vec![
            StatusState::Connected,
            StatusState::Disconnected,
            StatusState::Resync,
            StatusState::Reconnecting,
            StatusState::Connected,
        ],
        "{statuses:?}"
    );
    assert!(
        statuses[1].1.contains("did not catch up"),
        "{:?}",
        statuses[1]
    );
    assert!(
        statuses[3].1.starts_with("attempt 1 in 0 ms"),
        "{statuses:?}"
    );
    // Connection 0 was closed by the client; 1 (silent) was given up; 2 serves now.
    let mut news = Vec::new();
    while let Ok(n) = rig.news.try_recv() {
        news.push(n);
    }
    assert!(
        news.contains(&ConnNews::ClosedByClient { n: 0, accepted: 2 })
            || news.contains(&ConnNews::ClosedByClient { n: 0, accepted: 3 }),
        "{news:?}"
    );
    assert!(news.contains(&ConnNews::Accepted(2)), "{news:?}");

    rig.shutdown.cancel();
    timeout(WAIT, rig.task)
        .await
        .expect("feed stops on shutdown")
        .unwrap();
    rig.stop_server.cancel();
}
