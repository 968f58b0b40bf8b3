//! The bot server's defences, end to end: a real listener on 127.0.0.1, real
//! `tokio_tungstenite` clients (and raw frames where a well-behaved client cannot send
//! what an attacker would), a bus fed with `BusMessage::encode` messages.
//! Every wait is a condition with a deadline; nothing asserts on timing.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mdbridge::bus::Interest;
use mdbridge::config::{BotToken, BotsConfig, ScopedToken};
use mdbridge::envelope::BusMessage;
use mdbridge::event::{Book, BookAction, Event, Exchange, Level, Side, Trade};
use mdbridge::gateway::{Gateway, GatewayStats};
use mdbridge::health::HealthHandle;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const DEADLINE: Duration = Duration::from_secs(10);

struct Harness {
    addr: SocketAddr,
    bus: mpsc::Sender<BusMessage>,
    stats: GatewayStats,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    _interest: watch::Receiver<Interest>,
    src: Uuid,
    seq: u64,
}

fn config() -> BotsConfig {
    BotsConfig {
        listen: "127.0.0.1:0".into(),
        ping_interval_ms: 60_000,
        ..BotsConfig::default()
    }
}

async fn start(config: BotsConfig) -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (bus, messages) = mpsc::channel(1024);
    let (interest_tx, interest) = watch::channel(Interest::default());
    let gateway = Gateway::new(
        config,
        messages,
        interest_tx,
        None,
        HealthHandle::detached("bots"),
    );
    let stats = gateway.stats();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(gateway.serve(listener, shutdown.clone()));
    Harness {
        addr,
        bus,
        stats,
        shutdown,
        server,
        _interest: interest,
        src: Uuid::new_v4(),
        seq: 0,
    }
}

impl Harness {
    /// Publishes `event` on the bus; returns the exact text a bot must receive.
    async fn publish(&mut self, event: Event) -> String {
        self.seq += 1;
        let msg = BusMessage::encode(self.src, self.seq, 1, event);
        let text = String::from_utf8(msg.event_json().to_vec()).unwrap();
        self.bus.send(msg).await.unwrap();
        text
    }

    fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    async fn connect(&self) -> Ws {
        let (ws, _) = within("connect", tokio_tungstenite::connect_async(self.url()))
            .await
            .unwrap();
        ws
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

async fn next_json(ws: &mut Ws) -> Value {
    within("a text frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

async fn ping_pong(ws: &mut Ws, req: &str) {
    send(ws, json!({"op":"ping","req":req})).await;
    assert_eq!(next_json(ws).await, json!({"type":"pong","req":req}));
}

/// Reads until the server's Close frame (text frames are not expected before it).
async fn close_frame(ws: &mut Ws) -> Option<CloseFrame> {
    within("a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a Close frame, got {other:?}"),
            }
        }
    })
    .await
}

/// A raw data frame (the client library masks it); lets a test send what a correct
/// client never would: fragments, invalid UTF-8.
fn raw(data: &[u8], opcode: Data, fin: bool) -> Message {
    Message::Frame(Frame::message(data.to_vec(), OpCode::Data(opcode), fin))
}

fn trade(symbol: &str, id: &str) -> Event {
    Event::Trade(Trade {
        exchange: Exchange::Binance,
        symbol: symbol.into(),
        ts: Some(1),
        ts_recv: mdbridge::event::now_micros(),
        trade_id: id.into(),
        price: "100.10".into(),
        size: "0.5".into(),
        side: Some(Side::Buy),
    })
}

fn book_snapshot() -> Event {
    Event::Book(Book {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: 7,
        action: BookAction::Snapshot,
        bids: vec![Level("100".into(), "1".into())],
        asks: vec![Level("101".into(), "1".into())],
        seq: Some(1),
        prev_seq: None,
    })
}

fn http_status<T>(r: Result<T, WsError>) -> u16 {
    match r {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade succeeded"),
    }
}

