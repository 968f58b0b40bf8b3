//! A durable executor under the ACL line docs/operations.md gives it (read verbatim):
//! reads, acks, retries, dead-letters, claims and gap checks all pass, and Redis logs no
//! refusal.

mod common;

use common::redis_extra::CustomRedis;
use common::*;
use mdbridge::bus::redis::append::AppendScript;
use mdbridge::durable::{stream_key, StreamCap};
use mdbridge::envelope::BusMessage;
use mdbridge::event::{now_micros, Event, Exchange, Side, Trade};
use uuid::Uuid;

const CHANNEL: &str = "trade:binance:BTC-USDT";

/// The durable executor's ACL block of docs/operations.md.
fn documented_line() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("docs/operations.md");
    let after = doc
        .split_once("<!-- acl-durable-executor")
        .expect("acl-durable-executor marker")
        .1;
    let block = after.split_once("```\n").expect("block start").1;
    block.split_once("```").expect("block end").0.to_string()
}

fn trade(seq: u64) -> BusMessage {
    BusMessage::encode(
        Uuid::nil(),
        seq,
        now_micros(),
        Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: "BTC-USDT".into(),
            ts: Some(1),
            ts_recv: now_micros(),
            trade_id: seq.to_string(),
            price: "1".into(),
            size: "1".into(),
            side: Some(Side::Buy),
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_executor_needs_nothing_beyond_its_documented_acl() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("users.acl"),
        format!(
            "user default off\n{}user admin on >admin-pw ~* &* +@all\n",
            documented_line()
        ),
    )
    .expect("acl file");
    let redis = CustomRedis::start_in(dir, &["--aclfile".into(), "{dir}/users.acl".into()], false);
    let mut admin = redis.conn_as("admin", "admin-pw");
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query(&mut admin)
        .expect("reset");

    let (h, b) = (free_port(), free_port());
    let url = format!(
        "redis://mdbridge-executor:CHANGE-ME-executor@127.0.0.1:{}/0",
        redis.port
    );
    let durable = "[durable]\nchannels = [\"trade:*:*\"]\nblock_ms = 200\nmax_deliveries = 2\nretry_backoff_ms = 50\nclaim_idle_ms = 200\n";
    let config =
        role_config(&url, h, b, durable).replace("[redis]\n", "[redis]\nmax_patterns = 0\n");
    let mut executor = Proc::role("executor", &config, h, Some(b));
    executor.wait_healthy().await;
    let mut exact = Bot::connect(&executor.bots_url()).await;
    exact.subscribe(&[CHANNEL]).await;
    let mut wild = Bot::connect(&executor.bots_url()).await;
    wild.subscribe(&["trade:binance:*"]).await;
    let key = stream_key("md:", CHANNEL);
    wait_until("the group exists", WAIT, || async {
        let mut c = redis.conn_as("admin", "admin-pw");
        redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&key)
            .query::<Vec<redis::Value>>(&mut c)
            .is_ok_and(|g| !g.is_empty())
    })
    .await;

    let client = redis::Client::open(format!("redis://admin:admin-pw@127.0.0.1:{}/0", redis.port))
        .expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("conn");
    let script = AppendScript::new();
    let cap = StreamCap {
        maxlen: 1_000,
        approximate: false,
    };
    let _: u64 = redis::cmd("SADD")
        .arg("md:streams")
        .arg(CHANNEL)
        .query(&mut admin)
        .expect("SADD");
    // seq 1, 2, then 5: a jump the consumer checks (XRANGE) and finds no trim.
    for seq in [1, 2, 5] {
        let (head, tail) = trade(seq).id_split().expect("split");
        script
            .append(&mut conn, &key, &format!("md:{CHANNEL}"), cap, &head, &tail)
            .await
            .expect("append");
    }
    // A poison entry: retried (XCLAIM, XPENDING), then dead-lettered (MULTI, XADD, XACK).
    let _: String = redis::cmd("XADD")
        .arg(&key)
        .arg("*")
        .arg("envelope")
        .arg("junk")
        .query(&mut admin)
        .expect("XADD");
    let (head, tail) = trade(6).id_split().expect("split");
    script
        .append(&mut conn, &key, &format!("md:{CHANNEL}"), cap, &head, &tail)
        .await
        .expect("append");
    // Another stream, with an entry left pending by a dead consumer of the executor's group
    // (`test`), registered only then: the wildcard reaches it and the entry is claimed
    // (XPENDING IDLE, XCLAIM).
    let other = "trade:binance:ETH-USDT";
    let other_key = stream_key("md:", other);
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&other_key)
        .arg("test")
        .arg("$")
        .arg("MKSTREAM")
        .query(&mut admin)
        .expect("XGROUP CREATE");
    let eth = BusMessage::encode(
        Uuid::nil(),
        1,
        now_micros(),
        Event::Trade(Trade {
            exchange: Exchange::Binance,
            symbol: "ETH-USDT".into(),
            ts: Some(1),
            ts_recv: now_micros(),
            trade_id: "eth-1".into(),
            price: "1".into(),
            size: "1".into(),
            side: None,
        }),
    );
    let (head, tail) = eth.id_split().expect("split");
    script
        .append(
            &mut conn,
            &other_key,
            &format!("md:{other}"),
            cap,
            &head,
            &tail,
        )
        .await
        .expect("append");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("test")
        .arg("ghost")
        .arg("STREAMS")
        .arg(&other_key)
        .arg(">")
        .query(&mut admin)
        .expect("XREADGROUP");
    let _: u64 = redis::cmd("SADD")
        .arg("md:streams")
        .arg(other)
        .query(&mut admin)
        .expect("SADD");

    for (bot, want) in [
        (&mut exact, vec!["1", "2", "5", "6"]),
        (&mut wild, vec!["1", "2", "5", "6", "eth-1"]),
    ] {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let (v, _) = bot.until(WAIT, |v| v["type"] == "trade").await;
            got.push(v["trade_id"].as_str().expect("trade_id").to_string());
        }
        got.sort();
        assert_eq!(got, want);
    }
    assert_eq!(executor.metric("mdbridge_stream_claimed_total").await, 1.0);
    wait_until("the poison entry dead-lettered", WAIT, || async {
        let mut c = redis.conn_as("admin", "admin-pw");
        redis::cmd("XLEN")
            .arg(format!("{key}:dead"))
            .query::<u64>(&mut c)
            .unwrap_or(0)
            == 1
    })
    .await;
    let log: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query(&mut admin)
        .expect("ACL LOG");
    assert!(log.is_empty(), "ACL refusals: {log:?}");
    assert_eq!(
        executor.metric("mdbridge_redis_error_replies_total").await,
        0.0
    );
}
