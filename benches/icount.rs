//! Instruction-count benchmarks: parse, encode, decode, book apply, and one event fanned
//! out to 1 000 subscribers (through the router, and straight into 1 000 client queues).
//! Instruction counts are stable on a noisy shared box where wall-clock times are not.
//!
//!     cargo bench --bench icount                # every case
//!     cargo bench --bench icount -- fanout      # cases whose name contains `fanout`
//!
//! With `--bench` (what `cargo bench` passes) the binary runs itself under
//! `valgrind --tool=cachegrind --cache-sim=no` twice per case, with `LOW` and `HIGH`
//! iterations, and prints (I(HIGH) − I(LOW)) / (HIGH − LOW): instructions per operation,
//! setup and process start cancelled out. Without `--bench` (`cargo test --benches`) it
//! runs each case a few times natively, as a smoke test. `--case NAME --iters N` runs one
//! case (what valgrind is given). Needs valgrind (`apt-get install valgrind`).

use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;

use mdbridge::book::OrderBook;
use mdbridge::config::SlowClientPolicy;
use mdbridge::envelope::BusMessage;
use mdbridge::event::{Book, BookAction, Channel, Event, Exchange, Level, Pattern, Side, Trade};
use mdbridge::gateway::client::ClientQueue;
use mdbridge::gateway::protocol::{Op, Request};
use mdbridge::gateway::router::{Command as RouterCommand, Router};
use mdbridge::gateway::StatsInner;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

const LOW: u64 = 200;
const HIGH: u64 = 1_200;
const SUBSCRIBERS: u64 = 1_000;

type Case = (&'static str, &'static str, fn(u64));

const CASES: &[Case] = &[
    (
        "parse_binance_trade",
        "combined-stream trade frame -> Event (copy into the scratch buffer + parse)",
        parse_trade,
    ),
    (
        "encode_trade",
        "build a trade Event + its envelope (the one serialization)",
        encode_trade,
    ),
    (
        "decode_trade",
        "envelope -> BusMessage with validation (executor side)",
        decode_trade,
    ),
    (
        "book_apply_delta",
        "build + apply a 4-level delta to a 2 000-level book",
        book_apply,
    ),
    (
        "fanout_1000_router",
        "one trade through Router::run to 1 000 subscribed clients (+ one BusMessage clone)",
        fanout_router,
    ),
    (
        "fanout_1000_queue_push",
        "ClientQueue::push_market of one frame into 1 000 queues",
        fanout_queues,
    ),
];

fn trade(i: u64) -> Event {
    Event::Trade(Trade {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: Some(1_672_515_782_136_000 + i),
        ts_recv: 1_672_515_782_140_000 + i,
        trade_id: i.to_string(),
        price: "60012.34000000".into(),
        size: "0.01234000".into(),
        side: Some(Side::Buy),
    })
}

fn parse_trade(iters: u64) {
    let adapter = mdbridge::exchange::adapter_for(Exchange::Binance, &["BNB-BTC".to_string()])
        .expect("binance adapter");
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/binance/trade_combined.json"
    );
    let frame = std::fs::read(path).expect("fixture");
    let mut buf = Vec::with_capacity(frame.len() * 2);
    for _ in 0..iters {
        buf.clear();
        buf.extend_from_slice(&frame);
        let parsed = adapter.parse(&mut buf, 1).expect("parses");
        assert_eq!(black_box(parsed).len(), 1);
    }
}

fn encode_trade(iters: u64) {
    let src = Uuid::from_u128(7);
    for i in 0..iters {
        black_box(BusMessage::encode(src, i + 1, i + 1, trade(i)));
    }
}

fn decode_trade(iters: u64) {
    let msg = BusMessage::encode(Uuid::from_u128(7), 1, 1_672_515_782_141_000, trade(1));
    for _ in 0..iters {
        let d = BusMessage::decode(msg.channel.clone(), msg.envelope.clone());
        assert!(black_box(d).is_ok());
    }
}

fn level(p: u64, q: &str) -> Level {
    Level(
        format!("{}.{:02}", 60_000 + p / 100, p % 100).into(),
        q.into(),
    )
}

fn book_apply(iters: u64) {
    let header = |action, bids, asks, seq: u64, prev_seq| Book {
        exchange: Exchange::Binance,
        symbol: "BTC-USDT".into(),
        ts: None,
        ts_recv: 0,
        action,
        bids,
        asks,
        seq: Some(seq),
        prev_seq,
    };
    let bids = (0..1000).map(|i| level(10_000 - i, "1.00000000")).collect();
    let asks = (0..1000).map(|i| level(10_001 + i, "1.00000000")).collect();
    let mut ob = OrderBook::new();
    ob.apply(&header(BookAction::Snapshot, bids, asks, 1, None))
        .expect("snapshot");
    for seq in 1..=iters {
        let delta = header(
            BookAction::Delta,
            vec![level(9_990, "2.00000000"), level(9_995, "0.00000000")],
            vec![level(10_005, "3.50000000"), level(10_995, "1.00000000")],
            seq + 1,
            Some(seq),
        );
        ob.apply(black_box(&delta)).expect("delta");
    }
}

