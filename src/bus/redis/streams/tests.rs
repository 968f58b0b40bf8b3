//! Live tests of the stream consumer's Redis pieces against a real redis-server: reply
//! parsing (including an entry deleted while pending) and the dead-letter step.

use ::redis::aio::MultiplexedConnection;
use ::redis::Value;

use super::dead::{dead_letter, DeadLetter};
use super::reply::parse_streams;
use crate::bus::redis_test_server::RedisTestServer;
use crate::durable::StreamId;

async fn conn(server: &RedisTestServer) -> MultiplexedConnection {
    ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn cmd(conn: &mut MultiplexedConnection, args: &[&str]) -> Value {
    let mut c = ::redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(conn).await.unwrap()
}

#[tokio::test]
async fn pending_reads_show_deleted_entries_and_dead_letters_ack_atomically() {
    let server = RedisTestServer::start();
    let mut c = conn(&server).await;
    for id in ["1-0", "2-0", "3-0"] {
        cmd(&mut c, &["XADD", "s", id, "envelope", id]).await;
    }
    cmd(&mut c, &["XGROUP", "CREATE", "s", "g", "0"]).await;
    let fresh = cmd(
        &mut c,
        &["XREADGROUP", "GROUP", "g", "me", "STREAMS", "s", ">"],
    )
    .await;
    let fresh = parse_streams(fresh).unwrap();
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].0, "s");
    assert_eq!(fresh[0].1.len(), 3);
    assert_eq!(
        fresh[0].1[1].fields,
        Some(vec![(b"envelope".to_vec(), b"2-0".to_vec())])
    );
    cmd(&mut c, &["XDEL", "s", "2-0"]).await;
    // Own pending entries again: the deleted one comes back without fields.
    let again = cmd(
        &mut c,
        &["XREADGROUP", "GROUP", "g", "me", "STREAMS", "s", "0"],
    )
    .await;
    let again = parse_streams(again).unwrap();
    let entries = &again[0].1;
    assert_eq!(
        entries.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3].map(|n| StreamId::new(n, 0))
    );
    assert!(entries[1].fields.is_none() && entries[0].fields.is_some());
    // Nothing new: a blocking read times out as nil.
    let none = cmd(
        &mut c,
        &[
            "XREADGROUP",
            "GROUP",
            "g",
            "me",
            "BLOCK",
            "10",
            "STREAMS",
            "s",
            ">",
        ],
    )
    .await;
    assert!(parse_streams(none).unwrap().is_empty());

    let letter = DeadLetter {
        key: "s",
        group: "g",
        consumer: "me",
        id: StreamId::new(3, 0),
        envelope: b"raw \xff bytes",
        error: "not JSON",
        deliveries: 5,
    };
    dead_letter(&mut c, &letter).await.unwrap();
    type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;
    let dead: Entries = ::redis::cmd("XRANGE")
        .arg("s:dead")
        .arg("-")
        .arg("+")
        .query_async(&mut c)
        .await
        .unwrap();
    let fields: Vec<(String, Vec<u8>)> = dead[0].1.clone();
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "envelope",
            "error",
            "group",
            "consumer",
            "source_id",
            "deliveries",
            "failed_at"
        ]
    );
    assert_eq!(fields[0].1, b"raw \xff bytes");
    assert_eq!(fields[4].1, b"3-0");
    assert_eq!(fields[5].1, b"5");
    // Acked in the same step: 1-0 and 2-0 stay pending, 3-0 does not.
    let pending: Vec<(String, String, u64, u64)> = ::redis::cmd("XPENDING")
        .arg("s")
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(10)
        .query_async(&mut c)
        .await
        .unwrap();
    let ids: Vec<&str> = pending.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(ids, ["1-0", "2-0"]);
}
