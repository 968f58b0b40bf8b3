//! Who may use the bot server, end to end: per-token `allow` lists, the throttle on failed
//! authentication, and `wss://` with a certificate the client verifies. Real sockets and
//! the in-process gateway (`gateway_harness`).

mod common;
mod gateway_harness;

use std::sync::Arc;

use futures_util::StreamExt;
use gateway_harness::*;
use mdbridge::config::{BotToken, BotsConfig, ScopedToken};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream};

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
async fn repeated_auth_failures_from_one_address_get_429_but_valid_tokens_still_pass() {
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
    // In cooldown a bad token gets 429 with Retry-After...
    let bad = with("bad").into_client_request().unwrap();
    match tokio_tungstenite::connect_async(bad).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected 429, got {:?}", other.map(|_| ())),
    }
    // ...but a valid one from the same address is admitted: behind a NAT, someone else's
    // bad tokens must not lock the legitimate bots out.
    let (mut good, _) = tokio_tungstenite::connect_async(with("good"))
        .await
        .expect("a valid token from an address in cooldown is admitted");
    ping_pong(&mut good, "good").await;
    // The success did not lift the cooldown for bad tokens (nor without a token).
    assert_eq!(
        http_status(tokio_tungstenite::connect_async(with("bad")).await),
        429
    );
    assert_eq!(
        http_status(tokio_tungstenite::connect_async(h.url()).await),
        429
    );
    // Another address is not affected (Linux routes all of 127/8 to loopback).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(h.addr).await.unwrap();
    assert_eq!(
        http_status(
            tokio_tungstenite::client_async(with("bad"), MaybeTlsStream::Plain(stream)).await
        ),
        401
    );
    ping_pong(&mut good, "still").await;
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

/// The real executor process: refusals show in `/metrics` by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_counts_refused_handshakes_by_reason() {
    use common::{free_port, role_config, Proc, RedisServer};
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let bots = "tokens = [\"good\"]\nauth_max_failures = 2\nmax_connections = 1";
    let mut executor = Proc::role(
        "executor",
        &role_config(&redis.url(), h, b, bots),
        h,
        Some(b),
    );
    executor.wait_healthy().await;
    let url = |token: &str| format!("ws://127.0.0.1:{b}/?token={token}");
    let (mut first, _) = tokio_tungstenite::connect_async(url("good")).await.unwrap();
    ping_pong(&mut first, "1").await;
    // From 127.0.0.2 (Linux routes all of 127/8 to loopback): a full server → 503.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket
        .connect(format!("127.0.0.1:{b}").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        http_status(
            tokio_tungstenite::client_async(url("good"), MaybeTlsStream::Plain(stream)).await
        ),
        503
    );
    for want in [401, 401, 429] {
        assert_eq!(
            http_status(tokio_tungstenite::connect_async(url("bad")).await),
            want
        );
    }
    let m = |reason: &str| format!("mdbridge_bot_handshakes_refused_total{{reason=\"{reason}\"}}");
    assert_eq!(executor.metric(&m("unauthorized")).await, 2.0);
    assert_eq!(executor.metric(&m("auth_throttled")).await, 1.0);
    assert_eq!(executor.metric(&m("max_connections")).await, 1.0);
    assert_eq!(
        executor.metric("mdbridge_bot_auth_cooldowns_total").await,
        1.0
    );
    ping_pong(&mut first, "2").await;
}
