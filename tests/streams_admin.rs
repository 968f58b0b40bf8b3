//! The `/api/streams…` endpoints against a real executor process and a real
//! redis-server: exact figures of a prepared stream, dead-letter pages, requeue with new
//! ids that are published (and the monitor's gauges following), the admin token and a
//! Redis outage. Streams are prepared as the protocol has them (`common::streams`).

mod common;

use common::streams::*;
use common::*;
use futures_util::StreamExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_endpoints_report_exact_figures_and_requeue_dead_letters() {
    let redis = RedisServer::start();
    let mut c = conn(&redis).await;
    let ids = append(&mut c, BTC, 5).await;
    let eth = append(&mut c, ETH, 2).await;
    // g1 read three entries and acknowledged the first; g2 starts at the end.
    let k = key(BTC);
    let _: () = cmd(&mut c, &["XGROUP", "CREATE", &k, "g1", "0"]).await;
    let _: redis::Value = cmd(
        &mut c,
        &[
            "XREADGROUP",
            "GROUP",
            "g1",
            "c1",
            "COUNT",
            "3",
            "STREAMS",
            &k,
            ">",
        ],
    )
    .await;
    let _: u64 = cmd(&mut c, &["XACK", &k, "g1", &ids[0]]).await;
    let _: () = cmd(&mut c, &["XGROUP", "CREATE", &k, "g2", "$"]).await;
    let mut dead_ids = Vec::new();
    for source in &ids[..3] {
        dead_ids.push(dead_letter(&mut c, BTC, source).await);
    }

    let (h, b) = (free_port(), free_port());
    let mut executor = Proc::role("executor", &executor_config(&redis, h, b, ""), h, Some(b));
    executor.wait_healthy().await;

    let (status, list) = get(&executor, "/api/streams").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list,
        json!({"streams": [
                {"channel": BTC, "length": 5, "dead_letters": 3},
                {"channel": ETH, "length": 2, "dead_letters": 0}],
               "total": 2, "next_cursor": null})
    );

    let (status, mut info) = get(&executor, &format!("/api/streams/{BTC}")).await;
    assert_eq!(status, 200, "{info}");
    // How long ago c1 read is the clock's business, not the test's.
    let idle = info["groups"][0]["consumers"][0]["idle_ms"].take();
    assert!(idle.is_u64(), "{idle}");
    let inactive = info["groups"][0]["consumers"][0]["inactive_ms"].take();
    assert!(inactive.is_null() || inactive.is_i64(), "{inactive}");
    assert_eq!(
        info,
        json!({
            "channel": BTC, "key": k, "length": 5,
            "first_id": ids[0], "last_id": ids[4], "last_generated_id": ids[4],
            "max_deleted_id": "0-0", "entries_added": 5, "group_count": 2,
            "groups": [
                {"name": "g1", "consumer_count": 1,
                 "consumers": [{"name": "c1", "pending": 2, "idle_ms": null, "inactive_ms": null}],
                 "pending": 2, "last_delivered_id": ids[2], "entries_read": 3, "lag": 2},
                {"name": "g2", "consumer_count": 0, "consumers": [],
                 "pending": 0, "last_delivered_id": ids[4], "entries_read": null, "lag": 0}],
            "dead_letters": 3,
        })
    );
    let (status, body) = get(&executor, "/api/streams/trade:binance:XRP-USDT").await;
    assert_eq!((status, body["error"].is_string()), (404, true), "{body}");
    for bad in [
        "/api/streams/nonsense",
        "/api/streams?count=0",
        "/api/streams?cursor=x",
        &format!("/api/streams/{BTC}/dlq?after=yesterday"),
        &format!("/api/streams/{BTC}/dlq?count=1000"),
    ] {
        let (status, body) = get(&executor, bad).await;
        assert_eq!(
            (status, body["error"].is_string()),
            (400, true),
            "{bad}: {body}"
        );
    }

    // Dead letters, two per page, with every field.
    let mut expected = Vec::new();
    for (i, d) in dead_ids.iter().enumerate() {
        expected.push(json!({
            "id": d, "envelope": envelope(&mut c, BTC, &ids[i]).await,
            "error": "handler failed: boom", "group": "g1", "consumer": "c1",
            "source_id": ids[i], "deliveries": 5, "failed_at": 1732300000000000u64,
        }));
    }
    let (status, page) = get(&executor, &format!("/api/streams/{BTC}/dlq?count=2")).await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page,
        json!({"channel": BTC, "dead_letters": expected[..2], "next": dead_ids[1], "total": 3})
    );
    let (_, page) = get(
        &executor,
        &format!("/api/streams/{BTC}/dlq?count=2&after={}", dead_ids[1]),
    )
    .await;
    assert_eq!(
        page,
        json!({"channel": BTC, "dead_letters": expected[2..], "next": null, "total": 3})
    );

    // Requeue one, then all: new ids, the envelope carries its new id, published, gone
    // from the dead letters.
    let mut pubsub = redis::Client::open(redis.url())
        .expect("client")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    pubsub
        .subscribe(format!("md:{BTC}"))
        .await
        .expect("SUBSCRIBE");
    let (status, one) = post(
        &executor,
        &format!("/api/streams/{BTC}/dlq/requeue"),
        json!({"id": dead_ids[0]}),
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["count"], 1, "{one}");
    assert_eq!(one["requeued"][0]["dead_id"], dead_ids[0]);
    assert_eq!(one["remaining"], 2);
    let (status, all) = post(
        &executor,
        &format!("/api/streams/{BTC}/dlq/requeue"),
        json!({"all": true}),
    )
    .await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["count"], 2, "{all}");
    assert_eq!(all["failed"], json!([]));
    assert_eq!(all["remaining"], 0);
    let requeued: Vec<(String, String)> = one["requeued"]
        .as_array()
        .into_iter()
        .chain(all["requeued"].as_array())
        .flatten()
        .map(|r| {
            (
                r["dead_id"].as_str().expect("dead_id").to_string(),
                r["new_id"].as_str().expect("new_id").to_string(),
            )
        })
        .collect();
    assert_eq!(
        requeued.iter().map(|r| &r.0).collect::<Vec<_>>(),
        dead_ids.iter().collect::<Vec<_>>()
    );
    let stream_ids: Vec<String> = cmd::<Entries>(&mut c, &["XRANGE", &k, "-", "+"])
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let new_ids: Vec<String> = requeued.iter().map(|r| r.1.clone()).collect();
    assert_eq!(stream_ids, [ids.clone(), new_ids.clone()].concat());
    let mut messages = pubsub.on_message();
    for (i, new_id) in new_ids.iter().enumerate() {
        let old = envelope(&mut c, BTC, &ids[i]).await;
        let new = envelope(&mut c, BTC, new_id).await;
        assert_eq!(
            new,
            old.replace(
                &format!("\"id\":\"{}\"", ids[i]),
                &format!("\"id\":\"{new_id}\"")
            ),
            "the same envelope with its new id"
        );
        let msg = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("published in time")
            .expect("a message");
        let payload: String = msg.get_payload().expect("payload");
        assert_eq!(payload, new, "published as appended, in order");
    }
    drop(messages);
    let dead_len: u64 = cmd(&mut c, &["XLEN", &dead(BTC)]).await;
    assert_eq!(dead_len, 0);
    let (status, body) = post(
        &executor,
        &format!("/api/streams/{BTC}/dlq/requeue"),
        json!({"id": dead_ids[0]}),
    )
    .await;
    assert_eq!((status, body["error"].is_string()), (404, true), "{body}");
    let (status, _) = post(
        &executor,
        &format!("/api/streams/{BTC}/dlq/requeue"),
        json!({"id": dead_ids[0], "all": true}),
    )
    .await;
    assert_eq!(status, 400);

    // The monitor's gauges follow.
    wait_until(
        "the stream gauges show the requeued entries",
        WAIT,
        || async {
            let text = metrics(&executor).await;
            metric_in(
                &text,
                &format!("mdbridge_stream_length{{channel=\"{BTC}\"}}"),
            ) == 8.0
                && metric_in(
                    &text,
                    &format!("mdbridge_stream_dead_letter_length{{channel=\"{BTC}\"}}"),
                ) == 0.0
                && text.contains(&format!(
                    "mdbridge_stream_dead_letter_length{{channel=\"{BTC}\"}} 0"
                ))
                && metric_in(
                    &text,
                    &format!("mdbridge_stream_pending{{channel=\"{BTC}\",group=\"g1\"}}"),
                ) == 2.0
                && metric_in(
                    &text,
                    &format!("mdbridge_stream_lag{{channel=\"{BTC}\",group=\"g1\"}}"),
                ) == 5.0
                && metric_in(
                    &text,
                    &format!("mdbridge_stream_length{{channel=\"{ETH}\"}}"),
                ) == eth.len() as f64
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_endpoints_want_the_admin_token_and_say_503_when_redis_is_down() {
    let mut redis = RedisServer::start();
    let mut c = conn(&redis).await;
    append(&mut c, BTC, 1).await;
    let (h, b) = (free_port(), free_port());
    let config = executor_config(&redis, h, b, "").replace(
        &format!("[http]\nlisten = \"127.0.0.1:{h}\"\n"),
        &format!("[http]\nlisten = \"127.0.0.1:{h}\"\ntoken = \"s3cret\"\n"),
    );
    let executor = Proc::role("executor", &config, h, Some(b));
    let client = reqwest::Client::new();
    let send = |method: reqwest::Method, path: String, token: Option<&'static str>| {
        let mut req = client
            .request(method, executor.http_url(&path))
            .header("content-type", "application/json")
            .body("{\"all\":true}");
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            match req.send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    wait_until("admin HTTP up", WAIT, || async {
        send(reqwest::Method::GET, "/api/streams".into(), Some("s3cret")).await == 200
    })
    .await;
    let requeue = format!("/api/streams/{BTC}/dlq/requeue");
    for (method, path) in [
        (reqwest::Method::GET, "/api/streams".to_string()),
        (reqwest::Method::GET, format!("/api/streams/{BTC}")),
        (reqwest::Method::GET, format!("/api/streams/{BTC}/dlq")),
        (reqwest::Method::POST, requeue.clone()),
    ] {
        assert_eq!(
            send(method.clone(), path.clone(), None).await,
            401,
            "{path}"
        );
        assert_eq!(
            send(method, path.clone(), Some("s3cret")).await,
            200,
            "{path}"
        );
    }
    redis.kill();
    assert_eq!(
        send(
            reqwest::Method::GET,
            format!("/api/streams/{BTC}"),
            Some("s3cret")
        )
        .await,
        503
    );
}