#[tokio::test]
async fn requests_past_the_burst_get_rate_limited_without_being_processed() {
    let cfg = BotsConfig {
        // One token per 1000 s: nothing refills during the test.
        max_requests_per_sec: 0.001,
        request_burst: 5,
        ..config()
    };
    let h = start(cfg).await;
    let mut bot = h.connect().await;
    // Sent back to back; a subscribe counts like a ping.
    send(
        &mut bot,
        json!({"op":"subscribe","channels":["trade:binance:BTC-USDT"],"req":0}),
    )
    .await;
    for i in 1..=7 {
        send(&mut bot, json!({"op":"ping","req":i})).await;
    }
    assert_eq!(
        next_json(&mut bot).await,
        json!({"type":"subscribed","channels":["trade:binance:BTC-USDT"],"req":0})
    );
    for i in 1..=4 {
        assert_eq!(next_json(&mut bot).await, json!({"type":"pong","req":i}));
    }
    for _ in 5..=7 {
        let reply = next_json(&mut bot).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "rate_limited", "{reply}");
    }
    // A limited subscribe is not processed: the bot holds only the first pattern.
    send(
        &mut bot,
        json!({"op":"subscribe","channels":["trade:binance:ETH-USDT"],"req":9}),
    )
    .await;
    assert_eq!(next_json(&mut bot).await["code"], "rate_limited");
    assert_eq!(h.stats.snapshot().subscriptions, 1);
    h.stop().await;
}

#[tokio::test]
async fn a_bot_that_keeps_flooding_past_the_limit_is_closed_with_1008() {
    let cfg = BotsConfig {
        max_requests_per_sec: 0.001,
        request_burst: 1,
        ..config()
    };
    let h = start(cfg).await;
    let mut flooder = h.connect().await;
    let mut polite = h.connect().await;
    // Refused requests may run 10 bursts ahead of the refill rate: here 10.
    for i in 0..12 {
        send(&mut flooder, json!({"op":"ping","req":i})).await;
    }
    // The pong, then `rate_limited` answers (the last ones may be cut off by the close:
    // the connection ends as soon as the flood is seen), then Close 1008.
    let mut limited = 0;
    let frame = within("the flooder's close frame", async {
        loop {
            match flooder.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).unwrap();
                    if v["type"] == "pong" {
                        assert_eq!((v["req"].clone(), limited), (json!(0), 0));
                    } else {
                        assert_eq!(v["code"], "rate_limited", "{v}");
                        limited += 1;
                    }
                }
                Some(Ok(Message::Close(frame))) => return frame,
                other => panic!("expected text or Close, got {other:?}"),
            }
        }
    })
    .await;
    assert!(limited <= 10, "{limited} rate_limited answers");
    let frame = frame.expect("a close code");
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    ping_pong(&mut polite, "fine").await;
    h.stop().await;
}

#[tokio::test]
async fn past_max_connections_the_upgrade_gets_503_until_a_slot_frees() {
    let cfg = BotsConfig {
        max_connections: 2,
        ..config()
    };
    let h = start(cfg).await;
    let mut a = h.connect().await;
    let mut b = h.connect().await;
    ping_pong(&mut a, "a").await;
    ping_pong(&mut b, "b").await;
    assert_eq!(
        http_status(tokio_tungstenite::connect_async(h.url()).await),
        503
    );
    a.close(None).await.unwrap();
    drop(a);
    wait_until("the first bot to be gone", || {
        h.stats.snapshot().clients == 1
    })
    .await;
    let mut c = h.connect().await;
    ping_pong(&mut c, "c").await;
    ping_pong(&mut b, "b2").await;
    h.stop().await;
}

#[tokio::test]
async fn past_max_handshakes_a_new_connection_waits_for_a_handshake_to_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cfg = BotsConfig {
        max_handshakes: 1,
        ..config()
    };
    let h = start(cfg).await;
    // `slow` holds the only handshake place: connected, request not sent yet.
    let mut slow = TcpStream::connect(h.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let url = h.url();
    let waiting = tokio::spawn(async move {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws
    });
    // Give a broken cap the chance to let the second handshake through (no assertion on
    // time: a correct server passes however long this takes).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a second handshake ran past max_handshakes = 1"
    );
    slow.write_all(
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut resp = [0u8; 12];
    within("the first upgrade", slow.read_exact(&mut resp))
        .await
        .unwrap();
    assert_eq!(&resp, b"HTTP/1.1 101");
    // The place is free again: the waiting connection goes through.
    let mut ws = within("the waiting upgrade", waiting).await.unwrap();
    ping_pong(&mut ws, "waited").await;
    h.stop().await;
}

