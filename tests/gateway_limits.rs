//! The bot server's limits, end to end: request rate, connection and handshake caps,
//! message size, UTF-8 and completion time (RFC 6455 close codes). Real sockets, the
//! in-process gateway (`gateway_harness`), raw frames where a correct client cannot send
//! what an attacker would. Nothing asserts on timing.

mod gateway_harness;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use gateway_harness::*;
use mdbridge::config::BotsConfig;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data};
use tokio_tungstenite::tungstenite::Message;

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
async fn a_subscribe_costs_one_token_per_channel_and_one_over_the_bucket_is_refused_whole() {
    let cfg = BotsConfig {
        // Nothing refills during the test.
        max_requests_per_sec: 0.001,
        request_burst: 3,
        ..config()
    };
    let h = start(cfg).await;
    let mut bot = h.connect().await;
    let four = [
        "trade:binance:BTC-USDT",
        "book:binance:BTC-USDT",
        "ticker:binance:BTC-USDT",
        "status:binance",
    ];
    // Burst + 1 channels in one request: refused whole, nothing subscribed, nothing taken.
    send(&mut bot, json!({"op":"subscribe","channels":four,"req":1})).await;
    let reply = next_json(&mut bot).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    assert_eq!(reply["req"], 1, "{reply}");
    assert_eq!(h.stats.snapshot().subscriptions, 0);
    // Exactly the burst: accepted, and the bucket is empty after it.
    send(
        &mut bot,
        json!({"op":"subscribe","channels":&four[..3],"req":2}),
    )
    .await;
    assert_eq!(
        next_json(&mut bot).await,
        json!({"type":"subscribed","channels":&four[..3],"req":2})
    );
    send(&mut bot, json!({"op":"ping","req":3})).await;
    assert_eq!(next_json(&mut bot).await["code"], "rate_limited");
    assert_eq!(h.stats.snapshot().subscriptions, 3);
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
