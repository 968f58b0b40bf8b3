//! The admin HTTP port under abuse, against a real executor process: half-sent requests
//! (more than the connection cap) are closed — the extras at once, the rest when their
//! header timeout passes — `/metrics` answers again on a new connection and bots connect
//! throughout; with `[http] token` set, every endpoint wants the bearer token.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `role_config` with extra `[http]` keys.
fn config_with_http(redis_url: &str, http: u16, bots: u16, keys: &str) -> String {
    let listen = format!("[http]\nlisten = \"127.0.0.1:{http}\"\n");
    let config = role_config(redis_url, http, bots, "");
    assert!(config.contains(&listen));
    config.replace(&listen, &format!("{listen}{keys}\n"))
}

/// Reads until the server closes the connection (EOF or reset); returns what it sent.
async fn read_until_closed(sock: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_admin_requests_are_closed_and_metrics_and_bots_stay_available() {
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let config = config_with_http(
        &redis.url(),
        h,
        b,
        // Long enough that all twelve are accepted while the first four still wait.
        "max_connections = 4\nheader_timeout_ms = 3000",
    );
    let mut executor = Proc::role("executor", &config, h, Some(b));
    executor.wait_healthy().await;

    // Three times the cap of connections that start a request and never finish it.
    let mut half_open = Vec::new();
    for _ in 0..12 {
        let mut sock = TcpStream::connect(("127.0.0.1", h)).await.expect("connect");
        // The write may fail on a socket the server already closed at accept: fine.
        let _ = sock
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            .await;
        half_open.push(sock);
    }
    // A bot connects and subscribes while the admin port is under attack.
    let mut bot = Bot::connect(&executor.bots_url()).await;
    let ack = bot.subscribe(&["trade:binance:BTC-USDT"]).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");

    // Every half-sent request is closed by the server: none holds a descriptor for good.
    for (i, sock) in half_open.iter_mut().enumerate() {
        let got = tokio::time::timeout(WAIT, read_until_closed(sock))
            .await
            .unwrap_or_else(|_| panic!("half-sent request {i} still open after {WAIT:?}"));
        let text = String::from_utf8_lossy(&got);
        assert!(
            !text.contains("mdbridge_"),
            "a half-sent request was answered with metrics: {text}"
        );
    }

    // A complete request on a new connection is answered.
    wait_until("/metrics answers again", WAIT, || async {
        reqwest::get(executor.http_url("/metrics"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let text = reqwest::get(executor.http_url("/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    // 12 against a cap of 4: at least 8 were closed at accept, the others timed out.
    assert!(
        metric_in(&text, "mdbridge_admin_connections_refused_total") >= 8.0,
        "{text}"
    );
    assert!(
        metric_in(&text, "mdbridge_admin_timeouts_total{what=\"header\"}") >= 1.0,
        "{text}"
    );
    // The bot is still served.
    bot.send(serde_json::json!({"op":"ping","req":7})).await;
    let (pong, _) = bot.until(WAIT, |v| v["type"] == "pong").await;
    assert_eq!(pong["req"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_gives_401_without_and_200_with() {
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let config = config_with_http(&redis.url(), h, b, "token = \"s3cret-admin\"");
    let executor = Proc::role("executor", &config, h, Some(b));
    let client = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut req = client.get(executor.http_url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.timeout(Duration::from_secs(5)).send()
    };
    wait_until("admin HTTP up", WAIT, || async {
        get("/metrics", Some("s3cret-admin"))
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    for path in ["/metrics", "/health", "/health/redis"] {
        let none = get(path, None).await.expect("GET");
        assert_eq!(none.status().as_u16(), 401, "{path} without a token");
        let wrong = get(path, Some("s3cret-admiN")).await.expect("GET");
        assert_eq!(wrong.status().as_u16(), 401, "{path} with a wrong token");
    }
    let metrics = get("/metrics", Some("s3cret-admin")).await.expect("GET");
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await.expect("body");
    assert!(
        metric_in(&text, "mdbridge_admin_requests_unauthorized_total") >= 6.0,
        "{text}"
    );
    wait_until("healthy, with the token", WAIT, || async {
        get("/health", Some("s3cret-admin"))
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
    })
    .await;
}

/// The status page in a browser cannot send a header: with `[http] token` it passes
/// `?token=`. Its event stream ends by itself before the admin connection lifetime (so the
/// listener never has to cut it, and no `lifetime` timeout is counted).
#[tokio::test]
async fn status_page_and_stream_take_the_token_as_a_query_and_the_stream_ends_cleanly() {
    let redis = RedisServer::start();
    let (h, b) = (free_port(), free_port());
    let config = config_with_http(
        &redis.url(),
        h,
        b,
        // Lifetime 1 + 2 = 3 s: the stream must end on its own before that.
        "token = \"s3cret-admin\"\nheader_timeout_ms = 1000\nrequest_timeout_ms = 2000",
    );
    let executor = Proc::role("executor", &config, h, Some(b));
    let client = reqwest::Client::new();
    wait_until("admin HTTP up", WAIT, || async {
        client
            .get(executor.http_url("/metrics"))
            .bearer_auth("s3cret-admin")
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    for path in ["/", "/api/status", "/api/status/stream"] {
        let r = client
            .get(executor.http_url(path))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status().as_u16(), 401, "{path} without a token");
        let r = client
            .get(executor.http_url(&format!("{path}?token=wrong")))
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status().as_u16(), 401, "{path} with a wrong token");
    }
    let page = client
        .get(executor.http_url("/?token=s3cret-admin"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.expect("body").contains("EventSource"));

    let stream = client
        .get(executor.http_url("/api/status/stream?token=s3cret-admin"))
        .timeout(WAIT)
        .send()
        .await
        .expect("GET stream");
    assert_eq!(stream.status().as_u16(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .starts_with("text/event-stream"));
    // The whole body arrives and ends without an error: the server closed it cleanly.
    let body = stream.text().await.expect("the stream ends cleanly");
    let snapshots: Vec<serde_json::Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("each event is a JSON snapshot"))
        .collect();
    assert!(!snapshots.is_empty(), "{body}");
    assert!(snapshots.iter().all(|s| s["role"] == "executor"), "{body}");
    assert!(body.contains("retry: 250"), "{body}");
    let metrics = client
        .get(executor.http_url("/metrics"))
        .bearer_auth("s3cret-admin")
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert_eq!(
        metric_in(&metrics, "mdbridge_admin_timeouts_total{what=\"lifetime\"}"),
        0.0,
        "the stream was not cut by the listener"
    );
}