#[tokio::test]
async fn too_large_messages_close_with_1009_whole_or_fragmented() {
    let cfg = BotsConfig {
        max_message_bytes: 512,
        ..config()
    };
    let h = start(cfg).await;
    let mut whole = h.connect().await;
    ping_pong(&mut whole, "ok").await;
    let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(600));
    whole.send(Message::text(big)).await.unwrap();
    let frame = close_frame(&mut whole).await.expect("a close code");
    assert_eq!(frame.code, CloseCode::Size, "{frame:?}");

    let mut fragmented = h.connect().await;
    fragmented
        .send(raw(&[b' '; 300], Data::Text, false))
        .await
        .unwrap();
    fragmented
        .send(raw(&[b' '; 300], Data::Continue, true))
        .await
        .unwrap();
    let frame = close_frame(&mut fragmented).await.expect("a close code");
    assert_eq!(frame.code, CloseCode::Size, "{frame:?}");
    h.stop().await;
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    let h = start(config()).await;
    let mut bot = h.connect().await;
    bot.send(raw(b"{\"op\":\"\xff\xfe\"}", Data::Text, true))
        .await
        .unwrap();
    let frame = close_frame(&mut bot).await.expect("a close code");
    assert_eq!(frame.code, CloseCode::Invalid, "{frame:?}");
    h.stop().await;
}

#[tokio::test]
async fn an_unfinished_message_kept_alive_by_pings_is_closed_after_message_timeout() {
    let cfg = BotsConfig {
        message_timeout_ms: 300,
        ..config()
    };
    let h = start(cfg).await;
    let mut stuck = h.connect().await;
    let mut pinger = h.connect().await;
    stuck
        .send(raw(br#"{"op":"pi"#, Data::Text, false))
        .await
        .unwrap();
    // Both bots ping the server continuously; only the one holding half a message goes.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let frame = within("the stuck bot's close frame", async {
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    stuck.send(Message::Ping(Vec::new().into())).await.unwrap();
                    pinger.send(Message::Ping(Vec::new().into())).await.unwrap();
                }
                m = pinger.next() => match m {
                    Some(Ok(Message::Pong(_) | Message::Ping(_))) => {}
                    other => panic!("the pinging bot got {other:?}"),
                },
                m = stuck.next() => match m {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(Message::Pong(_) | Message::Ping(_))) => {}
                    other => panic!("expected Close, got {other:?}"),
                },
            }
        }
    })
    .await;
    let frame = frame.expect("a close code");
    assert_eq!(frame.code, CloseCode::Policy, "{frame:?}");
    // The bot that only pinged (no message pending) is still served.
    ping_pong(&mut pinger, "alive").await;
    h.stop().await;
}

#[tokio::test]
async fn a_scoped_token_may_only_subscribe_to_what_its_allow_list_covers() {
    let cfg = BotsConfig {
        tokens: vec![
            "full".into(),
            BotToken::Scoped(ScopedToken {
                token: "trades".into(),
                allow: vec!["trade:*:*".into(), "status:binance".into()],
            }),
        ],
        ..config()
    };
    let mut h = start(cfg).await;
    let (mut scoped, _) = tokio_tungstenite::connect_async(format!("{}?token=trades", h.url()))
        .await
        .unwrap();
    let (mut full, _) = tokio_tungstenite::connect_async(format!("{}?token=full", h.url()))
        .await
        .unwrap();
    send(
        &mut scoped,
        json!({"op":"subscribe","channels":["trade:binance:BTC-USDT","status:binance"],"req":1}),
    )
    .await;
    assert_eq!(next_json(&mut scoped).await["type"], "subscribed");
    // All or nothing: one forbidden pattern refuses the whole request.
    for (req, channels) in [
        (
            2,
            json!(["trade:binance:ETH-USDT", "book:binance:BTC-USDT"]),
        ),
        (3, json!(["*:binance:BTC-USDT"])),
        (4, json!(["*:*"])),
    ] {
        send(
            &mut scoped,
            json!({"op":"subscribe","channels":channels,"req":req}),
        )
        .await;
        let reply = next_json(&mut scoped).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "forbidden", "{reply}");
        assert_eq!(reply["req"], req, "{reply}");
    }
    assert_eq!(
        h.stats.snapshot().subscriptions,
        2,
        "nothing refused was held"
    );
    send(
        &mut full,
        json!({"op":"subscribe","channels":["book:binance:BTC-USDT","trade:binance:BTC-USDT"],"req":5}),
    )
    .await;
    assert_eq!(next_json(&mut full).await["type"], "subscribed");
    let book = h.publish(book_snapshot()).await;
    let t = h.publish(trade("BTC-USDT", "1")).await;
    assert_eq!(
        next_json(&mut full).await,
        serde_json::from_str::<Value>(&book).unwrap()
    );
    assert_eq!(
        next_json(&mut full).await,
        serde_json::from_str::<Value>(&t).unwrap()
    );
    assert_eq!(
        next_json(&mut scoped).await,
        serde_json::from_str::<Value>(&t).unwrap(),
        "the scoped bot gets the trade and never the book"
    );
    h.stop().await;
}

