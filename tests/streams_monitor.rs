//! The stream monitor against a real executor process and a real redis-server: `degraded`
//! health while the own group lags or holds pending entries (and on the status page),
//! series removed with their stream, and the garbage collection of idle groups.

mod common;

use common::streams::*;
use common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_degraded_while_the_own_group_lags_or_holds_pending_entries() {
    let redis = RedisServer::start();
    let mut c = conn(&redis).await;
    let ids = append(&mut c, BTC, 5).await;
    let k = key(BTC);
    // A registered channel whose key is not a stream is skipped, not a failed round.
    let _: () = cmd(&mut c, &["SET", &key(ETH), "not a stream"]).await;
    let _: u64 = cmd(&mut c, &["SADD", "md:streams", ETH]).await;
    // The executor's own group is its instance name, "test".
    let _: () = cmd(&mut c, &["XGROUP", "CREATE", &k, "test", "0"]).await;
    let (h, b) = (free_port(), free_port());
    let config = executor_config(&redis, h, b, "lag_threshold = 3\npending_threshold = 2");
    let executor = Proc::role("executor", &config, h, Some(b));

    let health = |want: &'static str, detail: &'static str| {
        let executor = &executor;
        async move {
            wait_until(&format!("/health {want}: {detail}"), WAIT, || async {
                match reqwest::get(executor.http_url("/health")).await {
                    Ok(r) if r.status().as_u16() == 200 => {
                        let text = r.text().await.unwrap_or_default();
                        let v: Value = serde_json::from_str(&text).unwrap_or_default();
                        v["status"] == want
                            && v["components"]["streams"]["detail"]
                                .as_str()
                                .is_some_and(|d| d == detail)
                    }
                    _ => false,
                }
            })
            .await;
        }
    };
    health(
        "degraded",
        "stream trade:binance:BTC-USDT (group test): lag 5 > 3",
    )
    .await;
    let _: redis::Value = cmd(
        &mut c,
        &[
            "XREADGROUP",
            "GROUP",
            "test",
            "c1",
            "COUNT",
            "3",
            "STREAMS",
            &k,
            ">",
        ],
    )
    .await;
    health(
        "degraded",
        "stream trade:binance:BTC-USDT (group test): pending 3 > 2",
    )
    .await;
    // The status page shows the same figures, and the component as degraded.
    let (status, snap) = get(&executor, "/api/status").await;
    assert_eq!(status, 200);
    assert_eq!(
        snap["streams"],
        json!([{"channel": BTC, "length": 5, "dead_letters": 0,
                "groups": [{"name": "test", "consumers": 1, "pending": 3, "lag": 2}]}])
    );
    assert_eq!(snap["components"]["streams"]["degraded"], true, "{snap}");
    let page = reqwest::get(executor.http_url("/"))
        .await
        .expect("GET /")
        .text()
        .await
        .expect("page");
    assert!(page.contains("Durable streams"));
    let _: u64 = cmd(&mut c, &["XACK", &k, "test", &ids[0], &ids[1], &ids[2]]).await;
    health("ok", "1 streams watched").await;
    let text = metrics(&executor).await;
    assert_eq!(
        metric_in(
            &text,
            &format!("mdbridge_stream_lag{{channel=\"{BTC}\",group=\"test\"}}")
        ),
        2.0,
        "{text}"
    );

    // A stream that disappears loses its series.
    let _: u64 = cmd(&mut c, &["DEL", &k]).await;
    health("ok", "0 streams watched").await;
    let text = metrics(&executor).await;
    assert!(!text.contains("mdbridge_stream_length{"), "{text}");
    assert!(!text.contains("mdbridge_stream_pending{"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_foreign_groups_are_destroyed_and_the_own_group_is_kept() {
    let redis = RedisServer::start();
    let mut c = conn(&redis).await;
    append(&mut c, BTC, 3).await;
    let k = key(BTC);
    for (group, consumer) in [("test", Some("c1")), ("old", Some("c9")), ("empty", None)] {
        let _: () = cmd(&mut c, &["XGROUP", "CREATE", &k, group, "0"]).await;
        if let Some(consumer) = consumer {
            let _: redis::Value = cmd(
                &mut c,
                &[
                    "XREADGROUP",
                    "GROUP",
                    group,
                    consumer,
                    "COUNT",
                    "1",
                    "STREAMS",
                    &k,
                    ">",
                ],
            )
            .await;
        }
    }
    let (h, b) = (free_port(), free_port());
    let config = executor_config(&redis, h, b, "group_idle_gc_ms = 300");
    let mut executor = Proc::role("executor", &config, h, Some(b));
    executor.wait_healthy().await;

    wait_until("the idle foreign groups are destroyed", WAIT, || async {
        let (status, info) = get(&executor, &format!("/api/streams/{BTC}")).await;
        status == 200
            && info["groups"]
                .as_array()
                .is_some_and(|g| g.len() == 1 && g[0]["name"] == "test")
    })
    .await;
    assert_eq!(
        executor
            .metric("mdbridge_stream_groups_removed_total")
            .await,
        2.0
    );
    let log = executor.log();
    assert!(log.contains("destroyed an idle consumer group"), "{log}");
}
