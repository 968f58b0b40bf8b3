//! Unit tests of the Binance front-end (kept apart so the module itself stays readable).

use super::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use tokio_tungstenite::tungstenite::Message as WsMsg;

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Upper bound for every wait in these tests (conditions, never sleeps).
const WAIT: Duration = Duration::from_secs(10);

struct Sim {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
}

impl Sim {
    async fn start(rate: u32) -> Sim {
        Self::start_with(SimConfig {
            rate,
            ..SimConfig::default()
        })
        .await
    }

    async fn start_with(config: SimConfig) -> Sim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve_binance(listener, config, shutdown.clone()));
        Sim {
            addr,
            shutdown,
            handle,
            http: reqwest::Client::new(),
        }
    }

    async fn ws(&self, path: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{path}", self.addr))
            .await
            .unwrap();
        ws
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_str(&r.text().await.unwrap()).unwrap(),
        )
    }

    async fn post(&self, path: &str) -> u16 {
        let r = self
            .http
            .post(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.handle)
            .await
            .expect("serve_binance did not return")
            .unwrap()
            .unwrap();
    }
}

/// Next text frame (skipping pings), parsed when it is valid JSON.
async fn next_text(ws: &mut Client) -> String {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("stream ended")
            .expect("ws error");
        if let WsMsg::Text(t) = m {
            return t.as_str().to_string();
        }
    }
}

async fn next_json(ws: &mut Client) -> Value {
    serde_json::from_str(&next_text(ws).await).unwrap()
}

/// Next reply to a request (frames without an `id` are market data).
async fn next_reply(ws: &mut Client) -> Value {
    loop {
        let v = next_json(ws).await;
        if v.get("id").is_some() {
            return v;
        }
    }
}

async fn send(ws: &mut Client, v: Value) {
    ws.send(WsMsg::Text(v.to_string().into())).await.unwrap();
}

type Side = BTreeMap<String, String>;

fn apply(side: &mut Side, levels: &Value) {
    for l in levels.as_array().unwrap() {
        let (p, q) = (l[0].as_str().unwrap(), l[1].as_str().unwrap());
        if q == "0.00000000" {
            side.remove(p);
        } else {
            side.insert(p.to_string(), q.to_string());
        }
    }
}

fn side_from(levels: &Value) -> Side {
    let mut s = Side::new();
    apply(&mut s, levels);
    s
}

#[test]
fn number_formats_match_binance() {
    assert_eq!(price_str(6_000_001), "60000.01000000");
    assert_eq!(price_str(5), "0.05000000");
    assert_eq!(price_str(-150), "-1.50000000");
    assert_eq!(qty_str(12_345_000), "0.12345000");
    assert_eq!(qty_str(2_00000000), "2.00000000");
    let t = Trade {
        id: 12345,
        price: 2535,
        qty: 100_000_000,
        time: 7,
        buyer_is_maker: true,
    };
    assert_eq!(
        render_trade("BNBBTC", 8, &t),
        r#"{"e":"trade","E":8,"s":"BNBBTC","t":12345,"p":"25.35000000","q":"1.00000000","T":7,"m":true,"M":true}"#
    );
}

#[test]
fn every_payload_is_valid_json() {
    let mut m = Market::new("BTC-USDT", 42, 1_000);
    let out = m.tick(1_000);
    let e = 2_000;
    let bbo = m
        .best_bid()
        .zip(m.best_ask())
        .map(|(bid, ask)| Bbo { bid, ask });
    let mut payloads = vec![
        render_trade("BTCUSDT", e, &out.trade),
        render_agg_trade("BTCUSDT", e, &out.trade),
        render_depth_update("BTCUSDT", e, &out.diff),
        render_ticker("BTCUSDT", e, &m.stats, bbo),
        render_book(&m, 10),
    ];
    if let Some(b) = bbo {
        payloads.push(render_book_ticker("BTCUSDT", m.last_update_id, &b));
    }
    for k in m.kline_updates(e) {
        payloads.push(render_kline("BTCUSDT", e, &k.candle, k.closed));
    }
    for p in payloads {
        let v: Value = serde_json::from_str(&p).unwrap_or_else(|e| panic!("{e}: {p}"));
        assert!(v.is_object());
    }
    let t: Value = serde_json::from_str(&render_ticker("BTCUSDT", e, &m.stats, bbo)).unwrap();
    for f in [
        "e", "E", "s", "p", "P", "w", "x", "c", "Q", "b", "B", "a", "A", "o", "h", "l", "v", "q",
        "O", "C", "F", "L", "n",
    ] {
        assert!(t.get(f).is_some(), "ticker lacks {f}");
    }
}