#[tokio::test]
async fn repeated_auth_failures_from_one_address_get_429() {
    let cfg = BotsConfig {
        tokens: vec!["good".into()],
        auth_max_failures: 2,
        ..config()
    };
    let h = start(cfg).await;
    let with = |token: &str| format!("{}?token={token}", h.url());
    for _ in 0..2 {
        assert_eq!(
            http_status(tokio_tungstenite::connect_async(with("bad")).await),
            401
        );
    }
    // In cooldown even the right token is turned away, before it is looked at.
    let good = with("good").into_client_request().unwrap();
    match tokio_tungstenite::connect_async(good).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // Another address is not affected (Linux routes all of 127/8 to loopback).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(h.addr).await.unwrap();
    let (mut other, _) =
        tokio_tungstenite::client_async(with("good"), MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    ping_pong(&mut other, "other").await;
    h.stop().await;
}

/// A CA and a server certificate for localhost / 127.0.0.1 signed by it, as PEM files.
struct TestPki {
    dir: tempfile::TempDir,
    ca: rustls::pki_types::CertificateDer<'static>,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "mdbridge test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bots.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("bots.key"), key.serialize_pem()).unwrap();
    TestPki {
        dir,
        ca: ca.der().clone(),
    }
}

fn client_tls(roots: rustls::RootCertStore) -> Connector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Connector::Rustls(Arc::new(config))
}

#[tokio::test]
async fn wss_with_a_verified_certificate_works_end_to_end() {
    let pki = test_pki();
    let path = |f: &str| pki.dir.path().join(f).display().to_string();
    let cfg = BotsConfig {
        tls_cert_file: Some(path("bots.crt")),
        tls_key_file: Some(path("bots.key")),
        ..config()
    };
    let mut h = start(cfg).await;
    let port = h.addr.port();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    for host in ["localhost", "127.0.0.1"] {
        let (mut bot, _) = within(
            "a wss connection",
            tokio_tungstenite::connect_async_tls_with_config(
                format!("wss://{host}:{port}/"),
                None,
                false,
                Some(client_tls(roots.clone())),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("wss://{host}: {e}"));
        send(
            &mut bot,
            json!({"op":"subscribe","channels":["trade:binance:BTC-USDT"],"req":1}),
        )
        .await;
        assert_eq!(next_json(&mut bot).await["type"], "subscribed");
        let t = h.publish(trade("BTC-USDT", host)).await;
        match within("a trade over TLS", bot.next()).await {
            Some(Ok(Message::Text(text))) => assert_eq!(text.as_str(), t),
            other => panic!("expected the trade, got {other:?}"),
        }
        bot.close(None).await.unwrap();
    }
    // A client that does not trust the test CA refuses the server...
    let untrusted = tokio_tungstenite::connect_async_tls_with_config(
        format!("wss://localhost:{port}/"),
        None,
        false,
        Some(client_tls(rustls::RootCertStore::empty())),
    )
    .await;
    assert!(untrusted.is_err(), "an unverified certificate was accepted");
    // ...and plain ws:// gets no WebSocket.
    assert!(
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
            .await
            .is_err()
    );
    h.stop().await;
}
