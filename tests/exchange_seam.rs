//! The venue seam on its own: a made-up venue described only through `Adapter` (client-sent
//! heartbeats, numeric acks), driven by `exchange::connection::run` against a tiny server
//! written here. Shows that what a venue needs is said by its adapter, not by the
//! connection.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, WAIT};
use futures_util::{SinkExt, StreamExt};
use mdbridge::config::{FeedChannel, FeedConfig};
use mdbridge::event::{Event, Exchange, StatusState};
use mdbridge::exchange::{Adapter, Heartbeat, ParseError, Parsed};
use mdbridge::health::Health;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A venue that acks `{"sub":N}` with `{"ack":N}` and wants a text `ping` every 50 ms.
struct PingVenue;

impl Adapter for PingVenue {
    fn exchange(&self) -> Exchange {
        Exchange::Okx
    }
    fn default_ws_url(&self) -> &'static str {
        "ws://unused"
    }
    fn heartbeat(&self) -> Heartbeat {
        Heartbeat::ClientSends {
            every: Duration::from_millis(50),
            frame: "ping",
        }
    }
    fn subscribe_frames(&self, _: &[String], _: &[FeedChannel]) -> Vec<(u64, String)> {
        vec![(7, r#"{"sub":7}"#.to_string())]
    }
    fn parse(&self, frame: &mut Vec<u8>, _ts_recv: u64) -> Result<Vec<Parsed>, ParseError> {
        match frame.as_slice() {
            b"pong" => Ok(Vec::new()),
            br#"{"ack":7}"# => Ok(vec![Parsed::Ack { id: Some(7) }]),
            _ => Err(ParseError::UnknownShape),
        }
    }
}

#[tokio::test]
async fn a_client_sent_heartbeat_is_sent_and_its_answers_keep_the_feed_quietly_alive() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let pings = Arc::new(AtomicU64::new(0));
    let seen = pings.clone();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
            return;
        };
        while let Some(Ok(Message::Text(t))) = ws.next().await {
            let reply = match t.as_str() {
                r#"{"sub":7}"# => r#"{"ack":7}"#,
                "ping" => {
                    seen.fetch_add(1, Ordering::SeqCst);
                    "pong"
                }
                _ => return,
            };
            if ws.send(Message::text(reply)).await.is_err() {
                return;
            }
        }
    });
    let mut feed = FeedConfig::new(
        Exchange::Okx,
        vec!["BTC-USDT".into()],
        vec![FeedChannel::Trade],
    );
    feed.url = Some(format!("ws://127.0.0.1:{port}/"));
    let (tx, mut events) = mpsc::channel::<Event>(64);
    let stop = CancellationToken::new();
    let health = Health::new().register("feed");
    let task = tokio::spawn(mdbridge::exchange::connection::run(
        Arc::new(PingVenue),
        feed,
        tx,
        health,
        stop.clone(),
    ));
    let first = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("in time");
    assert!(
        matches!(&first, Some(Event::Status(s)) if s.state == StatusState::Connected),
        "{first:?}"
    );
    wait_until("three client pings answered", WAIT, || async {
        pings.load(Ordering::SeqCst) >= 3
    })
    .await;
    // Pongs are control frames: nothing else reached the bus.
    assert!(events.try_recv().is_err());
    stop.cancel();
    let _ = task.await;
}
