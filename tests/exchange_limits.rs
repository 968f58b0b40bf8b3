//! Binance's per-connection limits against a Binance-like WebSocket server written here:
//! a feed with more than 1 024 streams is sharded over several sockets, none carrying more
//! than 1 024, and every event of every shard arrives exactly once; a refused SUBSCRIBE
//! makes the feed unhealthy with the exchange's reason (never a silent green).
//! Real sockets, bounded waits on conditions, no sleeps.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mdbridge::config::{FeedChannel, FeedConfig};
use mdbridge::event::{Event, Exchange, StatusState};
use mdbridge::exchange::run_feed;
use mdbridge::health::Health;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// What the server saw: per connection, the streams it was asked for (in order).
type Seen = Arc<Mutex<Vec<Vec<String>>>>;
/// Per connection, when each SUBSCRIBE request arrived.
type Arrivals = Arc<Mutex<Vec<Vec<std::time::Instant>>>>;

/// Accepts connections; on each, records every SUBSCRIBE's streams and answers it with
/// `reply(id)` (an ack or an error); once `go` turns true, sends one trade per `@trade`
/// stream this connection subscribed (only those: a shard hears only its own symbols, as
/// on Binance), then keeps the socket open.
async fn server(
    listener: TcpListener,
    seen: Seen,
    arrivals: Arrivals,
    reply: fn(u64) -> String,
    go: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        let Ok(ws) = tokio_tungstenite::accept_async(sock).await else {
            continue;
        };
        let index = {
            let mut s = seen.lock().unwrap();
            s.push(Vec::new());
            s.len() - 1
        };
        arrivals.lock().unwrap().push(Vec::new());
        tokio::spawn(connection(
            ws,
            index,
            seen.clone(),
            arrivals.clone(),
            reply,
            go.clone(),
        ));
    }
}