fn queue(id: u64) -> Arc<ClientQueue> {
    Arc::new(ClientQueue::new(
        id,
        1_000_000,
        SlowClientPolicy::DropOldest,
        Arc::new(StatsInner::default()),
    ))
}

fn fanout_router(iters: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (interest, _interest_rx) = tokio::sync::watch::channel(Default::default());
        let (commands_tx, commands) = tokio::sync::mpsc::channel(16);
        let stats = Arc::new(StatsInner::default());
        let mut router = Router::new(interest, None, commands_tx.clone(), stats, 1_000);
        let channel = "trade:binance:BTC-USDT";
        let queues: Vec<_> = (1..=SUBSCRIBERS).map(queue).collect();
        for q in &queues {
            router.on_command(RouterCommand::Connect {
                id: q.id(),
                queue: q.clone(),
            });
            router.on_command(RouterCommand::Request {
                id: q.id(),
                request: Request {
                    op: Op::Subscribe {
                        patterns: vec![Pattern::parse(channel).expect("pattern")],
                        since: Vec::new(),
                    },
                    req: None,
                },
            });
        }
        let first = queues.first().expect("a subscriber").clone();
        let mut out = Vec::new();
        first.take_batch(&mut out, usize::MAX); // the `subscribed` reply
        let msg = BusMessage::encode(Uuid::from_u128(7), 1, 1, trade(1));
        assert_eq!(msg.channel, Channel::parse(channel).expect("channel"));
        let (tx, messages) = tokio::sync::mpsc::channel(iters as usize + 1);
        for _ in 0..iters {
            tx.try_send(msg.clone()).expect("room");
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(router.run(commands, None, messages, stop.clone()));
        while (first.market_len() as u64) < iters {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        task.await.expect("router");
        drop(commands_tx);
        assert!(queues.iter().all(|q| q.market_len() as u64 == iters));
    });
}

fn fanout_queues(iters: u64) {
    let queues: Vec<_> = (1..=SUBSCRIBERS).map(queue).collect();
    let msg = BusMessage::encode(Uuid::from_u128(7), 1, 1, trade(1));
    let text = Utf8Bytes::try_from(msg.event_json()).expect("utf-8");
    for _ in 0..iters {
        for q in &queues {
            black_box(q.push_market(text.clone(), 1, None));
        }
    }
    assert!(queues.iter().all(|q| q.market_len() as u64 == iters));
}

/// Instructions valgrind counted for one run of `case` with `iters` iterations.
fn instructions(case: &str, iters: u64) -> Result<u64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = Command::new("valgrind")
        .args([
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
        ])
        .arg(exe)
        .args(["--case", case, "--iters", &iters.to_string()])
        .output()
        .map_err(|e| format!("valgrind: {e} (apt-get install valgrind)"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!(
            "{case}: {}",
            err.lines().last().unwrap_or_default()
        ));
    }
    // `==123== I   refs:      1,234,567` (3.19) or `I refs:` (newer).
    err.lines()
        .find_map(|l| {
            let rest = l.split_once("refs:")?;
            rest.0.contains('I').then(|| rest.1.trim().replace(',', ""))
        })
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{case}: no `I refs` line in valgrind's output"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1).cloned()
    };
    if let Some(case) = value("--case") {
        let iters = value("--iters").and_then(|v| v.parse().ok()).unwrap_or(1);
        let (_, _, f) = CASES.iter().find(|c| c.0 == case).expect("no such case");
        f(iters);
        return;
    }
    let filter = args.iter().find(|a| !a.starts_with("--"));
    let selected = CASES
        .iter()
        .filter(|c| filter.is_none_or(|f| c.0.contains(f.as_str())));
    if !args.iter().any(|a| a == "--bench") {
        for (name, _, f) in selected {
            f(3);
            println!("{name}: ok");
        }
        return;
    }
    println!("{:<24} {:>14}  what", "case", "instr/op");
    for (name, what, _) in selected {
        match (instructions(name, LOW), instructions(name, HIGH)) {
            (Ok(low), Ok(high)) => {
                let per = high.saturating_sub(low) as f64 / (HIGH - LOW) as f64;
                println!("{name:<24} {per:>14.0}  {what}");
            }
            (Err(e), _) | (_, Err(e)) => println!("{name:<24} {:>14}  {e}", "error"),
        }
    }
}