#[tokio::test]
async fn rest_depth_limit_ordering_and_errors() {
    let sim = Sim::start(100).await;
    let (st, v) = sim.get("/api/v3/depth?symbol=BTCUSDT&limit=5").await;
    assert_eq!(st, 200);
    assert!(v["lastUpdateId"].as_u64().unwrap() >= 1000);
    let px = |side: &str| -> Vec<f64> {
        v[side]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[0].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let (bids, asks) = (px("bids"), px("asks"));
    assert_eq!((bids.len(), asks.len()), (5, 5));
    assert!(bids.windows(2).all(|w| w[0] > w[1]), "bids best first");
    assert!(asks.windows(2).all(|w| w[0] < w[1]), "asks best first");
    assert!(bids[0] < asks[0]);
    assert!(bids[0] > 50_000.0 && bids[0] < 70_000.0);
    let p = v["bids"][0][0].as_str().unwrap();
    assert_eq!(p.split('.').nth(1).map(str::len), Some(8));

    // Default limit (100) covers the whole simulated book.
    let (_, full) = sim.get("/api/v3/depth?symbol=ETHUSDT").await;
    assert!(full["bids"].as_array().unwrap().len() >= 40);

    let (st, v) = sim.get("/api/v3/depth?symbol=NOPEUSDT").await;
    assert_eq!(st, 400);
    assert_eq!(v, json!({"code": -1121, "msg": "Invalid symbol."}));
    let (st, v) = sim.get("/api/v3/depth?symbol=BTCUSDT&limit=abc").await;
    assert_eq!((st, v["code"].as_i64()), (400, Some(-1100)));
    let (st, v) = sim.get("/api/v3/depth").await;
    assert_eq!((st, v["code"].as_i64()), (400, Some(-1102)));

    assert_eq!(sim.get("/api/v3/ping").await, (200, json!({})));
    let (_, t) = sim.get("/api/v3/time").await;
    assert!(t["serverTime"].as_i64().unwrap() > 1_600_000_000_000);
    let (st, _) = sim.get("/_sim/book?symbol=DOGE-USDT").await;
    assert_eq!(st, 400);
    sim.stop().await;
}

#[tokio::test]
async fn subscribe_list_unsubscribe_and_errors() {
    let sim = Sim::start(200).await;
    let mut ws = sim.ws("/ws").await;
    send(
        &mut ws,
        json!({"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}),
    )
    .await;
    assert_eq!(next_reply(&mut ws).await, json!({"result": null, "id": 1}));
    // Raw stream: payload not wrapped.
    let t = loop {
        let v = next_json(&mut ws).await;
        if v.get("id").is_none() {
            break v;
        }
    };
    assert_eq!(t["e"], "trade");
    assert_eq!(t["s"], "BTCUSDT");
    assert!(t["t"].is_u64() && t["T"].is_i64() && t["m"].is_boolean());

    send(&mut ws, json!({"method":"LIST_SUBSCRIPTIONS","id":2})).await;
    assert_eq!(
        next_reply(&mut ws).await,
        json!({"result": ["btcusdt@trade"], "id": 2})
    );
    send(&mut ws, json!({"method":"FOO","id":3})).await;
    let e = next_reply(&mut ws).await;
    assert_eq!(
        (e["error"]["code"].as_i64(), e["id"].as_i64()),
        (Some(2), Some(3))
    );
    send(
        &mut ws,
        json!({"method":"SUBSCRIBE","params":["btcusdt@nope"],"id":4}),
    )
    .await;
    assert_eq!(next_reply(&mut ws).await["error"]["code"], 2);
    ws.send(WsMsg::Text("{not json".into())).await.unwrap();
    assert_eq!(next_reply(&mut ws).await["error"]["code"], 3);
    send(
        &mut ws,
        json!({"method":"UNSUBSCRIBE","params":["btcusdt@trade"],"id":"abc"}),
    )
    .await;
    assert_eq!(
        next_reply(&mut ws).await,
        json!({"result": null, "id": "abc"})
    );
    send(&mut ws, json!({"method":"LIST_SUBSCRIPTIONS","id":5})).await;
    assert_eq!(next_reply(&mut ws).await, json!({"result": [], "id": 5}));

    // Combined endpoint wraps payloads with the stream name.
    let mut c = sim.ws("/stream").await;
    send(
        &mut c,
        json!({"method":"SUBSCRIBE","params":["ethusdt@depth@100ms","ethusdt@bookTicker"],"id":9}),
    )
    .await;
    assert_eq!(next_reply(&mut c).await, json!({"result": null, "id": 9}));
    let mut seen = (false, false);
    tokio::time::timeout(WAIT, async {
        while seen != (true, true) {
            let v = next_json(&mut c).await;
            match v["stream"].as_str() {
                Some("ethusdt@depth@100ms") => {
                    assert_eq!(v["data"]["e"], "depthUpdate");
                    seen.0 = true;
                }
                Some("ethusdt@bookTicker") => {
                    assert!(v["data"]["u"].is_u64() && v["data"]["b"].is_string());
                    seen.1 = true;
                }
                other => panic!("unexpected frame {other:?}: {v}"),
            }
        }
    })
    .await
    .unwrap();
    sim.stop().await;
}

#[tokio::test]
async fn snapshot_plus_diffs_equals_simulator_book() {
    let sim = Sim::start(500).await;
    let mut ws = sim.ws("/stream?streams=btcusdt@depth").await;
    // Buffer diffs, then take the snapshot (Binance's documented recipe).
    let mut buffered = vec![next_json(&mut ws).await["data"].clone()];
    let (_, snap) = sim.get("/api/v3/depth?symbol=BTCUSDT&limit=5000").await;
    let last_id = snap["lastUpdateId"].as_u64().unwrap();
    let (mut bids, mut asks) = (side_from(&snap["bids"]), side_from(&snap["asks"]));
    while buffered.last().unwrap()["u"].as_u64().unwrap() <= last_id {
        buffered.push(next_json(&mut ws).await["data"].clone());
    }
    let mut local_u = last_id;
    let mut first = true;
    for d in buffered {
        let (big_u, u) = (d["U"].as_u64().unwrap(), d["u"].as_u64().unwrap());
        if u <= last_id {
            continue;
        }
        if first {
            assert!(big_u <= last_id + 1 && u > last_id);
            first = false;
        } else {
            assert_eq!(big_u, local_u + 1);
        }
        apply(&mut bids, &d["b"]);
        apply(&mut asks, &d["a"]);
        local_u = u;
    }

    assert_eq!(sim.post("/_sim/pause").await, 200);
    let (_, book) = sim.get("/_sim/book?symbol=BTC-USDT").await;
    let target = book["lastUpdateId"].as_u64().unwrap();
    while local_u < target {
        let d = next_json(&mut ws).await["data"].clone();
        assert_eq!(d["U"].as_u64().unwrap(), local_u + 1);
        apply(&mut bids, &d["b"]);
        apply(&mut asks, &d["a"]);
        local_u = d["u"].as_u64().unwrap();
    }
    assert_eq!(local_u, target);
    assert_eq!(bids, side_from(&book["bids"]));
    assert_eq!(asks, side_from(&book["asks"]));

    // At rest the book does not move.
    let (_, again) = sim.get("/_sim/book?symbol=BTCUSDT").await;
    assert_eq!(again, book);
    assert_eq!(sim.post("/_sim/resume").await, 200);
    sim.stop().await;
}

#[tokio::test]
async fn gap_fault_skips_exactly_one_diff() {
    let sim = Sim::start(300).await;
    let mut ws = sim.ws("/ws/btcusdt@depth").await;
    let mut prev_u = next_json(&mut ws).await["u"].as_u64().unwrap();
    for _ in 0..5 {
        let d = next_json(&mut ws).await;
        assert_eq!(
            d["U"].as_u64().unwrap(),
            prev_u + 1,
            "contiguous before gap"
        );
        prev_u = d["u"].as_u64().unwrap();
    }
    assert_eq!(sim.post("/_sim/gap?symbol=BTC-USDT").await, 200);
    let mut gaps = 0;
    tokio::time::timeout(WAIT, async {
        while gaps == 0 {
            let d = next_json(&mut ws).await;
            if d["U"].as_u64().unwrap() != prev_u + 1 {
                assert!(d["U"].as_u64().unwrap() > prev_u + 1);
                gaps += 1;
            }
            prev_u = d["u"].as_u64().unwrap();
        }
    })
    .await
    .unwrap();
    for _ in 0..10 {
        let d = next_json(&mut ws).await;
        assert_eq!(d["U"].as_u64().unwrap(), prev_u + 1, "contiguous after gap");
        prev_u = d["u"].as_u64().unwrap();
    }
    assert_eq!(sim.post("/_sim/gap?symbol=XRP-USDT").await, 400);
    sim.stop().await;
}

#[tokio::test]
async fn malformed_and_drop_faults() {
    let sim = Sim::start(100).await;
    let mut ws = sim.ws("/ws/ethusdt@trade").await;
    next_json(&mut ws).await;
    assert_eq!(sim.post("/_sim/malformed").await, 200);
    tokio::time::timeout(WAIT, async {
        while serde_json::from_str::<Value>(&next_text(&mut ws).await).is_ok() {}
    })
    .await
    .expect("no malformed frame");

    let (_, stats) = sim.get("/_sim/stats").await;
    assert_eq!(stats["connections_open"], 1);
    assert!(stats["frames_sent"].as_u64().unwrap() > 0);

    assert_eq!(sim.post("/_sim/drop").await, 200);
    // The connection ends without a close frame.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(WsMsg::Close(_))) => return "close frame",
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return "dropped",
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(end, "dropped");
    sim.stop().await;
}

#[tokio::test]
async fn flat_out_and_shutdown_with_open_connection() {
    let sim = Sim::start(0).await;
    let mut ws = sim
        .ws("/stream?streams=btcusdt@trade/btcusdt@kline_1s")
        .await;
    let mut last = 0;
    for _ in 0..2_000 {
        let v = next_json(&mut ws).await;
        if v["stream"] == "btcusdt@trade" {
            let t = v["data"]["t"].as_u64().unwrap();
            assert!(t > last);
            last = t;
        }
    }
    // Open connection: shutdown must still complete.
    sim.stop().await;
}

#[tokio::test]
async fn bad_stream_in_url_is_rejected() {
    let sim = Sim::start(10).await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws/btcusdt@bogus", sim.addr))
        .await
        .err();
    assert!(err.is_some());
    sim.stop().await;
}

#[tokio::test]
async fn periodic_faults_and_ticker_kline_streams() {
    let sim = Sim::start_with(SimConfig {
        rate: 200,
        faults: crate::simulator::Faults {
            gap_every_updates: Some(5),
            malformed_every_frames: Some(7),
            drop_every_secs: None,
        },
        ..SimConfig::default()
    })
    .await;
    let mut ws = sim
        .ws("/stream?streams=ethusdt@depth/ethusdt@ticker/ethusdt@kline_1s")
        .await;
    let (mut prev_u, mut gaps, mut garbage, mut ticker, mut kline) =
        (None::<u64>, 0, 0, false, false);
    tokio::time::timeout(WAIT, async {
        while gaps < 2 || garbage < 2 || !ticker || !kline {
            let text = next_text(&mut ws).await;
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                assert_eq!(text, GARBAGE_FRAME);
                garbage += 1;
                continue;
            };
            let d = &v["data"];
            match v["stream"].as_str().unwrap() {
                "ethusdt@depth" => {
                    let big_u = d["U"].as_u64().unwrap();
                    if prev_u.is_some_and(|p| big_u != p + 1) {
                        gaps += 1;
                    }
                    prev_u = d["u"].as_u64();
                }
                "ethusdt@ticker" => {
                    assert_eq!(d["e"], "24hrTicker");
                    assert!(d["n"].as_u64().is_some() && d["c"].is_string());
                    ticker = true;
                }
                "ethusdt@kline_1s" => {
                    assert_eq!(d["e"], "kline");
                    assert_eq!(d["k"]["i"], "1s");
                    assert!(d["k"]["x"].is_boolean());
                    kline = true;
                }
                other => panic!("unexpected stream {other}"),
            }
        }
    })
    .await
    .expect("periodic faults / ticker / kline not observed");
    sim.stop().await;
}