async fn connection(
    mut ws: WebSocketStream<TcpStream>,
    index: usize,
    seen: Seen,
    arrivals: Arrivals,
    reply: fn(u64) -> String,
    mut go: tokio::sync::watch::Receiver<bool>,
) {
    let mut sent = false;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { return };
                let Message::Text(t) = msg else { continue };
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["method"], "SUBSCRIBE", "{v}");
                let streams: Vec<String> = v["params"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect();
                assert!(streams.len() <= 1024, "one SUBSCRIBE over 1024 streams");
                seen.lock().unwrap()[index].extend(streams);
                arrivals.lock().unwrap()[index].push(std::time::Instant::now());
                let id = v["id"].as_u64().unwrap();
                if ws.send(Message::text(reply(id))).await.is_err() {
                    return;
                }
            }
            changed = go.changed(), if !sent => {
                if changed.is_err() {
                    return;
                }
                if !*go.borrow() {
                    continue;
                }
                sent = true;
                let streams = seen.lock().unwrap()[index].clone();
                for (i, stream) in streams.iter().enumerate() {
                    let Some(wire) = stream.strip_suffix("@trade") else { continue };
                    let upper = wire.to_ascii_uppercase();
                    let frame = format!(
                        r#"{{"stream":"{stream}","data":{{"e":"trade","E":1700000000000,"s":"{upper}","t":{i},"p":"1.00","q":"2.00","T":1700000000000,"m":false,"M":true}}}}"#
                    );
                    if ws.send(Message::text(frame)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

fn ack(id: u64) -> String {
    format!(r#"{{"result":null,"id":{id}}}"#)
}

/// Binance's error reply shape (web-socket-streams.md, "Error Messages").
fn refuse_first(id: u64) -> String {
    if id == 1 {
        format!(
            r#"{{"error":{{"code":2,"msg":"Invalid request: too many streams, max 1024"}},"id":{id}}}"#
        )
    } else {
        ack(id)
    }
}

struct Rig {
    seen: Seen,
    arrivals: Arrivals,
    go: tokio::sync::watch::Sender<bool>,
    events: mpsc::Receiver<Event>,
    health: Health,
    stop: CancellationToken,
}

async fn rig(symbols: Vec<String>, reply: fn(u64) -> String) -> Rig {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let arrivals: Arrivals = Arc::default();
    let (go, go_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(server(
        listener,
        seen.clone(),
        arrivals.clone(),
        reply,
        go_rx,
    ));
    let mut feed = FeedConfig::new(Exchange::Binance, symbols, vec![FeedChannel::Trade]);
    feed.url = Some(format!("ws://127.0.0.1:{port}/stream"));
    feed.rest_url = Some(format!("http://127.0.0.1:{port}"));
    let (tx, events) = mpsc::channel(100_000);
    let health = Health::new();
    let handle = health.register("feed:binance:0");
    let stop = CancellationToken::new();
    tokio::spawn(run_feed(feed, tx, handle, stop.clone()));
    Rig {
        seen,
        arrivals,
        go,
        events,
        health,
        stop,
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_over_1024_streams_is_sharded_and_every_event_arrives_once() {
    // 1 100 symbols × 1 channel = 1 100 streams: more than one Binance connection may carry.
    let symbols: Vec<String> = (0..1100).map(|i| format!("S{i}-USDT")).collect();
    let mut rig = rig(symbols.clone(), ack).await;
    let total = |seen: &Seen| seen.lock().unwrap().iter().map(Vec::len).sum::<usize>();
    wait_for("every stream subscribed", || total(&rig.seen) == 1100).await;
    let per_socket: Vec<usize> = rig.seen.lock().unwrap().iter().map(Vec::len).collect();
    assert!(
        per_socket.len() >= 2,
        "one socket for 1100 streams: {per_socket:?}"
    );
    assert!(
        per_socket.iter().all(|&n| n <= 1024),
        "a socket over 1024 streams: {per_socket:?}"
    );
    // Paced: never more than 5 requests within a second on one connection (Binance's
    // limit on incoming messages). Only an upper bound on the rate: a slow machine only
    // spreads them further.
    for (k, times) in rig.arrivals.lock().unwrap().iter().enumerate() {
        for w in times.windows(6) {
            assert!(
                w[5].duration_since(w[0]) >= Duration::from_secs(1),
                "socket {k}: 6 SUBSCRIBE requests within a second"
            );
        }
    }
    // Each stream asked for once, on one socket only.
    let mut all: Vec<String> = rig.seen.lock().unwrap().concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 1100);

    // Healthy once every socket is subscribed; one component per socket.
    wait_for("every socket healthy", || rig.health.all_healthy()).await;
    let report = rig.health.report();
    let sockets = report.keys().filter(|k| k.contains("/socket")).count();
    assert_eq!(sockets, per_socket.len(), "{report:?}");

    rig.go.send(true).unwrap();
    let mut trades: HashMap<String, u32> = HashMap::new();
    let mut connected = 0;
    while trades.len() < 1100 {
        let e = timeout(WAIT, rig.events.recv())
            .await
            .expect("every trade in time")
            .expect("feed alive");
        match e {
            Event::Trade(t) => *trades.entry(t.symbol.clone()).or_default() += 1,
            Event::Status(s) if s.state == StatusState::Connected => connected += 1,
            Event::Status(s) => panic!("unexpected status {s:?}"),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(connected, per_socket.len(), "one `connected` per socket");
    let expected: BTreeMap<String, u32> = symbols.into_iter().map(|s| (s, 1)).collect();
    let got: BTreeMap<String, u32> = trades.into_iter().collect();
    assert_eq!(got, expected, "every trade exactly once");
    rig.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscribe_makes_the_feed_unhealthy_with_the_exchange_reason() {
    let mut rig = rig(vec!["BTC-USDT".into(), "ETH-USDT".into()], refuse_first).await;
    // The refusal is told to bots as an `error` status with the exchange's words.
    // No `connected` before it: the first event is the refusal.
    let e = timeout(WAIT, rig.events.recv())
        .await
        .expect("an event in time")
        .expect("feed alive");
    let detail = match e {
        Event::Status(s) if s.state == StatusState::Error => s.detail.unwrap_or_default(),
        other => panic!("expected the refusal as an `error` status, got {other:?}"),
    };
    assert!(
        detail.contains("code 2: Invalid request: too many streams, max 1024"),
        "{detail}"
    );
    assert!(
        !detail.contains("Some("),
        "Rust Debug text in a detail: {detail}"
    );

    // Data that does flow on the socket does not turn the feed green.
    rig.go.send(true).unwrap();
    let trade = timeout(WAIT, rig.events.recv())
        .await
        .expect("a trade in time")
        .expect("feed alive");
    assert!(matches!(trade, Event::Trade(_)), "{trade:?}");
    let report = rig.health.report();
    let feed = &report["feed:binance:0"];
    assert!(
        !feed.healthy,
        "a refused SUBSCRIBE left the feed green: {feed:?}"
    );
    let why = feed.detail.clone().unwrap_or_default();
    assert!(
        why.contains("refused") && why.contains("too many streams, max 1024"),
        "{why}"
    );
    rig.stop.cancel();
}
